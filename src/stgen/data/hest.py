"""HEST-1k samples (``st/<id>.h5ad``, ``wsis/<id>.tif``, ``metadata/<id>.json``)."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from stgen.errors import InputError
from stgen.data.common import GRIDS
from stgen.data.common import SCALE_TOLERANCE
from stgen.data.common import _anndata_counts
from stgen.data.common import _assemble
from stgen.data.common import _flag_column
from stgen.data.common import _float_column
from stgen.data.common import _image_info
from stgen.data.common import _int_column
from stgen.data.common import _pos_float
from stgen.data.common import _read_json
from stgen.data.common import _spot_ids
from stgen.data.common import array_pitch_px
from stgen.data.common import read_anndata

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- HEST-1k

#: HEST-1k ``st_technology`` values stgen trains on (HEST's spelling) -> spot grid
SPOT_TECHNOLOGIES: dict[str, str] = {"Visium": "hex", "Spatial Transcriptomics": "square"}

#: lower-case names accepted for :data:`SPOT_TECHNOLOGIES` (``technology=``, ``--technology``)
_ALIASES = {"visium": "Visium", "spatial transcriptomics": "Spatial Transcriptomics",
            "st": "Spatial Transcriptomics", "legacy st": "Spatial Transcriptomics"}

#: what HEST-1k stores for the technologies stgen does not train on (lower-case name -> why)
_NOT_SPOTS = {
    "xenium": "HEST pools Xenium transcripts into 100 um square pseudo-spots, an in-situ gene panel rather "
              "than a sequenced spot array",
    "visium hd": "HEST pools Visium HD's 2-16 um bins into square pseudo-spots, not Visium's 55 um spots",
}

#: ratio (true / tagged) of HEST-1k's pyramidal-TIFF resolution tags: its writer passes pixels per cm where
#: pixels per mm are expected, so the tag's um/px is 10x too small (HEST issue #106)
TAG_BUG_RATIO = 10.0


def _tech_key(tech: object) -> str:
    return " ".join(str(tech).strip().lower().replace("_", " ").replace("-", " ").split())


def technology_name(tech: object) -> str:
    """HEST's spelling of a supported technology (``'visium'`` -> ``'Visium'``, ``'st'`` -> ``'Spatial
    Transcriptomics'``); InputError naming the supported ones for anything else (Xenium and Visium HD with
    the reason)."""
    name = _ALIASES.get(_tech_key(tech))
    if name is not None:
        return name
    why = _NOT_SPOTS.get(_tech_key(tech))
    raise InputError(f"technology {tech!r} is not supported for spot-level training"
                     + (f" ({why})" if why else "") + "; use 'Visium' or 'Spatial Transcriptomics'")


def sample_technology(root: Path, sample_id: str) -> str:
    """``st_technology`` of a sample's ``metadata/<id>.json`` as written (HEST's spelling for the supported
    ones); InputError when the file is missing, unreadable or has no such field."""
    path = Path(root) / "metadata" / f"{sample_id}.json"
    tech = _read_json(path, "HEST metadata").get("st_technology")
    if not tech or not isinstance(tech, str) or _tech_key(tech) == "nan":
        raise InputError(f"{path}: no 'st_technology' field")
    return _ALIASES.get(_tech_key(tech), tech.strip())


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


def refusal(sample_id: str, tech: str, path: Path) -> str:
    """Why sample ``sample_id`` (``st_technology`` ``tech``, metadata ``path``) is not read, and what to do."""
    why = _NOT_SPOTS.get(_tech_key(tech))
    return (f"{path}: HEST sample {sample_id!r}: st_technology {tech!r} is not supported for spot-level "
            "training (supported: 'Visium', 'Spatial Transcriptomics')" + (f": {why}" if why else "")
            + f"; leave it out by opening the folder with technology='Visium' or 'Spatial Transcriptomics' "
              f"(stgen fit --technology ...), or move st/{sample_id}.h5ad out of {path.parent.parent}")


def _hest_technology(meta: dict, path: Path, sample_id: str | None = None) -> tuple[str, str]:
    tech = meta.get("st_technology")
    if not tech or not isinstance(tech, str) or _tech_key(tech) == "nan":
        raise InputError(f"{path}: no 'st_technology' field")
    name = _ALIASES.get(_tech_key(tech))
    if name is None:
        raise InputError(refusal(sample_id or path.stem, tech, path))
    return tech, SPOT_TECHNOLOGIES[name]


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


# --------------------------------------------------------------------------- pixel size


def hest_slide_mpp(image: str | os.PathLike) -> float | None:
    """``pixel_size_um_estimated`` (um per full-resolution pixel) for a HEST-1k slide ``<root>/wsis/<id>.tif``
    from ``<root>/metadata/<id>.json`` beside it, or None (not in that layout, no such file or field): what
    ``predict`` uses instead of the slide's TIFF tags, which HEST writes 10x off."""
    p = Path(image)
    if p.parent.name != "wsis" or p.suffix.lower() not in (".tif", ".tiff"):
        return None
    meta = p.parent.parent / "metadata" / f"{p.stem}.json"
    if not meta.is_file():
        return None
    try:
        return _pos_float(_read_json(meta, "HEST metadata").get("pixel_size_um_estimated"))
    except InputError:
        return None


def _raw_tiff_mpp(path: Path) -> float | None:
    """um/px of a TIFF's first-page XResolution/ResolutionUnit tags, however implausible (None when absent)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            tags = tf.pages[0].tags
            xres, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
            num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
            per_unit_um = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}.get(int(unit.value) if unit is not None else 2)
    except Exception:  # noqa: BLE001 - no tag, or a file open_slide already judged: nothing to flag
        return None
    return _pos_float(per_unit_um / (num / den)) if per_unit_um and num and den else None


def _lattice_pitch_px(pixel_xy: np.ndarray, array_xy: np.ndarray, grid: str, where: str) -> float | None:
    """Spot pitch in full-resolution pixels, as :func:`stgen.data.common.check_spot_scale` measures it."""
    from scipy.spatial import cKDTree

    pitch = array_pitch_px(array_xy, pixel_xy, grid, where)
    if pitch is not None or len(pixel_xy) < 2:
        return pitch
    d, _ = cKDTree(pixel_xy).query(pixel_xy, k=2)
    nn = d[:, 1][d[:, 1] > 0]
    return float(np.median(nn)) if len(nn) else None


def _tag_note(tag: float, good: float) -> str:
    """How far a resolution tag's ``tag`` um/px is from the ``good`` one, naming HEST's tag bug when the ratio
    is about :data:`TAG_BUG_RATIO`."""
    r = good / tag
    if abs(r / TAG_BUG_RATIO - 1) <= SCALE_TOLERANCE:
        return (f" (about {r:.3g}x too small: HEST's TIFF writer stores pixels per cm where pixels per mm are "
                "expected, HEST issue #106)")
    return f" ({r:.3g}x off)"


def _hest_mpp(mpp, meta: dict, meta_path: Path, wsi: Path | None, wsi_mpp: float | None,
              pitch_px: float | None, spacing: float, sample_id: str) -> tuple[float, str]:
    """``(mpp, mpp_source)`` of a HEST sample; see :func:`read_hest_sample`."""
    if mpp is not None:
        m = _pos_float(mpp)
        if m is None:
            raise InputError(f"mpp must be a positive number, got {mpp!r}")
        return m, "argument"
    est = _pos_float(meta.get("pixel_size_um_estimated"))
    emb = _pos_float(meta.get("pixel_size_um_embedded"))
    tag = wsi_mpp if wsi_mpp is not None else (_raw_tiff_mpp(wsi) if wsi is not None else None)

    def fits(m: float) -> bool:
        return pitch_px is None or abs(pitch_px * m / spacing - 1.0) <= SCALE_TOLERANCE

    if est is not None:
        if tag is not None and abs(tag / est - 1.0) > SCALE_TOLERANCE:
            warnings.warn(f"HEST sample {sample_id!r}: the resolution tag of {wsi} says {tag:.4g} um/px but "
                          f"{meta_path.name} has pixel_size_um_estimated {est:.4g} um/px{_tag_note(tag, est)}; "
                          "using pixel_size_um_estimated", stacklevel=3)
        return est, "metadata pixel_size_um_estimated"
    implied = spacing / pitch_px if pitch_px else None
    if tag is not None and wsi_mpp is not None and fits(tag):
        return tag, "image resolution tags"
    problems = ["no pixel_size_um_estimated"]
    if tag is not None:
        bad = f"the resolution tag of {wsi.name} says {tag:.4g} um/px"
        if wsi_mpp is None:
            from stgen.image.slide import MPP_RANGE

            bad += f" (outside the plausible {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} um/px)"
        if implied is not None:
            bad += f", which makes the spot pitch {pitch_px * tag:.3g} um instead of {spacing:g} um"
            bad += _tag_note(tag, implied)
        problems.append(bad)
    else:
        problems.append(f"no resolution in {wsi}" if wsi is not None else "no WSI")
    if emb is not None and fits(emb):
        if tag is not None:
            warnings.warn(f"{meta_path}: {'; '.join(problems)}; using pixel_size_um_embedded {emb:.4g} um/px, "
                          "which fits the spot spacing (set pixel_size_um_estimated to be sure)", stacklevel=3)
        return emb, "metadata pixel_size_um_embedded"
    if emb is not None:
        problems.append(f"pixel_size_um_embedded {emb:.4g} um/px makes the spot pitch "
                        f"{pitch_px * emb:.3g} um instead of {spacing:g} um")
    hint = f" (the spot lattice implies about {implied:.4g} um/px)" if implied is not None else ""
    raise InputError(f"{meta_path}: no usable pixel size for HEST sample {sample_id!r}: {'; '.join(problems)}; "
                     f"set pixel_size_um_estimated in {meta_path.name}{hint} or pass mpp= (microns per "
                     "full-resolution pixel)")


# --------------------------------------------------------------------------- reader


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
      ``array_col`` from the first / second number of the ``"<x>x<y>"`` spot id
      (zero-padded by HEST, e.g. ``"010x007"``), so ``array_x = array_row``,
      ``array_y = array_col`` (and the id is parsed when those columns are missing).
    * Counts: ``layers['counts']`` if present, else ``.X`` (must be raw counts).
    * Grid from ``st_technology``: ``Visium`` -> hex, ``Spatial Transcriptomics``
      -> square; spacing / diameter from ``inter_spot_dist`` / ``spot_diameter``
      when present, else 100/55 (hex) or 200/100 (square). Xenium and Visium HD
      samples (HEST's square pseudo-spots) are refused, naming the way out.
    * Metadata fields that are ``NaN`` (the JSON token), ``null`` or ``"nan"`` count as missing.
    * mpp (um per full-resolution pixel), first usable: the ``mpp`` argument; metadata
      ``pixel_size_um_estimated`` (what HEST itself uses; a warning names both values when the WSI's
      resolution tag differs by over 25%, as HEST's 10x-off tags do); the WSI's embedded resolution
      when it makes the spot pitch match ``inter_spot_dist`` (within 25%); metadata
      ``pixel_size_um_embedded`` (HEST's least reliable field: 1.0, 31.75, 2540 occur) likewise only when
      it fits the spot pitch. ``uns['stgen']['mpp_source']`` says which.

    Raises
    ------
    InputError : missing/corrupt files, unsupported technology (Xenium, Visium
        HD, ...), bad counts or coordinates, no usable mpp (the message names the
        field to set and the pitch-implied value), wrong coordinate scale,
        spots outside the image (or outside ``fullres_px_width/height`` when the
        WSI is absent), ``require_image`` without a WSI.
    """
    root = Path(root)
    st, meta_path, wsi = _hest_paths(root, sample_id)
    if not st.is_file():
        raise InputError(f"{st}: HEST sample {sample_id!r} not found (no st/{sample_id}.h5ad)")
    meta = _read_json(meta_path, "HEST metadata")
    tech, grid = _hest_technology(meta, meta_path, sample_id)
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
    pitch_px = None if mpp is not None else _lattice_pitch_px(pixel_xy, array_xy, grid, str(st))
    m, m_src = _hest_mpp(mpp, meta, meta_path, wsi, wsi_mpp, pitch_px, spacing, sample_id)

    return _assemble(
        X, spots, genes, array_xy, pixel_xy,
        where=str(st), section=sample_id, image=wsi,
        image_wh=image_wh,
        image_name=wsi.name if wsi is not None else f"fullres_px_width/height of {meta_path.name}",
        mpp=m, mpp_source=m_src, grid=grid, spacing_um=spacing, diameter_um=diameter,
        source=f"hest:{tech}",
    )


# --------------------------------------------------------------------------- technology selection


class HestSelection:
    """The samples of a HEST-1k folder that one data set uses: those of one ``st_technology``.

    A HEST download mixes technologies (HEST's own query for breast IDC returns ST, Visium and Xenium
    samples), and one fit trains on one spot grid. ``technology`` (a name :func:`technology_name`
    accepts) picks the group; by default it is the larger supported group (Visium or Spatial
    Transcriptomics; a tie goes to Visium) and a warning names it and counts the samples of every other
    group left out, Xenium, Visium HD and samples without a readable ``st_technology`` included, so that
    none of them enters a fit or a pre-training corpus unannounced.
    """

    def __init__(self, root: str | os.PathLike, technology: str | None = None):
        self.root = Path(root)
        self.requested = None if technology is None else technology_name(technology)
        self._tech: dict[str, tuple[tuple[int, int], str | None]] = {}
        self._said: set[tuple] = set()

    def technology_of(self, sample_id: str) -> str | None:
        """:func:`sample_technology`, or None when the metadata is missing or unreadable (cached per file
        version)."""
        p = self.root / "metadata" / f"{sample_id}.json"
        try:
            st = p.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            return None
        hit = self._tech.get(sample_id)
        if hit is None or hit[0] != stamp:
            try:
                tech: str | None = sample_technology(self.root, sample_id)
            except InputError:
                tech = None
            hit = self._tech[sample_id] = (stamp, tech)
        return hit[1]

    def groups(self, samples: list[str]) -> dict[str | None, list[str]]:
        """technology (None: no readable ``st_technology``) -> its sorted samples."""
        out: dict[str | None, list[str]] = {}
        for s in sorted(samples):
            out.setdefault(self.technology_of(s), []).append(s)
        return out

    def chosen(self, samples: list[str]) -> str | None:
        """The technology used: the requested one, else the larger supported group (None: there is none)."""
        if self.requested is not None:
            return self.requested
        g = self.groups(samples)
        best = max(SPOT_TECHNOLOGIES, key=lambda t: len(g.get(t, [])))  # the first of equals: Visium
        return best if g.get(best) else None

    def _describe(self, groups: dict[str | None, list[str]], chosen: str | None) -> str:
        parts = []
        for t, v in sorted(groups.items(), key=lambda kv: (kv[0] is None, -len(kv[1]), str(kv[0]))):
            if t == chosen:
                continue
            if t is None:
                parts.append(f"{len(v)} without a readable st_technology (e.g. {v[0]!r})")
            elif t in SPOT_TECHNOLOGIES:
                parts.append(f"{len(v)} {t}")
            else:
                parts.append(f"{len(v)} {t} (not supported for spot-level training)")
        return ", ".join(parts)

    def select(self, samples: list[str]) -> list[str]:
        """The sorted samples of :meth:`chosen`, announcing (once) what is left out; InputError when the
        folder has samples but none of the chosen (or any supported) technology."""
        if not samples:
            return []
        g = self.groups(samples)
        tech = self.chosen(samples)
        left = self._describe(g, tech)
        if tech is None:
            raise InputError(f"{self.root}: no HEST sample stgen can train on (Visium or Spatial Transcriptomics); "
                             f"found {left}")
        keep = g.get(tech, [])
        if not keep:
            raise InputError(f"{self.root}: no {tech} sample (technology={tech!r}); found {left}")
        key = (tech, tuple(sorted((str(t), len(v)) for t, v in g.items())))
        if left and key not in self._said:
            self._said.add(key)
            other = next((t for t in SPOT_TECHNOLOGIES if t != tech), "")
            if self.requested is None:
                warnings.warn(f"{self.root}: HEST folder of several technologies: using its {len(keep)} {tech} "
                              f"sample(s), the largest group stgen trains on; left out: {left}; choose with "
                              f"technology={other!r} (open_dataset, HestDataset; stgen fit --technology)",
                              stacklevel=3)
            else:
                log.info("%s: using the %d %s sample(s) (technology=%r); left out: %s",
                         self.root, len(keep), tech, tech, left)
        return list(keep)

    def note_outside(self, sample_id: str, samples: list[str]) -> None:
        """Warn (once per sample) that ``sample_id``'s counts are asked for although it lies outside the
        selection (e.g. a Xenium sample named in ``pretrain.corpus``)."""
        tech, chosen = self.technology_of(sample_id), self.chosen(samples)
        if tech == chosen or ("outside", sample_id) in self._said:
            return
        self._said.add(("outside", sample_id))
        warnings.warn(f"{self.root}: using the counts of HEST sample {sample_id!r} "
                      f"({tech or 'no readable st_technology'}), which lies outside the data set's "
                      f"{chosen or 'trainable'} samples", stacklevel=4)
