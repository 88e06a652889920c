"""TRIPLEX's network: target, neighbourhood and global views, cross-attention fusion, four heads.

Chung et al., "Accurate Spatial Gene Expression Prediction by Integrating Multi-Resolution Features",
CVPR 2024; the layer structure follows the authors' public code (NEXGEM/TRIPLEX ``models/TRIPLEX.py``,
``models/module.py``), read for its design, not copied. Shapes: ``B`` spots of a batch, ``N`` spots of a
section, ``F`` encoder feature width, ``d`` = ``cfg.dim``, ``K`` = ``n_neighbours ** 2``, ``G`` genes.

* **Target view**: the spot patch's encoder feature projected to one token (B, 1, d).
* **Neighbour view**: the ``K`` neighbour patches' features projected to tokens plus a fixed sinusoidal
  encoding of their grid position, a pre-norm transformer and LayerNorm (B, K, d).
* **Global view**: every spot of the section, projected; one transformer layer; the positional-encoding
  generator (a depthwise convolution over the spots laid on their lattice, added to each token, the
  authors' PEGH); ``global_layers - 1`` layers and LayerNorm (N, d). Attention runs through
  :func:`torch.nn.functional.scaled_dot_product_attention`, whose CPU and CUDA kernels keep memory linear in
  ``N`` (no N x N matrix is stored).
* **Fusion**: one shared cross-attention encoder; the spot's global token queries the target tokens and,
  separately, the neighbour tokens; the two results are summed and normalised (B, d).
* **Heads**: fused, target (mean of its tokens), neighbour (mean of its tokens) and global, each (B, G).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from stgen.models.triplex.config import TriplexConfig
from stgen.nn.stats import floored_std


class _Attention(nn.Module):
    """Multi-head (cross-)attention through ``scaled_dot_product_attention``: (B, Nq, d), (B, Nk, d) -> (B, Nq, d)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor) -> torch.Tensor:
        b, nq, d = xq.shape
        h = self.heads
        q = self.q(xq).view(b, nq, h, d // h).transpose(1, 2)
        k, v = self.kv(xkv).view(b, xkv.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, nq, d))


class _Block(nn.Module):
    """Pre-norm block: ``x + Attn(LN(x), LN(kv))`` then ``x + FF(LN(x))``; self-attention when ``kv`` is None
    (the authors' ``PreNorm`` normalises query and key/value with the same LayerNorm)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, dropout)
        hidden = max(1, int(dim * mlp_ratio))
        self.ff = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        q = self.norm1(x)
        x = x + self.attn(q, q if kv is None else self.norm1(kv))
        return x + self.ff(self.norm2(x))


def sinusoidal_positions(n: int, dim: int) -> torch.Tensor:
    """(n, dim) sine/cosine encoding of positions 0..n-1 (Vaswani et al.; the authors' neighbour encoding)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe


class LatticePEG(nn.Module):
    """Positional-encoding generator on the spot lattice (the authors' PEGH).

    Spots are placed on a grid of half-pitch cells (``lattice`` (N, 2) long: column, row; two spots never
    share a cell when neighbours are at least 0.71 pitch apart, and a shared cell is averaged), a depthwise
    convolution whose kernel spans ``kernel_size`` pitches runs over the occupied grid, and its output at each
    spot is added to the spot's token: (N, d) -> (N, d). Memory: the grid's cells x d.
    """

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        k = 2 * kernel_size - 1  # half-pitch cells: +-(kernel_size // 2) pitches
        self.conv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)

    def forward(self, x: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        w, h = int(lattice[:, 0].max()) + 1, int(lattice[:, 1].max()) + 1
        flat = lattice[:, 1] * w + lattice[:, 0]
        grid = x.new_zeros(h * w, d).index_add(0, flat, x)
        count = x.new_zeros(h * w).index_add(0, flat, torch.ones_like(flat, dtype=x.dtype)).clamp_min(1.0)
        grid = (grid / count[:, None]).T.reshape(1, d, h, w)
        out = self.conv(grid).reshape(d, h * w).T[flat]
        return x + out


class TriplexNet(nn.Module):
    """The three views, the fusion and the heads (module docstring); inputs are raw encoder features.

    ``feat_mean``/``feat_std`` standardise the features (fitted on the training spots); the heads' biases
    start at the training mean of the targets, which the model predicts in target units (log2(count+1)).
    """

    def __init__(self, feat_dim: int, n_genes: int, cfg: TriplexConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.register_buffer("feat_mean", torch.zeros(feat_dim))
        self.register_buffer("feat_std", torch.ones(feat_dim))
        self.proj_target = nn.Linear(feat_dim, d)
        self.proj_neighbour = nn.Linear(feat_dim, d)
        self.proj_global = nn.Linear(feat_dim, d)
        self.register_buffer("neighbour_pos", sinusoidal_positions(cfg.n_neighbours ** 2, d), persistent=False)
        self.neighbour = nn.ModuleList(_Block(d, cfg.neighbour_heads, cfg.mlp_ratio, cfg.neighbour_dropout)
                                       for _ in range(cfg.neighbour_layers))
        self.neighbour_norm = nn.LayerNorm(d)
        self.global1 = _Block(d, cfg.global_heads, cfg.mlp_ratio, cfg.global_dropout)
        self.peg = LatticePEG(d, cfg.kernel_size)
        self.global2 = nn.ModuleList(_Block(d, cfg.global_heads, cfg.mlp_ratio, cfg.global_dropout)
                                     for _ in range(cfg.global_layers - 1))
        self.global_norm = nn.LayerNorm(d)
        self.fusion = nn.ModuleList(_Block(d, cfg.fusion_heads, cfg.mlp_ratio, cfg.fusion_dropout)
                                    for _ in range(cfg.fusion_layers))
        self.fusion_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_genes)
        self.head_target = nn.Linear(d, n_genes)
        self.head_neighbour = nn.Linear(d, n_genes)
        self.head_global = nn.Linear(d, n_genes)

    @torch.no_grad()
    def set_stats(self, feats: torch.Tensor, targets: torch.Tensor) -> None:
        """Feature standardisation from the training spots' features (M, F); head biases = target means (M, G)."""
        self.feat_mean.copy_(feats.mean(0))
        self.feat_std.copy_(floored_std(feats.std(0)) if len(feats) > 1 else torch.ones_like(self.feat_std))
        for head in (self.head, self.head_target, self.head_neighbour, self.head_global):
            head.bias.copy_(targets.mean(0))

    def _z(self, f: torch.Tensor) -> torch.Tensor:
        return (f - self.feat_mean) / self.feat_std

    def encode_global(self, feats: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
        """Global tokens (N, d) of a whole section: ``feats`` (N, F), ``lattice`` (N, 2) half-pitch cells."""
        x = self.global1(self.proj_global(self._z(feats))[None])[0]
        x = self.peg(x, lattice)[None]
        for blk in self.global2:
            x = blk(x)
        return self.global_norm(x)[0]

    def forward(self, target: torch.Tensor, neighbours: torch.Tensor,
                global_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """``target`` (B, F), ``neighbours`` (B, K, F), ``global_tokens`` (B, d) -> the four heads, (B, G) each
        (``fused``, ``target``, ``neighbour``, ``global``)."""
        t = self.proj_target(self._z(target))[:, None]  # (B, 1, d)
        nb = self.proj_neighbour(self._z(neighbours)) + self.neighbour_pos
        for blk in self.neighbour:
            nb = blk(nb)
        nb = self.neighbour_norm(nb)
        q = global_tokens[:, None]
        fused = []
        for kv in (t, nb):  # one shared cross-attention encoder, queried twice
            x = q
            for blk in self.fusion:
                x = blk(x, kv)
            fused.append(x)
        fused = self.fusion_norm((fused[0] + fused[1])[:, 0])
        return {"fused": self.head(fused), "target": self.head_target(t.mean(1)),
                "neighbour": self.head_neighbour(nb.mean(1)), "global": self.head_global(global_tokens)}


def triplex_loss(out: dict[str, torch.Tensor], y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``MSE(fused, y) + sum_v [(1 - alpha) MSE(v, y) + alpha MSE(fused, v)]`` over the target, neighbour and
    global heads (the authors' training step: supervision plus distillation from the fusion, both ways)."""
    loss = F.mse_loss(out["fused"], y)
    for view in ("target", "neighbour", "global"):
        loss = loss + (1 - alpha) * F.mse_loss(out[view], y) + alpha * F.mse_loss(out["fused"], out[view])
    return loss


__all__ = ["TriplexNet", "LatticePEG", "sinusoidal_positions", "triplex_loss"]
