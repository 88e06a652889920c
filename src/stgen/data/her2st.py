"""Reader for the Her2ST breast-cancer Spatial Transcriptomics data set.

Expected layout under ``root``::

    ST-cnts/<section>.tsv.gz                  spots x genes raw counts (tab-separated)
    ST-spotfiles/<section>_selection.tsv      x y new_x new_y pixel_x pixel_y selected
    ST-imgs/<patient letter>/<section>/*.jpg  full-resolution H&E image (some sections only)

Coordinates: ``pixel_x`` is the image column and ``pixel_y`` the image row, in
full-resolution pixels. ``obsm['spatial']`` stores ``(pixel_x, pixel_y)``. The
legacy ST array has spots of 100 um diameter on a 200 um centre-to-centre grid,
which is used to estimate the microns-per-pixel (mpp) of each image.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from pathlib import Path
from typing import Iterable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from stgen.errors import InputError
from stgen.image.patches import image_size

__all__ = [
    "SPOT_DIAMETER_UM",
    "SPOT_SPACING_UM",
    "list_sections",
    "find_image",
    "read_spots",
    "read_counts",
    "estimate_mpp",
    "read_section",
    "read_dataset",
]

SPOT_DIAMETER_UM = 100.0
SPOT_SPACING_UM = 200.0
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


# --------------------------------------------------------------------------- layout


def _counts_dir(root: str | os.PathLike) -> Path:
    d = Path(root) / "ST-cnts"
    if not d.is_dir():
        raise InputError(f"{root}: not a Her2ST folder (no 'ST-cnts' sub-folder)")
    return d


def list_sections(root: str | os.PathLike, imaged_only: bool = False) -> list[str]:
    """Sorted section names with a count table under ``root/ST-cnts``.

    Parameters
    ----------
    root : Her2ST root folder.
    imaged_only : keep only sections with an H&E image (see :func:`find_image`).

    Raises
    ------
    InputError : ``root`` has no ``ST-cnts`` folder.
    """
    d = _counts_dir(root)
    names = set()
    for p in d.iterdir():
        if p.is_file() and (p.name.endswith(".tsv.gz") or p.name.endswith(".tsv")):
            names.add(p.name.removesuffix(".gz").removesuffix(".tsv"))
    out = sorted(names)
    if imaged_only:
        out = [s for s in out if find_image(root, s) is not None]
    return out


def find_image(root: str | os.PathLike, section: str) -> Path | None:
    """Path of the H&E image of ``section`` (``ST-imgs/<letter>/<section>/*.jpg``) or None.

    If the folder holds several images the first in sorted order is returned.
    """
    if not section:
        return None
    d = Path(root) / "ST-imgs" / section[0] / section
    if not d.is_dir():
        return None
    imgs = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    return imgs[0] if imgs else None


# --------------------------------------------------------------------------- spots


def read_spots(path: str | os.PathLike) -> pd.DataFrame:
    """Read a spot-position table.

    Accepts a Her2ST ``*_selection.tsv`` (tab-separated; columns ``x y new_x new_y
    pixel_x pixel_y selected``; spot id ``f"{x}x{y}"``; only rows with
    ``selected == 1`` are kept when that column exists) or a CSV with header
    ``barcode,pixel_x,pixel_y``.

    Returns
    -------
    DataFrame indexed by spot id (str) with float columns ``pixel_x`` (image
    column) and ``pixel_y`` (image row) in full-resolution pixels, plus int
    ``array_x``, ``array_y`` and float ``new_x``, ``new_y`` when available.

    Raises
    ------
    InputError : missing/empty file, no (selected) rows, missing columns,
        non-finite coordinates or duplicated spot ids.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: spot file not found")
    try:
        head = path.open("r", encoding="utf-8", errors="replace").readline()
    except OSError as e:
        raise InputError(f"{path}: cannot read spot file ({e})") from e
    if not head.strip():
        raise InputError(f"{path}: spot file is empty")
    sep = "\t" if "\t" in head else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot parse spot file ({e})") from e
    df.columns = [str(c).strip() for c in df.columns]
    dup_cols = df.columns[df.columns.duplicated()]
    if len(dup_cols):
        raise InputError(f"{path}: duplicated column {dup_cols[0]!r} in the header")

    def num(col: str) -> np.ndarray:
        v = pd.to_numeric(df[col].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
        return v

    cols = set(df.columns)
    if {"x", "y", "pixel_x", "pixel_y"} <= cols:  # Her2ST selection file
        if "selected" in cols:
            sel = num("selected")
            df = df.loc[sel == 1].reset_index(drop=True)
        if len(df) == 0:
            raise InputError(f"{path}: spot file has no (selected) rows")
        ax, ay = num("x"), num("y")
        if not (np.isfinite(ax).all() and np.isfinite(ay).all()):
            raise InputError(f"{path}: non-numeric or missing array coordinates in columns x/y")
        ax, ay = _array_ints(ax, path, "x"), _array_ints(ay, path, "y")
        out = pd.DataFrame(
            {"pixel_x": num("pixel_x"), "pixel_y": num("pixel_y"), "array_x": ax, "array_y": ay},
            index=pd.Index([f"{a}x{b}" for a, b in zip(ax, ay)], name="spot"),
        )
        for c in ("new_x", "new_y"):
            if c in cols:
                out[c] = num(c)
                if not np.isfinite(out[c]).all():
                    raise InputError(f"{path}: non-finite values in column {c}")
    elif {"barcode", "pixel_x", "pixel_y"} <= cols:
        if len(df) == 0:
            raise InputError(f"{path}: spot file has no rows")
        empty = df["barcode"].str.strip() == ""
        if empty.any():
            raise InputError(f"{path}: empty barcode on data row {int(np.flatnonzero(empty.to_numpy())[0]) + 1}")
        out = pd.DataFrame(
            {"pixel_x": num("pixel_x"), "pixel_y": num("pixel_y")},
            index=pd.Index(df["barcode"].str.strip().to_numpy(dtype=str), name="spot"),
        )
        if "array_x" in cols and "array_y" in cols:
            ax, ay = num("array_x"), num("array_y")
            if np.isfinite(ax).all() and np.isfinite(ay).all():  # optional: kept only when complete
                out["array_x"] = _array_ints(ax, path, "array_x")
                out["array_y"] = _array_ints(ay, path, "array_y")
    else:
        raise InputError(
            f"{path}: missing columns; expected Her2ST 'x y pixel_x pixel_y [selected]' "
            f"or 'barcode,pixel_x,pixel_y', found {sorted(cols)}"
        )
    bad = ~(np.isfinite(out["pixel_x"].to_numpy()) & np.isfinite(out["pixel_y"].to_numpy()))
    if bad.any():
        raise InputError(
            f"{path}: {int(bad.sum())} spot(s) with missing or non-finite pixel coordinates "
            f"(first: {out.index[bad][0]!r})"
        )
    dup = out.index.duplicated()
    if dup.any():
        raise InputError(
            f"{path}: {int(dup.sum())} duplicated spot id(s), e.g. {out.index[dup][0]!r}"
        )
    return out


def _array_ints(v: np.ndarray, path: Path, name: str) -> np.ndarray:
    """Finite float array coordinates -> int64; InputError if not integers or beyond +-2**31."""
    if np.any(v != np.round(v)):
        raise InputError(f"{path}: array coordinates in column {name} must be integers")
    if np.any(np.abs(v) > 2**31):
        raise InputError(f"{path}: array coordinate {v[np.abs(v) > 2**31][0]:g} in column {name} is out of range")
    return v.astype(np.int64)


# --------------------------------------------------------------------------- counts


def _open_text(path: Path) -> io.TextIOBase:
    with path.open("rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open("r", encoding="utf-8")


def read_counts(path: str | os.PathLike) -> ad.AnnData:
    """Read a spots x genes raw-count table (tab-separated, optionally gzipped).

    The header's first cell is the (empty) index name followed by gene symbols;
    each row starts with a spot id. Duplicate gene symbols are summed.

    Returns
    -------
    AnnData (n_spots, n_genes) with ``.X`` a CSR float32 matrix of raw counts,
    ``obs_names`` spot ids and ``var_names`` unique gene symbols (first-seen order).

    Raises
    ------
    InputError : missing, unreadable or truncated file; NaN, negative or
        non-integer counts; non-numeric cells; no genes or no spots; duplicated
        spot ids.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: count file not found")
    try:
        with _open_text(path) as f:
            header = f.readline().rstrip("\r\n").split("\t")
            body = pd.read_csv(f, sep="\t", header=None, index_col=0, dtype={0: str}, low_memory=False)
    except (EOFError, OSError, zlib.error, UnicodeDecodeError) as e:
        raise InputError(f"{path}: unreadable or truncated count file ({type(e).__name__}: {e})") from e
    except pd.errors.EmptyDataError as e:
        raise InputError(f"{path}: count file has no spots") from e
    except pd.errors.ParserError as e:
        raise InputError(f"{path}: malformed count table ({e})") from e

    n_cols = body.shape[1]
    if len(header) == n_cols + 1:
        genes = header[1:]
    elif len(header) == n_cols:
        genes = header
    else:
        raise InputError(
            f"{path}: header has {len(header)} cells but rows have {n_cols + 1} fields"
        )
    genes = [g.strip() for g in genes]
    if n_cols == 0 or not any(genes):
        raise InputError(f"{path}: count file has no genes")
    if body.shape[0] == 0:
        raise InputError(f"{path}: count file has no spots")
    if any(g == "" for g in genes):
        raise InputError(f"{path}: empty gene symbol in header")
    missing = body.index.isna() | (body.index.astype(str).str.strip() == "")
    if missing.any():
        raise InputError(
            f"{path}: empty or missing spot id (first cell of data row {int(np.flatnonzero(missing)[0]) + 1})"
        )
    spots = body.index.astype(str).str.strip()
    if spots.duplicated().any():
        raise InputError(f"{path}: duplicated spot id(s), e.g. {spots[spots.duplicated()][0]!r}")

    nonnum = [c for c, t in body.dtypes.items()
              if not pd.api.types.is_numeric_dtype(t) or pd.api.types.is_bool_dtype(t)]
    if nonnum:
        col = nonnum[0]
        raise InputError(f"{path}: non-numeric value(s) in gene column {genes[col - 1]!r}")
    X = body.to_numpy(dtype=np.float64)
    if np.isnan(X).any():
        r, c = np.argwhere(np.isnan(X))[0]
        raise InputError(f"{path}: missing/NaN count at spot {spots[r]!r}, gene {genes[c]!r}")
    if not np.isfinite(X).all():
        raise InputError(f"{path}: infinite count value")
    if (X < 0).any():
        r, c = np.argwhere(X < 0)[0]
        raise InputError(f"{path}: negative count {X[r, c]} at spot {spots[r]!r}, gene {genes[c]!r}")
    if (X != np.round(X)).any():
        r, c = np.argwhere(X != np.round(X))[0]
        raise InputError(
            f"{path}: non-integer count {X[r, c]} at spot {spots[r]!r}, gene {genes[c]!r} "
            "(expected raw counts)"
        )

    M = sp.csr_matrix(X.astype(np.float32))
    uniq, inverse = np.unique(np.asarray(genes, dtype=object), return_inverse=True)
    if len(uniq) < len(genes):
        # Sum duplicated symbols; keep first-seen order.
        first = np.full(len(uniq), len(genes))
        np.minimum.at(first, inverse, np.arange(len(genes)))
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        col_map = rank[inverse]
        S = sp.csr_matrix(
            (np.ones(len(genes), np.float32), (np.arange(len(genes)), col_map)),
            shape=(len(genes), len(uniq)),
        )
        M = (M @ S).tocsr()
        genes = [str(g) for g in uniq[order]]
    M.sort_indices()
    obs = pd.DataFrame(index=pd.Index(spots.to_numpy(dtype=str), name=None))
    var = pd.DataFrame(index=pd.Index(genes, dtype=str))
    return ad.AnnData(X=M, obs=obs, var=var)


# --------------------------------------------------------------------------- sections


def estimate_mpp(spots: pd.DataFrame, source: str = "spot table") -> float:
    """Microns per full-resolution pixel from a spot table with array coordinates.

    Fits ``(pixel_x, pixel_y) ~ A @ (ax, ay) + b`` by least squares, using
    ``new_x/new_y`` when present else ``array_x/array_y``; the pixel length of
    one array step is the mean of the column norms of ``A`` (rotation-invariant)
    and ``mpp = 200 um / px_per_step``.

    Raises
    ------
    InputError : no array coordinates, fewer than 3 spots or a degenerate fit.
    """
    if {"new_x", "new_y"} <= set(spots.columns):
        a = spots[["new_x", "new_y"]].to_numpy(np.float64)
    elif {"array_x", "array_y"} <= set(spots.columns):
        a = spots[["array_x", "array_y"]].to_numpy(np.float64)
    else:
        raise InputError(f"{source}: no array coordinates, cannot estimate microns per pixel")
    p = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    design = np.column_stack([a, np.ones(len(a))])
    if len(a) < 3 or np.linalg.matrix_rank(design) < 3:
        raise InputError(f"{source}: too few non-collinear spots to estimate microns per pixel")
    coef, *_ = np.linalg.lstsq(design, p, rcond=None)
    A = coef[:2].T  # (2 pixel axes, 2 array axes)
    px_per_step = float(np.linalg.norm(A, axis=0).mean())
    if not np.isfinite(px_per_step) or px_per_step <= 0:
        raise InputError(f"{source}: degenerate spot layout, cannot estimate microns per pixel")
    return SPOT_SPACING_UM / px_per_step


def read_section(root: str | os.PathLike, section: str, require_image: bool = False) -> ad.AnnData:
    """Read one Her2ST section as AnnData.

    Counts and spot positions are inner-joined on spot id (count-table order).

    Returns
    -------
    AnnData with ``.X`` CSR float32 raw counts; ``.obs`` columns ``array_x``,
    ``array_y`` (int), ``pixel_x``, ``pixel_y`` (float, full-res px) and
    ``section``; ``.obsm['spatial']`` float64 (n, 2) = (pixel_x, pixel_y), i.e.
    (column, row); ``.uns['stgen']`` = dict(section, image_path (str or None),
    mpp (um/px), spot_diameter_um=100, spot_spacing_um=200, grid='square', source='her2st').

    Raises
    ------
    InputError : unknown section (lists available ones); ``require_image`` and
        no image; no common spots; spots outside the image bounds; any error
        from :func:`read_counts` / :func:`read_spots`.
    """
    root = Path(root)
    available = list_sections(root)
    if section not in available:
        raise InputError(f"unknown section {section!r} in {root}; available: {', '.join(available)}")
    cdir = _counts_dir(root)
    cpath = cdir / f"{section}.tsv.gz"
    if not cpath.exists():
        cpath = cdir / f"{section}.tsv"
    spath = root / "ST-spotfiles" / f"{section}_selection.tsv"
    img = find_image(root, section)
    if require_image and img is None:
        raise InputError(f"section {section!r} has no H&E image under {root / 'ST-imgs'}")

    counts = read_counts(cpath)
    spots = read_spots(spath)
    keep = counts.obs_names.isin(spots.index)
    if not keep.any():
        raise InputError(f"{cpath}: no spot ids in common with {spath}")
    adata = counts[keep].copy()
    sp_tab = spots.loc[adata.obs_names]
    if "array_x" not in sp_tab.columns:
        raise InputError(f"{spath}: no array coordinates")

    if img is not None:
        w, h = image_size(img)
        px, py = sp_tab["pixel_x"].to_numpy(), sp_tab["pixel_y"].to_numpy()
        bad = (px < 0) | (px >= w) | (py < 0) | (py >= h)
        if bad.any():
            raise InputError(
                f"{spath}: {int(bad.sum())} spot(s) lie outside the image bounds "
                f"({w} x {h} px of {img.name}), e.g. {sp_tab.index[bad][0]!r}"
            )

    mpp = estimate_mpp(spots, source=str(spath))
    adata.obs["array_x"] = sp_tab["array_x"].to_numpy(np.int64)
    adata.obs["array_y"] = sp_tab["array_y"].to_numpy(np.int64)
    adata.obs["pixel_x"] = sp_tab["pixel_x"].to_numpy(np.float64)
    adata.obs["pixel_y"] = sp_tab["pixel_y"].to_numpy(np.float64)
    adata.obs["section"] = section
    adata.obsm["spatial"] = np.ascontiguousarray(sp_tab[["pixel_x", "pixel_y"]].to_numpy(np.float64))
    adata.uns["stgen"] = {
        "section": section,
        "image_path": str(img) if img is not None else None,
        "mpp": float(mpp),
        "spot_diameter_um": SPOT_DIAMETER_UM,
        "spot_spacing_um": SPOT_SPACING_UM,
        "grid": "square",
        "source": "her2st",
    }
    return adata


def read_dataset(
    root: str | os.PathLike,
    sections: Iterable[str] | None = None,
    imaged_only: bool = False,
) -> dict[str, ad.AnnData]:
    """Read several sections (default: all, or all imaged ones) into ``{name: AnnData}``.

    ``imaged_only`` filters to sections with an image and, when ``sections`` is
    given, requires each of them to have one. Raises InputError as
    :func:`read_section`.
    """
    names = list(sections) if sections is not None else list_sections(root, imaged_only=imaged_only)
    out: dict[str, ad.AnnData] = {}
    for s in tqdm(names, desc="read her2st", unit="section"):
        out[s] = read_section(root, s, require_image=imaged_only)
    return out
