"""Tissue detection and spot grids for predicting on a bare H&E slide (no spot file).

A slide that was never sequenced has no spot positions. :func:`detect_tissue`
finds the tissue on a low-resolution thumbnail the way whole-slide pathology
pipelines do (e.g. CLAM, Lu et al. 2021): Otsu's threshold on the median-blurred
HSV saturation channel, then a morphological closing and removal of small
specks and holes. :func:`lay_spot_grid` lays virtual spots over it at the
training data's centre-to-centre spacing:

* ``"square"`` - legacy Spatial Transcriptomics (Her2ST): 200 um spacing,
  100 um spots on a square lattice;
* ``"hex"`` - 10x Visium: 100 um centre-to-centre, 55 um spots; rows are
  ``spacing * sqrt(3) / 2`` apart and every odd row is shifted by half a spacing.

Coordinates are full-resolution pixels, x = column, y = row (as everywhere in
stgen); a thumbnail of ``scale`` thumbnail pixels per full-resolution pixel maps
full-resolution ``(x, y)`` to thumbnail ``(x * scale, y * scale)``.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import pandas as pd
from scipy import ndimage
from stgen.data.common import GRIDS
from stgen.errors import InputError


__all__ = ["GRIDS", "MAX_GRID_SPOTS", "TissueMask", "detect_tissue", "lay_spot_grid"]

#: Most lattice points :func:`lay_spot_grid` lays over a slide (a 100 x 100 mm slide holds 1e6 Visium
#: spots); more means a wrong mpp, refused before any memory is spent on them.
MAX_GRID_SPOTS = 20_000_000


@dataclass
class TissueMask:
    """A boolean tissue mask on a thumbnail.

    Attributes
    ----------
    mask : (h, w) bool, True on tissue.
    scale : thumbnail pixels per full-resolution pixel.
    threshold : the Otsu threshold on saturation (0-255) that produced it.
    """

    mask: np.ndarray
    scale: float
    threshold: float

    @property
    def fraction(self) -> float:
        """Share of the thumbnail covered by tissue (0..1)."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def detect_tissue(thumbnail: np.ndarray, scale: float, min_area_um2: float = 2.5e5, mpp: float | None = None,
                  source: str = "slide") -> TissueMask:
    """Tissue mask of a slide thumbnail by Otsu thresholding of its saturation.

    Parameters
    ----------
    thumbnail : (h, w, 3) uint8 RGB thumbnail.
    scale : thumbnail pixels per full-resolution pixel (``Slide.thumbnail``).
    min_area_um2 : tissue pieces and holes smaller than this (square microns;
        default 0.25 mm^2) are dropped / filled; needs ``mpp``, else 0.1 % of the
        thumbnail is used.
    mpp : microns per full-resolution pixel.
    source : name used in error messages.

    Returns
    -------
    :class:`TissueMask`.

    Raises
    ------
    InputError : bad thumbnail, or no tissue found (a blank or uniformly coloured slide).
    """
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    t = np.asarray(thumbnail)
    if t.ndim != 3 or t.shape[2] != 3 or t.dtype != np.uint8 or min(t.shape[:2]) < 2:
        raise InputError(f"{source}: thumbnail must be (h, w, 3) uint8 with h, w >= 2, got {t.shape} {t.dtype}")
    sat = (rgb2hsv(t)[..., 1] * 255.0).astype(np.float32)
    sat = ndimage.median_filter(sat, size=5)
    if float(sat.max() - sat.min()) < 8.0:  # nothing but background (or a uniform stain)
        raise InputError(f"{source}: no tissue found (the slide's saturation is uniform)")
    thr = float(threshold_otsu(sat))
    mask = sat > thr
    mask = ndimage.binary_closing(mask, structure=np.ones((5, 5), bool), iterations=1)
    px_area = (mpp / scale) ** 2 if mpp else None  # um^2 per thumbnail pixel
    min_px = int(min_area_um2 / px_area) if px_area else int(0.001 * mask.size)
    if min_px > 1:
        mask = remove_small_objects(mask, max_size=min_px)
        # fill small holes, but never background that reaches the slide's edge (glass, however small)
        holes, n = ndimage.label(~mask)
        if n:
            sizes = np.bincount(holes.ravel(), minlength=n + 1)
            edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
            small = sizes <= min_px
            small[0] = False
            small[edge] = False
            mask |= small[holes]
    if not mask.any():
        raise InputError(f"{source}: no tissue found (Otsu threshold {thr:.1f} on saturation left nothing)")
    return TissueMask(mask=mask, scale=float(scale), threshold=thr)


def _lattice(kind: str, spacing_px: float, width: int, height: int,
             origin: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All lattice points inside the image: ``(xy (M, 2), col (M,), row (M,))``."""
    ox, oy = origin
    dy = spacing_px * (np.sqrt(3.0) / 2.0 if kind == "hex" else 1.0)
    r0, r1 = int(np.floor(-oy / dy)), int(np.ceil((height - 1 - oy) / dy))
    rows = np.arange(r0, r1 + 1)
    c0, c1 = int(np.floor(-ox / spacing_px)) - 1, int(np.ceil((width - 1 - ox) / spacing_px)) + 1
    cols = np.arange(c0, c1 + 1)
    cc, rr = np.meshgrid(cols, rows)
    cc, rr = cc.ravel(), rr.ravel()
    x = ox + spacing_px * (cc + (0.5 * (rr % 2) if kind == "hex" else 0.0))
    y = oy + dy * rr
    inside = (x >= 0) & (y >= 0) & (x <= width - 1) & (y <= height - 1)
    return np.column_stack([x[inside], y[inside]]), cc[inside], rr[inside]


def lay_spot_grid(tissue: TissueMask, width: int, height: int, mpp: float, kind: str = "square",
                  spacing_um: float | None = None, diameter_um: float | None = None,
                  origin: tuple[float, float] | None = None, min_tissue: float = 0.5) -> pd.DataFrame:
    """Virtual spots on the tissue at a technology's spot spacing.

    Parameters
    ----------
    tissue : mask from :func:`detect_tissue`.
    width, height : slide size in full-resolution pixels.
    mpp : microns per full-resolution pixel.
    kind : ``"square"`` (legacy ST) or ``"hex"`` (Visium); see :data:`GRIDS`.
    spacing_um, diameter_um : centre-to-centre spacing and spot diameter in
        microns (default: those of ``kind``).
    origin : full-resolution ``(x, y)`` of one lattice point (default: the
        top-left corner of the tissue's bounding box); predictions at a lattice
        point equal those of a spot file listing the same position (and, for
        a model with spatial context, the same neighbours).
    min_tissue : keep a spot when at least this share of its disc is tissue.

    Returns
    -------
    DataFrame indexed by spot id ``"<col>x<row>"`` with float ``pixel_x``,
    ``pixel_y`` (full-resolution px) and int ``array_col``, ``array_row``
    (lattice indices; hex rows follow Visium's offset-row convention).

    Raises
    ------
    InputError : unknown ``kind``, non-positive ``mpp``/spacing, an ``origin`` that is not a
        finite point of the slide, a spacing or spot so small or large in pixels that ``mpp``
        must be wrong (over :data:`MAX_GRID_SPOTS` lattice points, or a spot wider than the
        slide), or no spot on tissue.
    """
    if kind not in GRIDS:
        raise InputError(f"unknown spot grid {kind!r}; choose one of {sorted(GRIDS)}")
    if not (np.isfinite(mpp) and mpp > 0):
        raise InputError(f"microns per pixel must be a positive number, got {mpp!r}")
    spacing_um = float(spacing_um or GRIDS[kind][0])
    diameter_um = float(diameter_um or GRIDS[kind][1])
    if not (np.isfinite(spacing_um) and np.isfinite(diameter_um) and spacing_um > 0 and diameter_um > 0):
        raise InputError(f"spot spacing and diameter must be finite numbers > 0 um, got {spacing_um}, {diameter_um}")
    if not 0.0 <= min_tissue <= 1.0:
        raise InputError(f"min_tissue must be in [0, 1], got {min_tissue}")
    spacing_px = spacing_um / mpp
    dy = spacing_px * (np.sqrt(3.0) / 2.0 if kind == "hex" else 1.0)
    n_lattice = (width / spacing_px + 3.0) * (height / dy + 2.0)
    if not n_lattice <= MAX_GRID_SPOTS:
        raise InputError(f"a {kind} grid of {spacing_um:g} um spacing is {spacing_px:.3g} px at {mpp:g} um/px: "
                         f"about {n_lattice:.3g} spots on a {width} x {height} px slide; is the mpp right?")
    if diameter_um / mpp > max(width, height):
        raise InputError(f"a {diameter_um:g} um spot is {diameter_um / mpp:.3g} px at {mpp:g} um/px, wider than "
                         f"the {width} x {height} px slide; is the mpp right?")
    mask, s = tissue.mask, tissue.scale
    if origin is not None:
        try:
            ox, oy = (float(v) for v in origin)
        except (TypeError, ValueError):
            raise InputError(f"grid origin must be two numbers (x, y), got {origin!r}") from None
        if not (np.isfinite(ox) and np.isfinite(oy) and 0 <= ox < width and 0 <= oy < height):
            raise InputError(f"grid origin ({ox:g}, {oy:g}) must be a point of the {width} x {height} px slide "
                             f"(0 <= x < {width}, 0 <= y < {height}; full-resolution pixels)")
        origin = (ox, oy)
    if origin is None:
        ys, xs = np.nonzero(mask)
        origin = (float(xs.min()) / s, float(ys.min()) / s)
    xy, col, row = _lattice(kind, spacing_px, width, height, (float(origin[0]), float(origin[1])))
    # share of tissue within each spot's disc, measured on the thumbnail
    r = max(0.5, diameter_um / mpp * s / 2.0)
    k = int(np.ceil(r))
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    disc = (xx**2 + yy**2 <= r * r).astype(np.float32)
    cover = ndimage.convolve(mask.astype(np.float32), disc / disc.sum(), mode="constant", cval=0.0)
    ti = np.clip(np.floor(xy * s).astype(np.int64), 0, [mask.shape[1] - 1, mask.shape[0] - 1])
    keep = cover[ti[:, 1], ti[:, 0]] >= min_tissue - 1e-6
    if not keep.any():
        raise InputError(f"no {kind} grid spot ({spacing_um:g} um spacing) lies on the detected tissue")
    xy, col, row = xy[keep], col[keep], row[keep]
    return pd.DataFrame({"pixel_x": xy[:, 0], "pixel_y": xy[:, 1], "array_col": col.astype(np.int64),
                         "array_row": row.astype(np.int64)},
                        index=pd.Index([f"{c}x{r_}" for c, r_ in zip(col, row)], name="spot"))
