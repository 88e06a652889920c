"""SoftAdaLN: identity-initialised conditional modulation (HINGE, Sec. 3.2).

``SoftNorm(h) = (1 - eta) h + eta LN(h)`` with a learned scalar ``eta`` that
starts at 0, and

``SoftAdaLN(h | c) = SoftNorm(h) * (1 + s(c)) + kappa(c)``, gate ``tau(c) = 1 + g(c)``

where ``s``, ``kappa``, ``g`` are one linear head on ``SiLU(c)`` whose weights
and bias start at zero. At initialisation the module returns ``(h, 1)``
exactly, so a backbone block wrapped with it reproduces the frozen backbone
bit for bit; histology information enters only as training moves the heads
away from zero.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SoftNorm(nn.Module):
    """``(1 - eta) h + eta LN(h)`` over the last dim; ``eta`` learned, starts at ``eta0``."""

    def __init__(self, dim: int, eta0: float = 0.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.eta = nn.Parameter(torch.tensor(float(eta0)))
        self.dim, self.eps = dim, eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.lerp(h, F.layer_norm(h, (self.dim,), eps=self.eps), self.eta)


class SoftAdaLN(nn.Module):
    """Histology/timestep modulation before one backbone sub-layer.

    Parameters
    ----------
    dim : token width ``D`` of the backbone.
    cond_dim : width ``C`` of the condition ``c_t``.
    soft_norm : if False, use plain LayerNorm (``eta = 1`` fixed; the
        "NoSoftNorm" ablation of HINGE Table S2), which is *not* identity at init.
    identity_init : if False, heads get a small random init (the "NoIdInit"
        ablation).

    ``forward(h (B, G, D), c (B, C)) -> (h_mod (B, G, D), gate (B, 1, D))``.
    """

    def __init__(self, dim: int, cond_dim: int, soft_norm: bool = True, identity_init: bool = True) -> None:
        super().__init__()
        self.norm = SoftNorm(dim, eta0=0.0) if soft_norm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(cond_dim, 3 * dim)
        if identity_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.normal_(self.head.bias, std=0.02)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift, gate = self.head(F.silu(c)).unsqueeze(1).chunk(3, dim=-1)
        return torch.addcmul(shift, self.norm(h), 1 + scale), 1 + gate
