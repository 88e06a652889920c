"""scGPT as a HINGE expression backbone ("HINGE (scGPT)", HINGE paper Table S5).

Loads a released scGPT model directory (``best_model.pt``, ``args.json``,
``vocab.json``; e.g. the whole-human checkpoint ``scGPT_human``) into
:class:`ScGPTBackbone`, a module with the interface HINGE uses on
:class:`~stgen.backbones.embedded.ExpressionBackbone` (``config.dim``, ``genes``,
``gene_to_idx``, ``blocks``, ``decoder``, ``gene_index``, ``embed``,
``kv_masks``, ``encode``, ``forward``), so :class:`~stgen.models.hinge.network.HINGE`
runs on it unchanged.

Sources
-------
Cui et al., "scGPT: toward building a foundation model for single-cell
multi-omics using generative AI", Nat. Methods 2024; code ``bowang-lab/scGPT``:
``scgpt/model/model.py`` (``TransformerModel._encode``, ``GeneEncoder``,
``ContinuousValueEncoder``, ``FlashTransformerEncoderLayer``, ``ExprDecoder``),
``scgpt/model/flash_attn_compat.py`` (the ``self_attn._impl.*`` key layout),
``scgpt/utils/util.py`` (``load_pretrained``: ``Wqkv.`` -> ``in_proj_``),
``scgpt/preprocess.py`` (``binning``), ``scgpt/data_collator.py`` (masking),
``scgpt/tokenizer/gene_tokenizer.py`` (``vocab.json`` = ``{token: id}``;
``tokenize_batch`` puts ``<cls>`` with value 0 first) and ``scgpt/tasks/cell_emb.py``
(how a model directory is read; ``<pad>``, ``<cls>``, ``<eoc>`` are appended to
the vocabulary when missing). This module is an independent re-implementation.

Computation (``B`` spots, ``G`` genes, ``P`` prefix tokens (1 for ``<cls>``, else 0),
``T = P + G`` tokens, ``D`` = ``embsize``, ``H`` = ``nheads``, ``F`` = ``d_hid``)
------------------------------------------------------------------------------------
* Input values (``scgpt/preprocess.py`` ``binning``; ``args.json`` ``input_style:
  "binned"``, ``n_bins``): per spot, the visible non-zero values are replaced by
  their quantile bin ``1 .. n_bins - 1`` (edges = ``n_bins - 1`` linear-interpolated
  quantiles of those values; bin = number of edges <= value, i.e. the one-sided
  ``np.digitize`` used by the pre-training collator); zeros stay 0. Masked genes
  get ``mask_value`` (-1), as in scGPT's masked value prediction
  (``DataCollator._mask``/``random_mask_value``).
* Token ``j``: ``LN_g(E[id_j]) + LN_v(W2 ReLU(W1 min(x_j, 512) + b1) + b2)``
  (``GeneEncoder`` = Embedding + LayerNorm; ``ContinuousValueEncoder`` =
  Linear(1, D) -> ReLU -> Linear(D, D) -> LayerNorm, input clipped at 512).
  Token 0 is ``<cls>`` with value 0 when ``prepend_cls``. If the checkpoint has
  ``bn.*`` (``TransformerModel.bn``, a BatchNorm1d(D, eps=6.1e-5) over the summed
  embeddings), it is applied with its running statistics.
* ``nlayers`` layers (``nn.TransformerEncoderLayer`` / ``FlashTransformerEncoderLayer``,
  ReLU, LayerNorm eps 1e-5, post-norm)::

      x = LN1(x + MHA(x));   x = LN2(x + W_b ReLU(W_a x + a) + b)

  with ``MHA`` full softmax self-attention over all ``T`` tokens, scale
  ``1/sqrt(D/H)``. With ``pre_norm: true`` scGPT's flash layer computes
  ``x = LN1(x); x = x + MHA(x); x = LN2(x); x = x + FFN(x)`` (sic), reproduced here.
* ``ExprDecoder``: ``Linear(D, D) -> LeakyReLU -> Linear(D, D) -> LeakyReLU ->
  Linear(D, 1)`` on every gene token (the ``<cls>`` token is dropped), in the units
  scGPT was trained on (bins for ``input_style: "binned"``).

HINGE hooks: every layer accepts ``(x, kv_mask, cond, mod_attn, mod_ffn)``; the
sub-layer input becomes ``mod(h, cond)[0]`` and its output is multiplied by
``mod(h, cond)[1]`` before the residual add, as in
:class:`~stgen.backbones.embedded.RetentionBlock`. scGPT lets every token attend to
every token, so :meth:`ScGPTBackbone.kv_masks` returns ``None`` for all layers
(a given ``kv_mask`` (B, G) is honoured: ``False`` genes are removed as keys).

Checkpoint layouts (``best_model.pt``, a plain ``state_dict``)
--------------------------------------------------------------
Per layer ``transformer_encoder.layers.{i}.``, the attention is stored as one of

* flash-attn 1.x ``FlashMHA`` (released checkpoints): ``self_attn.Wqkv.{weight,bias}``
  (3D x D, rows ``[q; k; v]``, heads contiguous inside each), ``self_attn.out_proj.*``;
* scGPT's flash-attn compat wrapper (2026): ``self_attn._impl.Wqkv.*``, ``self_attn._impl.out_proj.*``;
* ``torch.nn.MultiheadAttention``: ``self_attn.in_proj_{weight,bias}``, ``self_attn.out_proj.*``.

All three carry the same tensors (``Wqkv`` == ``in_proj``, as scGPT's
``load_pretrained`` renames them). Heads HINGE does not use are skipped, by the
explicit prefixes of :data:`IGNORED_PREFIXES`, and listed in ``load_report``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from stgen.errors import InputError
from stgen.backbones.embedded import modulated

log = logging.getLogger(__name__)


CHECKPOINT_FILE = "best_model.pt"
ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"

#: Special tokens scGPT appends to the vocabulary when missing (``scgpt/tasks/cell_emb.py``).
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")

_SUPPORTED_INPUT_STYLES = ("binned", "normed_raw", "log1p")
_LAYER_RE = re.compile(r"^transformer_encoder\.layers\.(\d+)\.(.+)$")
_BN_EPS = 6.1e-5  # TransformerModel.bn / dsbn


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ScGPTConfig:
    """Architecture and input convention of an scGPT checkpoint (from ``args.json``).

    Attributes
    ----------
    dim, n_heads, d_hid, n_layers : ``embsize``, ``nheads``, ``d_hid``, ``nlayers``.
    n_bins : ``n_bins`` (51 for scGPT_human): value bins incl. the zero bin.
    input_style : ``input_style`` (``"binned"``, ``"normed_raw"``, ``"log1p"``).
    input_emb_style : ``input_emb_style``; only ``"continuous"`` is implemented.
    pad_token, pad_value, mask_value : ``pad_token``, ``pad_value``, ``mask_value``.
    explicit_zero_prob : ``explicit_zero_prob`` (the decoder has a ``zero_logit`` branch).
    pre_norm : ``pre_norm`` (scGPT's flash-layer ``"pre"`` scheme).
    bin_inputs : bin visible values per spot (default: ``input_style == "binned"``).
    prepend_cls : put a ``<cls>`` token (value ``cls_value``) before the genes.
    cls_value : input value of ``<cls>`` (0, as ``tokenize_batch``).
    input_batchnorm : the checkpoint has ``bn.*`` (inferred from the checkpoint).
    max_value : clip of the continuous value encoder (512 in scGPT).
    layer_norm_eps : LayerNorm eps of every LayerNorm (PyTorch default 1e-5).
    """

    dim: int = 512
    n_heads: int = 8
    d_hid: int = 512
    n_layers: int = 12
    n_bins: int = 51
    input_style: str = "binned"
    input_emb_style: str = "continuous"
    pad_token: str = "<pad>"
    pad_value: float = -2.0
    mask_value: float = -1.0
    explicit_zero_prob: bool = False
    pre_norm: bool = False
    bin_inputs: bool = True
    prepend_cls: bool = True
    cls_value: float = 0.0
    input_batchnorm: bool = False
    max_value: float = 512.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("dim", "n_heads", "d_hid", "n_layers", "n_bins"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InputError(f"scGPT config: {name} must be a positive integer, got {v!r}")
        if self.dim % self.n_heads:
            raise InputError(f"scGPT config: embsize {self.dim} is not divisible by nheads {self.n_heads}")
        if self.input_emb_style != "continuous":
            raise InputError(
                f"scGPT config: input_emb_style {self.input_emb_style!r} is not supported "
                "(only 'continuous' is implemented; 'category' and 'scaling' are not)"
            )
        if self.input_style not in _SUPPORTED_INPUT_STYLES:
            raise InputError(
                f"scGPT config: input_style {self.input_style!r} is not one of {list(_SUPPORTED_INPUT_STYLES)}"
            )
        if self.bin_inputs and self.n_bins < 3:
            raise InputError(f"scGPT config: n_bins must be >= 3 to bin inputs, got {self.n_bins}")
        for name in ("pad_value", "mask_value", "cls_value", "max_value", "layer_norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"scGPT config: {name} must be a finite number, got {v!r}")
        if not isinstance(self.pad_token, str) or not self.pad_token:
            raise InputError(f"scGPT config: pad_token must be a non-empty string, got {self.pad_token!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_prefix(self) -> int:
        """Tokens before the genes: 1 (``<cls>``) or 0."""
        return 1 if self.prepend_cls else 0

    @classmethod
    def from_args(cls, args: Mapping[str, Any], source: str | Path = ARGS_FILE, **overrides) -> "ScGPTConfig":
        """Config from a parsed ``args.json``; InputError naming ``source`` when invalid.

        Used fields: ``embsize``, ``nheads``, ``d_hid``, ``nlayers`` (required);
        ``n_bins`` (51), ``input_style`` ("binned"), ``input_emb_style``
        ("continuous"), ``pad_token`` ("<pad>"), ``pad_value`` (-2),
        ``mask_value`` (-1), ``explicit_zero_prob`` (False), ``pre_norm`` (False).
        ``overrides`` replace fields after reading (e.g. ``bin_inputs``).
        """
        if not isinstance(args, Mapping):
            raise InputError(f"{source}: expected a JSON object, got {type(args).__name__}")
        required = {"embsize": "dim", "nheads": "n_heads", "d_hid": "d_hid", "nlayers": "n_layers"}
        missing = [k for k in required if k not in args]
        if missing:
            raise InputError(f"{source}: missing required field(s) {missing}")
        kw: dict[str, Any] = {ours: args[theirs] for theirs, ours in required.items()}
        optional = {
            "n_bins": "n_bins", "input_style": "input_style", "input_emb_style": "input_emb_style",
            "pad_token": "pad_token", "pad_value": "pad_value", "mask_value": "mask_value",
            "explicit_zero_prob": "explicit_zero_prob", "pre_norm": "pre_norm",
        }
        for theirs, ours in optional.items():
            if theirs in args and args[theirs] is not None:
                kw[ours] = args[theirs]
        for flag in ("explicit_zero_prob", "pre_norm"):
            if flag in kw and not isinstance(kw[flag], bool):
                raise InputError(f"{source}: {flag} must be true or false, got {kw[flag]!r}")
        kw.setdefault("input_style", cls.input_style)
        kw["bin_inputs"] = kw["input_style"] == "binned"
        kw.update(overrides)
        try:
            return cls(**kw)
        except InputError as e:
            raise InputError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- modules
class GeneEncoder(nn.Module):
    """scGPT ``GeneEncoder``: token ids (...) -> ``LayerNorm(Embedding(ids))`` (..., D)."""

    def __init__(self, ntoken: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.embedding = nn.Embedding(ntoken, dim)
        self.enc_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """scGPT ``ContinuousValueEncoder``: values (B, T) -> ``LN(W2 ReLU(W1 min(x, max) + b1) + b2)`` (B, T, D)."""

    def __init__(self, dim: int, max_value: float = 512.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.max_value = max_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(-1).clamp(max=self.max_value)
        return self.norm(self.linear2(F.relu(self.linear1(x))))


class FrozenBatchNorm1d(nn.Module):
    """scGPT's ``bn`` (BatchNorm1d over ``D``) applied with its running statistics only.

    ``forward(x (B, T, D)) -> (B, T, D)``. Always in inference mode, so training
    HINGE (``model.train()``) neither uses batch statistics nor updates buffers.
    Parameter and buffer names match ``nn.BatchNorm1d`` (``bn.*`` in the checkpoint).
    """

    def __init__(self, dim: int, eps: float = _BN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x.transpose(1, 2), self.running_mean, self.running_var, self.weight, self.bias,
                         training=False, eps=self.eps)
        return y.transpose(1, 2)


class ScGPTSelfAttention(nn.Module):
    """Full multi-head softmax self-attention, ``nn.MultiheadAttention`` parameter layout.

    ``forward(x (B, T, D), kv_mask (B, T) or (B, T - P) bool or None) -> (B, T, D)``.
    ``in_proj_weight`` (3D, D) stacks ``[Wq; Wk; Wv]`` (== flash-attn ``Wqkv.weight``);
    ``kv_mask == False`` removes a token from the keys (a missing prefix is
    visible; a row without any visible key attends to all tokens).
    """

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, t, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        mask = None
        if kv_mask is not None:
            m = kv_mask.to(torch.bool)
            if m.shape[1] < t:  # prefix tokens (<cls>) are always keys
                m = F.pad(m, (t - m.shape[1], 0), value=True)
            m = m | ~m.any(dim=1, keepdim=True)
            mask = m[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, d))


class ScGPTLayer(nn.Module):
    """One scGPT transformer layer (post-norm unless ``pre_norm``) with HINGE modulation hooks.

    ``forward(x (B, T, D), kv_mask=None, cond=None, mod_attn=None, mod_ffn=None) -> (B, T, D)``.
    Post-norm: ``x1 = LN1(x + MHA(x))``, ``x2 = LN2(x1 + FFN(x1))``; with modulation
    the sub-layer input becomes ``mod(h, cond)[0]`` and its output is multiplied by
    ``mod(h, cond)[1]`` before the residual add (``h`` the residual stream).
    """

    def __init__(self, dim: int, n_heads: int, d_hid: int, eps: float = 1e-5, pre_norm: bool = False) -> None:
        super().__init__()
        self.self_attn = ScGPTSelfAttention(dim, n_heads)
        self.linear1 = nn.Linear(dim, d_hid)
        self.linear2 = nn.Linear(d_hid, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.pre_norm = pre_norm

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(h)))

    def forward(
        self,
        x: torch.Tensor,
        kv_mask: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        mod_attn=None,
        mod_ffn=None,
    ) -> torch.Tensor:
        if self.pre_norm:  # scGPT FlashTransformerEncoderLayer, norm_scheme="pre"
            x = self.norm1(x)
            x = x + modulated(self.self_attn, x, cond, mod_attn, kv_mask)
            x = self.norm2(x)
            return x + modulated(self.ffn, x, cond, mod_ffn)
        x = self.norm1(x + modulated(self.self_attn, x, cond, mod_attn, kv_mask))
        return self.norm2(x + modulated(self.ffn, x, cond, mod_ffn))


class ExprDecoder(nn.Module):
    """scGPT ``ExprDecoder`` on gene tokens: (B, P + G, D) -> predicted values (B, G).

    ``fc`` = Linear(D, D) -> LeakyReLU -> Linear(D, D) -> LeakyReLU -> Linear(D, 1);
    the first ``n_prefix`` tokens (``<cls>``) are dropped. With
    ``explicit_zero_prob`` the ``zero_logit`` branch is kept (loaded) and
    :meth:`nonzero_prob` returns its sigmoid; ``forward`` returns scGPT's ``pred``
    (its ``mlm_output`` without sampling).
    """

    def __init__(self, dim: int, explicit_zero_prob: bool = False, n_prefix: int = 0) -> None:
        super().__init__()
        mlp = lambda: nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(), nn.Linear(dim, dim),  # noqa: E731
                                    nn.LeakyReLU(), nn.Linear(dim, 1))
        self.fc = mlp()
        self.zero_logit = mlp() if explicit_zero_prob else None
        self.n_prefix = n_prefix

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h[:, self.n_prefix :]).squeeze(-1)

    def nonzero_prob(self, h: torch.Tensor) -> torch.Tensor:
        """scGPT's ``zero_probs`` (B, G): Bernoulli probability that a gene is non-zero."""
        if self.zero_logit is None:
            raise ValueError("this checkpoint has no explicit zero-probability branch")
        return torch.sigmoid(self.zero_logit(h[:, self.n_prefix :]).squeeze(-1))


# ----------------------------------------------------------------------------- backbone
def _is_special(token: str, pad_token: str) -> bool:
    return token == pad_token or token in SPECIAL_TOKENS or (token.startswith("<") and token.endswith(">"))


def _check_vocab(vocab: Any, source: str | Path, pad_token: str) -> dict[str, int]:
    if not isinstance(vocab, Mapping) or not vocab:
        raise InputError(f"{source}: expected a non-empty JSON object {{token: id}}")
    bad = [(k, v) for k, v in vocab.items() if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise InputError(f"{source}: token ids must be integers, e.g. {bad[:3]}")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise InputError(f"{source}: token ids must be 0 .. {len(ids) - 1}, each used once")
    if pad_token not in vocab:
        raise InputError(f"{source}: the pad token {pad_token!r} is not in the vocabulary")
    return dict(vocab)


class ScGPTBackbone(nn.Module):
    """scGPT ``TransformerModel`` (continuous values) with the HINGE backbone interface.

    Parameters
    ----------
    vocab : ``{token: id}`` from ``vocab.json``; must contain ``config.pad_token``.
        ``<cls>`` and ``<eoc>`` get the next ids when missing (as scGPT does), so
        the embedding has ``len(vocab) + #missing`` rows.
    config : :class:`ScGPTConfig`.
    source : name of the vocabulary (for error messages).

    Attributes: ``genes`` (vocabulary symbols in id order, special tokens
    excluded), ``gene_to_idx`` (symbol -> scGPT token id = embedding row),
    ``blocks`` (:class:`ScGPTLayer` list), ``decoder`` (:class:`ExprDecoder`),
    ``load_report`` (filled by :func:`load_scgpt`).

    ``forward(values (B, G), gene_idx (G,), visible (B, G) bool) -> (B, G)``:
    scGPT's masked value prediction with masked genes at ``mask_value``.
    ``values`` are the model's input units before binning (e.g. log1p-normalised
    expression); masked entries are ignored.
    """

    def __init__(
        self, vocab: Mapping[str, int], config: ScGPTConfig = ScGPTConfig(), source: str | Path = VOCAB_FILE
    ) -> None:
        super().__init__()
        self.config = config
        self.vocab = _check_vocab(vocab, source, config.pad_token)
        n = len(self.vocab)
        ids = dict(self.vocab)
        for tok in (config.pad_token, "<cls>", "<eoc>"):
            if tok not in ids:
                ids[tok] = n
                n += 1
        self.ntoken = n
        self.pad_id, self.cls_id = ids[config.pad_token], ids["<cls>"]
        by_id = sorted(self.vocab.items(), key=lambda kv: kv[1])
        self.genes = [t for t, _ in by_id if not _is_special(t, config.pad_token)]
        self.gene_to_idx = {g: self.vocab[g] for g in self.genes}
        d, eps = config.dim, config.layer_norm_eps
        self.register_buffer("cls_token_id", torch.tensor([self.cls_id], dtype=torch.long), persistent=False)
        self.encoder = GeneEncoder(self.ntoken, d, eps)
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)
        self.value_encoder = ContinuousValueEncoder(d, config.max_value, eps)
        self.bn = FrozenBatchNorm1d(d) if config.input_batchnorm else None
        self.blocks = nn.ModuleList(
            ScGPTLayer(d, config.n_heads, config.d_hid, eps, config.pre_norm) for _ in range(config.n_layers)
        )
        self.decoder = ExprDecoder(d, config.explicit_zero_prob, config.n_prefix)
        self.load_report: dict[str, Any] = {}

    @property
    def n_prefix(self) -> int:
        return self.config.n_prefix

    def gene_index(self, genes: Sequence[str]) -> torch.Tensor:
        """Gene symbols -> scGPT token ids (G,) via ``vocab.json``; InputError naming missing genes."""
        missing = [g for g in genes if g not in self.gene_to_idx]
        if missing:
            raise InputError(
                f"{len(missing)} gene(s) are not in the scGPT vocabulary, e.g. {missing[:10]}"
            )
        return torch.tensor([self.gene_to_idx[g] for g in genes], dtype=torch.long)

    @torch.no_grad()
    def bin_values(self, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Per-spot quantile binning of the visible values (B, G) -> bins (B, G) in ``values.dtype``.

        For each row, the visible non-zero values ``v`` give ``n_bins - 1`` edges
        ``quantile(v, linspace(0, 1, n_bins - 1))`` (numpy's linear method, float64);
        each of them gets ``#edges <= value`` (in ``1 .. n_bins - 1``), zeros and masked
        entries get 0. Same as scGPT's ``binning`` with one-sided ``np.digitize``.
        """
        nb = self.config.n_bins
        x = values.to(torch.float64)
        cand = visible.to(torch.bool) & (x != 0)
        n = cand.sum(dim=1, keepdim=True)  # (B, 1)
        srt = torch.where(cand, x, torch.full_like(x, math.inf)).sort(dim=1).values
        q = torch.from_numpy(np.linspace(0.0, 1.0, nb - 1)).to(x.device)  # numpy's exact grid
        virt = (n - 1).clamp_min(0).to(torch.float64) * q  # (B, nb-1)
        prev = virt.floor()
        above = virt >= (n - 1).to(torch.float64)
        last = (n - 1).clamp_min(0).expand_as(virt)
        lo = torch.where(above, last, prev.long())
        hi = torch.where(above, last, (prev.long() + 1).clamp_max(x.shape[1] - 1))
        gamma = virt - torch.where(above, last.to(torch.float64), prev)
        a, b = srt.gather(1, lo), srt.gather(1, hi)
        diff = b - a
        edges = torch.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)  # numpy's _lerp
        edges = torch.where(above, a, edges)
        digits = torch.searchsorted(edges.contiguous(), x.contiguous(), right=True)
        return torch.where(cand, digits, torch.zeros_like(digits)).to(values.dtype)

    def input_values(self, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Values fed to the value encoder (B, G): binned if ``bin_inputs``; masked -> ``mask_value``."""
        vis = visible.to(torch.bool)
        v = self.bin_values(values, vis) if self.config.bin_inputs else values
        return torch.where(vis, v, torch.full_like(v, float(self.config.mask_value)))

    def embed(self, values: torch.Tensor, gene_idx: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Input tokens (B, P + G, D): ``GeneEncoder(id) + ContinuousValueEncoder(value)`` [-> bn].

        ``values`` (B, G), ``gene_idx`` (G,) scGPT token ids, ``visible`` (B, G) bool.
        With ``prepend_cls`` token 0 is ``<cls>`` with value ``cls_value``.
        """
        if values.shape != visible.shape or values.shape[-1] != gene_idx.shape[-1]:
            raise ValueError(f"shape mismatch: values {tuple(values.shape)}, visible {tuple(visible.shape)}, "
                             f"gene_idx {tuple(gene_idx.shape)}")
        x = self.encoder(gene_idx).unsqueeze(0) + self.value_encoder(self.input_values(values, visible))
        if self.config.prepend_cls:
            cls_val = torch.full((1, 1), float(self.config.cls_value), dtype=x.dtype, device=x.device)
            cls = self.encoder(self.cls_token_id).unsqueeze(0) + self.value_encoder(cls_val)  # (1, 1, D)
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x if self.bn is None else self.bn(x)

    def kv_masks(self, visible: torch.Tensor) -> list[torch.Tensor | None]:
        """Per layer: ``None`` (scGPT lets every token, masked genes included, be attended)."""
        return [None] * len(self.blocks)

    def tokens(self, values: torch.Tensor, gene_idx: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Final transformer output over all tokens (B, P + G, D)."""
        x = self.embed(values, gene_idx, visible)
        for blk, kv in zip(self.blocks, self.kv_masks(visible)):
            x = blk(x, kv)
        return x

    def encode(self, values: torch.Tensor, gene_idx: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Final gene tokens (B, G, D) (the ``<cls>`` token is dropped)."""
        return self.tokens(values, gene_idx, visible)[:, self.n_prefix :]

    def cell_embedding(self, values: torch.Tensor, gene_idx: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """scGPT's ``cell_emb`` (B, D): the ``<cls>`` output (requires ``prepend_cls``)."""
        if not self.config.prepend_cls:
            raise ValueError("cell_embedding needs prepend_cls=True")
        return self.tokens(values, gene_idx, visible)[:, 0]

    def forward(self, values: torch.Tensor, gene_idx: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.tokens(values, gene_idx, visible))


def map_panel(genes: Sequence[str], backbone: ScGPTBackbone) -> tuple[list[str], list[str]]:
    """Split a panel into ``(kept, dropped)``: genes in / absent from the backbone vocabulary (order kept)."""
    kept = [g for g in genes if g in backbone.gene_to_idx]
    dropped = [g for g in genes if g not in backbone.gene_to_idx]
    if dropped:
        log.info("%d of %d panel genes are not in the scGPT vocabulary: %s", len(dropped), len(genes), dropped[:10])
    return kept, dropped
