"""HiFusion: hierarchical intra-spot alignment and regional context fusion.

Weng et al., "HiFusion: Hierarchical Intra-Spot Alignment and Regional Context
Fusion for Spatial Gene Expression Prediction from Histopathology" (AAAI 2026,
arXiv 2511.12969). The paper text at hand (``papers/hifusion.txt``) holds only
the abstract and figure captions; the details below follow the authors' public
implementation (``HER2-code``: ``models/hifusion.py``, ``2d_main.py``,
``dataloader.py``), read for its settings, not copied.

Pieces and the part of the method each one reproduces:

* **Multi-scale inputs** (HISM, "multi-resolution sub-patch decomposition"):
  per spot, the spot patch (``section.feats``, ``patch_px`` full-resolution
  px), its ``k x k`` sub-patches for every ``k`` in ``grids`` (default 2x2 and
  4x4; side ``patch_px / k``, exactly tiling the spot patch) and a region patch
  of ``region_scale x patch_px`` px around the spot (the authors crop a 448-px
  region around a 224-px spot, so the default is 2.0), all encoded by the
  run's patch encoder (:func:`multiscale_features`).
* **Hierarchical intra-spot modelling** (HISM): every scale's patch features
  are standardised and projected to ``d``-wide tokens (one linear map per
  scale; 1 + 4 + 16 tokens per spot) plus learned scale and grid-position
  embeddings; ``n_layers`` pre-norm transformer blocks attend *within* each
  scale (block-diagonal mask: like the authors' shared CNN, which sees every
  scale's tiles separately); a scale's summary is the LayerNorm'ed mean of its
  tokens (the authors' global average pool).
* **Feature alignment loss** (HISM, "semantic consistency across scales"):
  ``L_align = mean_{k in grids} |g_spot - g_k|_1`` (element-mean L1 between
  the spot-scale summary and each sub-patch-scale summary; the authors use
  ``0.5 (L1(f_1, f_2x2) + L1(f_1, f_7x7))`` on their spatial feature maps, i.e.
  weight 1 on the mean over the two pairs); ``align_metric="cosine"`` uses
  ``1 - cos`` instead.
* **Context-aware cross-scale fusion** (CCF, "region-based queries ...
  residual cross-attention"): the query is the projected region feature
  ``q`` (B, 1, d); with ``key_tokens="fused"`` (authors) the keys/values are
  the scales' token grids average-pooled to a common 2 x 2 layout and mixed
  with learned softmax scale weights (their ``DynamicWeightFusion`` +
  ``AdaptiveAvgPool2d((2, 2))``); ``key_tokens="all"`` attends to all
  1 + 4 + 16 tokens instead. ``z = CrossAttn(q, K, K) + q``, fused prediction
  ``LayerNorm -> Linear`` (their ``gene_head``).
* **Multi-level supervision**: a prediction per scale from its summary (one
  linear head shared by the scales, as in the authors' code;
  ``shared_scale_head=False`` gives one head per scale) plus the fused head;
  ``L = MSE(fused) + w_s sum_scales MSE(scale) + w_a L_align`` with the
  authors' ``w_s = 1 / n_scales`` (1/3) and ``w_a = 1``. Prediction = fused
  head; deterministic (``sd = 0``).
* **Training** (authors' ``2d_main.py``): Adam (lr 1e-3, weight decay 1e-5),
  cosine annealing to 1e-6 over ``max_epochs`` = 50, batch 32, the weights of
  the epoch with the lowest validation MSE are kept. Here the validation spots
  are a random ``val_fraction`` of the pooled training spots
  (:func:`stgen.training.data.split_validation`), not the test fold.

Simplifications versus the paper (stated, not hidden):

* the image encoders are **frozen**: the run's encoder (EfficientNet-Lite0 by
  default) replaces the authors' end-to-end trained ResNet-18 (spot and
  sub-patches, shared) and ResNet-10 (region); the trainable part is the
  token projections, the intra-scale transformer, CCF and the heads;
* **sub-patches at native resolution** (``native_subpatches = True``, the
  default): as the authors feed each tile to their CNN at native resolution
  (a 32-px tile of a 224-px spot gives one 512-d vector), a ``patch_px / k``
  tile is encoded at ``patch_px / k`` px (EfficientNet-Lite0 is fully
  convolutional; >= 32 px), so the 20 sub-patches cost as much as two spot
  patches. ``native_subpatches = False`` resizes every tile to the encoder
  input (224 px; 20x the cost, seen ``k`` times magnified), the only choice for
  encoders of a fixed input size (ViTs);
* the authors' finest grid is 7 x 7 (49 tokens; their Fig. 2a ablates the
  number); the default here is 2 x 2 and 4 x 4 (21 extra patches per spot
  with the region, about 3 spot patches' worth of encoder work at native
  resolution) to keep feature extraction affordable on a CPU; any
  ``grids`` list works (alignment and fusion handle any ``k``);
* the alignment is between scale *summaries* (vectors), not between spatial
  feature maps max-pooled to a common size, because a frozen encoder gives
  one vector per patch and the spot scale has a single token;
* no image augmentation (the authors flip/rotate spot and region images
  together): features are pre-computed once per patch;
* targets are standardised per gene on the training spots (the network works
  in z-units; predictions are returned in the run's target units); the
  authors regress log-normalised counts directly.

Units: ``xy`` full-resolution px (x = column, y = row); features as produced
by the run's encoder; targets in the run's units (log2(count + 1) by default).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from stgen.utils.config import check_divisible, check_ranges, coerce_numbers
from stgen.errors import InputError
from stgen.training.best_weights import BestWeights
from stgen.training.callbacks import WarmupEarlyStopping
from stgen.training.trainer import _trainer
from stgen.training.data import split_validation
from stgen.models.base import FitContext, FeatureSettings, SectionInput, SpotModel, check_training_sections
from stgen.nn.dit import GEGLU
from stgen.nn.stats import floored_std


__all__ = [
    "HiFusionConfig",
    "HiFusionNet",
    "HiFusion",
    "HiFusionModule",
    "subpatch_centres",
    "multiscale_features",
    "hifusion_objective",
]

KEY_TOKENS = ("fused", "all")
ALIGN_METRICS = ("l1", "cosine")
#: Config fields that fix the network's architecture (stored in ``meta["arch"]``).
ARCH_FIELDS = ("grids", "region_scale", "d_model", "n_heads", "n_layers", "ff_mult", "dropout", "key_tokens",
               "shared_scale_head")


@dataclass
class HiFusionConfig:
    """Hyper-parameters of :class:`HiFusion` (YAML section ``hifusion``).

    Attributes
    ----------
    grids : sub-patch grids ``k`` (``k x k`` sub-patches of side ``patch_px / k``
        each); authors: [2, 7], default [2, 4].
    region_scale : region (context) patch side in units of ``patch_px``
        (authors: 448 px around a 224-px spot = 2.0).
    d_model, n_heads, n_layers, ff_mult, dropout : token width, attention heads,
        intra-scale transformer depth, GEGLU expansion and dropout (attention
        weights, feed-forward, token embeddings; the authors' CCF uses 0.1).
    key_tokens : CCF keys: ``"fused"`` (softmax scale mix pooled to 2 x 2,
        authors) or ``"all"`` (all spot tokens of all scales).
    shared_scale_head : one linear head for all per-scale predictions (authors).
    scale_weight : weight of each per-scale MSE; ``None`` = 1 / n_scales (authors).
    align_weight, align_metric : weight and kind (``"l1"`` authors, ``"cosine"``)
        of the feature alignment loss.
    lr, weight_decay, min_lr : Adam learning rate, L2 weight decay, cosine
        annealing floor (authors: 1e-3, 1e-5, 1e-6).
    batch_size, max_epochs : authors: 32, 50.
    val_fraction : share of the pooled training spots held out to pick the best
        epoch (0: no validation, the last weights are kept).
    patience : early-stopping patience in epochs on the validation MSE (0: off,
        as in the authors' code).
    grad_clip : gradient-norm clip (0: off, authors).
    precision : Lightning precision string.
    predict_batch_size : spots per forward pass at prediction.
    seed : seeds initialisation, the validation split and batch order.
    native_subpatches : encode sub-patches at their native size (``patch_px / k``
        px) rather than resized to the encoder input (module docstring).
    """

    grids: list = field(default_factory=lambda: [2, 4])
    region_scale: float = 2.0
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 1
    ff_mult: int = 2
    dropout: float = 0.1
    key_tokens: str = "fused"
    shared_scale_head: bool = True
    scale_weight: float | None = None
    align_weight: float = 1.0
    align_metric: str = "l1"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    min_lr: float = 1e-6
    batch_size: int = 32
    max_epochs: int = 50
    val_fraction: float = 0.1
    patience: int = 0
    grad_clip: float = 0.0
    precision: str = "32-true"
    predict_batch_size: int = 256
    seed: int = 42
    native_subpatches: bool = True

    def __post_init__(self) -> None:
        self.grids = [int(k) for k in self.grids]
        if not self.grids or any(k < 2 for k in self.grids) or len(set(self.grids)) != len(self.grids):
            raise InputError(f"hifusion.grids must be a non-empty list of distinct integers >= 2, got {self.grids!r}")
        coerce_numbers(self, "hifusion")  # YAML gives e.g. 1e-3 as a string
        check_ranges(self, "hifusion",
                     at_least_1=("d_model", "n_heads", "ff_mult", "batch_size", "predict_batch_size"),
                     at_least_0=("n_layers", "max_epochs", "patience", "align_weight", "weight_decay", "grad_clip"),
                     positive=("region_scale", "lr"), fraction=("dropout", "val_fraction"))
        check_divisible(self, "hifusion", "d_model", "n_heads")
        if self.key_tokens not in KEY_TOKENS:
            raise InputError(f"unknown hifusion.key_tokens {self.key_tokens!r}; choose one of {KEY_TOKENS}")
        if self.align_metric not in ALIGN_METRICS:
            raise InputError(f"unknown hifusion.align_metric {self.align_metric!r}; choose one of {ALIGN_METRICS}")
        if self.scale_weight is not None and not self.scale_weight >= 0:
            raise InputError(f"hifusion.scale_weight must be >= 0 or null, got {self.scale_weight!r}")

    @property
    def n_scales(self) -> int:
        """Spot scale + one per grid."""
        return 1 + len(self.grids)

    @property
    def scale_loss_weight(self) -> float:
        """``scale_weight``, or 1 / n_scales when unset (authors)."""
        return 1.0 / self.n_scales if self.scale_weight is None else float(self.scale_weight)

    def region_px(self, patch_px: int) -> int:
        """Region patch side in full-resolution px for spot patches of ``patch_px`` px."""
        return max(1, int(round(self.region_scale * patch_px)))


# --------------------------------------------------------------------------- multi-scale inputs
def subpatch_centres(xy: np.ndarray, patch_px: int, k: int) -> tuple[np.ndarray, int]:
    """Centres and side of the ``k x k`` sub-patches tiling each spot patch.

    Parameters
    ----------
    xy : (N, 2) spot centres, full-resolution px (x = column, y = row).
    patch_px : spot patch side, px.
    k : grid size.

    Returns
    -------
    ``(centres (N, k*k, 2) float64, side px)``. Sub-patch ``t = i * k + j`` is
    row ``i`` (top to bottom), column ``j`` (left to right); its centre is
    ``xy + (-patch_px / 2 + (j + 1/2) patch_px / k, -patch_px / 2 + (i + 1/2) patch_px / k)``
    and its side ``round(patch_px / k)``. When ``k`` divides ``patch_px`` the
    offsets are integers and, with :func:`stgen.image.patches.extract_patches`'
    rounding, the sub-patches tile the spot patch exactly (pixel for pixel).
    """
    xy = np.asarray(xy, dtype=np.float64)
    step = patch_px / k
    off = -patch_px / 2 + (np.arange(k) + 0.5) * step  # (k,)
    oy, ox = np.meshgrid(off, off, indexing="ij")  # row-major: t = i * k + j
    offsets = np.stack([ox.ravel(), oy.ravel()], axis=1)  # (k*k, 2) as (dx, dy)
    return xy[:, None, :] + offsets[None], max(1, int(round(step)))


def multiscale_features(section: SectionInput, features: FeatureSettings, cfg: HiFusionConfig) -> dict[str, np.ndarray]:
    """The multi-scale patch features of one section (used by fit and predict alike).

    Returns a dict of float32 arrays: ``"spot"`` (N, F) = ``section.feats``
    (the ``features.patch_px`` spot patch); ``f"grid{k}"`` (N, k*k, F) for each
    ``k`` in ``cfg.grids`` (sub-patches, :func:`subpatch_centres` order);
    ``"region"`` (N, F) (``cfg.region_px(patch_px)`` px around the spot). All
    are encoded by ``features.encode`` (the run's encoder, cached on disk by
    content hash when ``features.cache_dir`` is set: computed once per section).

    Raises InputError when the section has no image, or its ``feats`` are not
    the width of the encoder's features.
    """
    image = section.require_image("hifusion")
    p = int(features.patch_px)
    n = section.n_spots
    out: dict[str, np.ndarray] = {"spot": section.feats}
    for k in cfg.grids:
        centres, side = subpatch_centres(section.xy, p, k)
        f = features.encode(image, centres.reshape(-1, 2), patch_px=side,
                            input_px=side if cfg.native_subpatches else None)
        out[f"grid{k}"] = np.asarray(f, dtype=np.float32).reshape(n, k * k, -1)
    out["region"] = np.asarray(features.encode(image, section.xy, patch_px=cfg.region_px(p)), dtype=np.float32)
    dim = out["region"].shape[1]
    if section.feats.shape[1] != dim:
        raise InputError(f"section {section.name}: feats have {section.feats.shape[1]} columns but the "
                         f"{features.encoder} encoder gives {dim}-d features: feats must come from the run's encoder")
    return out


def _stack_tokens(ms: dict[str, np.ndarray], grids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens (N, T, F), region (N, F))`` with ``T = 1 + sum k^2`` (spot token first, then each grid)."""
    parts = [ms["spot"][:, None, :]] + [ms[f"grid{k}"] for k in grids]
    return torch.from_numpy(np.concatenate(parts, axis=1)), torch.from_numpy(ms["region"])


# --------------------------------------------------------------------------- network
class IntraScaleBlock(nn.Module):
    """Pre-norm transformer block over a spot's tokens, attention restricted by a mask.

    ``forward(h (B, T, d), mask (T, T) bool, True = blocked) -> (B, T, d)``:
    ``h + MHA(LN h)``, then ``h + GEGLU(LN h)``.
    """

    def __init__(self, d: int, heads: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff = GEGLU(d, ff_mult * d, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(h)
        h = h + self.drop(self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])
        return h + self.drop(self.ff(self.norm2(h)))


class HiFusionNet(nn.Module):
    """HISM + CCF on frozen multi-scale patch features (see the module docstring).

    Parameters
    ----------
    feat_dim : encoder feature width ``F``.
    n_genes : ``G``.
    cfg : :class:`HiFusionConfig` (architecture fields).

    ``forward(tokens (B, T, F), region (B, F))`` with ``T = 1 + sum_k k^2``
    raw encoder features (spot token, then each grid row-major) returns a dict:
    ``fused`` (B, G) and ``scales`` (B, S, G) predictions in standardised
    target units (S = 1 + len(grids) scales, spot first), ``summaries``
    (B, S, d) the scale summaries ``g_s`` and ``align`` (scalar) the feature
    alignment loss. Buffers: per-scale feature mean/sd ``(S + 1, F)`` (last row:
    region), per-gene target mean/sd ``(G,)``.
    """

    def __init__(self, feat_dim: int, n_genes: int, cfg: HiFusionConfig) -> None:
        super().__init__()
        self.grids = list(cfg.grids)
        self.align_metric, self.key_tokens = cfg.align_metric, cfg.key_tokens
        sizes = [1] + [k * k for k in self.grids]
        self.bounds = np.cumsum([0] + sizes).tolist()  # token segment of scale s: bounds[s]:bounds[s+1]
        S, T, d = len(sizes), sum(sizes), cfg.d_model
        scale_of = torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in enumerate(sizes)])
        self.register_buffer("token_scale", scale_of, persistent=False)
        self.register_buffer("attn_mask", scale_of[:, None] != scale_of[None, :], persistent=False)
        self.register_buffer("feat_mean", torch.zeros(S + 1, feat_dim))
        self.register_buffer("feat_std", torch.ones(S + 1, feat_dim))
        self.register_buffer("y_mean", torch.zeros(n_genes))
        self.register_buffer("y_std", torch.ones(n_genes))
        self.proj = nn.ModuleList(nn.Linear(feat_dim, d) for _ in range(S + 1))  # per scale, + region
        self.scale_emb = nn.Parameter(torch.randn(S, d) * 0.02)
        self.pos_emb = nn.Parameter(torch.randn(T, d) * 0.02)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(IntraScaleBlock(d, cfg.n_heads, cfg.ff_mult, cfg.dropout)
                                    for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        n_heads = 1 if cfg.shared_scale_head else S
        self.scale_heads = nn.ModuleList(nn.Linear(d, n_genes) for _ in range(n_heads))
        self.fusion_logits = nn.Parameter(torch.ones(S))  # DynamicWeightFusion (softmax over scales)
        self.q_norm = nn.LayerNorm(d)
        self.cross = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, n_genes))

    @property
    def n_scales(self) -> int:
        return len(self.bounds) - 1

    def set_stats(self, feat_mean: torch.Tensor, feat_std: torch.Tensor, y_mean: torch.Tensor,
                  y_std: torch.Tensor) -> None:
        """Feature (S + 1, F) and target (G,) standardisation, fitted on training spots.

        Each sd is floored at 10% of its median (:func:`stgen.nn.stats.floored_std`).
        """
        self.feat_mean.copy_(feat_mean)
        self.feat_std.copy_(torch.stack([floored_std(s) for s in feat_std]))
        self.y_mean.copy_(y_mean)
        self.y_std.copy_(floored_std(y_std))

    def normalise(self, y: torch.Tensor) -> torch.Tensor:
        """Target units -> per-gene z-units, (..., G)."""
        return (y - self.y_mean) / self.y_std

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        """Per-gene z-units -> target units, (..., G)."""
        return z * self.y_std + self.y_mean

    def _to_grid2x2(self, h: torch.Tensor, s: int) -> torch.Tensor:
        """Scale ``s`` tokens (B, k*k, d) -> (B, 4, d) on a 2 x 2 layout (adaptive average pool)."""
        k = 1 if s == 0 else self.grids[s - 1]
        b, _, d = h.shape
        grid = h.transpose(1, 2).reshape(b, d, k, k)
        return F.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, region: torch.Tensor) -> dict[str, torch.Tensor]:
        S, b = self.n_scales, self.bounds
        z = ((tokens - self.feat_mean[self.token_scale]) / self.feat_std[self.token_scale]).clamp(-8.0, 8.0)
        e = torch.cat([self.proj[s](z[:, b[s]:b[s + 1]]) for s in range(S)], dim=1)
        h = self.emb_drop(e + self.scale_emb[self.token_scale] + self.pos_emb)
        for blk in self.blocks:  # HISM: attention within each scale
            h = blk(h, self.attn_mask)
        h = self.norm(h)
        summaries = torch.stack([h[:, b[s]:b[s + 1]].mean(1) for s in range(S)], dim=1)  # (B, S, d)
        heads = self.scale_heads if len(self.scale_heads) == S else [self.scale_heads[0]] * S
        scales = torch.stack([heads[s](summaries[:, s]) for s in range(S)], dim=1)  # (B, S, G)
        ref = summaries[:, :1]
        if self.align_metric == "l1":
            align = (summaries[:, 1:] - ref).abs().mean()
        else:
            align = (1.0 - F.cosine_similarity(summaries[:, 1:], ref, dim=-1)).mean()
        # CCF: region query attends to the multi-scale spot tokens, residual
        zr = ((region - self.feat_mean[S]) / self.feat_std[S]).clamp(-8.0, 8.0)
        q = self.proj[S](zr)[:, None]  # (B, 1, d)
        if self.key_tokens == "fused":
            w = torch.softmax(self.fusion_logits, dim=0)
            keys = sum(w[s] * self._to_grid2x2(h[:, b[s]:b[s + 1]], s) for s in range(S))  # (B, 4, d)
        else:
            keys = h
        fused = self.cross(self.q_norm(q), keys, keys, need_weights=False)[0] + q
        return {"fused": self.head(fused[:, 0]), "scales": scales, "summaries": summaries, "align": align}


def hifusion_objective(out: dict[str, torch.Tensor], y: torch.Tensor, scale_weight: float,
                       align_weight: float) -> dict[str, torch.Tensor]:
    """Multi-level supervision + alignment: ``L = MSE(fused, y) + scale_weight sum_s MSE(scale_s, y) + align_weight L_align``.

    ``out`` from :meth:`HiFusionNet.forward`, ``y`` (B, G) standardised targets.
    Returns ``{"loss", "fused_mse", "scale_mse" (sum over scales), "align"}`` scalars.
    """
    fused = F.mse_loss(out["fused"], y)
    scale = ((out["scales"] - y[:, None]) ** 2).mean(dim=(0, 2)).sum()
    loss = fused + scale_weight * scale + align_weight * out["align"]
    return {"loss": loss, "fused_mse": fused, "scale_mse": scale, "align": out["align"]}


# --------------------------------------------------------------------------- training
class HiFusionModule(BestWeights, L.LightningModule):
    """Lightning training of :class:`HiFusionNet` with :func:`hifusion_objective`.

    Batches are ``(tokens (B, T, F), region (B, F), y (B, G) standardised)``.
    Validation scores the fused prediction's MSE in target units; the weights
    of the best validation epoch are kept in ``best_state``.
    """

    def __init__(self, net: HiFusionNet, cfg: HiFusionConfig) -> None:
        super().__init__()
        self.net, self.cfg = net, cfg
        self._parts: dict[str, list[float]] = {}
        self._val_sq = self._val_n = 0.0

    def training_step(self, batch, batch_idx):
        tokens, region, y = batch
        parts = hifusion_objective(self.net(tokens, region), y, self.cfg.scale_loss_weight, self.cfg.align_weight)
        for k, v in parts.items():
            self._parts.setdefault(k, []).append(float(v.detach()))
        self.log("loss", parts["loss"], prog_bar=True, batch_size=len(y))
        return parts["loss"]

    def on_train_epoch_end(self) -> None:
        self.record_epoch(**{f"train_{k}": float(np.mean(v)) for k, v in self._parts.items()})
        self._parts = {}

    def on_validation_epoch_start(self) -> None:
        self._val_sq, self._val_n = 0.0, 0.0

    def validation_step(self, batch, batch_idx):
        tokens, region, y = batch
        pred = self.net.denormalise(self.net(tokens, region)["fused"])
        self._val_sq += float(((pred - self.net.denormalise(y)) ** 2).sum())
        self._val_n += y.numel()

    def on_validation_epoch_end(self) -> None:
        self.record_validation(self._val_sq / max(self._val_n, 1.0), self.net)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.cfg.max_epochs),
                                                           eta_min=self.cfg.min_lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


# --------------------------------------------------------------------------- SpotModel
class HiFusion(SpotModel):
    """HiFusion on the run's frozen patch encoder (module docstring); needs ``section.image``.

    ``predict`` returns ``(fused prediction (N, G) float32 in target units,
    zeros (N, G))``.
    """

    name = "hifusion"
    cuts_own_patches = True  # sub-patches and regions cut from the image
    generative = False
    config_cls = HiFusionConfig

    def __init__(self, net: HiFusionNet, panel: list[str], cfg: HiFusionConfig, encoder: str, patch_px: int,
                 feat_dim: int) -> None:
        self.net, self.panel, self.cfg = net.eval(), list(panel), cfg
        self.encoder, self.patch_px, self.feat_dim = str(encoder), int(patch_px), int(feat_dim)

    @classmethod
    def fit(cls, train: list[SectionInput], panel: list[str], cfg: HiFusionConfig, features: FeatureSettings,
            progress: bool = True, context: FitContext | None = None) -> tuple["HiFusion", dict]:
        """Train on ``train`` sections (targets (N_s, len(panel)), target units); returns ``(model, history)``.

        Raises InputError for no sections, missing or misshapen targets, a
        section without image, or feats not from the run's encoder.
        """
        check_training_sections(train, panel, "hifusion")
        for s in train:
            s.require_image("hifusion")
        g = len(panel)
        t0 = time.perf_counter()
        tok, reg = zip(*(_stack_tokens(multiscale_features(s, features, cfg), cfg.grids) for s in train))
        feat_seconds = time.perf_counter() - t0
        tokens, region = torch.cat(tok), torch.cat(reg)
        y = torch.from_numpy(np.concatenate([s.targets for s in train]))
        n = len(y)
        if cfg.val_fraction > 0 and n >= 2:
            tr, va = split_validation(n, cfg.val_fraction, cfg.seed)
        else:
            tr, va = np.arange(n), np.arange(0)
        tr_t = torch.from_numpy(tr)

        L.seed_everything(cfg.seed, workers=True, verbose=False)
        net = HiFusionNet(tokens.shape[-1], g, cfg)
        b = net.bounds
        means = [tokens[tr_t, b[s]:b[s + 1]].reshape(-1, tokens.shape[-1]) for s in range(net.n_scales)]
        means.append(region[tr_t])
        with torch.no_grad():
            net.set_stats(torch.stack([m.mean(0) for m in means]), torch.stack([m.std(0) for m in means]),
                          y[tr_t].mean(0), y[tr_t].std(0) if len(tr) > 1 else torch.ones(g))
            yz = net.normalise(y)
        gen = torch.Generator().manual_seed(cfg.seed)
        train_dl = DataLoader(TensorDataset(tokens[tr_t], region[tr_t], yz[tr_t]), batch_size=cfg.batch_size,
                              shuffle=True, generator=gen)
        val_dl = None
        if len(va):
            va_t = torch.from_numpy(va)
            val_dl = DataLoader(TensorDataset(tokens[va_t], region[va_t], yz[va_t]), batch_size=cfg.predict_batch_size)
        module = HiFusionModule(net, cfg)
        callbacks = ([WarmupEarlyStopping(0, monitor="val_mse", mode="min", patience=cfg.patience)]
                     if cfg.patience > 0 and val_dl is not None else [])
        trainer = _trainer(cfg.max_epochs, callbacks=callbacks, progress=progress, precision=cfg.precision,
                           gradient_clip_val=cfg.grad_clip or None)
        t1 = time.perf_counter()
        if cfg.max_epochs > 0:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*but have no .val_dataloader.")
                trainer.fit(module, train_dl, val_dl)
        train_seconds = time.perf_counter() - t1
        module.restore_best(net)
        net.eval()
        model = cls(net, panel, cfg, features.encoder, features.patch_px, tokens.shape[-1])
        history = {
            "epochs_run": trainer.current_epoch,
            "best_epoch": module.best_epoch,
            "best_val_mse": module.best_val if val_dl is not None else None,
            "n_train": int(len(tr)),
            "n_val": int(len(va)),
            "feature_seconds": feat_seconds,
            "train_seconds": train_seconds,
            "history": module.history,
        }
        return model, history

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(state_dict tensors, meta)``; meta holds the panel, encoder, patch size and architecture."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        meta = {"panel": self.panel, "encoder": self.encoder, "patch_px": self.patch_px, "feat_dim": self.feat_dim,
                "arch": {k: getattr(self.cfg, k) for k in ARCH_FIELDS}}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, cfg: HiFusionConfig | None) -> "HiFusion":
        """Rebuild from :meth:`state`; the architecture comes from ``meta["arch"]`` (overriding ``cfg``)."""
        meta = meta[cls.name]
        try:
            cfg = replace(cfg or HiFusionConfig(), **meta["arch"])
            net = HiFusionNet(int(meta["feat_dim"]), len(meta["panel"]), cfg)
            net.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=True)
        except (KeyError, RuntimeError, TypeError) as e:
            raise InputError(f"hifusion: saved state does not match the model ({e})") from e
        return cls(net, meta["panel"], cfg, meta["encoder"], meta["patch_px"], meta["feat_dim"])

    @torch.no_grad()
    def predict(self, section: SectionInput, features: FeatureSettings, samples: int | None = None,
                steps: int | None = None, seed: int = 0, progress: bool = False,
                **options) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, sd)`` (N, G) float32: the fused prediction in target units and zeros.

        ``samples``, ``steps`` and ``seed`` are ignored (deterministic model).
        Raises InputError when the section has no image or the features differ
        from training (encoder, patch size, width).
        """
        if (features.encoder, int(features.patch_px)) != (self.encoder, self.patch_px):
            raise InputError(f"hifusion was trained on {self.encoder} features of {self.patch_px}-px patches, got "
                             f"{features.encoder} / {features.patch_px} px for section {section.name}")
        if section.feats.shape[1] != self.feat_dim:
            raise InputError(f"section {section.name}: feats have {section.feats.shape[1]} columns, the model "
                             f"was trained on {self.feat_dim}")
        tokens, region = _stack_tokens(multiscale_features(section, features, self.cfg), self.cfg.grids)
        self.net.eval()
        out = [self.net(tokens[s:s + self.cfg.predict_batch_size], region[s:s + self.cfg.predict_batch_size])["fused"]
               for s in range(0, len(tokens), self.cfg.predict_batch_size)]
        mean = self.net.denormalise(torch.cat(out)) if out else torch.zeros(0, len(self.panel))
        mean = mean.float().numpy()
        return mean, np.zeros_like(mean)

    @torch.no_grad()
    def objective(self, sections: list[SectionInput], features: FeatureSettings) -> dict[str, float]:
        """Training objective parts (:func:`hifusion_objective`, eval mode, standardised units) on sections with targets."""
        for s in sections:
            if s.targets is None or s.targets.shape[1] != len(self.panel):
                raise InputError(f"hifusion.objective: section {s.name} needs targets (N, {len(self.panel)})")
        tok, reg = zip(*(_stack_tokens(multiscale_features(s, features, self.cfg), self.cfg.grids) for s in sections))
        y = self.net.normalise(torch.from_numpy(np.concatenate([s.targets for s in sections])))
        self.net.eval()
        parts = hifusion_objective(self.net(torch.cat(tok), torch.cat(reg)), y, self.cfg.scale_loss_weight,
                                   self.cfg.align_weight)
        return {k: float(v) for k, v in parts.items()}
