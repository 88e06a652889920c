"""A weight-free 'encoder' of per-channel colour statistics (tests, smoke runs)."""

from __future__ import annotations

import torch
from stgen.features.efficientnet import _prepare


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
