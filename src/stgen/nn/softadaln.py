"""SoftAdaLN: identity-initialised conditional modulation (HINGE, Sec. 3.2).

``SoftNorm(h) = (1 - eta) h + eta LN(h)`` with a learned scalar ``eta`` that
starts at 0, and

``SoftAdaLN(h | c) = SoftNorm(h) * (1 + s(c)) + kappa(c)``, gate ``tau(c) = 1 + g(c)``

where ``s``, ``kappa``, ``g`` are one linear head on ``SiLU(c)`` whose weights
and bias start at zero. At initialisation the module returns ``(h, 1)``
exactly, so a backbone block wrapped with it reproduces the frozen backbone
bit for bit; histology information enters only as training moves the heads
away from zero.

The three switches of the conditioning ablations (HINGE Supp. Tables S2/S3,
"Conditioning" rows) are constructor flags:

* ``soft_norm=False`` - ``eta`` fixed at 1 (plain LayerNorm): "SoftAdaLN (NoSoftNorm)";
* ``identity_init=False`` - PyTorch's default ``nn.Linear`` init of the heads:
  "SoftAdaLN (NoIdInit)";
* ``gate=False`` - no output gate (the sub-layer output is not rescaled).

"Hist-Affine-LN" (DiT-style AdaLN: ``LN(h)(1 + s(c)) + kappa(c)``, no gate,
randomly initialised heads) is all three switched off.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SoftNorm(nn.Module):
    """``(1 - eta) h + eta LN(h)`` over the last dim (no affine LN parameters).

    Parameters
    ----------
    dim : width ``D`` of ``h``.
    eta0 : initial ``eta`` (0: identity, 1: plain LayerNorm).
    eps : LayerNorm epsilon.
    learnable : ``eta`` is a trained parameter (SoftNorm); if False it is a
        fixed, non-persistent buffer (the state dict then has no ``eta``).

    ``forward(h (..., D)) -> (..., D)``; with ``eta == 1`` it returns
    ``LN(h)`` exactly (``torch.lerp`` with weight 1 returns the end point).
    """

    def __init__(self, dim: int, eta0: float = 0.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        if learnable:
            self.eta = nn.Parameter(torch.tensor(float(eta0)))
        else:
            self.register_buffer("eta", torch.tensor(float(eta0)), persistent=False)
        self.dim, self.eps = dim, eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.lerp(h, F.layer_norm(h, (self.dim,), eps=self.eps), self.eta)


class SoftAdaLN(nn.Module):
    """Histology/timestep modulation before one backbone sub-layer.

    Parameters
    ----------
    dim : token width ``D`` of the backbone.
    cond_dim : width ``C`` of the condition ``c_t``.
    soft_norm : if False, ``eta`` is fixed at 1 (plain LayerNorm; the
        "NoSoftNorm" ablation of HINGE Table S2), which is *not* identity at init.
    identity_init : if False, the scale/shift/gate head keeps PyTorch's default
        ``nn.Linear`` init (the "NoIdInit" ablation), not identity at init.
    gate : if False, no gate: ``forward`` returns ``None`` as the gate, which
        every backbone block treats as "output not rescaled" (Hist-Affine-LN).

    ``forward(h (B, G, D), c (B, C)) -> (h_mod (B, G, D), gate (B, 1, D) or None)``.
    """

    def __init__(self, dim: int, cond_dim: int, soft_norm: bool = True, identity_init: bool = True,
                 gate: bool = True) -> None:
        super().__init__()
        self.norm = SoftNorm(dim, eta0=0.0) if soft_norm else SoftNorm(dim, eta0=1.0, learnable=False)
        self.use_gate = gate
        self.head = nn.Linear(cond_dim, (3 if gate else 2) * dim)
        if identity_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.use_gate:
            scale, shift = self.head(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
            return torch.addcmul(shift, self.norm(h), 1 + scale), None
        scale, shift, gate = self.head(F.silu(c)).unsqueeze(1).chunk(3, dim=-1)
        return torch.addcmul(shift, self.norm(h), 1 + scale), 1 + gate
