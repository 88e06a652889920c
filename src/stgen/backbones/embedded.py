"""Expression backbone: a small CellFM-architecture transformer over genes.

CellFM (Zeng et al. 2025, biomed-AI/CellFM) embeds every gene of a cell as a
token = gene-identity embedding + value embedding, and runs a stack of RetNet-
style blocks:

* value encoder: a scalar expression value is mapped to a soft one-hot over
  ``value_bins`` learned bins (Linear -> LeakyReLU -> Linear with a learned skip
  -> softmax) and then to a ``dim``-d vector through a bin table;
* multi-head retention (non-causal, linear): Q, K pass a ReLU kernel, U a SiLU
  gate, ``O = SRMSNorm(Q (K^T V)) * U`` per head, then an output projection;
  masked genes contribute no keys/values in the first half of the layers (as
  in CellFM/HINGE's masked encoding);
* a gated linear unit ``o(u(x) * v(x))``;
* post-norm residuals with DeepNet scaling: ``x <- LN(alpha * x + f(x))`` with
  ``alpha = (2 L)^{1/4}`` for ``L`` layers.

Masked genes enter with value 0 plus a learned mask embedding. A per-gene value
decoder (MLP on each gene token) predicts the expression value; pre-training is
masked auto-encoding (MSE on masked genes), see :mod:`stgen.backbones.pretrain`.

This small model stands in for CellFM-800M (40 layers, 1536-d) until real
checkpoints are loaded. Each block exposes its sub-layers so that HINGE can
insert SoftAdaLN modulation before them (:mod:`stgen.nn.softadaln`).

Shapes: ``B`` spots (batch), ``G`` genes (tokens), ``D`` model width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol, Sequence
import torch
import torch.nn as nn
import torch.nn.functional as F
from stgen.errors import InputError


@dataclass(frozen=True)
class BackboneConfig:
    """Size of the expression backbone.

    Attributes
    ----------
    dim, n_layers, n_heads : transformer width, depth and retention heads.
    value_bins : number of soft bins of the CellFM value encoder.
    masked_kv_layers : how many of the first layers drop masked genes from keys
        and values; ``None`` = the first half, as in CellFM/HINGE's masked
        encoder. Later layers let every token (masked ones carry what the
        earlier layers gathered from visible genes and the condition) exchange
        information, so even an all-masked spot gets gene-gene coupling.
    """

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 8
    value_bins: int = 64
    masked_kv_layers: int | None = None

    @property
    def n_masked_kv_layers(self) -> int:
        return self.n_layers // 2 if self.masked_kv_layers is None else self.masked_kv_layers

    def to_dict(self) -> dict:
        return asdict(self)


class SRMSNorm(nn.Module):
    """Scale-free RMS norm of CellFM's retention: ``x / max(||x||_2 / sqrt(d), eps)``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.inv_sqrt_d = 1.0 / math.sqrt(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * self.inv_sqrt_d
        return x / rms.clamp_min(self.eps)


class ValueEncoder(nn.Module):
    """CellFM value encoder: scalar (B, G) -> soft-binned embedding (B, G, D)."""

    def __init__(self, dim: int, bins: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(1, bins, bias=False)
        self.w2 = nn.Linear(bins, bins, bias=False)
        self.skip = nn.Parameter(torch.zeros(()))
        self.table = nn.Linear(bins, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.w1(x.unsqueeze(-1)))
        h = self.w2(h) + self.skip * h
        return self.table(torch.softmax(h, dim=-1))


class MultiHeadRetention(nn.Module):
    """Non-causal multi-head retention of CellFM (linear attention, no decay).

    ``forward(x (B, G, D), kv_mask (B, G) bool or None) -> (B, G, D)``: genes with
    ``kv_mask == False`` (masked genes) are removed from keys and values; every
    gene still queries. Values are scaled by ``1/sqrt(#visible genes)`` so the
    output scale does not grow with the panel size.
    """

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.qukv = nn.Linear(dim, 4 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.inner_norm = SRMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, g, d = x.shape
        q, u, k, v = self.qukv(x).view(b, g, 4, self.n_heads, self.head_dim).unbind(2)
        q, k = F.relu(q), F.relu(k)
        if kv_mask is None:
            n_vis = torch.full((b, 1, 1, 1), float(g), dtype=x.dtype, device=x.device)
        else:
            m = kv_mask.to(x.dtype)
            k = k * m[:, :, None, None]  # a zero key removes the gene from K^T V
            n_vis = m.sum(1).clamp_min(1.0).view(b, 1, 1, 1)
        # kernel scale 1/sqrt(Dh) on Q and K and value scale 1/sqrt(n_visible), folded into K^T V
        kv = torch.einsum("bghi,bghj->bhij", k, v) * (n_vis.rsqrt() / self.head_dim)  # (B, H, Dh, Dh)
        o = torch.einsum("bghi,bhij->bghj", q, kv)
        o = self.inner_norm(o) * F.silu(u)
        return self.out(o.reshape(b, g, d))


class GatedLinearUnit(nn.Module):
    """CellFM's gated linear unit ``o(u(x) * v(x))``: (B, G, D) -> (B, G, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.uv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.uv(x).chunk(2, dim=-1)
        return self.out(u * v)


class SubLayerModulation(Protocol):
    """What HINGE plugs in before a sub-layer: ``(h, cond) -> (h_modulated, gate)``."""

    def __call__(self, h: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def modulated(sublayer, x: torch.Tensor, cond: torch.Tensor | None, mod: SubLayerModulation | None, *args):
    """``sublayer(x, *args)``, or with HINGE modulation ``sublayer(mod(x, c)[0], *args) * mod(x, c)[1]``.

    The one place that defines how a SoftAdaLN (or any :class:`SubLayerModulation`)
    wraps a backbone sub-layer; every backbone block (embedded, CellFM, scGPT)
    adds the result to its residual stream. ``x`` (B, T, D) -> (B, T, D).
    """
    h, gate = (x, None) if mod is None else mod(x, cond)
    y = sublayer(h, *args)
    return y if gate is None else y * gate


class RetentionBlock(nn.Module):
    """Post-norm residual block: retention then GLU, DeepNet residual scale ``alpha``.

    ``forward(x, kv_mask, cond=None, mod_attn=None, mod_ffn=None)``. Without
    modulation: ``x1 = LN1(alpha x + Ret(x))``, ``x2 = LN2(alpha x1 + GLU(x1))``.
    With HINGE modulation the sub-layer input becomes ``mod(h, cond)[0]`` and its
    output is multiplied by the gate ``mod(h, cond)[1]`` before the residual add.
    """

    def __init__(self, dim: int, n_heads: int, n_layers: int) -> None:
        super().__init__()
        self.alpha = (2.0 * n_layers) ** 0.25
        self.attn = MultiHeadRetention(dim, n_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = GatedLinearUnit(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        kv_mask: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        mod_attn: SubLayerModulation | None = None,
        mod_ffn: SubLayerModulation | None = None,
    ) -> torch.Tensor:
        # sub-layer first, then the residual (the order autograd records, kept from the original code)
        x = self.norm1(modulated(self.attn, x, cond, mod_attn, kv_mask) + self.alpha * x)
        return self.norm2(modulated(self.ffn, x, cond, mod_ffn) + self.alpha * x)


class ValueDecoder(nn.Module):
    """Per-gene value head: token (B, G, D) -> expression value (B, G)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, dim)
        self.w2 = nn.Linear(dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w2(F.leaky_relu(self.w1(h))).squeeze(-1)


class ExpressionBackbone(nn.Module):
    """CellFM-architecture expression model over a fixed gene list.

    Parameters
    ----------
    genes : gene symbols with a learned identity embedding (the backbone's own
        vocabulary, a subset of CellFM's ``gene_info.csv``).
    config : :class:`BackboneConfig`.

    ``forward(values (B, G), gene_idx (G,), visible (B, G) bool) -> (B, G)``
    predicts every gene's value from the visible ones; ``encode`` returns the
    final gene tokens (B, G, D). ``values`` are in the target units
    (log2(count+1) by default); masked entries are ignored (set to 0 inside).
    """

    def __init__(self, genes: Sequence[str], config: BackboneConfig = BackboneConfig()) -> None:
        super().__init__()
        self.genes = list(genes)
        self.gene_to_idx = {g: i for i, g in enumerate(self.genes)}
        self.config = config
        d = config.dim
        self.gene_emb = nn.Embedding(len(self.genes), d)
        nn.init.normal_(self.gene_emb.weight, std=0.02)
        self.mask_emb = nn.Parameter(torch.randn(d) * 0.02)
        self.value_enc = ValueEncoder(d, config.value_bins)
        self.blocks = nn.ModuleList(RetentionBlock(d, config.n_heads, config.n_layers) for _ in range(config.n_layers))
        self.decoder = ValueDecoder(d)

    def gene_index(self, genes: Sequence[str]) -> torch.Tensor:
        """Map gene symbols to embedding rows; InputError naming missing genes."""
        missing = [g for g in genes if g not in self.gene_to_idx]
        if missing:
            raise InputError(
                f"{len(missing)} gene(s) are not in the backbone vocabulary, e.g. {missing[:10]}"
            )
        return torch.tensor([self.gene_to_idx[g] for g in genes], dtype=torch.long)

    def embed(self, values: torch.Tensor, gene_idx: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Input tokens (B, G, D): gene embedding + value embedding (masked: mask embedding)."""
        vis = visible.to(values.dtype)
        tok = self.value_enc(values * vis) * vis.unsqueeze(-1) + self.mask_emb * (1 - vis).unsqueeze(-1)
        return tok + self.gene_emb(gene_idx)

    def kv_masks(self, visible: torch.Tensor) -> list[torch.Tensor | None]:
        """Per block: ``visible`` for the first ``n_masked_kv_layers`` blocks, else None."""
        k = self.config.n_masked_kv_layers
        return [visible if i < k else None for i in range(len(self.blocks))]

    def encode(self, values: torch.Tensor, gene_idx: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        x = self.embed(values, gene_idx, visible)
        for blk, kv in zip(self.blocks, self.kv_masks(visible)):
            x = blk(x, kv)
        return x

    def forward(self, values: torch.Tensor, gene_idx: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(values, gene_idx, visible))
