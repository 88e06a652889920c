"""10x Visium HD (Space Ranger >= 3.0) binned outputs: square bins of 2, 8 or 16 um as spot-level sections.

Layout read (one sample; ``outs/`` is Space Ranger's output folder)::

    outs/binned_outputs/square_016um/                (also square_002um/, square_008um/, custom sizes)
        filtered_feature_bc_matrix.h5                10x HDF5 v3 (or the filtered_feature_bc_matrix/ MEX folder)
        spatial/tissue_positions.parquet             barcode, in_tissue, array_row, array_col,
                                                     pxl_row_in_fullres, pxl_col_in_fullres (one row per bin)
        spatial/scalefactors_json.json               spot_diameter_fullres (= the bin side in full-resolution px),
                                                     bin_size_um, microns_per_pixel, tissue_hires_scalef,
                                                     tissue_lowres_scalef, regist_target_img_scalef, ...
        spatial/tissue_hires_image.png               downsampled microscope image (longest side 6,000 px)
    outs/spatial/tissue_hires_image.png              the same images, one level up

The full-resolution microscope image given to Space Ranger is not part of ``outs/`` and is passed separately
(:class:`stgen.data.dataset.VisiumHdDataset` looks for it beside ``outs/``, as for Visium). Without it, the
hires PNG is used at its scale factor (``uns['stgen']['image_scale'] = tissue_hires_scalef``) with a
:class:`~stgen.errors.LowResolutionImageWarning`.

Which bin size and patch size
-----------------------------
Bins tile the capture area edge to edge (a square lattice: pitch = side = bin size), so a bin's patch of
tissue is its neighbourhood, not a spot surrounded by gaps as in Visium (55 um spots, 100 um apart).

* **16 um** (default): about one to two cells (cells are ~10-20 um across) and enough UMIs per bin for a
  useful target. The default 224 px patch (``features.patch_px``) at a typical HD microscope scan of
  ~0.27 um/px covers ~60 um: the bin and the cells around it, the context an H&E encoder needs. Set
  ``features.patch_um`` (e.g. 64) to keep that context in microns across scanners.
* **8 um**: below a cell; few UMIs per bin, so targets are noisy (lower per-gene correlations) and there
  are 4x as many bins (a 6.5 mm capture area holds up to ~660,000) to encode. Use it for finer maps when the
  tissue is well covered; keep the patch at tens of microns (a patch of 8 um holds no tissue context).
* **2 um**: sub-cellular, a handful of UMIs per bin and ~11 million bins: far too sparse to train on (read
  with a warning; aggregate to 8 or 16 um instead).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stgen.data.common import (
    _assemble,
    _float_column,
    _image_and_mpp_override,
    _int_column,
    _pos_float,
    _read_json,
    _resolve_image,
    downsampled_scale,
    warn_downsampled,
)
from stgen.data.visium import _section_name, downsampled_image, read_10x_counts
from stgen.errors import InputError

__all__ = [
    "DEFAULT_BIN_UM",
    "hd_bin_sizes",
    "hd_bins_dir",
    "hd_downsampled_image",
    "hd_sample",
    "is_hd_bin_folder",
    "read_hd_positions",
    "read_visium_hd",
    "read_visium_hd_counts",
]

#: Bin side (um) read by default: about one to two cells (module docstring).
DEFAULT_BIN_UM = 16
#: Visium HD barcodes squares are 2 um; every bin size is a multiple of it.
BASE_BIN_UM = 2
BINNED_OUTPUTS = "binned_outputs"
POSITIONS_FILE = "tissue_positions.parquet"
_BIN_RE = re.compile(r"square_(\d{3})um")
_POS_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


# --------------------------------------------------------------------------- layout


def is_hd_bin_folder(d: Path) -> bool:
    """Whether ``d`` is named like a Visium HD bin folder (``square_016um``)."""
    return _BIN_RE.fullmatch(Path(d).name) is not None


def _bin_folders(d: Path) -> dict[int, Path]:
    """bin size (um) -> ``square_NNNum`` sub-folder of ``d``."""
    if not d.is_dir():
        return {}
    out = {}
    for p in d.iterdir():
        m = _BIN_RE.fullmatch(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def hd_bins_dir(d: str | os.PathLike) -> Path | None:
    """The folder holding the ``square_NNNum`` bin folders of a Visium HD sample, or None.

    ``d`` may be the sample folder (``d/outs/binned_outputs``), the ``outs`` folder (``d/binned_outputs``)
    or the ``binned_outputs`` folder itself (any folder whose sub-folders are ``square_NNNum``).
    """
    d = Path(d)
    for cand in (d / "outs" / BINNED_OUTPUTS, d / BINNED_OUTPUTS, d):
        if _bin_folders(cand):
            return cand
    return None


def hd_bin_sizes(d: str | os.PathLike) -> list[int]:
    """The bin sizes (um) of a Visium HD sample folder (see :func:`hd_bins_dir`); [] if it is none."""
    bins = hd_bins_dir(d)
    return list(_bin_folders(bins)) if bins is not None else []


def _hd_outs(bins: Path) -> Path:
    """The ``outs`` folder above a bins folder (the bins folder itself when it is not ``binned_outputs``)."""
    return bins.parent if bins.name == BINNED_OUTPUTS else bins


def hd_sample(d: str | os.PathLike) -> tuple[Path, Path, Path] | None:
    """``(sample folder, outs folder, bins folder)`` of a Visium HD sample folder / outs / binned_outputs, or
    None. The sample folder (where a full-resolution image is looked for) is the one containing ``outs``."""
    bins = hd_bins_dir(d)
    if bins is None:
        return None
    outs = _hd_outs(bins)
    return (outs.parent if outs.name == "outs" else outs), outs, bins


def hd_downsampled_image(outs: Path, bin_dir: Path | None = None) -> tuple[Path, str] | None:
    """``(tissue_hires_image.png, else tissue_lowres_image.png, its scale-factor field)`` of the bin folder's
    ``spatial/``, else of ``outs/spatial/``; None when neither has one."""
    found = downsampled_image(bin_dir / "spatial") if bin_dir is not None else None
    return found or downsampled_image(Path(outs) / "spatial")


def _check_bin_um(bin_um: object, where: str) -> int:
    """``bin_um`` as an int: InputError unless it is a positive multiple of 2 um."""
    v = _pos_float(bin_um)
    if v is None or v % BASE_BIN_UM != 0:
        raise InputError(f"{where}: bin_um={bin_um!r}: Visium HD bins are multiples of {BASE_BIN_UM} um "
                         f"(2, 8, 16 from Space Ranger)")
    return int(v)


def _bin_dir(path: Path, bin_um: object) -> tuple[Path, Path, int]:
    """``(outs folder, square_NNNum folder, bin size)`` for ``path`` (a sample, outs, binned_outputs or bin
    folder). One InputError, naming the folder and the sizes available, for a bin size that is not a multiple
    of 2 um or not on disk."""
    if is_hd_bin_folder(path) and not hd_bins_dir(path):  # a square_NNNum folder itself
        bins, own = path.parent, int(_BIN_RE.fullmatch(path.name).group(1))
        if _pos_float(bin_um) != own:
            raise InputError(f"{path}: this folder holds the {own} um bins but bin_um={bin_um!r}; pass "
                             f"bin_um={own} or the outs folder")
    else:
        bins = hd_bins_dir(path)
    if bins is None:
        hint = ""
        if (path / "spatial").is_dir() or (path / "outs" / "spatial").is_dir():
            hint = " (a Visium 55 um spot outs folder is read by stgen.data.visium.read_spaceranger)"
        raise InputError(f"{path}: not a Visium HD outs folder: no {BINNED_OUTPUTS}/square_NNNum/ bin folders "
                         f"(Space Ranger >= 3.0){hint}")
    folders = _bin_folders(bins)
    avail = ", ".join(str(b) for b in folders)
    v = _pos_float(bin_um)
    if v is None or v % BASE_BIN_UM != 0 or int(v) not in folders:
        why = "is not a multiple of 2 um" if v is None or v % BASE_BIN_UM != 0 else "is not there"
        raise InputError(f"{bins}: bin_um={bin_um!r} {why}; this sample has {avail} um bins "
                         f"({', '.join(p.name for p in folders.values())})")
    b = int(v)
    if b < 8:
        warnings.warn(f"{folders[b]}: {b} um bins are far below a cell (~10-20 um) and hold a handful of UMIs "
                      "each: too sparse to train on; use bin_um=8 or 16", UserWarning, stacklevel=3)
    return _hd_outs(bins), folders[b], b


# --------------------------------------------------------------------------- files


def read_hd_positions(path: str | os.PathLike) -> pd.DataFrame:
    """Read a Visium HD ``spatial/tissue_positions.parquet``.

    Returns
    -------
    DataFrame indexed by barcode (str) with int ``in_tissue``, ``array_row``, ``array_col`` and float
    ``pxl_row_in_fullres`` (y), ``pxl_col_in_fullres`` (x) in full-resolution pixels; all rows.

    Raises
    ------
    InputError : missing or unreadable file, missing columns, non-numeric or missing values, in_tissue not
        0/1, duplicated barcodes.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: tissue positions not found (Visium HD writes spatial/{POSITIONS_FILE})")
    try:
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        miss = [c for c in _POS_COLUMNS if c not in names]
        if miss:
            raise InputError(f"{path}: missing column(s) {', '.join(miss)}; found {names}")
        df = pq.read_table(path, columns=_POS_COLUMNS).to_pandas()
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
    if len(df) == 0:
        raise InputError(f"{path}: no bins")
    ids = pd.Index(df["barcode"].astype(str).str.strip(), dtype=object)
    dup = ids.duplicated()
    if dup.any():
        raise InputError(f"{path}: {int(dup.sum())} duplicated barcode(s), e.g. {ids[dup][0]!r}")
    out = pd.DataFrame(index=ids)
    for c in ("in_tissue", "array_row", "array_col"):
        out[c] = _int_column(df[c].to_numpy(), str(path), c)
    if not out["in_tissue"].isin([0, 1]).all():
        raise InputError(f"{path}: in_tissue must be 0 or 1")
    for c in ("pxl_row_in_fullres", "pxl_col_in_fullres"):
        out[c] = _float_column(df[c].to_numpy(), str(path), c, ids)
    return out


def _matrix_path(bin_dir: Path) -> Path:
    for p in (bin_dir / "filtered_feature_bc_matrix.h5", bin_dir / "filtered_feature_bc_matrix"):
        if p.exists():
            return p
    raise InputError(f"{bin_dir}: no filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/ folder")


def _hd_counts(bin_dir: Path) -> tuple[ad.AnnData, pd.DataFrame, Path]:
    """In-tissue bin counts (count-matrix order), their rows of the positions table, and its path."""
    counts = read_10x_counts(_matrix_path(bin_dir))
    ppath = bin_dir / "spatial" / POSITIONS_FILE
    pos = read_hd_positions(ppath)
    pos = pos[pos["in_tissue"] == 1]
    keep = counts.obs_names.isin(pos.index)
    if not keep.any():
        raise InputError(f"{ppath}: no in-tissue barcode is in the count matrix {_matrix_path(bin_dir)}")
    if not keep.all():
        counts = counts[keep].copy()
    return counts, pos.loc[counts.obs_names], ppath


def _sf_number(sf: dict, key: str, path: Path) -> float | None:
    """``sf[key]`` as a positive float; None when absent; InputError naming ``path`` and ``key`` when it is
    there but not a positive number."""
    if sf.get(key) is None:
        return None
    v = _pos_float(sf[key])
    if v is None:
        raise InputError(f"{path}: {key} is {sf[key]!r}; it must be a positive number")
    return v


def _hd_mpp(sf: dict, sf_path: Path, bin_um: int, img_mpp: float | None) -> tuple[float, str]:
    """Microns per full-resolution pixel from the scale factors (``microns_per_pixel``, else ``bin_size_um /
    spot_diameter_fullres``), else the image's embedded resolution."""
    m = _sf_number(sf, "microns_per_pixel", sf_path)
    if m is not None:
        return m, "scalefactors microns_per_pixel"
    d = _sf_number(sf, "spot_diameter_fullres", sf_path)
    if d is not None:
        return (sf.get("bin_size_um") or bin_um) / d, "scalefactors bin_size_um / spot_diameter_fullres"
    if img_mpp is not None:
        return img_mpp, "image resolution tags"
    raise InputError(f"{sf_path}: no microns_per_pixel or spot_diameter_fullres, and no embedded image "
                     "resolution; pass mpp= (microns per full-resolution pixel)")


# --------------------------------------------------------------------------- readers


def read_visium_hd(
    path: str | os.PathLike,
    bin_um: int = DEFAULT_BIN_UM,
    image: str | os.PathLike | None = None,
    mpp: float | None = None,
    section: str | None = None,
    require_image: bool = False,
    downsampled: bool = True,
) -> ad.AnnData:
    """Read one bin size of a Visium HD Space Ranger ``outs/`` folder as one section of square spots.

    Parameters
    ----------
    path : the ``outs`` folder (the folder containing ``outs/``, the ``binned_outputs`` folder or one
        ``square_NNNum`` folder are accepted too).
    bin_um : bin side in microns: 16 (default), 8, or 2 (warned: too sparse to train on; see the module
        docstring for which bin and patch sizes suit H&E prediction); ``square_<bin_um:03d>um`` must exist.
    image : the full-resolution microscope H&E image given to Space Ranger. None: with ``downsampled``
        (default), ``spatial/tissue_hires_image.png`` (of the bin folder, else ``outs/spatial/``; without it
        the lowres PNG) at its scale factor: ``uns['stgen']['image_scale']`` = ``tissue_hires_scalef`` (image
        pixels per full-resolution pixel), with a :class:`~stgen.errors.LowResolutionImageWarning`; patches
        cover the same microns and are upsampled. Without either, an expression-only section.
    mpp : microns per full-resolution pixel; default ``microns_per_pixel`` of the bin's
        ``spatial/scalefactors_json.json``, else ``bin_size_um / spot_diameter_fullres``, else the image's
        embedded resolution.
    section : section name (default: the folder containing ``outs``).
    require_image : raise if there is no image (neither ``image`` nor, with ``downsampled``, a PNG).
    downsampled : use the hires/lowres PNG when ``image`` is None.

    Counts of the bin's filtered matrix (Gene Expression features) are inner-joined with the
    ``in_tissue == 1`` rows of ``tissue_positions.parquet`` (count-matrix order); ``pixel_x =
    pxl_col_in_fullres``, ``pixel_y = pxl_row_in_fullres`` (full-resolution pixels), ``array_x = array_col``,
    ``array_y = array_row``; grid ``square`` with ``spot_spacing_um = spot_diameter_um = bin_um`` (bins
    tile the area), checked against the pixel coordinates (one array step = one bin).

    Raises
    ------
    InputError : not a Visium HD folder, a bin size that is not a multiple of 2 um or not on disk (naming
        those available), missing/corrupt files, bad scale factors (naming the file and field), no mpp,
        coordinates that do not match the bin size, bins outside the image.
    """
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: Visium HD outs folder not found")
    outs, bin_dir, b = _bin_dir(p, bin_um)
    section = section or _section_name(outs)
    sf_path = bin_dir / "spatial" / "scalefactors_json.json"
    sf = _read_json(sf_path, "scale factors")
    size = _sf_number(sf, "bin_size_um", sf_path)
    if size is not None and size != b:
        raise InputError(f"{sf_path}: bin_size_um is {sf['bin_size_um']!r} but the folder {bin_dir.name} holds "
                         f"{b} um bins")
    scale = 1.0
    if image is None and downsampled:
        small = hd_downsampled_image(outs, bin_dir)
        if small is not None:
            image, field = small
            scale = downsampled_scale(sf, field, str(sf_path))
    img = _resolve_image(image, require_image, f"section {section!r}")
    counts, pos, ppath = _hd_counts(bin_dir)

    image_wh, img_mpp, m, m_src = _image_and_mpp_override(img, mpp)  # the mpp argument wins
    if scale != 1.0:
        img_mpp = None  # a PNG has no scan resolution
    if m is None:
        m, m_src = _hd_mpp(sf, sf_path, b, img_mpp)
    if scale != 1.0:
        warn_downsampled(section, img, image_wh, scale, m)
    return _assemble(
        sp.csr_matrix(counts.X), pd.Index(counts.obs_names, dtype=object), list(counts.var_names),
        pos[["array_col", "array_row"]].to_numpy(np.int64),
        pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64),
        where=str(ppath), section=section, image=img, image_wh=image_wh, image_scale=scale,
        mpp=m, mpp_source=m_src, grid="square", spacing_um=float(b), diameter_um=float(b), source="visium_hd",
    )


def read_visium_hd_counts(path: str | os.PathLike, bin_um: int = DEFAULT_BIN_UM,
                          section: str | None = None) -> ad.AnnData:
    """Raw counts of the in-tissue bins of :func:`read_visium_hd` (same bins and order; bins x genes, CSR
    float32, ``obs['section']``), without image, mpp or geometry checks."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: Visium HD outs folder not found")
    outs, bin_dir, _ = _bin_dir(p, bin_um)
    counts, _, _ = _hd_counts(bin_dir)
    counts.obs["section"] = section or _section_name(outs)
    return counts
