"""The on-disk feature cache: content-hash keys, SHA-256-verified ``.npy`` files, never unpickled."""

from __future__ import annotations

import logging
import os
from pathlib import Path
import numpy as np
from stgen.utils.io import atomic_path, sha256_file, sha256_json
from stgen.features.registry import _REGISTRY
from stgen.features.registry import _parts
from stgen.errors import InputError

#: test-time augmentation: how many dihedral views of a patch are averaged (1 = off)
TTA_VIEWS = (1, 2, 4, 8)


def tta_views(tta: bool | int) -> int:
    """The number of views ``tta`` asks for: ``False``/0/1 -> 1 (no augmentation), ``True``/8 -> 8 (every
    flip and rotation), 2 (the patch and its 180-degree rotation), 4 (the four rotations). InputError otherwise.
    """
    if isinstance(tta, bool):
        return 8 if tta else 1
    if isinstance(tta, (int, np.integer)) and int(tta) in (0, *TTA_VIEWS):
        return max(1, int(tta))
    raise InputError(f"features.tta must be true/false or a number of views {TTA_VIEWS}, got {tta!r}")

log = logging.getLogger(__name__)


#: Bump when feature computation changes, to invalidate cached features.
FEATURE_CODE_VERSION = 1


# --------------------------------------------------------------------------- caching

_IMAGE_HASHES: dict[tuple[str, int, int], str] = {}


def _image_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    h = _IMAGE_HASHES.get(key)
    if h is None:
        h = _IMAGE_HASHES[key] = sha256_file(path)
    return h


def _centers_sha256(c: np.ndarray) -> str:
    import hashlib

    arr = np.ascontiguousarray(c, dtype="<f8")
    return hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()


def feature_cache_path(
    cache_dir: str | os.PathLike,
    image_path: str | os.PathLike,
    centers_xy: np.ndarray,
    patch_px: int,
    encoder: str,
    tta: bool | int,
    input_px: int | None = None,
    image_scale: float = 1.0,
    stain: str = "none",
) -> Path:
    """Cache file ``<cache_dir>/features/<key>.npy`` for these inputs (hashes the image; ``tta``: the number of
    views averaged, or a bool (8 views / none); ``image_scale``: image pixels per full-resolution pixel of a
    downsampled image, :class:`stgen.image.scaled.SlideRef`; ``stain``: the stain normalisation,
    :mod:`stgen.image.stain`)."""
    views = tta_views(tta)
    key = {
        "image_sha256": _image_sha256(Path(image_path)),
        "centers_sha256": _centers_sha256(np.asarray(centers_xy, dtype=np.float64)),
        "patch_px": int(patch_px),
        "encoder": encoder,
        # on/off as before for 1 and 8 views, so every cache written before view counts stays valid
        "tta": views > 1 if views in (1, 8) else views,
        "version": FEATURE_CODE_VERSION,
    }
    if input_px is not None:  # only then, so that the keys of every cache written before it stay valid
        key["input_px"] = int(input_px)
    if float(image_scale) != 1.0:  # likewise: full-resolution images keep their keys
        key["image_scale"] = float(image_scale)
    if stain != "none":  # likewise: features without stain normalisation keep their keys
        key["stain"] = stain
    if encoder not in _REGISTRY and (":" in encoder or "+" in encoder):
        parts = _parts(encoder)
        if any(p.path is not None for p in parts):  # weights files: key on their bytes, not their paths
            from stgen.features.spec import ENCODER_CODE_VERSION

            key["encoder"] = "+".join(p.cache_token() for p in parts)
            key["encoder_code"] = ENCODER_CODE_VERSION
    key = sha256_json(key)
    return Path(cache_dir) / "features" / f"{key}.npy"


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _load_cached(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached features at ``path``, or None when they must be (re)computed.

    A cache file is trusted only when its bytes match the SHA-256 written beside it (``<key>.npy.sha256``)
    and it holds a finite float32 ``shape`` array, read without pickle. A corrupted, truncated or
    misshapen file is logged and recomputed. A file from before the checksums (no ``.sha256``) that
    passes the array checks gets its checksum written now.
    """
    if not path.is_file():
        return None
    sums = _checksum_path(path)
    want = sums.read_text().strip() if sums.is_file() else None
    if want is not None and sha256_file(path) != want:
        log.warning("feature cache %s does not match its checksum: recomputing", path)
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        log.warning("feature cache %s is unreadable: recomputing", path)
        return None
    if arr.shape != shape or arr.dtype != np.float32 or not np.isfinite(arr).all():
        log.warning("feature cache %s holds %s %s, expected finite float32 %s: recomputing", path, arr.dtype,
                    arr.shape, shape)
        return None
    if want is None:
        _write_checksum(path)
    return arr


def _write_checksum(path: Path) -> None:
    with atomic_path(_checksum_path(path)) as tmp:
        tmp.write_text(sha256_file(path) + "\n")
