"""Any ``.h5ad`` section with ``obsm['spatial']`` (full-resolution pixels) and an H&E image."""

from __future__ import annotations

import os
from pathlib import Path
import anndata as ad
import numpy as np
from stgen.errors import InputError
from stgen.data.common import GRIDS
from stgen.data.common import VISIUM_SPOT_DIAMETER_UM
from stgen.data.common import _anndata_counts
from stgen.data.common import _assemble
from stgen.data.common import _check_grid
from stgen.data.common import _float_column
from stgen.data.common import _image_and_mpp_override
from stgen.data.common import _int_column
from stgen.data.common import _meta_str
from stgen.data.common import _pos_float
from stgen.data.common import _resolve_image
from stgen.data.common import _spot_ids
from stgen.data.common import read_anndata


# --------------------------------------------------------------------------- generic h5ad


def _visium_scalefactors(a: ad.AnnData) -> dict | None:
    spatial = a.uns.get("spatial")
    if not isinstance(spatial, dict):
        return None
    for lib in spatial.values():
        if isinstance(lib, dict) and isinstance(lib.get("scalefactors"), dict):
            if _pos_float(lib["scalefactors"].get("spot_diameter_fullres")):
                return lib["scalefactors"]
    return None


def read_h5ad_section(
    path: str | os.PathLike,
    image: str | os.PathLike | None = None,
    mpp: float | None = None,
    section: str | None = None,
    grid: str | None = None,
    require_image: bool = False,
) -> ad.AnnData:
    """Read a generic AnnData section with ``obsm['spatial']`` in full-resolution pixels.

    * Counts: ``layers['counts']`` if present, else ``.X``; raw non-negative
      integers are required.
    * Image: ``image`` argument, else ``uns['stgen']['image_path']`` if that file exists.
    * mpp, first available: argument; ``uns['stgen']['mpp']``;
      ``55 / uns['spatial'][lib]['scalefactors']['spot_diameter_fullres']``
      (Visium); the image's embedded resolution.
    * Grid: argument; ``uns['stgen']['grid']``; ``"hex"`` when Visium
      scalefactors exist. Spacing/diameter: ``uns['stgen']`` values if present,
      else those of the grid.
    * Array coordinates: obs ``array_x``/``array_y``, else ``array_col``/``array_row``,
      else -1.
    * Section name: argument, else ``uns['stgen']['section']``, else the file stem.

    Raises
    ------
    InputError : missing/corrupt file, no/invalid ``obsm['spatial']``, bad
        counts (naming the layer), no mpp, no grid, wrong coordinate scale
        (e.g. hires-image pixels), spots outside the image.
    """
    path = Path(path)
    a = read_anndata(path)
    meta = a.uns.get("stgen") if isinstance(a.uns.get("stgen"), dict) else {}
    section = section or _meta_str(meta, "section") or path.stem
    meta_image = _meta_str(meta, "image_path")
    if image is None and meta_image and Path(meta_image).is_file():
        image = meta_image
    img = _resolve_image(image, require_image, f"section {section!r} ({path})")

    spots = _spot_ids(a.obs_names, str(path))
    if "spatial" not in a.obsm:
        raise InputError(f"{path}: no obsm['spatial'] (spot centres in full-resolution pixels)")
    xy = np.asarray(a.obsm["spatial"])
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.issubdtype(xy.dtype, np.number):
        raise InputError(f"{path}: obsm['spatial'] must be a numeric (n_spots, 2) array, got shape {xy.shape}")
    pixel_xy = np.column_stack([
        _float_column(xy[:, 0], str(path), "obsm['spatial'][:, 0]", spots),
        _float_column(xy[:, 1], str(path), "obsm['spatial'][:, 1]", spots),
    ])
    cols = set(a.obs.columns)
    if {"array_x", "array_y"} <= cols:
        array_xy = np.column_stack([
            _int_column(a.obs["array_x"], str(path), "array_x"),
            _int_column(a.obs["array_y"], str(path), "array_y"),
        ])
    elif {"array_col", "array_row"} <= cols:
        array_xy = np.column_stack([
            _int_column(a.obs["array_col"], str(path), "array_col"),
            _int_column(a.obs["array_row"], str(path), "array_row"),
        ])
    else:
        array_xy = np.full((a.n_obs, 2), -1, dtype=np.int64)

    X, genes = _anndata_counts(a, path)

    sf = _visium_scalefactors(a)
    if grid is not None:
        g = _check_grid(grid, str(path))
    elif meta.get("grid") is not None and not (isinstance(meta["grid"], str) and not meta["grid"].strip()):
        g = _check_grid(meta["grid"], f"{path}: uns['stgen']['grid']")
    elif sf is not None:
        g = "hex"
    else:
        raise InputError(
            f"{path}: unknown spot grid (no uns['stgen']['grid'] and no Visium scalefactors); "
            "pass grid='hex' (Visium) or grid='square' (legacy ST)"
        )
    spacing = _pos_float(meta.get("spot_spacing_um")) or GRIDS[g][0]
    diameter = _pos_float(meta.get("spot_diameter_um")) or GRIDS[g][1]

    image_wh, img_mpp, m, m_src = _image_and_mpp_override(img, mpp)  # the mpp argument wins
    if m is None and _pos_float(meta.get("mpp")):
        m, m_src = _pos_float(meta["mpp"]), "uns['stgen']['mpp']"
    elif m is None and sf is not None:
        m = VISIUM_SPOT_DIAMETER_UM / _pos_float(sf["spot_diameter_fullres"])
        m_src = "uns['spatial'] spot_diameter_fullres"
    elif m is None and img_mpp is not None:
        m, m_src = img_mpp, "image resolution tags"
    elif m is None:
        raise InputError(
            f"{path}: no microns-per-pixel (no uns['stgen']['mpp'], no Visium scalefactors"
            f"{', no resolution in ' + img.name if img is not None else ', no image'}); pass mpp="
        )
    return _assemble(
        X, spots, genes, array_xy, pixel_xy,
        where=str(path), section=section, image=img, image_wh=image_wh,
        mpp=m, mpp_source=m_src, grid=g, spacing_um=spacing, diameter_um=diameter,
        source="h5ad",
    )
