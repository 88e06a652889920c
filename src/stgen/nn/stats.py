"""Feature standardisation shared by the models."""

from __future__ import annotations

import torch


def floored_std(std: torch.Tensor, rel: float = 0.1) -> torch.Tensor:
    """``std`` with every entry floored at ``rel`` x its median (and 1e-6): a near-constant
    column would otherwise turn small shifts into huge z-scores (HINGE's and FLAG's
    feature standardisation, FLAG's target normalisation)."""
    return std.clamp_min(max(float(std.median()) * rel, 1e-6))
