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
from stgen.data.common import downsampled_scale
from stgen.data.common import read_anndata
from stgen.data.common import warn_downsampled
from stgen.image.scaled import SlideRef


# --------------------------------------------------------------------------- images in uns['spatial']


def _spatial_library(a: ad.AnnData, where: str) -> tuple[str, dict] | None:
    """The ``(library_id, uns['spatial'][library_id])`` holding images, or None; with several, the one named by a
    single ``obs['library_id']`` value, else InputError listing them."""
    spatial = a.uns.get("spatial")
    if not isinstance(spatial, dict):
        return None
    libs = {k: v for k, v in spatial.items() if isinstance(v, dict) and isinstance(v.get("images"), dict)
            and any(np.ndim(im) in (2, 3) for im in v["images"].values())}
    if len(libs) > 1 and "library_id" in a.obs.columns and a.obs["library_id"].nunique() == 1:
        libs = {k: v for k, v in libs.items() if k == str(a.obs["library_id"].iloc[0])}
    if len(libs) > 1:
        raise InputError(f"{where}: uns['spatial'] holds images of several libraries ({', '.join(sorted(libs))}); "
                         "keep one library per section (adata[adata.obs['library_id'] == ...])")
    return next(iter(libs.items())) if libs else None


def _rgb_uint8(im: np.ndarray, where: str) -> np.ndarray:
    """An image array as scanpy stores it (float in [0, 1] from ``imread``, or uint8; gray, RGB or RGBA) as
    uint8 RGB (alpha composited over white)."""
    a = np.asarray(im)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise InputError(f"{where}: not an image array (shape {a.shape}, dtype {a.dtype})")
    if not np.issubdtype(a.dtype, np.integer):
        a = np.asarray(a, dtype=np.float64)
        if not np.isfinite(a).all():
            raise InputError(f"{where}: image holds non-finite values")
        a = np.round(np.clip(a * 255.0 if a.max() <= 1.0 else a, 0, 255))
    a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[2] == 4:
        al = a[:, :, 3:].astype(np.uint16)
        a = ((a[:, :, :3].astype(np.uint16) * al + 255 * (255 - al) + 127) // 255).astype(np.uint8)
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else np.ascontiguousarray(a)


def materialise_image(rgb: np.ndarray, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write an in-memory RGB uint8 image as ``<cache>/images/<sha256>.png`` (content-addressed, atomic, reused
    when present) so it can be read like any image file; ``cache_dir`` default ``$STGEN_CACHE`` or
    ``./.stgen_cache``."""
    import hashlib
    from PIL import Image

    from stgen.utils.io import atomic_path, default_cache_dir

    h = hashlib.sha256(repr(rgb.shape).encode() + np.ascontiguousarray(rgb).tobytes()).hexdigest()
    path = Path(cache_dir or default_cache_dir()) / "images" / f"{h}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".png") as tmp:
            Image.fromarray(rgb).save(tmp, format="PNG")
    return path


def anndata_image(a: ad.AnnData, where: str, cache_dir: str | os.PathLike | None = None
                  ) -> tuple[SlideRef, tuple[int, int], str] | None:
    """The largest image of ``uns['spatial'][library]['images']`` (scanpy/squidpy ``read_visium``: ``hires``,
    ``lowres``) as a :class:`~stgen.image.scaled.SlideRef` at its scale factor
    (``scalefactors['tissue_<name>_scalef']``, image pixels per full-resolution pixel), its ``(w, h)`` and a
    description, or None when there is none. The array is written once to a PNG (:func:`materialise_image`).

    InputError naming ``where`` and the field for a missing, zero or negative scale factor, or several libraries.
    """
    found = _spatial_library(a, where)
    if found is None:
        return None
    lib_id, lib = found
    images = {k: v for k, v in lib["images"].items() if np.ndim(v) in (2, 3)}
    name = max(images, key=lambda k: np.shape(images[k])[0] * np.shape(images[k])[1])
    field = f"tissue_{name}_scalef"
    scale = downsampled_scale(lib.get("scalefactors") or {}, field, f"{where}: uns['spatial'][{lib_id!r}]['scalefactors']")
    rgb = _rgb_uint8(images[name], f"{where}: uns['spatial'][{lib_id!r}]['images'][{name!r}]")
    path = materialise_image(rgb, cache_dir)
    return SlideRef(path, scale), (rgb.shape[1], rgb.shape[0]), f"uns['spatial'][{lib_id!r}]['images'][{name!r}]"


def anndata_mpp(a: ad.AnnData) -> tuple[float | None, str | None]:
    """Microns per full-resolution pixel recorded in an AnnData and where from: ``uns['stgen']['mpp']``, else
    ``55 / spot_diameter_fullres`` of Visium scale factors in ``uns['spatial']``; ``(None, None)`` without."""
    meta = a.uns.get("stgen") if isinstance(a.uns.get("stgen"), dict) else {}
    if _pos_float(meta.get("mpp")):
        return _pos_float(meta["mpp"]), "uns['stgen']['mpp']"
    sf = visium_scalefactors(a)
    if sf is not None:
        return VISIUM_SPOT_DIAMETER_UM / _pos_float(sf["spot_diameter_fullres"]), "uns['spatial'] spot_diameter_fullres"
    return None, None


def has_embedded_image(path: str | os.PathLike) -> bool:
    """Whether an ``.h5ad`` file holds an image array under ``uns/spatial/<library>/images`` (read with h5py,
    without loading the AnnData)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            sp_ = f.get("uns/spatial")
            return sp_ is not None and any(
                isinstance(lib, h5py.Group) and isinstance(lib.get("images"), h5py.Group)
                and any(isinstance(d, h5py.Dataset) and d.ndim in (2, 3) for d in lib["images"].values())
                for lib in sp_.values())
    except (OSError, KeyError, TypeError):
        return False


# --------------------------------------------------------------------------- generic h5ad


def visium_scalefactors(a: ad.AnnData) -> dict | None:
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
    * Image: ``image`` argument, else ``uns['stgen']['image_path']`` if that file exists, else the largest
      image in ``uns['spatial'][library]['images']`` (scanpy/squidpy ``read_visium``: ``hires``) at its scale
      factor (:func:`anndata_image`; ``uns['stgen']['image_scale']``), with a
      :class:`~stgen.errors.LowResolutionImageWarning` naming the resolution used.
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
    embedded = None
    if image is None and (embedded := anndata_image(a, str(path))) is not None:
        image = embedded[0].path
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

    sf = visium_scalefactors(a)
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
    scale = embedded[0].scale if embedded is not None else 1.0
    if embedded is not None:
        img_mpp = None  # a PNG has no scan resolution
    if m is None:
        m, m_src = anndata_mpp(a)
    if m is None and img_mpp is not None:
        m, m_src = img_mpp, "image resolution tags"
    if m is None:
        raise InputError(
            f"{path}: no microns-per-pixel (no uns['stgen']['mpp'], no Visium scalefactors"
            f"{', no resolution in ' + img.name if img is not None else ', no image'}); pass mpp="
        )
    if embedded is not None:
        warn_downsampled(section, embedded[2], image_wh, scale, m)
    return _assemble(
        X, spots, genes, array_xy, pixel_xy,
        where=str(path), section=section, image=img, image_wh=image_wh, image_scale=scale,
        image_name=embedded[2] if embedded is not None else None,
        mpp=m, mpp_source=m_src, grid=g, spacing_um=spacing, diameter_um=diameter,
        source="h5ad",
    )
