"""What every reader shares: spot grids, count matrices, column parsing, spot-scale checks and the per-section AnnData."""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable
import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from stgen.errors import InputError
from stgen.image.scaled import SlideRef


VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_SPOT_SPACING_UM = 100.0

#: grid name -> (spot_spacing_um, spot_diameter_um)
GRIDS: dict[str, tuple[float, float]] = {
    "hex": (VISIUM_SPOT_SPACING_UM, VISIUM_SPOT_DIAMETER_UM),
    "square": (200.0, 100.0),
}

#: Image suffixes recognised by the data-set folder conventions (lower case).
IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ndpi", ".jpg", ".jpeg", ".png")

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
    anything else through :func:`stgen.image.slide.open_slide` (TIFF/OME/Aperio/vendor).
    """
    from stgen.image.patches import image_size
    from stgen.image.slide import open_slide

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


def _default_vocabulary() -> tuple[list[str] | None, Path | None]:
    """The CellFM vocabulary and ``genemap.csv`` beside it when one is found (:func:`stgen.data.panel.default_vocab_path`),
    else ``(None, None)``; read once per file version."""
    from stgen.data.panel import default_vocab_path

    p = default_vocab_path()
    if p is None or not p.is_file():
        return None, None
    return _vocab_file(str(p), p.stat().st_mtime_ns), (p.parent / "genemap.csv")


@functools.lru_cache(maxsize=2)
def _vocab_file(path: str, mtime_ns: int) -> list[str]:
    from stgen.data.panel import load_vocabulary

    return load_vocabulary(path)


def _sum_duplicate_genes(X: sp.csr_matrix, genes: Iterable[Any], where: str, var: pd.DataFrame | None = None,
                         make_unique_suffixes: bool = False) -> tuple[sp.csr_matrix, list[str]]:
    """Strip symbols, reject empty ones, resolve identifiers to vocabulary symbols
    (:func:`stgen.data.genes.resolve_gene_names`: Ensembl ids through ``var``, ``var_names_make_unique``
    suffixes when ``make_unique_suffixes``, aliases and case against the default vocabulary) and sum
    duplicated symbols (first-seen order)."""
    from stgen.data.genes import resolve_gene_names

    names = [("" if g is None else str(g)).strip() for g in genes]
    if len(names) != X.shape[1]:
        raise InputError(f"{where}: {len(names)} gene names for {X.shape[1]} matrix columns")
    if not names:
        raise InputError(f"{where}: no genes")
    if any(n == "" or n.lower() == "nan" for n in names):
        i = next(i for i, n in enumerate(names) if n == "" or n.lower() == "nan")
        raise InputError(f"{where}: empty gene symbol (column {i})")
    vocab, genemap = _default_vocabulary()
    names = resolve_gene_names(names, where, var=var, vocabulary=vocab, genemap=genemap,
                               make_unique_suffixes=make_unique_suffixes)
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


def array_pitch_px(array_xy: np.ndarray, xy_px: np.ndarray, grid: str, source: str) -> float | None:
    """Spot pitch in full-resolution pixels from the affine map array -> pixel coordinates, or None when the
    spots do not span two array directions (fewer than 3, or all on one line).

    The map ``pixel = A @ array + b`` is fitted by least squares on the spots present, so a sparse or subset
    section (QC-filtered spots, a crop) gives the pitch of the full array. One array step is one pitch on a
    ``square`` (legacy ST) grid, and half a pitch along a row (``array_col``) on a ``hex`` (Visium) grid.
    InputError naming ``source`` when the pixel coordinates do not follow the array coordinates (median
    residual over a quarter pitch: e.g. mixed-up columns).
    """
    a = np.asarray(array_xy, dtype=np.float64).reshape(-1, 2)
    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    if len(a) < 3 or np.linalg.matrix_rank(a - a.mean(0)) < 2:
        return None
    design = np.column_stack([a, np.ones(len(a))])
    coef, *_ = np.linalg.lstsq(design, xy, rcond=None)  # (3, 2): rows = array x, array y, offset
    step_x, step_y = np.linalg.norm(coef[0]), np.linalg.norm(coef[1])
    pitch = 2.0 * step_x if grid == "hex" else 0.5 * (step_x + step_y)
    resid = np.linalg.norm(design @ coef - xy, axis=1)
    if not pitch > 0 or np.median(resid) > 0.25 * pitch:
        raise InputError(f"{source}: the pixel coordinates do not follow the array coordinates (median "
                         f"distance to the fitted lattice {np.median(resid):.3g} px, pitch {pitch:.3g} px): are the "
                         "pixel or array columns mixed up?")
    return float(pitch)


def check_spot_scale(
    xy_px: np.ndarray,
    mpp: float,
    spacing_um: float | None,
    source: str,
    tolerance: float = SCALE_TOLERANCE,
    array_xy: np.ndarray | None = None,
    grid: str = "square",
) -> float:
    """Check that spot coordinates and ``mpp`` agree with the array's spot spacing.

    The spot pitch in pixels times ``mpp`` must be within ``tolerance``
    (relative) of ``spacing_um``; with ``spacing_um=None`` (technology unknown,
    e.g. a spot file given to predict) it must lie in :data:`SPACING_RANGE_UM`,
    the span of real spot arrays. With ``array_xy`` (the spots' integer array
    coordinates, ``grid`` ``square`` or ``hex``) the pitch comes from the affine
    map array -> pixels (:func:`array_pitch_px`), which holds for any subset of
    the array's spots; without them (or when they span a single line) it is the
    median nearest-neighbour distance between spot centres, which is too large
    for a sparse subset.

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
    pitch_px = array_pitch_px(array_xy, xy, grid, source) if array_xy is not None else None
    what = "median spot spacing" if pitch_px is None else "spot pitch from the array coordinates"
    pitch_px = float(np.median(nn)) if pitch_px is None else pitch_px
    measured = pitch_px * float(mpp)
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
        f"{source}: {what} is {measured:.3g} um ({pitch_px:.4g} px x "
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
    image_scale: float = 1.0,
    mpp: float,
    mpp_source: str,
    grid: str,
    spacing_um: float,
    diameter_um: float,
    source: str,
) -> ad.AnnData:
    """Run the shared geometry checks and build the section AnnData. ``image_wh`` is the image's size in its own
    pixels; ``image_scale`` (< 1 for a downsampled image) its pixels per full-resolution pixel."""
    pixel_xy = np.ascontiguousarray(pixel_xy, dtype=np.float64)
    bad = ~np.isfinite(pixel_xy).all(axis=1)
    if bad.any():
        raise InputError(
            f"{where}: {int(bad.sum())} spot(s) with missing or non-finite pixel coordinates "
            f"(first: {spots[bad][0]!r})"
        )
    check_spot_scale(pixel_xy, mpp, spacing_um, where, array_xy=array_xy, grid=grid)
    if image_wh is not None:
        full_wh = [int(math.ceil(v / image_scale - 1e-6)) for v in image_wh]
        check_spots_in_image(
            pixel_xy, spots, full_wh[0], full_wh[1], where,
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
    if image_scale != 1.0:
        adata.uns["stgen"]["image_scale"] = float(image_scale)
    return adata


def section_image(adata: ad.AnnData) -> SlideRef | None:
    """The H&E image of a section read by stgen (``uns['stgen']``): a :class:`~stgen.image.scaled.SlideRef` of
    ``image_path`` at ``image_scale`` (image pixels per full-resolution pixel; absent = 1, the full-resolution
    slide; e.g. Space Ranger's ``tissue_hires_scalef`` when only the hires PNG exists), or None."""
    info = adata.uns.get("stgen") if isinstance(adata.uns.get("stgen"), dict) else {}
    path = info.get("image_path")
    if not path:
        return None
    return SlideRef(Path(path), float(info.get("image_scale", 1.0)))


#: Downsampled images of a Space Ranger ``spatial/`` folder / a scanpy ``uns['spatial'][lib]['images']``, best
#: first, with the scale-factor field that maps full-resolution pixels to them.
DOWNSAMPLED_IMAGES = (("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef"))


def downsampled_scale(scalefactors: dict, field: str, where: str) -> float:
    """``scalefactors[field]`` (image pixels per full-resolution pixel), checked: InputError naming ``where``
    and ``field`` when it is missing, not a number, 0 or negative, or above 1."""
    v = scalefactors.get(field) if isinstance(scalefactors, dict) else None
    f = _pos_float(v)
    if f is None or f > 1:
        got = "missing" if v is None else f"{v!r}"
        raise InputError(f"{where}: scale factor {field} is {got}; it must be a number in (0, 1] (image "
                         "pixels per full-resolution pixel) to use the downsampled image")
    return f


def warn_downsampled(section: str, image: str, size: tuple[int, int], scale: float, mpp: float | None) -> None:
    """Warn (:class:`~stgen.errors.LowResolutionImageWarning`) that ``section``'s patches come from ``image`` (a
    file or field name), a
    ``size`` = (w, h) px image at ``scale`` of full resolution (``mpp``: microns per full-resolution pixel)."""
    from stgen.errors import LowResolutionImageWarning

    res = f", {mpp / scale:.3g} um/px" if mpp else ""
    warnings.warn(
        f"section {section}: no full-resolution image; using {image} ({size[0]} x {size[1]} px, "
        f"x{scale:.4g} of full resolution{res}): spot patches cover the same tissue but are cut at that "
        "resolution and upsampled to the encoder's input; pass the full-resolution H&E image for full detail",
        LowResolutionImageWarning, stacklevel=3)


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
    return _sum_duplicate_genes(X, adata.var_names, str(path), var=adata.var, make_unique_suffixes=True)


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


# --------------------------------------------------------------------------- data sets


def _image_files(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
