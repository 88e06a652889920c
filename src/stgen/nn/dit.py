"""Diffusion-transformer blocks (Peebles & Xie 2023): adaLN-Zero DiT block, final layer, GEGLU feed-forward."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GEGLU(nn.Module):
    """Gated-GELU feed-forward (App. D.2 eq. 29): ``W_o (a * GELU(b))``, ``[a; b] = W_i x``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)
        self.out = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)
        return self.out(self.drop(a * F.gelu(b)))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _zero_linear(dim_in: int, dim_out: int) -> nn.Linear:
    lin = nn.Linear(dim_in, dim_out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero over the gene tokens of each spot (Peebles & Xie 2023).

    ``forward(h (B, G, d), c (B, d)) -> (B, G, d)``:
    ``h += g1 * Attn(LN(h)(1 + s1) + b1)``, ``h += g2 * MLP(LN(h)(1 + s2) + b2)``
    with ``(b1, s1, g1, b2, s2, g2) = Linear(SiLU(c))``, zero-initialised: the
    block is the identity at initialisation.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), _zero_linear(dim, 6 * dim))

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        b, g, d = x.shape
        q, k, v = self.qkv(x).view(b, g, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(o.transpose(1, 2).reshape(b, g, d))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b1, s1, g1, b2, s2, g2 = self.ada(c)[:, None, :].chunk(6, dim=-1)
        h = h + g1 * self.attn(_modulate(self.norm1(h), b1, s1))
        return h + g2 * self.mlp(_modulate(self.norm2(h), b2, s2))


class FinalLayer(nn.Module):
    """adaLN (zero-initialised) + zero-initialised linear: gene tokens (B, G, d) -> (B, G)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), _zero_linear(dim, 2 * dim))
        self.out = _zero_linear(dim, 1)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c)[:, None, :].chunk(2, dim=-1)
        return self.out(_modulate(self.norm(h), shift, scale)).squeeze(-1)
