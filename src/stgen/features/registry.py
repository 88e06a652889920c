"""The encoder registry: names and specs -> patch encoders (built once per process)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable
import torch
from stgen.features.efficientnet import EfficientNetLite0Encoder
from stgen.features.simple import RGBStatsEncoder


@runtime_checkable
class PatchEncoder(Protocol):
    """Callable image-patch encoder: ``(B, 3, H, W)`` float in [0, 1] -> ``(B, dim)``."""

    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...  # encoders with any_size=True: (batch, size=None)


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
    :mod:`stgen.features.spec`)."""
    return sorted(_REGISTRY)


def _parts(spec: str):
    from stgen.features.spec import parse_encoder_spec

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
    from stgen.features.spec import part_dim

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
    concatenated in that order); see :mod:`stgen.features.spec`. ``device`` defaults to CUDA when
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
    from stgen.features.spec import ConcatEncoder, build_part
    from stgen.features.weights import file_stamp

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
