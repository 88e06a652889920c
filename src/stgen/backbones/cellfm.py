"""CellFM in PyTorch, parameter-for-parameter compatible with the released MindSpore checkpoints.

Sources
-------
CellFM: Zeng et al., "CellFM: a large-scale foundation model pre-trained on
transcriptomics of 100 million human cells", Nat. Commun. 2025; code
``biomed-AI/CellFM`` (MindSpore 2.2): ``model.py`` (``CellFM``, ``ValueEncoder``,
``FFN``, ``ValueDecoder``, ``CellwiseDecoder``), ``retention.py``
(``MHRetention``, ``GatedLinearUnit``, ``RetentionLayer``, ``SRMSNorm``),
``config.py`` (``Config``, ``Config_80M``) and the tutorials that load
``CellFM_80M_weight.ckpt``. The formulas below cite those files; this module is
an independent re-implementation.

Architecture (``B`` spots, ``G`` genes, ``T = G + 1`` tokens, ``D`` width, ``H`` heads, ``Dh = D / H``)
--------------------------------------------------------------------------------------------------
* Tokens (``model.py``, ``CellFM.encode``): token 0 is the learned ``cls_token``;
  token ``1 + j`` is ``gene_emb[id_j] + value_emb_j``. Gene ids are 1-based rows
  of the vocabulary CSV (``expand_gene_info.csv``, 27,855 genes), row 0 of
  ``gene_emb`` is padding and the table is padded to a multiple of 8 rows
  (``n_genes + 1 + (-n_genes - 1) % 8``).
* Value encoder (``model.py``, ``ValueEncoder``/``FFN``): for a scalar ``x``,
  ``h = LeakyReLU_0.2(W1 x)`` (``b = 256`` bins), ``h = W3 h + a * h``,
  ``emb = table(softmax(h))``. Masked genes (``unmask = 0``) get the learned
  ``value_enc.mask_emb`` instead: ``emb = FFN(x) * unmask + mask_emb * (1 - unmask)``.
  With CellFM's ``pad_zero = False`` rule (``zero_token=True`` here) visible genes
  whose value is exactly 0 get ``zero_emb`` instead of the value encoding.
* Retention layer (``retention.py``, ``RetentionLayer``), post-norm with DeepNet
  residual scale ``alpha = (2 L)^{1/4}``::

      x = LN1(alpha x + MHRetention(x))
      x = LN2(alpha x + GLU(x))

  LayerNorms are MindSpore ``nn.LayerNorm`` (``gamma``/``beta``, eps ``1e-7``).
* Multi-head retention (``retention.py``, ``MHRetention``), non-causal, no decay::

      Q = ReLU(x Wq^T) / sqrt(Dh),  K = ReLU(x Wk^T) * kv_mask / sqrt(Dh)
      V = (x Wv^T) / sqrt(G),       U = SiLU(x Wu^T)            (per head, Dh wide)
      O = SRMSNorm(Q (K^T V)) * U,  out = concat_heads(O) Wo^T

  with ``SRMSNorm(z) = z / max(||z / sqrt(Dh)||_2, 1e-12)`` computed in (at least) float32.
  ``1/sqrt(G)`` is CellFM's ``len_scale = rsqrt(sum(zero_idx) - 1)`` (the number of
  non-padded genes, cls excluded) and applies in every layer.
* Masked genes (``model.py``, ``CellFM.encode``): in the first ``L // 2`` layers
  the keys of masked genes are zeroed (``attn_mask = [1 (cls), unmask]``), so
  they receive information but contribute none; the remaining layers use only
  the padding mask (no padding here, so every token is a key).
* Gated linear unit (``retention.py``, ``GatedLinearUnit``): ``o((u x) * (v x))``,
  no activation, no bias.
* Decoders (``model.py``): ``value_dec`` per gene token ``w2(LeakyReLU_0.2(w1 h))``
  (no biases); ``cellwise_dec``: ``sigmoid(map(gene_emb)) . h_cls``.
* Checkpoints that carry spatial tokens (``ST_emb`` (1, 2, D) and an ``ST_enc``
  FFN, as in ``biomed-AI/CellFM-torch``'s 80M weights) load with
  ``st_tokens=True``; those parameters are kept but unused (CellFM-torch's
  ``embedding_infer`` path without spatial features).

Dropout (``enc_dropout * i / L`` per layer upstream) is off by default; HINGE
runs the backbone frozen in eval mode.

Notes on the PyTorch ports upstream: ``biomed-AI/CellFM-torch`` and
``donghaifang/HINGE`` use PyTorch's defaults (LayerNorm eps 1e-5/1e-6,
LeakyReLU slope 0.01) where MindSpore's are 1e-7 and 0.2; HINGE's port also
feeds masked genes ``value_enc(0) + zero_emb`` instead of ``mask_emb``. This
module follows the MindSpore originals (the numerics are config fields).
``genemap.csv`` is not used for gene ids: its ``idx`` differs from the
vocabulary-row rule for 20,099 of 27,855 genes (from ``GRAPLDR`` on) and has
only 27,852 distinct values; it only supplies aliases (:func:`read_aliases`).

Parameter names: MindSpore -> PyTorch rename rule
-------------------------------------------------
**Identity.** Every MindSpore parameter name is used unchanged as the PyTorch
``state_dict`` key: the module tree mirrors the MindSpore cell tree
(``encoder`` is the block list, ``value_enc.value_enc`` the FFN, ...), linear
layers keep MindSpore's ``Dense`` layout ``weight (out, in)`` and the
LayerNorms are a small module whose parameters are named ``gamma`` and ``beta``
like MindSpore's. Examples (CellFM-800M)::

    gene_emb                          (27856, 1536)
    cls_token, zero_emb               (1, 1, 1536)
    value_enc.mask_emb                (1, 1, 1536)
    value_enc.value_enc.w1.weight     (256, 1)
    value_enc.value_enc.w3.weight     (256, 256)
    value_enc.value_enc.table.weight  (1536, 256)
    value_enc.value_enc.a             (1, 1)
    encoder.{i}.attn.{q,k,v,u,o}_proj.weight   (1536, 1536)   i = 0..39
    encoder.{i}.ffn.{u,v,o}_proj.weight        (1536, 1536)
    encoder.{i}.post_norm{1,2}.{gamma,beta}    (1536,)
    value_dec.w1.weight               (1536, 1536)
    value_dec.w2.weight               (1, 1536)
    cellwise_dec.map.weight           (1536, 1536)

Optimiser and training state stored in the same file (``moment1.*``,
``moment2.*``, ``global_step``, ``learning_rate``, ``beta1_power``, ...; see
:data:`TRAINING_STATE_NAMES`) is not part of the model; :func:`convert_cellfm`
drops it and lists it in the sidecar. Anything else that does not match the
model raises :class:`~stgen.errors.InputError`.

HINGE interface
---------------
:class:`CellFMBackbone` exposes what :class:`~stgen.models.hinge.network.HINGE` uses on
:class:`~stgen.backbones.embedded.ExpressionBackbone` (``config.dim``, ``genes``,
``gene_to_idx``, ``blocks``, ``decoder``, ``gene_index``, ``embed``,
``kv_masks``, ``encode``, ``forward``) with one difference that faithfulness
requires: the token sequence carries CellFM's cls token in front, so ``embed``
and the blocks work on ``(B, 1 + G, D)``, ``kv_masks`` are ``(B, 1 + G)`` and the
``decoder`` drops token 0 and returns ``(B, G)``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping, Sequence
import torch
import torch.nn as nn
import torch.nn.functional as F
from stgen.errors import InputError
from stgen.backbones.embedded import modulated

log = logging.getLogger(__name__)


#: Parameters of the optional spatial-token group (CellFM-torch's 80M weights).
ST_KEYS = ("ST_emb", "ST_enc.w1.weight", "ST_enc.w3.weight", "ST_enc.table.weight", "ST_enc.a")


def default_vocab_dir() -> Path:
    """``$STGEN_CELLFM_VOCAB`` or ``../shared/vocab/cellfm`` next to the source checkout."""
    if "STGEN_CELLFM_VOCAB" in os.environ:
        return Path(os.environ["STGEN_CELLFM_VOCAB"])
    return Path(__file__).resolve().parents[3].parent / "shared" / "vocab" / "cellfm"


# =========================================================================== config
@dataclass(frozen=True)
class CellFMConfig:
    """Size and numerics of a CellFM model.

    Attributes
    ----------
    n_genes : vocabulary size (gene ids ``1..n_genes``; ``gene_emb`` has
        :attr:`n_rows` rows).
    dim, n_layers, n_heads : ``enc_dims``, ``enc_nlayers``, ``enc_num_heads``.
    value_bins : soft bins of the value encoder (``FFN(..., b=256)``).
    st_tokens : the checkpoint carries ``ST_emb``/``ST_enc`` (kept, unused).
    zero_token : CellFM's ``pad_zero=False`` rule (visible zero values -> ``zero_emb``);
        False for the released models (``pad_zero=True``).
    layer_norm_eps, leaky_relu_slope, srms_eps : MindSpore defaults (``nn.LayerNorm``
        eps 1e-7, ``nn.LeakyReLU`` alpha 0.2) and CellFM's SRMSNorm clamp.
    dropout : ``enc_dropout``; layer ``i`` uses ``dropout * i / n_layers`` (0 = off).
    name : label of the preset.
    """

    n_genes: int = 27855
    dim: int = 1536
    n_layers: int = 40
    n_heads: int = 48
    value_bins: int = 256
    st_tokens: bool = False
    zero_token: bool = False
    layer_norm_eps: float = 1e-7
    leaky_relu_slope: float = 0.2
    srms_eps: float = 1e-12
    dropout: float = 0.0
    name: str = "custom"

    def __post_init__(self) -> None:
        for f in ("n_genes", "dim", "n_layers", "n_heads", "value_bins"):
            if int(getattr(self, f)) < 1:
                raise InputError(f"CellFMConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.dim % self.n_heads:
            raise InputError(f"CellFMConfig: dim {self.dim} is not divisible by n_heads {self.n_heads}")

    # ---- presets
    @classmethod
    def cellfm_800m(cls, **overrides) -> "CellFMConfig":
        """CellFM-800M: ``config.py`` ``Config`` (enc_dims 1536, enc_nlayers 40,
        enc_num_heads 48), vocabulary ``expand_gene_info.csv`` (27,855 genes)."""
        return cls(**{"n_genes": 27855, "dim": 1536, "n_layers": 40, "n_heads": 48, "name": "CellFM-800M", **overrides})

    @classmethod
    def cellfm_80m(cls, **overrides) -> "CellFMConfig":
        """CellFM-80M: ``config.py`` ``Config_80M`` (enc_dims 1536, enc_nlayers 2,
        enc_num_heads 48), vocabulary ``expand_gene_info.csv`` as in the tutorials
        that load ``CellFM_80M_weight.ckpt``."""
        return cls(**{"n_genes": 27855, "dim": 1536, "n_layers": 2, "n_heads": 48, "name": "CellFM-80M", **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "CellFMConfig":
        """Test size: 50 genes, width 32, 3 layers, 4 heads, 16 bins."""
        return cls(**{"n_genes": 50, "dim": 32, "n_layers": 3, "n_heads": 4, "value_bins": 16, "name": "tiny",
                      **overrides})

    @classmethod
    def small(cls, **overrides) -> "CellFMConfig":
        """Small CPU size: 1000 genes, width 128, 4 layers, 8 heads, 64 bins."""
        return cls(**{"n_genes": 1000, "dim": 128, "n_layers": 4, "n_heads": 8, "value_bins": 64, "name": "small",
                      **overrides})

    @classmethod
    def from_name(cls, name: str, **overrides) -> "CellFMConfig":
        key = name.lower().replace("cellfm", "").strip("-_ ")
        presets = {"800m": cls.cellfm_800m, "80m": cls.cellfm_80m, "tiny": cls.tiny, "small": cls.small}
        if key not in presets:
            raise InputError(f"unknown CellFM config {name!r}; available: CellFM-800M, CellFM-80M, tiny, small")
        return presets[key](**overrides)

    @classmethod
    def from_dict(cls, d: Mapping) -> "CellFMConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown CellFMConfig field(s): {sorted(unknown)}")
        return cls(**d)

    # ---- derived
    @property
    def n_rows(self) -> int:
        """Rows of ``gene_emb``: padding row 0 + genes, padded to a multiple of 8."""
        return self.n_genes + 1 + (-self.n_genes - 1) % 8

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_masked_kv_layers(self) -> int:
        """Layers whose keys exclude masked genes: the first half (``depth // 2``)."""
        return self.n_layers // 2

    @property
    def alpha(self) -> float:
        """DeepNet residual scale ``(2 L)^{1/4}``."""
        return (2.0 * self.n_layers) ** 0.25

    def to_dict(self) -> dict:
        return asdict(self)


def _resolve_config(config: "str | CellFMConfig") -> CellFMConfig:
    if isinstance(config, CellFMConfig):
        return config
    if isinstance(config, str):
        return CellFMConfig.from_name(config)
    raise InputError(f"config must be a CellFMConfig or a preset name, got {type(config).__name__}")


# =========================================================================== layers
class MSLayerNorm(nn.Module):
    """MindSpore ``nn.LayerNorm`` over the last dim, parameters named ``gamma``/``beta``.

    ``(..., D) -> (..., D)``: ``(x - E x) / sqrt(Var x + eps) * gamma + beta``.
    """

    def __init__(self, dim: int, eps: float = 1e-7) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.gamma.shape, self.gamma, self.beta, self.eps)


class SRMSNorm(nn.Module):
    """CellFM ``SRMSNorm`` (``retention.py``): ``x / max(||x / sqrt(d)||_2, eps)``, no parameters.

    Computed in at least float32 (MindSpore casts half-precision inputs up), result in the input dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.scale = 1.0 / math.sqrt(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        norm = torch.linalg.vector_norm(x32 * self.scale, dim=-1, keepdim=True)
        return (x32 / norm.clamp_min(self.eps)).to(x.dtype)


class ValueFFN(nn.Module):
    """CellFM ``FFN`` (``model.py``): scalar ``(..., 1) -> (..., D)`` through soft bins.

    ``h = LeakyReLU(w1 x)``, ``h = w3 h + a h``, ``out = table(softmax(h))``.
    Parameters ``w1.weight (b, 1)``, ``w3.weight (b, b)``, ``table.weight (D, b)``, ``a (1, 1)``.
    """

    def __init__(self, dim: int, bins: int = 256, slope: float = 0.2) -> None:
        super().__init__()
        self.w1 = nn.Linear(1, bins, bias=False)
        self.w3 = nn.Linear(bins, bins, bias=False)
        self.table = nn.Linear(bins, dim, bias=False)
        self.a = nn.Parameter(torch.zeros(1, 1))
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.w1(x), self.slope)
        h = self.w3(h) + h * self.a
        return self.table(torch.softmax(h, dim=-1))


class ValueEncoder(nn.Module):
    """CellFM ``ValueEncoder`` (``model.py``): ``FFN(x) * unmask + mask_emb * (1 - unmask)``.

    ``forward(values (B, G), visible (B, G) bool) -> (B, G, D)``; masked values are
    zeroed before the FFN (CellFM's masked inputs are 0) so they cannot leak.
    """

    def __init__(self, dim: int, bins: int = 256, slope: float = 0.2) -> None:
        super().__init__()
        self.value_enc = ValueFFN(dim, bins, slope)
        self.mask_emb = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        vis = visible.to(values.dtype).unsqueeze(-1)
        emb = self.value_enc((values.unsqueeze(-1) * vis))
        return emb * vis + self.mask_emb * (1 - vis)


class MHRetention(nn.Module):
    """CellFM ``MHRetention`` (``retention.py``), non-causal linear retention.

    ``forward(x (B, T, D), kv_mask (B, T) bool or None, v_scale float) -> (B, T, D)``;
    see the module docstring for the formula. ``kv_mask == False`` zeroes a token's key.
    """

    def __init__(self, dim: int, n_heads: int, srms_eps: float = 1e-12) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        for name in ("q_proj", "k_proj", "v_proj", "u_proj", "o_proj"):
            setattr(self, name, nn.Linear(dim, dim, bias=False))
        self.inner_norm = SRMSNorm(self.head_dim, srms_eps)

    def forward(self, x: torch.Tensor, kv_mask: torch.Tensor | None = None, v_scale: float = 1.0) -> torch.Tensor:
        b, t, d = x.shape
        shape = (b, t, self.n_heads, self.head_dim)
        inv = 1.0 / math.sqrt(self.head_dim)
        q = F.relu(self.q_proj(x)).view(shape) * inv
        k = F.relu(self.k_proj(x)).view(shape)
        if kv_mask is not None:
            k = k * kv_mask.to(k.dtype)[:, :, None, None]
        k = k * inv
        v = self.v_proj(x).view(shape) * v_scale
        u = F.silu(self.u_proj(x)).view(shape)
        kv = torch.einsum("bthi,bthj->bhij", k, v)  # (B, H, Dh, Dh)
        o = torch.einsum("bthi,bhij->bthj", q, kv)  # (B, T, H, Dh)
        o = self.inner_norm(o) * u
        return self.o_proj(o.reshape(b, t, d))


class GatedLinearUnit(nn.Module):
    """CellFM ``GatedLinearUnit`` (``retention.py``): ``o_proj(u_proj(x) * v_proj(x))``, (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.u_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.u_proj(x) * self.v_proj(x))


class RetentionLayer(nn.Module):
    """CellFM ``RetentionLayer`` (``retention.py``), post-norm, DeepNet scale ``alpha``.

    ``forward(x (B, T, D), kv_mask (B, T) bool or None, cond=None, mod_attn=None, mod_ffn=None)``.
    Without modulation: ``x1 = LN1(alpha x + Ret(x))``, ``x2 = LN2(alpha x1 + GLU(x1))``.
    With HINGE modulation (same semantics as :class:`~stgen.backbones.embedded.RetentionBlock`)
    the sub-layer input becomes ``mod(h, cond)[0]`` and its output is multiplied by
    the gate ``mod(h, cond)[1]`` before the residual add. The value scale is
    ``1 / sqrt(T - n_prefix)`` (CellFM's ``len_scale``: genes, cls excluded).
    """

    def __init__(self, config: CellFMConfig, index: int = 0, n_prefix: int = 1) -> None:
        super().__init__()
        d = config.dim
        self.alpha = config.alpha
        self.n_prefix = n_prefix
        self.attn = MHRetention(d, config.n_heads, config.srms_eps)
        self.ffn = GatedLinearUnit(d)
        self.post_norm1 = MSLayerNorm(d, config.layer_norm_eps)
        self.post_norm2 = MSLayerNorm(d, config.layer_norm_eps)
        p = config.dropout * index / config.n_layers
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        kv_mask: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        mod_attn=None,
        mod_ffn=None,
    ) -> torch.Tensor:
        v_scale = 1.0 / math.sqrt(max(x.shape[1] - self.n_prefix, 1))
        attn = lambda h: self.dropout(self.attn(h, kv_mask, v_scale))  # noqa: E731
        x = self.post_norm1(self.alpha * x + modulated(attn, x, cond, mod_attn))
        ffn = lambda h: self.dropout(self.ffn(h))  # noqa: E731
        return self.post_norm2(self.alpha * x + modulated(ffn, x, cond, mod_ffn))


class ValueDecoder(nn.Module):
    """CellFM ``ValueDecoder`` (``model.py``): ``w2(LeakyReLU(w1 h))`` per gene token.

    ``forward(tokens (B, n_prefix + G, D)) -> (B, G)``: the cls token (first
    ``n_prefix`` tokens) is dropped, as CellFM decodes ``emb[:, 1:]``.
    """

    def __init__(self, dim: int, slope: float = 0.2, n_prefix: int = 1) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, dim, bias=False)
        self.w2 = nn.Linear(dim, 1, bias=False)
        self.slope = slope
        self.n_prefix = n_prefix

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h[:, self.n_prefix :]
        return self.w2(F.leaky_relu(self.w1(h), self.slope)).squeeze(-1)


class CellwiseDecoder(nn.Module):
    """CellFM ``CellwiseDecoder`` (``model.py``): ``pred_g = sigmoid(map(gene_emb_g)) . cell_emb``.

    ``forward(cell_emb (B, D), gene_emb (G, D) or (B, G, D)) -> (B, G)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.map = nn.Linear(dim, dim, bias=False)

    def forward(self, cell_emb: torch.Tensor, gene_emb: torch.Tensor) -> torch.Tensor:
        q = torch.sigmoid(self.map(gene_emb))
        return (q * cell_emb.unsqueeze(-2)).sum(-1)


# =========================================================================== backbone
class CellFMBackbone(nn.Module):
    """CellFM expression model with MindSpore-identical parameter names.

    Parameters
    ----------
    config : :class:`CellFMConfig`.
    genes : vocabulary symbols in token order (gene id ``i + 1`` is ``genes[i]``);
        ``None`` gives placeholder names (for shape/parameter counting).
    aliases : optional alias -> vocabulary symbol map (e.g. newer HGNC symbols
        from ``genemap.csv``); aliases are accepted by :meth:`gene_index`.

    Attributes used by HINGE: ``config.dim``, ``genes``, ``gene_to_idx`` (symbol ->
    row of ``gene_emb``), ``blocks`` (the ``encoder`` layers), ``decoder`` (``value_dec``).
    Shapes: ``B`` spots, ``G`` genes, ``T = G + 1`` tokens (cls first), ``D`` width.
    """

    n_prefix = 1  # the cls token

    def __init__(
        self,
        config: CellFMConfig,
        genes: Sequence[str] | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        genes = [f"<gene {i + 1}>" for i in range(config.n_genes)] if genes is None else [str(g) for g in genes]
        if len(genes) != config.n_genes:
            raise InputError(f"CellFM vocabulary has {len(genes)} genes but the config expects {config.n_genes}")
        if len(set(genes)) != len(genes):
            seen: set[str] = set()
            dup = sorted({g for g in genes if g in seen or seen.add(g)})
            raise InputError(f"CellFM vocabulary has duplicated gene symbols, e.g. {dup[:10]}")
        self.genes = genes
        self.gene_to_idx = {g: i + 1 for i, g in enumerate(genes)}
        self.aliases = {a: g for a, g in (aliases or {}).items() if a not in self.gene_to_idx and g in self.gene_to_idx}
        for a, g in self.aliases.items():
            self.gene_to_idx[a] = self.gene_to_idx[g]

        d = config.dim
        self.gene_emb = nn.Parameter(torch.empty(config.n_rows, d))
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        self.zero_emb = nn.Parameter(torch.zeros(1, 1, d))
        self.value_enc = ValueEncoder(d, config.value_bins, config.leaky_relu_slope)
        if config.st_tokens:
            self.ST_emb = nn.Parameter(torch.empty(1, 2, d))
            self.ST_enc = ValueFFN(d, config.value_bins, config.leaky_relu_slope)
        self.encoder = nn.ModuleList(RetentionLayer(config, i, self.n_prefix) for i in range(config.n_layers))
        self.value_dec = ValueDecoder(d, config.leaky_relu_slope, self.n_prefix)
        self.cellwise_dec = CellwiseDecoder(d)
        self._init_weights()

    def _init_weights(self) -> None:
        """Fresh-model init in the spirit of CellFM (XavierNormal); loaded checkpoints overwrite it."""
        with torch.no_grad():
            nn.init.xavier_normal_(self.gene_emb, gain=0.5)
            self.gene_emb[0].zero_()
            nn.init.normal_(self.cls_token, std=0.02)
            if self.config.st_tokens:
                nn.init.normal_(self.ST_emb, std=0.02)
            beta = (8.0 * self.config.n_layers) ** -0.25
            for blk in self.encoder:
                for name in ("q_proj", "k_proj", "v_proj", "u_proj", "o_proj"):
                    gain = 1.0 if name in ("q_proj", "k_proj") else beta
                    nn.init.xavier_normal_(getattr(blk.attn, name).weight, gain=gain)
                for lin in (blk.ffn.u_proj, blk.ffn.v_proj, blk.ffn.o_proj):
                    nn.init.xavier_normal_(lin.weight, gain=beta)

    # ---- HINGE interface
    @property
    def blocks(self) -> nn.ModuleList:
        """The retention layers (MindSpore name ``encoder``)."""
        return self.encoder

    @property
    def decoder(self) -> ValueDecoder:
        """The per-gene value decoder (MindSpore name ``value_dec``): (B, 1 + G, D) -> (B, G)."""
        return self.value_dec

    def gene_index(self, genes: Sequence[str]) -> torch.Tensor:
        """Gene ids (rows of ``gene_emb``), ``(G,)`` long; InputError naming genes not in the vocabulary."""
        missing = [g for g in genes if g not in self.gene_to_idx]
        if missing:
            raise InputError(
                f"{len(missing)} gene(s) are not in the CellFM vocabulary, e.g. {missing[:10]} "
                f"(use stgen.backbones.cellfm.map_panel to drop them)"
            )
        return torch.tensor([self.gene_to_idx[g] for g in genes], dtype=torch.long)

    def embed(self, values: torch.Tensor, gene_idx: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Input tokens ``(B, 1 + G, D)``: cls token, then ``gene_emb[id] + value embedding``.

        ``values (B, G)`` (log1p-normalised expression in CellFM), ``gene_idx (G,)``
        or ``(B, G)``, ``visible (B, G)`` bool. Masked genes get ``mask_emb``
        (``model.py``: ``ValueEncoder``); with ``zero_token`` visible zeros get ``zero_emb``.
        """
        if values.shape != visible.shape or gene_idx.shape[-1] != values.shape[-1]:
            raise InputError(
                f"embed: values {tuple(values.shape)}, visible {tuple(visible.shape)} and gene_idx "
                f"{tuple(gene_idx.shape)} do not agree on (B, G)"
            )
        emb = self.value_enc(values, visible)
        if self.config.zero_token:
            z = (visible & (values == 0)).to(emb.dtype).unsqueeze(-1)
            emb = z * self.zero_emb + (1 - z) * emb
        emb = emb + self.gene_emb[gene_idx]
        cls = self.cls_token.to(emb.dtype).expand(emb.shape[0], 1, -1)
        return torch.cat([cls, emb], dim=1)

    def kv_masks(self, visible: torch.Tensor) -> list[torch.Tensor | None]:
        """Per layer: ``[True (cls), visible]`` ``(B, 1 + G)`` for the first ``L // 2`` layers, then None."""
        m = torch.cat([torch.ones_like(visible[:, :1], dtype=torch.bool), visible.bool()], dim=1)
        k = self.config.n_masked_kv_layers
        return [m if i < k else None for i in range(len(self.encoder))]

    def encode(self, values: torch.Tensor, gene_idx: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Final tokens ``(B, 1 + G, D)`` (token 0 = cls / cell embedding)."""
        x = self.embed(values, gene_idx, visible)
        for blk, kv in zip(self.encoder, self.kv_masks(visible)):
            x = blk(x, kv)
        return x

    def forward(self, values: torch.Tensor, gene_idx: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Gene-wise value prediction ``(B, G)`` (CellFM's ``gw_pred``)."""
        return self.value_dec(self.encode(values, gene_idx, visible))

    def cellwise(self, tokens: torch.Tensor, gene_idx: torch.Tensor) -> torch.Tensor:
        """Cell-wise prediction ``(B, G)`` (CellFM's ``cw_pred``) from ``encode`` output and gene ids."""
        return self.cellwise_dec(tokens[:, 0], self.gene_emb[gene_idx])


def count_parameters(config: CellFMConfig) -> int:
    """Number of parameters of a config, from a meta-device instance (nothing is allocated)."""
    with torch.device("meta"):
        model = CellFMBackbone(config)
    return sum(p.numel() for p in model.parameters())


def expected_shapes(config: CellFMConfig) -> dict[str, tuple[int, ...]]:
    """MindSpore (= PyTorch) parameter name -> shape for ``config`` (meta device)."""
    with torch.device("meta"):
        model = CellFMBackbone(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# =========================================================================== vocabulary
def read_vocab(csv_path: str | os.PathLike) -> list[str]:
    """Gene symbols in token order from a CellFM gene table (first column, e.g. ``HGNC_gene``)."""
    import pandas as pd

    p = Path(csv_path)
    try:
        df = pd.read_csv(p, index_col=0, header=0)
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: cannot read CellFM vocabulary CSV ({e})") from e
    genes = [str(g) for g in df.index]
    if not genes:
        raise InputError(f"{p}: CellFM vocabulary CSV has no genes")
    if len(set(genes)) != len(genes):
        dup = df.index[df.index.duplicated()].tolist()[:10]
        raise InputError(f"{p}: CellFM vocabulary CSV has duplicated symbols, e.g. {dup}")
    return genes


def read_aliases(genemap_csv: str | os.PathLike, vocab: Sequence[str]) -> dict[str, str]:
    """Alias -> vocabulary symbol from ``genemap.csv`` (columns: symbol index, ``idx``).

    ``genemap.csv`` groups symbols by an ``idx``; a symbol absent from the
    vocabulary whose group holds exactly one vocabulary symbol is an alias of it
    (e.g. ``SPMIP1 -> ATP6V1FNB``). Its ``idx`` values are *not* used as token
    ids: they differ from CellFM's rule (1 + row of the vocabulary CSV, used by
    every upstream loader) for most genes.
    """
    import pandas as pd

    p = Path(genemap_csv)
    try:
        df = pd.read_csv(p, index_col=0, header=0)
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: cannot read genemap CSV ({e})") from e
    if "idx" not in df.columns:
        raise InputError(f"{p}: genemap CSV needs an 'idx' column, has {list(df.columns)}")
    vocab_set = set(vocab)
    groups: dict[int, list[str]] = {}
    for sym, i in zip(df.index.astype(str), df["idx"]):
        groups.setdefault(int(i), []).append(sym)
    aliases = {}
    for syms in groups.values():
        canon = [s for s in syms if s in vocab_set]
        if len(canon) == 1:
            aliases.update({s: canon[0] for s in syms if s not in vocab_set})
    return aliases


def map_panel(genes: Sequence[str], backbone: CellFMBackbone) -> tuple[list[str], list[str]]:
    """Split a panel into genes the backbone knows (``kept``, in order) and the rest (``dropped``).

    Aliases known to the backbone count as kept (and keep their panel name).
    Dropped genes are logged as a warning.
    """
    kept = [g for g in genes if g in backbone.gene_to_idx]
    dropped = [g for g in genes if g not in backbone.gene_to_idx]
    if dropped:
        log.warning("%d of %d panel genes are not in the CellFM vocabulary and are dropped: %s%s",
                    len(dropped), len(genes), ", ".join(dropped[:20]), " ..." if len(dropped) > 20 else "")
    return kept, dropped
