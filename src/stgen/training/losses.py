"""Losses shared by trainings."""

from __future__ import annotations

import torch


def masked_mse(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked entries only (``visible == False``)."""
    masked = (~visible).to(pred.dtype)
    return ((pred - target) ** 2 * masked).sum() / masked.sum().clamp_min(1.0)
