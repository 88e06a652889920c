"""Low-rank adapters (LoRA) on a frozen backbone: the "Backbone-LoRA" ablation.

HINGE Supp. Tables S2/S3, "Backbone adaptation" rows: HINGE (frozen backbone
+ SoftAdaLN) plus rank-``r`` LoRA adapters (Hu et al., ICLR 2022) on the
backbone's retention and GLU projections, i.e. every ``nn.Linear`` inside each
backbone block (for the embedded/CellFM backbones: the retention's Q/U/K/V and
output projections and the GLU's U/V and output projections; for scGPT: the
attention output projection and the two FFN linears - its fused ``in_proj`` is
a raw parameter, not an ``nn.Linear``, and gets no adapter).

A wrapped projection computes

    y = x W^T + b + (alpha / r) * (x A^T) B^T,   A (r, in), B (out, r)

with ``A`` Kaiming-uniform (as ``nn.Linear``) and ``B = 0``, so at
initialisation the wrapped backbone is the frozen backbone bit for bit
(``y + 0 == y``). ``W`` and ``b`` stay frozen; only ``A`` and ``B`` train.

The wrapper re-registers the original ``weight``/``bias`` *objects* under the
same names, so backbone state-dict keys are unchanged
(``blocks.0.attn.qukv.weight``) and the adapters add
``blocks.0.attn.qukv.lora_A`` / ``lora_B``.
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F
from stgen.errors import InputError


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update.

    Parameters
    ----------
    base : the linear layer to adapt (its parameters are shared, frozen here).
    rank : LoRA rank ``r`` (>= 1).
    alpha : LoRA scaling numerator; the update is multiplied by ``alpha / r``.

    ``forward(x (..., in_features)) -> (..., out_features)``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise InputError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias  # None or the base Parameter
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def add_lora(blocks: nn.ModuleList, rank: int = 8, alpha: float = 8.0) -> list[str]:
    """Replace every ``nn.Linear`` inside ``blocks`` by a :class:`LoRALinear`, in place.

    Returns the wrapped modules' names relative to ``blocks`` (e.g.
    ``["0.attn.qukv", "0.attn.out", ...]``). Raises InputError when no block
    contains an ``nn.Linear`` (LoRA would be a no-op).
    """
    names = []
    for name, module in list(blocks.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                names.append(f"{name}.{child_name}" if name else child_name)
    if not names:
        raise InputError("Backbone-LoRA: the backbone blocks contain no nn.Linear projection to adapt")
    return names


__all__ = ["LoRALinear", "add_lora"]
