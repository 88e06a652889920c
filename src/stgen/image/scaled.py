"""Downsampled images read as if they were the full-resolution slide (Visium hires/lowres PNGs, SpatialData scales).

Spot coordinates in stgen are always full-resolution pixels (``obsm['spatial']``, the scanpy/Space Ranger
convention). When only a downsampled image of the slide exists (Space Ranger's ``tissue_hires_image.png``,
the arrays in a scanpy AnnData's ``uns['spatial'][library]['images']``, a coarse scale of a SpatialData
image), :class:`SlideRef` names that file with its ``scale`` (image pixels per full-resolution pixel,
Space Ranger's ``tissue_hires_scalef``) and :func:`open_ref` opens it as a :class:`ScaledSlide`: a
:class:`~stgen.image.slide.Slide` whose size, coordinates and patch sizes are those of the full-resolution
image. A patch of ``size`` full-resolution pixels covers the same tissue as on the full image (the same
physical size); it is cut from the downsampled image at ``size * scale`` pixels and upsampled to ``size``
(bicubic), so it holds less detail than a real full-resolution patch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
import numpy as np
from PIL import Image
from stgen.errors import InputError
from stgen.image.patches import PAD_VALUE, check_patch_args
from stgen.image.slide import Slide, open_slide

__all__ = ["SlideRef", "ScaledSlide", "as_slide_ref", "open_ref"]


@dataclass(frozen=True)
class SlideRef:
    """An image file and its scale: pixel ``(i, j)`` of the file covers full-resolution pixel ``(i, j) / scale``.

    ``scale`` = 1 for the full-resolution slide itself; Space Ranger's ``tissue_hires_scalef`` (e.g. 0.08)
    for ``tissue_hires_image.png``. Not path-like on purpose: ``Path(ref)`` raises instead of silently
    dropping the scale. InputError for a scale that is not a finite number in (0, 1].
    """

    path: Path
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        try:
            s = float(self.scale)
        except (TypeError, ValueError):
            s = float("nan")
        if not (math.isfinite(s) and 0 < s <= 1):
            raise InputError(f"{self.path}: image scale must be a number in (0, 1] (image pixels per "
                             f"full-resolution pixel), got {self.scale!r}")
        object.__setattr__(self, "scale", s)

    @property
    def name(self) -> str:
        return self.path.name

    def __str__(self) -> str:
        return str(self.path) if self.scale == 1 else f"{self.path} (x{self.scale:.4g} of full resolution)"


def as_slide_ref(image: "SlideRef | str | os.PathLike") -> SlideRef:
    """``image`` itself when it is a :class:`SlideRef`, else the full-resolution file ``SlideRef(image, 1)``."""
    return image if isinstance(image, SlideRef) else SlideRef(Path(image), 1.0)


class ScaledSlide(Slide):
    """A downsampled image presented in full-resolution pixels (module docstring); made by :func:`open_ref`.

    ``width``/``height`` are the full-resolution size (``ceil(image size / scale)``); ``mpp`` is microns per
    full-resolution pixel (the ``mpp`` given to :func:`open_ref`, else the file's own mpp times ``scale``).
    :meth:`read_patches` keeps the patch semantics of :meth:`Slide.read_patches` (centre rounded half-up,
    out-of-image pixels white) at the coarse image's resolution.
    """

    backend = "scaled"

    def __init__(self, base: Slide, scale: float, mpp: float | None = None):
        self.base, self.scale = base, float(scale)
        w, h = math.ceil(base.width / self.scale - 1e-6), math.ceil(base.height / self.scale - 1e-6)
        if mpp is None and base.mpp is not None:
            mpp = float(base.mpp) * self.scale
        super().__init__(base.path, [(w, h)], mpp)
        self.backend = f"scaled({base.backend}, x{self.scale:.4g})"

    def _read_level(self, level, x, y, w, h):
        s = self.scale
        bx0, by0 = math.floor(x * s), math.floor(y * s)
        bx1, by1 = math.ceil((x + w) * s), math.ceil((y + h) * s)
        block = self.base.read_region(bx0, by0, max(1, bx1 - bx0), max(1, by1 - by0))
        box = (x * s - bx0, y * s - by0, (x + w) * s - bx0, (y + h) * s - by0)
        return np.asarray(Image.fromarray(block).resize((w, h), Image.Resampling.BICUBIC, box=box))

    def read_patches(self, centers_xy: np.ndarray, size_px: int = 224) -> np.ndarray:
        """(N, size_px, size_px, 3) uint8 patches around full-resolution centres, cut from the coarse image at
        ``max(1, round(size_px * scale))`` pixels around ``centres * scale`` and upsampled (bicubic)."""
        self._check_open()
        size, c = check_patch_args(centers_xy, size_px)
        out = np.full((len(c), size, size, 3), PAD_VALUE, dtype=np.uint8)
        if len(c) == 0:
            return out
        small = max(1, int(round(size * self.scale)))
        coarse = self.base.read_patches(c * self.scale, small)
        for i, p in enumerate(coarse):
            out[i] = np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BICUBIC))
        return out

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """The coarse image's thumbnail (never upsampled) and its pixels per full-resolution pixel."""
        thumb, s = self.base.thumbnail(max_side)
        return thumb, s * self.scale

    def _close(self) -> None:
        self.base.close()


def open_ref(image: "SlideRef | str | os.PathLike", mpp: float | None = None) -> Slide:
    """Open ``image`` (a path: the full-resolution slide; a :class:`SlideRef`: a file at its scale) as a
    :class:`~stgen.image.slide.Slide` in full-resolution pixels. ``mpp`` is microns per full-resolution
    pixel and overrides the file's metadata. InputError as :func:`~stgen.image.slide.open_slide`."""
    ref = as_slide_ref(image)
    if ref.scale == 1.0:
        return open_slide(ref.path, mpp=mpp)
    m = None if mpp is None else _positive(mpp, ref.path)
    base = open_slide(ref.path)
    try:
        return ScaledSlide(base, ref.scale, mpp=m)
    except BaseException:
        base.close()
        raise


def _positive(v, path) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = float("nan")
    if not (math.isfinite(f) and f > 0):
        raise InputError(f"{path}: mpp must be a finite number > 0 (microns per pixel), got {v!r}")
    return f
