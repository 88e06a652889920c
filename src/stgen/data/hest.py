"""HEST-1k samples (``st/<id>.h5ad``, ``wsis/<id>.tif``, ``metadata/<id>.json``)."""

from __future__ import annotations

import os
import re
from pathlib import Path
import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from stgen.errors import InputError
from stgen.data.common import GRIDS
from stgen.data.common import _anndata_counts
from stgen.data.common import _assemble
from stgen.data.common import _flag_column
from stgen.data.common import _float_column
from stgen.data.common import _image_info
from stgen.data.common import _int_column
from stgen.data.common import _pos_float
from stgen.data.common import _read_json
from stgen.data.common import _spot_ids
from stgen.data.common import read_anndata


# --------------------------------------------------------------------------- HEST-1k

#: HEST-1k ``st_technology`` (lower case) -> grid
_HEST_TECH = {"visium": "hex", "spatial transcriptomics": "square"}


def _hest_paths(root: Path, sample_id: str) -> tuple[Path, Path, Path | None]:
    st = root / "st" / f"{sample_id}.h5ad"
    meta = root / "metadata" / f"{sample_id}.json"
    wsi = None
    for ext in (".tif", ".tiff"):
        p = root / "wsis" / f"{sample_id}{ext}"
        if p.is_file():
            wsi = p
            break
    return st, meta, wsi


def _hest_technology(meta: dict, path: Path) -> tuple[str, str]:
    tech = meta.get("st_technology")
    if not tech or not isinstance(tech, str):
        raise InputError(f"{path}: no 'st_technology' field")
    key = " ".join(tech.strip().lower().replace("_", " ").split())
    grid = _HEST_TECH.get(key)
    if grid is None:
        raise InputError(
            f"{path}: st_technology {tech!r} is not supported for spot-level training "
            "(supported: 'Visium', 'Spatial Transcriptomics')"
        )
    return tech, grid


def _hest_obs_filter(a: ad.AnnData, path: Path) -> np.ndarray:
    if "in_tissue" in a.obs.columns:
        keep = _flag_column(a.obs["in_tissue"], str(path), "in_tissue")
        if not keep.any():
            raise InputError(f"{path}: no spot has in_tissue == 1")
        return keep
    return np.ones(a.n_obs, dtype=bool)


def _hest_counts(root: Path, sample_id: str) -> tuple[sp.csr_matrix, pd.Index, list[str]]:
    """In-tissue raw counts, spot ids and genes of a HEST sample (no metadata needed)."""
    st, _, _ = _hest_paths(root, sample_id)
    a = read_anndata(st)
    keep = _hest_obs_filter(a, st)
    spots = _spot_ids(a.obs_names, str(st))
    X, genes = _anndata_counts(a, st)
    return X[keep], spots[keep], genes


def read_hest_sample(
    root: str | os.PathLike,
    sample_id: str,
    mpp: float | None = None,
    require_image: bool = False,
) -> ad.AnnData:
    """Read one HEST-1k sample (``st/<id>.h5ad``, ``metadata/<id>.json``, ``wsis/<id>.tif``).

    * Spots: ``in_tissue`` truthy rows when that column exists.
    * Coordinates: ``obsm['spatial']`` = (``pxl_col_in_fullres``,
      ``pxl_row_in_fullres``), falling back to those ``obs`` columns.
    * Array coordinates: Visium ``array_x = array_col``, ``array_y = array_row``;
      legacy ST samples follow HEST's convention of deriving ``array_row`` /
      ``array_col`` from the first / second number of the ``"<x>x<y>"`` spot id,
      so ``array_x = array_row``, ``array_y = array_col`` (and the id is parsed
      when those columns are missing).
    * Counts: ``layers['counts']`` if present, else ``.X`` (must be raw counts).
    * Grid from ``st_technology``: ``Visium`` -> hex, ``Spatial Transcriptomics``
      -> square; spacing / diameter from ``inter_spot_dist`` / ``spot_diameter``
      when present, else 100/55 (hex) or 200/100 (square).
    * mpp, first available: the ``mpp`` argument; metadata
      ``pixel_size_um_estimated`` (what HEST itself uses); metadata
      ``pixel_size_um_embedded``; the WSI's embedded resolution.

    Raises
    ------
    InputError : missing/corrupt files, unsupported technology (Xenium, Visium
        HD, ...), bad counts or coordinates, no mpp, wrong coordinate scale,
        spots outside the image (or outside ``fullres_px_width/height`` when the
        WSI is absent), ``require_image`` without a WSI.
    """
    root = Path(root)
    st, meta_path, wsi = _hest_paths(root, sample_id)
    if not st.is_file():
        raise InputError(f"{st}: HEST sample {sample_id!r} not found (no st/{sample_id}.h5ad)")
    meta = _read_json(meta_path, "HEST metadata")
    tech, grid = _hest_technology(meta, meta_path)
    default_spacing, default_diam = GRIDS[grid]
    spacing = _pos_float(meta.get("inter_spot_dist")) or default_spacing
    diameter = _pos_float(meta.get("spot_diameter")) or default_diam
    if require_image and wsi is None:
        raise InputError(f"HEST sample {sample_id!r} has no image {root / 'wsis' / (sample_id + '.tif')}")

    a = read_anndata(st)
    keep = _hest_obs_filter(a, st)  # out-of-tissue rows are dropped before any check
    spots = _spot_ids(a.obs_names, str(st))[keep]
    obs = a.obs.loc[keep]

    # pixel coordinates
    if "spatial" in a.obsm:
        raw = np.asarray(a.obsm["spatial"])
        if raw.ndim != 2 or raw.shape[1] < 2:
            raise InputError(f"{st}: obsm['spatial'] must have shape (n_spots, 2), got {raw.shape}")
        raw, names = raw[keep], ("obsm['spatial'][:, 0]", "obsm['spatial'][:, 1]")
    elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(obs.columns):
        raw = obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
        names = ("pxl_col_in_fullres", "pxl_row_in_fullres")
    else:
        raise InputError(
            f"{st}: no spot coordinates (neither obsm['spatial'] nor obs "
            "'pxl_col_in_fullres'/'pxl_row_in_fullres')"
        )
    pixel_xy = np.column_stack([_float_column(raw[:, i], str(st), names[i], spots) for i in (0, 1)])

    # array coordinates
    cols = set(obs.columns)
    if {"array_row", "array_col"} <= cols:
        r = _int_column(obs["array_row"], str(st), "array_row")
        c = _int_column(obs["array_col"], str(st), "array_col")
        array_xy = np.column_stack([r, c] if grid == "square" else [c, r])
    elif grid == "square" and all(re.fullmatch(r"-?\d+(\.\d+)?x-?\d+(\.\d+)?", s) for s in spots):
        parts = [s.split("x") for s in spots]
        array_xy = np.array([[round(float(p[0])), round(float(p[1]))] for p in parts], dtype=np.int64)
    else:
        raise InputError(f"{st}: missing obs columns 'array_row'/'array_col'")

    X, genes = _anndata_counts(a, st)
    X = X[keep]

    # mpp
    image_wh = None
    if wsi is not None:
        w, h, wsi_mpp = _image_info(wsi)
        image_wh = (w, h)
    else:
        wsi_mpp = None
        fw, fh = _pos_float(meta.get("fullres_px_width")), _pos_float(meta.get("fullres_px_height"))
        if fw and fh:
            image_wh = (int(fw), int(fh))
    if mpp is not None:
        m, m_src = _pos_float(mpp), "argument"
        if m is None:
            raise InputError(f"mpp must be a positive number, got {mpp!r}")
    elif _pos_float(meta.get("pixel_size_um_estimated")):
        m, m_src = _pos_float(meta["pixel_size_um_estimated"]), "metadata pixel_size_um_estimated"
    elif _pos_float(meta.get("pixel_size_um_embedded")):
        m, m_src = _pos_float(meta["pixel_size_um_embedded"]), "metadata pixel_size_um_embedded"
    elif wsi_mpp is not None:
        m, m_src = wsi_mpp, "image resolution tags"
    else:
        raise InputError(
            f"{meta_path}: no pixel size (pixel_size_um_estimated / pixel_size_um_embedded) and "
            f"{'no resolution in ' + str(wsi) if wsi is not None else 'no WSI'}; pass mpp= "
            "(microns per full-resolution pixel)"
        )

    return _assemble(
        X, spots, genes, array_xy, pixel_xy,
        where=str(st), section=sample_id, image=wsi,
        image_wh=image_wh,
        image_name=wsi.name if wsi is not None else f"fullres_px_width/height of {meta_path.name}",
        mpp=m, mpp_source=m_src, grid=grid, spacing_um=spacing, diameter_um=diameter,
        source=f"hest:{tech}",
    )
