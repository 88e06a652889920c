"""Readers for spot-level spatial transcriptomics data sets beyond Her2ST.

Every reader returns one section as an AnnData with the layout of
:func:`stgen.data.her2st.read_section`:

* ``.X`` CSR float32 raw counts; ``obs_names`` spot ids; ``var_names`` unique
  gene symbols (duplicated symbols are summed, first-seen order);
* ``.obs`` columns ``array_x``, ``array_y`` (int; lattice column / row, ``-1``
  when the input has none), ``pixel_x``, ``pixel_y`` (float, full-resolution
  pixels, ``x`` = image column) and ``section``;
* ``.obsm['spatial']`` float64 ``(n, 2)`` = ``(pixel_x, pixel_y)``;
* ``.uns['stgen']`` = dict(section, image_path (str or None), mpp (um per
  full-resolution pixel), spot_diameter_um, spot_spacing_um, source, grid
  (``"hex"`` for Visium: 55 um spots 100 um apart; ``"square"`` for legacy
  Spatial Transcriptomics: 100 um spots 200 um apart) and mpp_source (where the
  mpp came from)).

Supported inputs
----------------
* **HEST-1k** (:func:`read_hest_sample`)::

      <root>/st/<id>.h5ad          counts; obsm['spatial'] = (pxl_col_in_fullres, pxl_row_in_fullres)
      <root>/metadata/<id>.json    st_technology, pixel_size_um_estimated, pixel_size_um_embedded,
                                   inter_spot_dist, spot_diameter, fullres_px_width/height, ...
      <root>/wsis/<id>.tif         pyramidal full-resolution H&E (optional for expression-only use)

* **10x Space Ranger** ``outs/`` folders (:func:`read_spaceranger`)::

      outs/filtered_feature_bc_matrix.h5        (or filtered_feature_bc_matrix/ with
                                                 matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz)
      outs/spatial/tissue_positions.csv         (Space Ranger >= 2.0, with header; or the older
                                                 headerless tissue_positions_list.csv)
      outs/spatial/scalefactors_json.json       spot_diameter_fullres, tissue_hires_scalef, ...

  The full-resolution H&E image is not part of ``outs/`` and is passed
  separately.

* **Generic h5ad** (:func:`read_h5ad_section`): any AnnData with
  ``obsm['spatial']`` in full-resolution pixels of its H&E image.

Data-set folders (:func:`open_dataset`) and their image conventions
-------------------------------------------------------------------
* ``"her2st"``: ``<root>/ST-cnts/`` ... (see :mod:`stgen.data.her2st`).
* ``"hest"``: ``<root>/st/*.h5ad`` + ``<root>/metadata/``; image
  ``<root>/wsis/<id>.tif`` (or ``.tiff``).
* ``"visium"``: ``<root>/<sample>/outs/`` (or ``<root>/<sample>/`` being itself an
  ``outs`` folder; ``<root>`` may also be a single such sample). Section name =
  ``<sample>``. Image: the image file (``.tif .tiff .btf .svs .ndpi .jpg .jpeg
  .png``) lying directly in ``<root>/<sample>/``; if there are several, the one
  whose stem is ``image`` or ``<sample>``; if there is none, a file of
  ``outs/spatial/`` whose name contains ``fullres``. The downsampled
  ``tissue_hires_image.png`` / ``tissue_lowres_image.png`` are never used.
* ``"h5ad"``: ``<root>/<section>.h5ad`` with the image ``<root>/<section>.<ext>``
  beside it (one of the suffixes above; several -> error).

Every user-caused problem is raised as :class:`stgen.errors.InputError` naming
the file and the problem.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stgen.errors import InputError

__all__ = [
    "FORMATS",
    "as_dataset",
    "GRIDS",
    "IMAGE_SUFFIXES",
    "VISIUM_SPOT_DIAMETER_UM",
    "VISIUM_SPOT_SPACING_UM",
    "check_spot_scale",
    "check_spots_in_image",
    "read_10x_counts",
    "read_anndata",
    "read_tissue_positions",
    "read_hest_sample",
    "read_spaceranger",
    "read_h5ad_section",
    "detect_format",
    "Dataset",
    "open_dataset",
]

VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_SPOT_SPACING_UM = 100.0

#: grid name -> (spot_spacing_um, spot_diameter_um)
GRIDS: dict[str, tuple[float, float]] = {
    "hex": (VISIUM_SPOT_SPACING_UM, VISIUM_SPOT_DIAMETER_UM),
    "square": (200.0, 100.0),
}

#: Image suffixes recognised by the data-set folder conventions (lower case).
IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ndpi", ".jpg", ".jpeg", ".png")

#: Data-set formats understood by :func:`open_dataset`.
FORMATS = ("her2st", "hest", "visium", "h5ad")

#: Relative tolerance of :func:`check_spot_scale`.
SCALE_TOLERANCE = 0.25

_GE = "Gene Expression"


# --------------------------------------------------------------------------- helpers


def _pos_float(v: Any) -> float | None:
    """``float(v)`` if it is a finite positive number, else None."""
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _image_info(path: Path) -> tuple[int, int, float | None]:
    """``(width, height, embedded mpp or None)`` of an image, without decoding it.

    JPEG/PNG: header size only (their dpi is a screen setting, so mpp is None);
    anything else through :func:`stgen.slide.open_slide` (TIFF/OME/Aperio/vendor).
    """
    from stgen.patches import image_size
    from stgen.slide import open_slide

    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
        w, h = image_size(path)
        return int(w), int(h), None
    try:
        with open_slide(path) as s:
            w, h, m = int(s.width), int(s.height), s.mpp
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - library errors on bad files become InputError
        raise InputError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    m = _pos_float(m)
    return w, h, m


def read_anndata(path: str | os.PathLike, what: str = "h5ad file") -> ad.AnnData:
    """``anndata.read_h5ad(path)``, with a missing or unreadable file (not HDF5, truncated, not
    an AnnData) raised as InputError naming ``path`` and ``what`` it should be."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ad.read_h5ad(path)
    except Exception as e:  # noqa: BLE001 - corrupt files raise many different library errors
        raise InputError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from e



def _count_matrix(M: Any, where: str, hint: str = "") -> sp.csr_matrix:
    """Validate raw counts (finite, non-negative, integer) and return CSR float32."""
    if M is None:
        raise InputError(f"{where}: no count matrix")
    if sp.issparse(M):
        M = sp.csr_matrix(M)
        vals = M.data
    else:
        try:
            vals = np.asarray(M)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{where}: cannot read the count matrix ({e})") from e
        if vals.ndim != 2:
            raise InputError(f"{where}: count matrix must be 2-D, got shape {vals.shape}")
        M = vals
    if not (np.issubdtype(vals.dtype, np.integer) or np.issubdtype(vals.dtype, np.floating) or vals.dtype == bool):
        raise InputError(f"{where}: non-numeric count matrix (dtype {vals.dtype})")
    if vals.dtype == bool:
        vals = vals.astype(np.uint8)
    if np.issubdtype(vals.dtype, np.floating):
        if np.isnan(vals).any():
            raise InputError(f"{where}: missing/NaN counts{hint}")
        if not np.isfinite(vals).all():
            raise InputError(f"{where}: infinite count values{hint}")
    if (vals < 0).any():
        raise InputError(f"{where}: negative counts (min {vals.min()}){hint}")
    if np.issubdtype(vals.dtype, np.floating) and (vals != np.round(vals)).any():
        bad = vals[vals != np.round(vals)][0]
        raise InputError(f"{where}: non-integer count {bad} (expected raw counts){hint}")
    out = sp.csr_matrix(M, dtype=np.float32)
    out.sum_duplicates()
    out.sort_indices()
    return out


def _sum_duplicate_genes(X: sp.csr_matrix, genes: Iterable[Any], where: str) -> tuple[sp.csr_matrix, list[str]]:
    """Strip symbols, reject empty ones and sum duplicated symbols (first-seen order)."""
    names = [("" if g is None else str(g)).strip() for g in genes]
    if len(names) != X.shape[1]:
        raise InputError(f"{where}: {len(names)} gene names for {X.shape[1]} matrix columns")
    if not names:
        raise InputError(f"{where}: no genes")
    if any(n == "" or n.lower() == "nan" for n in names):
        i = next(i for i, n in enumerate(names) if n == "" or n.lower() == "nan")
        raise InputError(f"{where}: empty gene symbol (column {i})")
    codes, uniq = pd.factorize(pd.Index(names, dtype=object))
    if len(uniq) < len(names):
        S = sp.csr_matrix(
            (np.ones(len(names), np.float32), (np.arange(len(names)), codes)),
            shape=(len(names), len(uniq)),
        )
        X = (X @ S).tocsr()
        X.sort_indices()
    return X, [str(g) for g in uniq]


def _spot_ids(ids: Iterable[Any], where: str) -> pd.Index:
    idx = pd.Index([str(s).strip() for s in ids], dtype=object)
    if len(idx) == 0:
        raise InputError(f"{where}: no spots")
    dup = idx.duplicated()
    if dup.any():
        raise InputError(f"{where}: {int(dup.sum())} duplicated spot id(s), e.g. {idx[dup][0]!r}")
    return idx


def _int_column(values: Any, where: str, name: str) -> np.ndarray:
    v = _to_float(values)
    if not np.isfinite(v).all():
        raise InputError(f"{where}: non-numeric or missing values in column {name!r}")
    if (v != np.round(v)).any():
        raise InputError(f"{where}: column {name!r} must hold integers")
    if (np.abs(v) > 2**31).any():
        raise InputError(f"{where}: value {v[np.abs(v) > 2**31][0]:g} in column {name!r} is out of range")
    return v.astype(np.int64)


def _meta_str(meta: dict, key: str) -> str | None:
    """``str(meta[key])`` when it is a non-empty string or an integer, else None (h5ad metadata can hold
    anything: arrays, dicts, ...)."""
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, (str, int, np.integer)) or not str(v).strip():
        return None
    return str(v)


def _to_float(values: Any) -> np.ndarray:
    """Exact float64 conversion (Python's float() round-trips decimal text); bad cells -> NaN."""
    arr = np.asarray(values)
    if np.issubdtype(arr.dtype, np.number) or arr.dtype == bool:
        return arr.astype(np.float64).ravel()
    out = np.empty(arr.size, dtype=np.float64)
    for i, v in enumerate(arr.ravel().tolist()):
        try:
            out[i] = float(str(v).strip())
        except ValueError:
            out[i] = np.nan
    return out


def _float_column(values: Any, where: str, name: str, ids: pd.Index | None = None) -> np.ndarray:
    v = _to_float(values)
    bad = ~np.isfinite(v)
    if bad.any():
        first = f" (first: {ids[bad][0]!r})" if ids is not None else ""
        raise InputError(
            f"{where}: {int(bad.sum())} missing or non-finite value(s) in {name}{first}"
        )
    return v


def _flag_column(values: Any, where: str, name: str) -> np.ndarray:
    """Parse a 0/1 / bool / 'true'/'false' column into a bool array."""
    s = pd.Series(np.asarray(values))
    if s.dtype == bool:
        return s.to_numpy()
    low = s.astype(str).str.strip().str.lower()
    mapped = low.map({"1": True, "0": False, "true": True, "false": False, "1.0": True, "0.0": False})
    if mapped.isna().any():
        bad = s[mapped.isna()].iloc[0]
        raise InputError(f"{where}: column {name!r} must be 0/1, found {bad!r}")
    return mapped.to_numpy(bool)


# --------------------------------------------------------------------------- geometry checks


#: Plausible centre-to-centre spacings of spot arrays (um): Visium 100, legacy ST 200, with margin.
SPACING_RANGE_UM = (40.0, 500.0)


def check_spot_scale(
    xy_px: np.ndarray,
    mpp: float,
    spacing_um: float | None,
    source: str,
    tolerance: float = SCALE_TOLERANCE,
) -> float:
    """Check that spot coordinates and ``mpp`` agree with the array's spot spacing.

    The median nearest-neighbour distance between spot centres (pixels) times
    ``mpp`` must be within ``tolerance`` (relative) of ``spacing_um``; with
    ``spacing_um=None`` (technology unknown, e.g. a spot file given to predict)
    it must lie in :data:`SPACING_RANGE_UM`, the span of real spot arrays.

    Parameters
    ----------
    xy_px : (n, 2) spot centres in full-resolution pixels.
    mpp : microns per full-resolution pixel.
    spacing_um : expected centre-to-centre spot distance (100 Visium, 200 legacy ST).
    source : file or section named in the error message.

    Returns
    -------
    The measured spacing in microns (NaN with fewer than 2 distinct spots: nothing to check).

    Raises
    ------
    InputError : the measured spacing is off, stating measured and expected
        spacing and the likely cause.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    if len(xy) < 2:
        return float("nan")
    d, _ = cKDTree(xy).query(xy, k=2)
    nn = d[:, 1]
    nn = nn[nn > 0]
    if len(nn) == 0:
        raise InputError(f"{source}: all {len(xy)} spots share the same coordinates")
    measured = float(np.median(nn)) * float(mpp)
    if spacing_um is None:
        lo, hi = SPACING_RANGE_UM
        if lo <= measured <= hi:
            return measured
        spacing_um = lo if measured < lo else hi
    ratio = measured / float(spacing_um)
    if abs(ratio - 1.0) <= tolerance:
        return measured
    if ratio < 1.0:
        cause = (
            f"coordinates look {ratio:.2g}x too small: are they hires/lowres-image pixels "
            "instead of full-resolution pixels, or is the mpp too small?"
        )
    else:
        cause = (
            f"coordinates look {ratio:.2g}x too large: is the mpp that of a downsampled "
            "image, or is the spot grid (hex 100 um / square 200 um) wrong for this technology?"
        )
    raise InputError(
        f"{source}: median spot spacing is {measured:.3g} um ({np.median(nn):.4g} px x "
        f"{mpp:.4g} um/px) but {spacing_um:g} um is expected; {cause}"
    )


def check_spots_in_image(
    xy_px: np.ndarray, spot_ids: Iterable[Any], width: int, height: int, source: str, image_name: str
) -> None:
    """Raise InputError if a spot centre lies outside a ``width`` x ``height`` image."""
    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    bad = (xy[:, 0] < 0) | (xy[:, 0] >= width) | (xy[:, 1] < 0) | (xy[:, 1] >= height)
    if bad.any():
        ids = list(spot_ids)
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{source}: {int(bad.sum())} of {len(xy)} spot(s) lie outside the image "
            f"({width} x {height} px of {image_name}), e.g. {ids[i]!r} at "
            f"(x={xy[i, 0]:.1f}, y={xy[i, 1]:.1f}); are the coordinates for another image "
            "or resolution?"
        )


def _assemble(
    X: sp.csr_matrix,
    spots: pd.Index,
    genes: list[str],
    array_xy: np.ndarray,
    pixel_xy: np.ndarray,
    *,
    where: str,
    section: str,
    image: Path | None,
    image_wh: tuple[int, int] | None,
    image_name: str | None = None,
    mpp: float,
    mpp_source: str,
    grid: str,
    spacing_um: float,
    diameter_um: float,
    source: str,
) -> ad.AnnData:
    """Run the shared geometry checks and build the section AnnData."""
    pixel_xy = np.ascontiguousarray(pixel_xy, dtype=np.float64)
    bad = ~np.isfinite(pixel_xy).all(axis=1)
    if bad.any():
        raise InputError(
            f"{where}: {int(bad.sum())} spot(s) with missing or non-finite pixel coordinates "
            f"(first: {spots[bad][0]!r})"
        )
    check_spot_scale(pixel_xy, mpp, spacing_um, where)
    if image_wh is not None:
        check_spots_in_image(
            pixel_xy, spots, image_wh[0], image_wh[1], where,
            image_name or (image.name if image is not None else "the image"),
        )
    adata = _new_anndata(X, spots, genes)
    adata.obs["array_x"] = np.asarray(array_xy[:, 0], dtype=np.int64)
    adata.obs["array_y"] = np.asarray(array_xy[:, 1], dtype=np.int64)
    adata.obs["pixel_x"] = pixel_xy[:, 0].copy()
    adata.obs["pixel_y"] = pixel_xy[:, 1].copy()
    adata.obs["section"] = section
    adata.obsm["spatial"] = pixel_xy
    adata.uns["stgen"] = {
        "section": section,
        "image_path": str(image) if image is not None else None,
        "mpp": float(mpp),
        "spot_diameter_um": float(diameter_um),
        "spot_spacing_um": float(spacing_um),
        "source": source,
        "grid": grid,
        "mpp_source": mpp_source,
    }
    return adata


def _new_anndata(X: sp.csr_matrix, spots: Iterable[Any], genes: Iterable[str]) -> ad.AnnData:
    obs = pd.DataFrame(index=pd.Index(list(spots), dtype=str))
    var = pd.DataFrame(index=pd.Index(list(genes), dtype=str))
    return ad.AnnData(X=X, obs=obs, var=var)


def _counts_anndata(X: sp.csr_matrix, spots: pd.Index, genes: list[str], section: str) -> ad.AnnData:
    a = _new_anndata(X, spots, genes)
    a.obs["section"] = section
    return a


def _resolve_image(image: str | os.PathLike | None, require_image: bool, what: str) -> Path | None:
    if image is None:
        if require_image:
            raise InputError(f"{what} has no H&E image")
        return None
    p = Path(image)
    if not p.is_file():
        raise InputError(f"{p}: image file not found")
    return p


def _check_grid(grid: Any, where: str) -> str:
    g = str(grid).strip().lower()
    if g not in GRIDS:
        raise InputError(f"{where}: unknown spot grid {grid!r}; use 'hex' (Visium) or 'square' (legacy ST)")
    return g


# --------------------------------------------------------------------------- AnnData counts


def _anndata_counts(adata: ad.AnnData, path: Path) -> tuple[sp.csr_matrix, list[str]]:
    """Raw counts of an AnnData: ``layers['counts']`` if present, else ``.X``."""
    if "counts" in adata.layers:
        M, name = adata.layers["counts"], "layers['counts']"
        hint = ""
    else:
        M, name = adata.X, ".X"
        hint = "; store raw counts in .X or layers['counts']"
    X = _count_matrix(M, f"{path}: {name}", hint)
    return _sum_duplicate_genes(X, adata.var_names, str(path))


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


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        with path.open("r", encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise InputError(f"{path}: {what} must be a JSON object")
    return d


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


# --------------------------------------------------------------------------- Space Ranger


def _image_and_mpp_override(img: Path | None, mpp: Any) -> tuple[tuple[int, int] | None, float | None,
                                                                  float | None, str | None]:
    """``(image (w, h) or None, the image's embedded mpp, mpp argument, "argument")``; the argument's pair is
    ``(None, None)`` when ``mpp`` is None. InputError for a non-positive ``mpp``."""
    image_wh, img_mpp = None, None
    if img is not None:
        w, h, img_mpp = _image_info(img)
        image_wh = (w, h)
    if mpp is None:
        return image_wh, img_mpp, None, None
    m = _pos_float(mpp)
    if m is None:
        raise InputError(f"mpp must be a positive number, got {mpp!r}")
    return image_wh, img_mpp, m, "argument"


def _read_10x_h5(path: Path) -> tuple[sp.csr_matrix, pd.Index, list[str], np.ndarray]:
    """barcodes x features CSR, barcodes, feature names, feature types from a 10x HDF5 (v3)."""
    import h5py

    def dec(a: np.ndarray) -> list[str]:
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in a.tolist()]

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{path}: not a readable HDF5 file ({e})") from e
    try:
        with f:
            if "matrix" not in f:
                raise InputError(
                    f"{path}: no 'matrix' group; not a 10x HDF5 feature-barcode matrix "
                    "(expected matrix/{data,indices,indptr,shape,barcodes,features/name})"
                )
            g = f["matrix"]
            need = ["data", "indices", "indptr", "shape", "barcodes", "features"]
            miss = [k for k in need if k not in g]
            if not miss and "name" not in g["features"]:
                miss = ["features/name"]
            if miss:
                raise InputError(f"{path}: 10x HDF5 matrix lacks {', '.join('matrix/' + m for m in miss)}")
            data, indices, indptr = g["data"][()], g["indices"][()], g["indptr"][()]
            shape = tuple(int(v) for v in g["shape"][()])
            barcodes = dec(g["barcodes"][()])
            fg = g["features"]
            names = dec(fg["name"][()])
            ftype = np.array(dec(fg["feature_type"][()]) if "feature_type" in fg else [_GE] * len(names))
    except InputError:
        raise
    except (OSError, KeyError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise InputError(f"{path}: corrupt 10x HDF5 matrix ({type(e).__name__}: {e})") from e
    if len(shape) != 2 or shape != (len(names), len(barcodes)):
        raise InputError(
            f"{path}: matrix/shape {shape} does not match {len(names)} features x {len(barcodes)} barcodes"
        )
    try:
        M = sp.csc_matrix((data, indices, indptr), shape=shape)
        M.check_format(full_check=True)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: malformed sparse matrix ({e})") from e
    if len(ftype) != len(names):
        raise InputError(f"{path}: features/feature_type and features/name differ in length")
    return _count_matrix(M.T, str(path)), pd.Index(barcodes), names, ftype


def _open_maybe_gz(path: Path):
    with path.open("rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else path.open("rb")


def _find(d: Path, *names: str) -> Path | None:
    for n in names:
        if (d / n).is_file():
            return d / n
    return None


def _read_10x_mtx(d: Path) -> tuple[sp.csr_matrix, pd.Index, list[str], np.ndarray]:
    import scipy.io

    mtx = _find(d, "matrix.mtx.gz", "matrix.mtx")
    feat = _find(d, "features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
    bcs = _find(d, "barcodes.tsv.gz", "barcodes.tsv")
    expected = (("matrix.mtx.gz", mtx), ("features.tsv.gz", feat), ("barcodes.tsv.gz", bcs))
    missing = [n for n, p in expected if p is None]
    if missing:
        raise InputError(f"{d}: missing {', '.join(missing)}")
    try:
        with _open_maybe_gz(mtx) as f:
            M = scipy.io.mmread(f)
    except Exception as e:  # noqa: BLE001 - scipy's parsers raise many types on bad input
        raise InputError(f"{mtx}: not a readable Matrix Market file ({type(e).__name__}: {e})") from e

    def table(p: Path) -> pd.DataFrame:
        try:
            with _open_maybe_gz(p) as f:
                return pd.read_csv(f, sep="\t", header=None, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError as e:
            raise InputError(f"{p}: empty file") from e
        except (OSError, EOFError, zlib.error, UnicodeDecodeError, pd.errors.ParserError) as e:
            raise InputError(f"{p}: unreadable table ({type(e).__name__}: {e})") from e

    ft = table(feat)
    bc = table(bcs)
    if ft.shape[1] < 2:
        raise InputError(f"{feat}: expected columns id, name[, feature_type]")
    names = ft.iloc[:, 1].tolist()
    ftype = ft.iloc[:, 2].to_numpy(dtype=str) if ft.shape[1] >= 3 else np.array([_GE] * len(names))
    barcodes = pd.Index(bc.iloc[:, 0].astype(str))
    if M.ndim != 2 or M.shape != (len(names), len(barcodes)):
        raise InputError(
            f"{mtx}: matrix is {M.shape[0]} x {M.shape[1]} but there are {len(names)} features "
            f"({feat.name}) and {len(barcodes)} barcodes ({bcs.name})"
        )
    return _count_matrix(sp.csr_matrix(M).T, str(mtx)), barcodes, names, ftype


def read_10x_counts(path: str | os.PathLike) -> ad.AnnData:
    """Read a 10x feature-barcode matrix: an ``.h5`` file (HDF5 v3) or an MEX folder.

    Only ``Gene Expression`` features are kept (all of them when there is no
    ``feature_type``); symbols come from ``features/name`` (column 2 of
    ``features.tsv.gz``), duplicated symbols are summed.

    Returns
    -------
    AnnData barcodes x genes, ``.X`` CSR float32 raw counts.

    Raises
    ------
    InputError : missing/corrupt/truncated file, inconsistent shapes, no gene
        expression features, bad counts.
    """
    p = Path(path)
    if p.is_dir():
        X, bcs, names, ftype = _read_10x_mtx(p)
    elif p.is_file():
        X, bcs, names, ftype = _read_10x_h5(p)
    else:
        raise InputError(f"{p}: feature-barcode matrix not found")
    ge = ftype == _GE
    if not ge.any():
        raise InputError(f"{p}: no '{_GE}' features (feature types: {sorted(set(ftype.tolist()))})")
    if not ge.all():
        X = X[:, np.flatnonzero(ge)].tocsr()
        names = [n for n, k in zip(names, ge) if k]
    X, genes = _sum_duplicate_genes(X, names, str(p))
    spots = _spot_ids(bcs, str(p))
    return _new_anndata(X, spots, genes)


_POS_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def read_tissue_positions(spatial_dir: str | os.PathLike) -> pd.DataFrame:
    """Read ``spatial/tissue_positions.csv`` (header) or ``tissue_positions_list.csv`` (no header).

    Returns
    -------
    DataFrame indexed by barcode with int ``in_tissue``, ``array_row``,
    ``array_col`` and float ``pxl_row_in_fullres`` (y), ``pxl_col_in_fullres``
    (x); all rows (not filtered).

    Raises
    ------
    InputError : missing file, missing columns, non-numeric values, duplicated barcodes.
    """
    d = Path(spatial_dir)
    path = _find(d, "tissue_positions.csv", "tissue_positions_list.csv")
    if path is None:
        raise InputError(f"{d}: no tissue_positions.csv or tissue_positions_list.csv")
    try:
        with path.open("r", encoding="utf-8", errors="replace") as f:
            head = f.readline()
        if not head.strip():
            raise InputError(f"{path}: empty file")
        has_header = head.split(",")[0].strip().strip('"').lower() == "barcode"
        df = pd.read_csv(path, header=0 if has_header else None, dtype=str, keep_default_na=False)
    except InputError:
        raise
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(f"{path}: cannot parse tissue positions ({type(e).__name__}: {e})") from e
    if has_header:
        df.columns = [str(c).strip() for c in df.columns]
        miss = [c for c in _POS_COLUMNS if c not in df.columns]
        if miss:
            raise InputError(f"{path}: missing column(s) {', '.join(miss)}; found {list(df.columns)}")
        df = df[_POS_COLUMNS]
    else:
        if df.shape[1] != 6:
            raise InputError(
                f"{path}: expected 6 columns ({','.join(_POS_COLUMNS)}), found {df.shape[1]}"
            )
        df.columns = _POS_COLUMNS
    if len(df) == 0:
        raise InputError(f"{path}: no spots")
    ids = _spot_ids(df["barcode"], str(path))
    out = pd.DataFrame(index=ids)
    for c in ("in_tissue", "array_row", "array_col"):
        out[c] = _int_column(df[c], str(path), c)
    for c in ("pxl_row_in_fullres", "pxl_col_in_fullres"):
        out[c] = _float_column(df[c], str(path), c, ids)
    if not out["in_tissue"].isin([0, 1]).all():
        raise InputError(f"{path}: in_tissue must be 0 or 1")
    return out


def _outs_like(d: Path) -> bool:
    return (d / "spatial").is_dir() and (
        (d / "filtered_feature_bc_matrix.h5").is_file() or (d / "filtered_feature_bc_matrix").is_dir()
    )


def _outs_dir(d: Path) -> Path | None:
    """The Space Ranger outs folder of a sample folder (``d/outs`` or ``d`` itself) or None."""
    if (d / "outs").is_dir() and _outs_like(d / "outs"):
        return d / "outs"
    if _outs_like(d):
        return d
    return None


def _spaceranger_matrix(outs: Path) -> Path:
    for p in (outs / "filtered_feature_bc_matrix.h5", outs / "filtered_feature_bc_matrix"):
        if p.exists():
            return p
    raise InputError(
        f"{outs}: no filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/ folder"
    )


def _section_name(outs: Path) -> str:
    return outs.parent.name if outs.name == "outs" else outs.name


def _spaceranger_counts(outs: Path) -> tuple[ad.AnnData, pd.DataFrame]:
    """In-tissue counts (count-matrix order) and their rows of the positions table."""
    counts = read_10x_counts(_spaceranger_matrix(outs))
    pos = read_tissue_positions(outs / "spatial")
    pos = pos[pos["in_tissue"] == 1]
    keep = counts.obs_names.isin(pos.index)
    if not keep.any():
        raise InputError(f"{outs}: no in-tissue barcode of spatial/tissue_positions* is in the count matrix")
    if not keep.all():
        counts = counts[keep].copy()
    return counts, pos.loc[counts.obs_names]


def read_spaceranger(
    outs_dir: str | os.PathLike,
    image: str | os.PathLike | None = None,
    mpp: float | None = None,
    section: str | None = None,
    require_image: bool = False,
) -> ad.AnnData:
    """Read a 10x Visium Space Ranger ``outs/`` folder as one section.

    Parameters
    ----------
    outs_dir : the ``outs`` folder (a folder containing ``outs/`` is accepted too).
    image : the full-resolution H&E image given to Space Ranger (None: an
        expression-only section; ``image_path`` is None).
    mpp : microns per full-resolution pixel; default ``55 / spot_diameter_fullres``
        from ``spatial/scalefactors_json.json``, else the image's embedded resolution.
    section : section name (default: the folder containing ``outs``).
    require_image : raise if ``image`` is None.

    Counts of the filtered matrix (Gene Expression features) are inner-joined
    with the ``in_tissue == 1`` rows of the positions table (count-matrix
    order); ``pixel_x = pxl_col_in_fullres``, ``pixel_y = pxl_row_in_fullres``,
    ``array_x = array_col``, ``array_y = array_row``; grid ``hex``.

    Raises
    ------
    InputError : missing/corrupt files, no mpp, coordinates that do not match
        the 100 um Visium spacing, spots outside the image.
    """
    outs = Path(outs_dir)
    if not outs.is_dir():
        raise InputError(f"{outs}: Space Ranger outs folder not found")
    found = _outs_dir(outs)
    if found is None:
        raise InputError(
            f"{outs}: not a Space Ranger outs folder (expected spatial/ and "
            "filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/)"
        )
    outs = found
    section = section or _section_name(outs)
    img = _resolve_image(image, require_image, f"section {section!r}")
    counts, pos = _spaceranger_counts(outs)

    sf_path = outs / "spatial" / "scalefactors_json.json"
    sf = _read_json(sf_path, "scale factors") if sf_path.is_file() else {}
    image_wh, img_mpp, m, m_src = _image_and_mpp_override(img, mpp)  # the mpp argument wins
    if m is None and _pos_float(sf.get("spot_diameter_fullres")):
        m = VISIUM_SPOT_DIAMETER_UM / _pos_float(sf["spot_diameter_fullres"])
        m_src = "scalefactors spot_diameter_fullres"
    elif m is None and img_mpp is not None:
        m, m_src = img_mpp, "image resolution tags"
    elif m is None:
        raise InputError(
            f"{sf_path}: {'no spot_diameter_fullres' if sf_path.is_file() else 'not found'} and no "
            "embedded image resolution; pass mpp= (microns per full-resolution pixel)"
        )
    pixel_xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    array_xy = pos[["array_col", "array_row"]].to_numpy(np.int64)
    spots = pd.Index(counts.obs_names, dtype=object)
    where = str(_find(outs / "spatial", "tissue_positions.csv", "tissue_positions_list.csv"))
    return _assemble(
        sp.csr_matrix(counts.X), spots, list(counts.var_names), array_xy, pixel_xy,
        where=where, section=section, image=img, image_wh=image_wh,
        mpp=m, mpp_source=m_src, grid="hex",
        spacing_um=VISIUM_SPOT_SPACING_UM, diameter_um=VISIUM_SPOT_DIAMETER_UM,
        source="spaceranger",
    )


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


# --------------------------------------------------------------------------- data sets


def _image_files(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class Dataset:
    """A folder of sections in one of :data:`FORMATS` (see :func:`open_dataset`).

    Attributes
    ----------
    root : the data-set folder.
    format : one of :data:`FORMATS`.
    """

    format: str = ""

    def __init__(self, root: str | os.PathLike, mpp: float | None = None, grid: str | None = None):
        self.root = Path(root)
        self.mpp = mpp
        self.grid = grid

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, format={self.format!r})"

    # subclasses implement these four
    def _all_sections(self) -> list[str]:
        raise NotImplementedError

    def image(self, section: str) -> Path | None:
        """Path of the full-resolution H&E image of ``section`` or None."""
        raise NotImplementedError

    def _read(self, section: str, require_image: bool) -> ad.AnnData:
        raise NotImplementedError

    def _counts(self, section: str) -> ad.AnnData:
        raise NotImplementedError

    # public API
    def sections(self, imaged_only: bool = False) -> list[str]:
        """Sorted section names (only those with an image when ``imaged_only``)."""
        out = sorted(self._all_sections())
        if imaged_only:
            out = [s for s in out if self.image(s) is not None]
        return out

    def __contains__(self, section: object) -> bool:
        return isinstance(section, str) and section in self._all_sections()

    def _check(self, section: str) -> None:
        avail = self.sections()
        if section not in avail:
            raise InputError(
                f"unknown section {section!r} in {self.root} ({self.format}); available: {', '.join(avail)}"
            )

    def read(self, section: str, require_image: bool = False) -> ad.AnnData:
        """Read ``section`` with the layout of :func:`stgen.data.her2st.read_section` (plus ``grid``).

        Raises InputError for an unknown section, a missing image when
        ``require_image``, or any reader error.
        """
        self._check(section)
        return self._read(section, require_image)

    def counts(self, section: str) -> ad.AnnData:
        """Raw counts of ``section`` (spots x genes, CSR float32, ``obs['section']``).

        Same spots (and order) as :meth:`read` where a position table exists,
        but needs neither image nor mpp and runs no geometry checks: for
        expression-only corpora.
        """
        self._check(section)
        return self._counts(section)


class Her2stDataset(Dataset):
    """Her2ST folder; delegates to :mod:`stgen.data.her2st` (adds ``grid='square'``)."""

    format = "her2st"

    def __init__(self, root: str | os.PathLike, mpp: float | None = None, grid: str | None = None):
        if mpp is not None or grid not in (None, "square"):
            raise InputError(
                f"{root}: Her2ST sections take their mpp from the spot lattice and use the square "
                "grid; mpp/grid overrides are not supported"
            )
        super().__init__(root)
        from stgen.data import her2st

        her2st.list_sections(self.root)  # validates the layout

    def _all_sections(self) -> list[str]:
        from stgen.data import her2st

        return her2st.list_sections(self.root)

    def sections(self, imaged_only: bool = False) -> list[str]:
        from stgen.data import her2st

        return her2st.list_sections(self.root, imaged_only=imaged_only)

    def image(self, section: str) -> Path | None:
        from stgen.data import her2st

        return her2st.find_image(self.root, section)

    def read(self, section: str, require_image: bool = False) -> ad.AnnData:
        from stgen.data import her2st

        a = her2st.read_section(self.root, section, require_image=require_image)
        a.uns["stgen"]["grid"] = "square"
        a.uns["stgen"]["mpp_source"] = "spot lattice"
        return a

    def counts(self, section: str) -> ad.AnnData:
        from stgen.data import her2st

        self._check(section)
        cdir = self.root / "ST-cnts"
        cpath = cdir / f"{section}.tsv.gz"
        if not cpath.exists():
            cpath = cdir / f"{section}.tsv"
        a = her2st.read_counts(cpath)
        spath = self.root / "ST-spotfiles" / f"{section}_selection.tsv"
        if spath.is_file():
            keep = a.obs_names.isin(her2st.read_spots(spath).index)
            if not keep.any():
                raise InputError(f"{cpath}: no spot ids in common with {spath}")
            a = a[keep].copy()
        a.obs["section"] = section
        return a


class HestDataset(Dataset):
    """HEST-1k folder: ``st/<id>.h5ad``, ``metadata/<id>.json``, ``wsis/<id>.tif``."""

    format = "hest"

    def _all_sections(self) -> list[str]:
        d = self.root / "st"
        if not d.is_dir():
            raise InputError(f"{self.root}: not a HEST folder (no 'st' sub-folder)")
        return sorted(p.name[: -len(".h5ad")] for p in d.iterdir() if p.is_file() and p.name.endswith(".h5ad"))

    def image(self, section: str) -> Path | None:
        return _hest_paths(self.root, section)[2]

    def technology(self, section: str) -> str:
        """``st_technology`` of a sample's metadata (e.g. 'Visium', 'Xenium')."""
        self._check(section)
        p = self.root / "metadata" / f"{section}.json"
        t = _read_json(p, "HEST metadata").get("st_technology")
        if not isinstance(t, str):
            raise InputError(f"{p}: no 'st_technology' field")
        return t

    def _read(self, section: str, require_image: bool) -> ad.AnnData:
        return read_hest_sample(self.root, section, mpp=self.mpp, require_image=require_image)

    def _counts(self, section: str) -> ad.AnnData:
        X, spots, genes = _hest_counts(self.root, section)
        return _counts_anndata(X, spots, genes, section)


class VisiumDataset(Dataset):
    """Folder of Space Ranger samples: ``<root>/<sample>/outs/`` (or ``<root>/<sample>/`` = outs)."""

    format = "visium"

    def _samples(self) -> dict[str, tuple[Path, Path]]:
        """section -> (sample folder, outs folder)."""
        if not self.root.is_dir():
            raise InputError(f"{self.root}: folder not found")
        own = _outs_dir(self.root)
        if own is not None:
            sample_dir = self.root.parent if self.root.name == "outs" else self.root
            return {_section_name(own): (sample_dir, own)}
        out = {}
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            o = _outs_dir(d)
            if o is not None:
                out[d.name] = (d, o)
        return out

    def _all_sections(self) -> list[str]:
        return list(self._samples())

    def image(self, section: str) -> Path | None:
        samples = self._samples()
        if section not in samples:
            return None
        sample_dir, outs = samples[section]
        imgs = _image_files(sample_dir)
        if len(imgs) > 1:
            named = [p for p in imgs if {p.name[: -len(p.suffix)], p.name.split(".")[0]} & {"image", section}]
            if len(named) != 1:
                raise InputError(
                    f"{sample_dir}: several images ({', '.join(p.name for p in imgs)}); keep one, "
                    f"or name the full-resolution H&E 'image.<ext>' or '{section}.<ext>'"
                )
            return named[0]
        if imgs:
            return imgs[0]
        full = [p for p in _image_files(outs / "spatial") if "fullres" in p.name.lower()]
        return full[0] if full else None

    def _read(self, section: str, require_image: bool) -> ad.AnnData:
        _, outs = self._samples()[section]
        img = self.image(section)
        if require_image and img is None:
            raise InputError(
                f"section {section!r} has no H&E image (expected an image file in "
                f"{self._samples()[section][0]})"
            )
        return read_spaceranger(outs, image=img, mpp=self.mpp, section=section)

    def _counts(self, section: str) -> ad.AnnData:
        _, outs = self._samples()[section]
        counts, _ = _spaceranger_counts(outs)
        counts.obs["section"] = section
        return counts


class H5adDataset(Dataset):
    """Folder of ``<section>.h5ad`` files with images ``<section>.<ext>`` beside them."""

    format = "h5ad"

    def _all_sections(self) -> list[str]:
        if not self.root.is_dir():
            raise InputError(f"{self.root}: folder not found")
        return sorted(p.stem for p in self.root.iterdir() if p.is_file() and p.suffix == ".h5ad")

    def image(self, section: str) -> Path | None:
        imgs = [p for p in _image_files(self.root) if p.name[: -len(p.suffix)] == section]
        if len(imgs) > 1:
            raise InputError(
                f"{self.root}: several images for section {section!r} "
                f"({', '.join(p.name for p in imgs)}); keep only the full-resolution H&E"
            )
        return imgs[0] if imgs else None

    def _read(self, section: str, require_image: bool) -> ad.AnnData:
        return read_h5ad_section(
            self.root / f"{section}.h5ad", image=self.image(section), mpp=self.mpp,
            section=section, grid=self.grid, require_image=require_image,
        )

    def _counts(self, section: str) -> ad.AnnData:
        path = self.root / f"{section}.h5ad"
        a = read_anndata(path)
        X, genes = _anndata_counts(a, path)
        return _counts_anndata(X, _spot_ids(a.obs_names, str(path)), genes, section)


_DATASETS: dict[str, type[Dataset]] = {
    "her2st": Her2stDataset,
    "hest": HestDataset,
    "visium": VisiumDataset,
    "h5ad": H5adDataset,
}

_LOOKED_FOR = (
    "her2st: ST-cnts/; hest: st/*.h5ad + metadata/; visium: <sample>/outs/ (or outs-like "
    "folders with spatial/ and filtered_feature_bc_matrix[.h5]); h5ad: *.h5ad files"
)


def _matches(root: Path) -> list[str]:
    found = []
    if (root / "ST-cnts").is_dir():
        found.append("her2st")
    st = root / "st"
    if st.is_dir() and (root / "metadata").is_dir() and any(p.suffix == ".h5ad" for p in st.iterdir()):
        found.append("hest")
    if _outs_dir(root) is not None or any(_outs_dir(d) is not None for d in root.iterdir() if d.is_dir()):
        found.append("visium")
    if any(p.is_file() and p.suffix == ".h5ad" for p in root.iterdir()):
        found.append("h5ad")
    return found


def detect_format(root: str | os.PathLike) -> str:
    """The format of a data-set folder, one of :data:`FORMATS`.

    Raises
    ------
    InputError : folder missing, no format matches, or several do (ambiguous);
        the message lists what was looked for.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: data-set folder not found")
    found = _matches(root)
    if not found:
        raise InputError(f"{root}: unrecognised data-set layout; looked for {_LOOKED_FOR}")
    if len(found) > 1:
        raise InputError(
            f"{root}: ambiguous data-set layout, matches {', '.join(found)}; pass format= "
            f"one of {', '.join(found)} (looked for {_LOOKED_FOR})"
        )
    return found[0]


def open_dataset(
    root: str | os.PathLike,
    format: str | None = None,
    mpp: float | None = None,
    grid: str | None = None,
) -> Dataset:
    """Open a data-set folder as a :class:`Dataset`.

    Parameters
    ----------
    root : the folder (layouts in the module docstring).
    format : one of :data:`FORMATS`; auto-detected when None.
    mpp : microns-per-pixel override for every section (not for Her2ST).
    grid : spot grid for h5ad sections that do not record one ('hex' or 'square').

    Raises
    ------
    InputError : unknown/undetectable/ambiguous format, or a layout that does
        not match the requested format.
    """
    root = Path(root)
    if format is None:
        format = detect_format(root)
    fmt = str(format).strip().lower()
    if fmt not in _DATASETS:
        raise InputError(f"unknown data-set format {format!r}; use one of {', '.join(FORMATS)}")
    if not root.is_dir():
        raise InputError(f"{root}: data-set folder not found")
    if fmt != "her2st" and fmt not in _matches(root):
        raise InputError(f"{root}: not a {fmt} data set; looked for {_LOOKED_FOR}")
    if grid is not None:
        grid = _check_grid(grid, str(root))
    if mpp is not None and _pos_float(mpp) is None:
        raise InputError(f"mpp must be a positive number, got {mpp!r}")
    return _DATASETS[fmt](root, mpp=mpp, grid=grid)


def as_dataset(data: "str | os.PathLike | Dataset", format: str | None = None) -> Dataset:
    """``data`` itself when it is a :class:`Dataset`, else :func:`open_dataset` of the folder."""
    return data if isinstance(data, Dataset) else open_dataset(data, format=format)
