"""Image loading and square patch extraction around spot centres.

Coordinates are full-resolution pixels with ``x`` = column and ``y`` = row.
A patch of ``size`` pixels around centre ``(x, y)`` covers columns
``round(x) - size // 2 .. round(x) - size // 2 + size - 1`` (likewise rows), so
for integer centres ``patch[size // 2, size // 2] == image[y, x]``. Pixels that
fall outside the image are filled with white (255), the H&E slide background.
"""

from __future__ import annotations

import os
from pathlib import Path
import numpy as np
from PIL import Image, UnidentifiedImageError
from stgen.errors import InputError


__all__ = ["MAX_IMAGE_PIXELS", "PAD_VALUE", "open_image", "image_size", "check_patch_args", "extract_patches"]

#: Whole-slide-ish Her2ST images are ~9,300 x 9,900 = 92 Mpx, just above PIL's
#: default limit. Allow up to 400 Mpx silently; PIL still refuses images over
#: twice this (its decompression-bomb error), which is reported as InputError.
MAX_IMAGE_PIXELS = 400_000_000
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MAX_IMAGE_PIXELS)

#: Fill value for patch pixels outside the image (white slide background).
PAD_VALUE = 255


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image in pixels, read from the header only (no decoding).

    Raises InputError naming ``path`` if it is missing or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return im.size
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: image is implausibly large ({e})") from e
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"{path}: not a readable image ({e})") from e


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB.

    Raises
    ------
    InputError : file missing, not an image, truncated/corrupt, or larger than
        twice :data:`MAX_IMAGE_PIXELS` (decompression-bomb guard).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()  # decode now so truncation is detected here
            return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: image is implausibly large ({e})") from e
    except UnidentifiedImageError as e:
        raise InputError(f"{path}: not a recognised image file") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: unreadable or truncated image ({e})") from e


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"image array must have shape (H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        raise InputError(f"image array must be uint8, got {arr.dtype}")
    return arr


def check_patch_args(centers_xy, size_px) -> tuple[int, np.ndarray]:
    """``(size, centres (N, 2) float64)`` of a patch request; InputError for a size that is not a positive
    integer or centres that are not a finite (N, 2) array."""
    size = int(size_px)
    if size < 1 or size != size_px:
        raise InputError(f"patch size must be a positive integer, got {size_px!r}")
    c = np.asarray(centers_xy, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise InputError(f"centres must have shape (N, 2), got {c.shape}")
    if not np.isfinite(c).all():
        raise InputError("centres contain non-finite coordinates")
    return size, c


def extract_patches(
    image: Image.Image | np.ndarray,
    centers_xy: np.ndarray,
    size_px: int = 224,
) -> np.ndarray:
    """Cut square RGB patches centred on spot positions.

    Parameters
    ----------
    image : PIL image or uint8 array (H, W, 3).
    centers_xy : (N, 2) array of ``(x, y)`` = (column, row) full-resolution pixel
        coordinates; non-integer centres are rounded half-up to a pixel.
    size_px : patch side length in pixels (>= 1).

    Returns
    -------
    uint8 array (N, size_px, size_px, 3). Out-of-image pixels are white (255).

    Raises
    ------
    InputError : bad ``size_px``, centres not (N, 2) finite, or bad image array.
    """
    size, c = check_patch_args(centers_xy, size_px)
    arr = _as_array(image)
    h, w = arr.shape[:2]
    n = len(c)
    out = np.full((n, size, size, 3), PAD_VALUE, dtype=np.uint8)
    if n == 0:
        return out
    x0 = np.floor(c[:, 0] + 0.5).astype(np.int64) - size // 2
    y0 = np.floor(c[:, 1] + 0.5).astype(np.int64) - size // 2
    # Clip each patch window to the image; copy the overlapping block.
    sx0, sy0 = np.clip(x0, 0, w), np.clip(y0, 0, h)
    sx1, sy1 = np.clip(x0 + size, 0, w), np.clip(y0 + size, 0, h)
    for i in range(n):
        if sx1[i] <= sx0[i] or sy1[i] <= sy0[i]:
            continue  # patch entirely outside: all white
        dx, dy = sx0[i] - x0[i], sy0[i] - y0[i]
        out[i, dy : dy + sy1[i] - sy0[i], dx : dx + sx1[i] - sx0[i]] = arr[sy0[i] : sy1[i], sx0[i] : sx1[i]]
    return out
