"""Sinusoidal timestep embedding (DDPM / DiT convention)."""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, T: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of timesteps ``t`` (B,) rescaled to [0, 1000]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * (1000.0 / T))[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim - emb.shape[-1]))
