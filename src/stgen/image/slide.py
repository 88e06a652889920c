"""Lazy reading of whole-slide images (tiled/pyramidal TIFF, vendor formats, JPEG/PNG).

:func:`open_slide` returns a :class:`Slide` whose pixels are read on demand, so
a 40,000 x 40,000 px slide can be cut into spot patches or thumbnailed without
ever holding a whole pyramid level in memory.

Backends (chosen from the file name by :func:`open_slide`)
----------------------------------------------------------
``"tifffile"``
    ``.tif``, ``.tiff``, ``.ome.tif``, ``.ome.tiff``, ``.btf``. Each pyramid
    level is opened as a zarr array backed by the TIFF file
    (``TiffFile.series[0].aszarr(level=i)``), so a read decodes only the tiles
    (or strips) it overlaps. Pyramids stored as SubIFDs (OME-TIFF, files written
    by :func:`write_pyramidal_tiff` or tifffile) and as successive reduced-
    resolution pages are both recognised (tifffile's ``series.levels``). 8-bit
    grayscale, gray+alpha, RGB and RGBA images are accepted; gray is replicated
    to RGB and alpha is composited over white. An untiled TIFF stored as one
    big strip is necessarily decoded whole on the first read.
``"openslide"``
    ``.svs``, ``.ndpi``, ``.mrxs``, ``.scn``, ``.vms``, ``.vmu``, ``.bif``, via
    OpenSlide (``pip install "stgen[wsi]"``: openslide-python + openslide-bin).
``"pillow"``
    ``.jpg``, ``.jpeg``, ``.png`` and anything else Pillow opens. These formats
    are not tiled, so the image is decoded fully at open
    (:func:`stgen.image.patches.open_image`) and held in memory.

Coordinates and units
---------------------
Positions are pixels of the full-resolution level 0 unless a ``level`` is
given: ``x`` = column, ``y`` = row, origin at the top-left pixel. A patch of
``size`` px around centre ``(x, y)`` covers columns
``floor(x + 0.5) - size // 2 .. + size - 1`` (likewise rows), exactly as
:func:`stgen.image.patches.extract_patches`. Any pixel outside the image is white
(:data:`stgen.image.patches.PAD_VALUE` = 255). Returned images are ``uint8`` arrays
of shape ``(rows, columns, 3)`` in RGB order.

Pixel size (:attr:`Slide.mpp`, microns per level-0 pixel) is read from, in
order of preference:

1. OME-XML ``Pixels/@PhysicalSizeX`` with ``PhysicalSizeXUnit`` (default µm);
2. an Aperio ImageDescription ``... |MPP = 0.2520| ...``;
3. the TIFF ``XResolution`` / ``ResolutionUnit`` tags (pixels per centimetre:
   ``mpp = 1e4 / res``; per inch, also when the unit tag is absent as the TIFF
   specification defaults to inch: ``25400 / res``; unit NONE: unknown);
4. for OpenSlide, the ``openslide.mpp-x`` property.

Values outside 0.05 .. 50 µm/px are treated as unknown (``None``) and logged
at debug level: many writers put a 72-dpi screen default in the resolution
tags, which would mean 353 µm/px. JPEG/PNG dpi is a screen setting, not a scan
resolution, so Pillow images have ``mpp = None``. An ``mpp`` given to
:func:`open_slide` overrides any metadata.

All user-caused problems (missing, unreadable, truncated or unsupported files,
bad arguments) raise :class:`stgen.errors.InputError` naming the file.
"""

from __future__ import annotations

import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable
import numpy as np
from PIL import Image
from stgen.errors import InputError
from stgen.utils.io import atomic_path
from stgen.image.patches import PAD_VALUE, check_patch_args, extract_patches, open_image


__all__ = ["BACKENDS", "MPP_RANGE", "Slide", "open_slide", "write_pyramidal_tiff"]

log = logging.getLogger(__name__)

#: Backend names accepted by :func:`open_slide`.
BACKENDS = ("tifffile", "openslide", "pillow")

#: Plausible microns per pixel; values outside are treated as unknown.
MPP_RANGE = (0.05, 50.0)

_TIFF_SUFFIXES = (".tif", ".tiff", ".btf")  # includes .ome.tif / .ome.tiff
_OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif")

#: read_patches groups patches by the block (in level-0 px) their corner falls
#: in and reads one region per block: bounded memory, shared tile decoding.
_PATCH_BLOCK = 2048
#: thumbnail reads the chosen level in blocks of about this many px a side.
_THUMB_BLOCK = 2048

# OME UnitsLength symbols -> microns
_OME_UNITS = {
    "pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "μm": 1.0, "um": 1.0,
    "micron": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6,
}


class Slide:
    """A whole-slide image opened for lazy reading; create it with :func:`open_slide`.

    Attributes
    ----------
    path : the file.
    width, height : level-0 (full-resolution) size in pixels.
    mpp : microns per level-0 pixel, or ``None`` when unknown.
    level_dims : ``[(width, height), ...]`` per pyramid level, level 0 first.
    level_downsamples : level-0 pixels per level pixel, per level (1.0 first).
    backend : ``"tifffile"``, ``"openslide"`` or ``"pillow"``.

    Use as a context manager (or call :meth:`close`) to release the file.
    """

    backend: str = ""

    def __init__(self, path: Path, level_dims: list[tuple[int, int]], mpp: float | None,
                 level_downsamples: list[float] | None = None):
        self.path = Path(path)
        self.level_dims = [(int(w), int(h)) for w, h in level_dims]
        self.width, self.height = self.level_dims[0]
        if level_downsamples is None:
            level_downsamples = [
                (self.width / w + self.height / h) / 2 for w, h in self.level_dims
            ]
        self.level_downsamples = [float(d) for d in level_downsamples]
        self.mpp = mpp
        self._closed = False

    # -- backend interface ------------------------------------------------
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of a region lying wholly inside ``level``."""
        raise NotImplementedError

    def _close(self) -> None:
        pass

    # -- public API -------------------------------------------------------
    def close(self) -> None:
        """Release the file; further reads raise ValueError."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.path.name!r} backend={self.backend} "
                f"{self.width}x{self.height} levels={len(self.level_dims)} mpp={self.mpp}>")

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: slide is closed")

    def read_region(self, x0: int, y0: int, w: int, h: int, *, level: int = 0) -> np.ndarray:
        """Read a ``w`` x ``h`` px rectangle whose top-left pixel is ``(x0, y0)``.

        Coordinates and sizes are integer pixels of ``level`` (default 0, full
        resolution); the rectangle may extend beyond the image, whose outside is
        white (255). Only the tiles overlapping the rectangle are decoded.

        Returns uint8 (h, w, 3) RGB.

        Raises InputError for a negative size, an unknown level, or when the
        file's pixel data cannot be decoded (corrupt or truncated file).
        """
        self._check_open()
        x0, y0, w, h = (_as_int(v, name) for v, name in ((x0, "x0"), (y0, "y0"), (w, "w"), (h, "h")))
        if w < 0 or h < 0:
            raise InputError(f"{self.path}: region size must be >= 0, got w={w}, h={h}")
        if not 0 <= level < len(self.level_dims):
            raise InputError(f"{self.path}: level {level} out of range 0..{len(self.level_dims) - 1}")
        lw, lh = self.level_dims[level]
        out = np.full((h, w, 3), PAD_VALUE, dtype=np.uint8)
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + w, lw), min(y0 + h, lh)
        if ix1 > ix0 and iy1 > iy0:
            out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = self._read_level(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        return out

    def read_patches(self, centers_xy: np.ndarray, size_px: int = 224) -> np.ndarray:
        """Square RGB patches around spot centres, read lazily from level 0.

        Same semantics (and bit-identical output) as
        :func:`stgen.image.patches.extract_patches` on the fully decoded image.

        Parameters
        ----------
        centers_xy : (N, 2) ``(x, y)`` = (column, row) level-0 pixel coordinates,
            rounded half-up to a pixel.
        size_px : patch side in pixels (>= 1).

        Returns uint8 (N, size_px, size_px, 3); out-of-image pixels are white.

        Raises InputError for a bad size, bad centres, or undecodable pixel data.
        """
        self._check_open()
        size, c = check_patch_args(centers_xy, size_px)
        n = len(c)
        out = np.full((n, size, size, 3), PAD_VALUE, dtype=np.uint8)
        if n == 0:
            return out
        # Clip absurd centres first so the int conversion cannot overflow; a
        # clipped centre is still far outside the image, so its patch stays white.
        c = np.clip(c, -(2.0**40), 2.0**40)
        x0 = np.floor(c[:, 0] + 0.5).astype(np.int64) - size // 2
        y0 = np.floor(c[:, 1] + 0.5).astype(np.int64) - size // 2
        inside = (x0 < self.width) & (x0 + size > 0) & (y0 < self.height) & (y0 + size > 0)
        idx = np.flatnonzero(inside)
        if len(idx) == 0:
            return out
        bx, by = x0[idx] // _PATCH_BLOCK, y0[idx] // _PATCH_BLOCK
        order = np.lexsort((bx, by))
        idx, bx, by = idx[order], bx[order], by[order]
        starts = np.flatnonzero(np.r_[True, (bx[1:] != bx[:-1]) | (by[1:] != by[:-1]), True])
        for s, e in zip(starts[:-1], starts[1:]):
            g = idx[s:e]
            rx0, ry0 = int(x0[g].min()), int(y0[g].min())
            region = self.read_region(rx0, ry0, int(x0[g].max()) + size - rx0, int(y0[g].max()) + size - ry0)
            for i in g:
                dx, dy = x0[i] - rx0, y0[i] - ry0
                out[i] = region[dy : dy + size, dx : dx + size]
        return out

    def level_for_size(self, w: int, h: int) -> int:
        """Index of the smallest pyramid level at least ``w`` x ``h`` px (0 if none is)."""
        best = 0
        for i, (lw, lh) in enumerate(self.level_dims):
            if lw >= w and lh >= h and lw * lh < self.level_dims[best][0] * self.level_dims[best][1]:
                best = i
        return best

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """Downscaled RGB overview whose longer side is at most ``max_side`` px.

        The image is read from the smallest pyramid level at least as large as
        the thumbnail (:meth:`level_for_size`), never from level 0 of a pyramid
        with a big-enough reduced level. That level is read in blocks of about
        2048 px, each block box-averaged by the integer factor
        ``floor(level size / thumbnail size)`` (``Image.reduce``), and the
        assembled intermediate (< 2x the thumbnail per side) is resized with a
        Lanczos filter -- bit-identical to Pillow's
        ``resize(..., LANCZOS, reducing_gap=1.0)`` of the whole level, with
        memory bounded by the block and the intermediate image.

        Returns
        -------
        (thumb, scale) : uint8 (th, tw, 3) RGB and the thumbnail pixels per
            level-0 pixel (``<= 1``; images already small enough are returned at
            full resolution with scale 1.0).
        """
        self._check_open()
        m = _as_int(max_side, "max_side")
        if m < 1:
            raise InputError(f"{self.path}: thumbnail max_side must be >= 1, got {max_side!r}")
        W, H = self.width, self.height
        scale = min(1.0, m / max(W, H))
        tw = min(m, max(1, round(W * scale)))
        th = min(m, max(1, round(H * scale)))
        level = self.level_for_size(tw, th)
        lw, lh = self.level_dims[level]
        fx, fy = max(1, int(lw / tw)), max(1, int(lh / th))
        reduced = np.empty((-(-lh // fy), -(-lw // fx), 3), dtype=np.uint8)
        bw, bh = fx * max(1, _THUMB_BLOCK // fx), fy * max(1, _THUMB_BLOCK // fy)
        for y in range(0, lh, bh):
            for x in range(0, lw, bw):
                block = self._read_level(level, x, y, min(bw, lw - x), min(bh, lh - y))
                if fx > 1 or fy > 1:
                    block = np.asarray(Image.fromarray(block).reduce((fx, fy)))
                reduced[y // fy : y // fy + block.shape[0], x // fx : x // fx + block.shape[1]] = block
        im = Image.fromarray(reduced)
        if im.size != (tw, th) or fx > 1 or fy > 1:
            im = im.resize((tw, th), Image.Resampling.LANCZOS, box=(0, 0, lw / fx, lh / fy))
        return np.asarray(im).copy(), scale


# --------------------------------------------------------------------------
# Backends


class _PillowSlide(Slide):
    backend = "pillow"

    def __init__(self, path: Path, mpp: float | None):
        self._array = np.asarray(open_image(path))  # InputError on any problem
        h, w = self._array.shape[:2]
        super().__init__(path, [(w, h)], mpp)

    def _read_level(self, level, x, y, w, h):
        return self._array[y : y + h, x : x + w]

    def read_patches(self, centers_xy, size_px=224):
        self._check_open()
        return extract_patches(self._array, centers_xy, size_px)

    def _close(self):
        self._array = None


class _TiffSlide(Slide):
    backend = "tifffile"

    def __init__(self, path: Path, mpp: float | None):
        import tifffile

        try:
            self._tf = tifffile.TiffFile(path)
        except Exception as e:  # TiffFileError, struct.error, OSError, ...
            raise InputError(f"{path}: not a readable TIFF file ({type(e).__name__}: {e})") from e
        try:
            level_dims, meta_mpp = self._setup(path)
        except InputError:
            self._tf.close()
            raise
        except Exception as e:
            self._tf.close()
            raise InputError(f"{path}: cannot read TIFF structure ({type(e).__name__}: {e})") from e
        super().__init__(path, level_dims, mpp if mpp is not None else meta_mpp)

    def _setup(self, path: Path):
        import tifffile
        import zarr

        tf = self._tf
        if not tf.series:
            raise InputError(f"{path}: TIFF contains no images")
        series = tf.series[0]
        page = series.keyframe
        dtype = np.dtype(series.dtype)
        if dtype != np.uint8:
            raise InputError(f"{path}: unsupported pixel type {dtype} (only 8-bit images are supported); "
                             "convert the slide to 8-bit RGB")
        photometric = int(page.photometric)
        P = tifffile.PHOTOMETRIC
        if photometric not in (P.MINISWHITE, P.MINISBLACK, P.RGB, P.YCBCR):
            raise InputError(f"{path}: unsupported TIFF colour model {P(photometric).name} "
                             "(expected grayscale or RGB)")
        self._invert = photometric == P.MINISWHITE
        extras = tuple(int(v) for v in (page.extrasamples or ()))
        self._assoc_alpha = bool(extras) and extras[0] == int(tifffile.EXTRASAMPLE.ASSOCALPHA)
        self._arrays, self._layouts, level_dims = [], [], []
        for i, lev in enumerate(series.levels):
            layout = _axes_layout(path, lev.axes, lev.shape)
            self._layouts.append(layout)
            self._arrays.append(zarr.open_array(series.aszarr(level=i), mode="r"))
            level_dims.append((lev.shape[layout[1]], lev.shape[layout[0]]))
        self._nsamples = self._layouts[0][3]
        if any(lay[3] != self._nsamples for lay in self._layouts):
            raise InputError(f"{path}: pyramid levels have different numbers of channels")
        return level_dims, _tiff_mpp(tf, page, path)

    def _read_level(self, level, x, y, w, h):
        yax, xax, sax, _, index = self._layouts[level]
        index = list(index)
        index[yax], index[xax] = slice(y, y + h), slice(x, x + w)
        try:
            block = np.asarray(self._arrays[level][tuple(index)])
        except Exception as e:  # tifffile / zarr / imagecodecs decode errors
            raise InputError(
                f"{self.path}: cannot decode image data at level {level}, region x={x} y={y} "
                f"w={w} h={h} (corrupt or truncated file? {type(e).__name__}: {e})"
            ) from e
        kept = [a for a in (yax, xax, sax) if a is not None]
        order = sorted(kept)  # positions of the kept axes in the result
        block = block.transpose([order.index(a) for a in kept])
        return _to_rgb(block, self._invert, self._assoc_alpha)

    def _close(self):
        self._arrays = []
        self._tf.close()


class _OpenSlideSlide(Slide):
    backend = "openslide"

    def __init__(self, path: Path, mpp: float | None):
        try:
            import openslide
        except (ImportError, OSError) as e:
            raise InputError(
                f"{path}: reading this format needs OpenSlide, which is not available ({e}); "
                'install it with: pip install "stgen[wsi]"'
            ) from e
        self._openslide = openslide
        try:
            self._os = openslide.OpenSlide(str(path))
        except Exception as e:  # OpenSlideUnsupportedFormatError, OpenSlideError
            raise InputError(f"{path}: OpenSlide cannot open this file ({type(e).__name__}: {e})") from e
        meta = None
        raw = self._os.properties.get(openslide.PROPERTY_NAME_MPP_X)
        if raw is not None:
            try:
                meta = _plausible_mpp(float(raw), path, "openslide.mpp-x")
            except ValueError:
                log.debug("%s: unparseable openslide.mpp-x %r", path, raw)
        super().__init__(path, list(self._os.level_dimensions), mpp if mpp is not None else meta,
                         list(self._os.level_downsamples))

    def _read_level(self, level, x, y, w, h):
        ds = self.level_downsamples[level]
        try:
            im = self._os.read_region((round(x * ds), round(y * ds)), level, (w, h))
        except Exception as e:
            raise InputError(f"{self.path}: OpenSlide cannot read level {level}, region x={x} y={y} "
                             f"w={w} h={h} ({type(e).__name__}: {e})") from e
        return _to_rgb(np.asarray(im), invert=False, assoc_alpha=False)  # RGBA, straight alpha

    def _close(self):
        self._os.close()


# --------------------------------------------------------------------------
# Opening


def open_slide(path: str | os.PathLike, mpp: float | None = None, *, backend: str | None = None) -> Slide:
    """Open a slide image for lazy reading (see the module docstring for formats).

    Parameters
    ----------
    path : image file.
    mpp : microns per level-0 pixel; overrides the file's metadata. Must be
        finite and > 0.
    backend : force ``"tifffile"``, ``"openslide"`` or ``"pillow"`` instead of
        choosing from the file name.

    Raises
    ------
    InputError : file missing; not an image; truncated or corrupt; not 8-bit;
        unsupported channel layout; bad ``mpp``; OpenSlide needed but missing.
    """
    path = Path(path)
    if mpp is not None:
        try:
            ok = math.isfinite(float(mpp)) and float(mpp) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"{path}: mpp must be a finite number > 0 (microns per pixel), got {mpp!r}")
        mpp = float(mpp)
    if not path.is_file():
        raise InputError(f"{path}: slide file not found")
    if backend is None:
        name = path.name.lower()
        if name.endswith(_TIFF_SUFFIXES):
            backend = "tifffile"
        elif name.endswith(_OPENSLIDE_SUFFIXES):
            backend = "openslide"
        else:
            backend = "pillow"
    cls = {"tifffile": _TiffSlide, "openslide": _OpenSlideSlide, "pillow": _PillowSlide}.get(backend)
    if cls is None:
        raise InputError(f"{path}: unknown slide backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    slide = cls(path, mpp)
    log.debug("opened %r", slide)
    return slide


# --------------------------------------------------------------------------
# Writing


def write_pyramidal_tiff(
    path: str | os.PathLike,
    width: int,
    height: int,
    tile_fn: Callable[[int, int, int, int, float], np.ndarray],
    mpp: float | None = None,
    tile: int = 512,
    levels: int | None = None,
    compression: str | None = "zlib",
) -> Path:
    """Write a tiled pyramidal RGB TIFF tile by tile (bounded memory).

    Level 0 is ``width`` x ``height`` px; level ``k`` is ``(width >> k, height >> k)``
    (at least 1 px), i.e. downsample ``2**k``. Without ``levels`` (the total
    number of levels, level 0 included), levels are added until the longer side
    is <= 1024 px. The reduced levels are stored as SubIFDs of level 0 (the
    layout of OME-TIFF and tifffile; OpenSlide sees only level 0 of such files).
    A name ending ``.ome.tif``/``.ome.tiff`` gets OME-XML metadata, including
    ``PhysicalSizeX/Y`` when ``mpp`` is given. With ``mpp``, each level's
    X/YResolution is set in pixels per centimetre (``1e4 / (mpp * 2**k)``).
    The file is written to a temporary name and renamed into place on success.

    Parameters
    ----------
    tile_fn : ``tile_fn(x0, y0, w, h, downsample) -> uint8 (h, w, 3)`` giving
        the pixels of the ``w`` x ``h`` block at ``(x0, y0)`` in the pixel grid
        of the level being written (``downsample = 2.0**k``; level pixel ``(x, y)``
        covers level-0 pixels ``[x * downsample, (x + 1) * downsample)``).
        Called once per tile, level 0 first, in row-major tile order.
    mpp : microns per level-0 pixel, or None to leave resolution unset.
    tile : tile side in px, a multiple of 16.
    compression : tifffile compression name (``"zlib"``, ``"jpeg"``, None, ...).

    Returns the path written.
    """
    import tifffile

    path = Path(path)
    width, height, tile = _as_int(width, "width"), _as_int(height, "height"), _as_int(tile, "tile")
    if width < 1 or height < 1:
        raise InputError(f"{path}: image size must be >= 1 px, got {width} x {height}")
    if tile < 16 or tile % 16:
        raise InputError(f"{path}: tile size must be a positive multiple of 16, got {tile}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise InputError(f"{path}: mpp must be a finite number > 0, got {mpp!r}")
    if levels is not None and _as_int(levels, "levels") < 1:
        raise InputError(f"{path}: levels must be >= 1, got {levels!r}")
    dims = [(width, height)]
    while (len(dims) < levels) if levels is not None else (max(dims[-1]) > 1024):
        k = len(dims)
        dims.append((max(1, width >> k), max(1, height >> k)))
    ome = path.name.lower().endswith((".ome.tif", ".ome.tiff"))
    # a pyramid is at most 4/3 of level 0; switch to BigTIFF well before 4 GiB
    bigtiff = width * height * 3 * 4 // 3 > 2**32 - 2**28
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=ome) as tw:
        for k, (lw, lh) in enumerate(dims):
            ds = 2.0**k
            kwargs = dict(shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                          compression=compression)
            if mpp is not None:
                kwargs.update(resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), resolutionunit="CENTIMETER")
            if k == 0:
                kwargs["subifds"] = len(dims) - 1
                meta = None
                if ome:
                    meta = {"axes": "YXS"}
                    if mpp is not None:
                        meta.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm",
                                    PhysicalSizeY=mpp, PhysicalSizeYUnit="µm")
                kwargs["metadata"] = meta
            else:
                kwargs["subfiletype"] = 1  # reduced-resolution image
            tw.write(_tile_iter(tile_fn, lw, lh, tile, ds), **kwargs)
    return path


def _tile_iter(tile_fn, lw: int, lh: int, tile: int, ds: float):
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            w, h = min(tile, lw - tx), min(tile, lh - ty)
            a = np.asarray(tile_fn(tx, ty, w, h, ds))
            if a.shape != (h, w, 3) or a.dtype != np.uint8:
                raise ValueError(f"tile_fn({tx}, {ty}, {w}, {h}, {ds}) returned {a.dtype} {a.shape}; "
                                 f"expected uint8 ({h}, {w}, 3)")
            if (h, w) != (tile, tile):  # pad edge tiles (invisible to readers) with background
                a = np.pad(a, ((0, tile - h), (0, tile - w), (0, 0)), constant_values=PAD_VALUE)
            yield a


# --------------------------------------------------------------------------
# Helpers


def _as_int(v, name: str) -> int:
    try:
        i = int(v)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an integer, got {v!r}") from None
    if i != v:
        raise InputError(f"{name} must be an integer, got {v!r}")
    return i


def _axes_layout(path: Path, axes: str, shape: tuple[int, ...]):
    """(y axis, x axis, sample axis or None, n samples, index template) of a tifffile series level.

    Axes of length 1 are indexed away; one 'S' (samples) or 'C' (channel) axis
    of length 2..4 is kept as the colour axis.
    """
    yax, xax, sax = axes.find("Y"), axes.find("X"), None
    if yax < 0 or xax < 0:
        raise InputError(f"{path}: unsupported TIFF layout (axes {axes!r}, shape {shape})")
    index: list = []
    for i, (a, n) in enumerate(zip(axes, shape)):
        if i in (yax, xax):
            index.append(slice(None))
        elif n == 1:
            index.append(0)
        elif a in "SC" and sax is None:
            sax = i
            index.append(slice(None))
        else:
            raise InputError(f"{path}: unsupported TIFF layout (axes {axes!r}, shape {shape}); "
                             "expected a single 2-D grayscale or RGB(A) image")
    nsamples = 1 if sax is None else shape[sax]
    if nsamples not in (1, 2, 3, 4):
        raise InputError(f"{path}: image has {nsamples} channels; expected gray, RGB or RGBA")
    return yax, xax, sax, nsamples, tuple(index)


def _to_rgb(block: np.ndarray, invert: bool, assoc_alpha: bool) -> np.ndarray:
    """(h, w[, s]) uint8 with s in 1..4 -> (h, w, 3) RGB; alpha composited over white."""
    if block.ndim == 2:
        block = block[:, :, None]
    s = block.shape[2]
    color = block[:, :, : (3 if s >= 3 else 1)]
    if invert:
        color = 255 - color
    if s in (2, 4):
        a = block[:, :, s - 1 :].astype(np.uint16)
        if assoc_alpha:  # premultiplied: out = c + (1 - a) * white
            color = np.minimum(color.astype(np.uint16) + (255 - a), 255).astype(np.uint8)
        else:
            color = ((color.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    if color.shape[2] == 1:
        color = np.repeat(color, 3, axis=2)
    return np.ascontiguousarray(color, dtype=np.uint8)


def _plausible_mpp(value: float, path, source: str) -> float | None:
    lo, hi = MPP_RANGE
    if math.isfinite(value) and lo <= value <= hi:
        return float(value)
    log.debug("%s: ignoring implausible pixel size %.6g µm/px from %s", path, value, source)
    return None


def _tiff_mpp(tf, page, path: Path) -> float | None:
    """Microns per pixel from OME-XML, an Aperio description, or resolution tags (in that order)."""
    if tf.is_ome:
        v = _ome_mpp(tf.ome_metadata, path)
        if v is not None:
            v = _plausible_mpp(v, path, "OME-XML PhysicalSizeX")
        if v is not None:
            return v
    desc = page.description or ""
    if desc.startswith("Aperio"):
        m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
        if m:
            try:
                v = _plausible_mpp(float(m.group(1)), path, "Aperio MPP")
            except ValueError:
                v = None
            if v is not None:
                return v
    xres = page.tags.get("XResolution")
    if xres is None:
        return None
    num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
    unit_tag = page.tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default: inch
    per_unit_um = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}.get(unit)  # inch, cm, mm, µm
    if per_unit_um is None or not den or not num:
        return None  # unit NONE (aspect ratio only) or zero resolution
    return _plausible_mpp(per_unit_um / (num / den), path, f"TIFF XResolution (unit {unit})")


def _ome_mpp(xml: str | None, path) -> float | None:
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        log.debug("%s: unparseable OME-XML (%s)", path, e)
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "Pixels":
            size = el.get("PhysicalSizeX")
            if size is None:
                return None
            unit = el.get("PhysicalSizeXUnit", "µm")
            factor = _OME_UNITS.get(unit)
            try:
                value = float(size)
            except ValueError:
                value = None
            if factor is None or value is None:
                log.debug("%s: cannot use OME PhysicalSizeX=%r %r", path, size, unit)
                return None
            return value * factor
    return None
