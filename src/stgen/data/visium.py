"""10x Space Ranger ``outs/`` folders: filtered matrices (HDF5 v3 or mtx), tissue positions, scale factors."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from stgen.errors import InputError
from stgen.data.common import DOWNSAMPLED_IMAGES
from stgen.data.common import VISIUM_SPOT_DIAMETER_UM
from stgen.data.common import downsampled_scale
from stgen.data.common import warn_downsampled
from stgen.data.common import VISIUM_SPOT_SPACING_UM
from stgen.data.common import _GE
from stgen.data.common import _assemble
from stgen.data.common import _count_matrix
from stgen.data.common import _float_column
from stgen.data.common import _image_and_mpp_override
from stgen.data.common import _int_column
from stgen.data.common import _new_anndata
from stgen.data.common import _pos_float
from stgen.data.common import _read_json
from stgen.data.common import _resolve_image
from stgen.data.common import _spot_ids
from stgen.data.common import _sum_duplicate_genes


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


def downsampled_image(spatial_dir: Path) -> tuple[Path, str] | None:
    """``(tissue_hires_image.png or, without it, tissue_lowres_image.png, its scale-factor field)`` of a Space
    Ranger ``spatial/`` folder, or None when it has neither."""
    for kind, field in DOWNSAMPLED_IMAGES:
        p = Path(spatial_dir) / f"tissue_{kind}_image.png"
        if p.is_file():
            return p, field
    return None


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
    downsampled: bool = True,
) -> ad.AnnData:
    """Read a 10x Visium Space Ranger ``outs/`` folder as one section.

    Parameters
    ----------
    outs_dir : the ``outs`` folder (a folder containing ``outs/`` is accepted too).
    image : the full-resolution H&E image given to Space Ranger. None: with ``downsampled`` (default),
        ``spatial/tissue_hires_image.png`` (else ``tissue_lowres_image.png``) at its scale factor
        (``uns['stgen']['image_scale']`` = ``tissue_hires_scalef``), with a
        :class:`~stgen.errors.LowResolutionImageWarning`: patches cover the same microns and are
        upsampled; without either, an expression-only section (``image_path`` None).
    mpp : microns per full-resolution pixel; default ``55 / spot_diameter_fullres``
        from ``spatial/scalefactors_json.json``, else the image's embedded resolution.
    section : section name (default: the folder containing ``outs``).
    require_image : raise if there is no image (neither ``image`` nor, with ``downsampled``, a hires/lowres PNG).
    downsampled : use the hires/lowres PNG when ``image`` is None.

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
    sf_path = outs / "spatial" / "scalefactors_json.json"
    sf = _read_json(sf_path, "scale factors") if sf_path.is_file() else {}
    scale = 1.0
    if image is None and downsampled and (small := downsampled_image(outs / "spatial")) is not None:
        image, field = small
        scale = downsampled_scale(sf, field, f"{sf_path}{'' if sf_path.is_file() else ' (file not found)'}")
    img = _resolve_image(image, require_image, f"section {section!r}")
    counts, pos = _spaceranger_counts(outs)

    image_wh, img_mpp, m, m_src = _image_and_mpp_override(img, mpp)  # the mpp argument wins
    if scale != 1.0:
        img_mpp = None  # a PNG has no scan resolution
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
    if scale != 1.0:
        warn_downsampled(section, img.name, image_wh, scale, m)
    return _assemble(
        sp.csr_matrix(counts.X), spots, list(counts.var_names), array_xy, pixel_xy,
        where=where, section=section, image=img, image_wh=image_wh, image_scale=scale,
        mpp=m, mpp_source=m_src, grid="hex",
        spacing_um=VISIUM_SPOT_SPACING_UM, diameter_um=VISIUM_SPOT_DIAMETER_UM,
        source="spaceranger",
    )
