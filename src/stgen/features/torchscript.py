"""Any TorchScript patch encoder (``torchscript:PATH``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
import torch
from stgen.errors import InputError
from stgen.features.vit import IMAGENET_MEAN
from stgen.features.vit import IMAGENET_STD
from stgen.features.weights import _first_line
from stgen.features.vit import _prepare


class TorchScriptEncoder:
    """A TorchScript module fed 224 px ImageNet-normalised batches; ``dim`` found by one dummy forward."""

    any_size = False
    input_size = 224
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, name: str, module: torch.jit.ScriptModule, path: Path,
                 device: str | torch.device = "cpu") -> None:
        self.name, self.path = name, path
        self.device = torch.device(device)
        self.model = module.eval().to(self.device)
        try:
            with torch.no_grad():
                out = self.model(torch.zeros(1, 3, self.input_size, self.input_size, device=self.device))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path}: TorchScript module fails on a (1, 3, 224, 224) batch ({_first_line(e)})") from None
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"{path}: TorchScript module must map (B, 3, 224, 224) to (B, D), "
                             f"returned {shape} for B=1")
        self.dim = int(out.shape[1])

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = _prepare(batch.to(self.device), self.input_size, self.mean, self.std, "bilinear")
        return self.model(x).float()


def load_torchscript(path: str | os.PathLike, device: str | torch.device = "cpu",
                     name: str | None = None) -> TorchScriptEncoder:
    """Load a TorchScript archive with ``torch.jit.load`` (no Python pickle of arbitrary objects)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: TorchScript file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{p}: not a TorchScript archive ({_first_line(e)})") from None
    return TorchScriptEncoder(name or f"torchscript:{p}", module, p, device)
