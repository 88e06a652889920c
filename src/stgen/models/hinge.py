"""HINGE: histology-conditioned generation with a frozen expression backbone.

Dong et al., "Adapting a Pre-trained Single-Cell Foundation Model to Spatial
Gene Expression Generation from Histology Images" (CVPR 2026):

* the expression backbone (:class:`~stgen.models.backbone.ExpressionBackbone`)
  is frozen;
* a condition ``c_t = phi([v; e_t])`` is built from the standardised histology
  feature ``v`` (B, F) and a sinusoidal timestep embedding ``e_t``;
* an identity-initialised :class:`~stgen.models.softadaln.SoftAdaLN` sits before
  every retention and GLU sub-layer, and before the value decoder;
* the value decoder is initialised from the backbone's pre-trained decoder and
  trained; only ``phi``, the modulation heads/``eta`` and the decoder train.

The denoiser maps a partially masked expression vector to a prediction of all
genes: ``forward(x_t (B, G), visible (B, G) bool, t (B,), feats (B, F)) -> (B, G)``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..masking import MaskSchedule, sample_unmasking
from .backbone import ExpressionBackbone
from .softadaln import SoftAdaLN


@dataclass(frozen=True)
class HingeConfig:
    """Architecture of the HINGE adapter (the backbone has its own config)."""

    cond_dim: int = 256
    time_dim: int = 128
    soft_norm: bool = True
    identity_init: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, T: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of timesteps ``t`` (B,) rescaled to [0, 1000]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * (1000.0 / T))[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim - emb.shape[-1]))


class HINGE(nn.Module):
    """HINGE denoiser on a frozen backbone.

    Parameters
    ----------
    backbone : pre-trained expression backbone (frozen here, in place).
    panel : gene symbols predicted (all must be in the backbone vocabulary).
    feat_dim : histology feature width ``F`` (1280 for EfficientNet-Lite0).
    T : masking horizon the timestep embedding is scaled to.
    config : :class:`HingeConfig`.
    """

    def __init__(
        self, backbone: ExpressionBackbone, panel: list[str], feat_dim: int, T: int, config: HingeConfig = HingeConfig()
    ) -> None:
        super().__init__()
        self.config, self.T, self.panel = config, T, list(panel)
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.register_buffer("gene_idx", backbone.gene_index(self.panel), persistent=True)
        self.register_buffer("feat_mean", torch.zeros(feat_dim), persistent=True)
        self.register_buffer("feat_std", torch.ones(feat_dim), persistent=True)
        d, c = backbone.config.dim, config.cond_dim
        self.phi = nn.Sequential(nn.Linear(feat_dim + config.time_dim, c), nn.SiLU(), nn.Linear(c, c))
        mk = lambda: SoftAdaLN(d, c, soft_norm=config.soft_norm, identity_init=config.identity_init)  # noqa: E731
        self.mod_attn = nn.ModuleList(mk() for _ in backbone.blocks)
        self.mod_ffn = nn.ModuleList(mk() for _ in backbone.blocks)
        self.mod_dec = mk()
        self.decoder = copy.deepcopy(backbone.decoder)
        for p in self.decoder.parameters():
            p.requires_grad_(True)

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardisation of histology features, fitted on training spots.

        Encoder channels that are (near-)constant on the training spots would turn
        small shifts on a new slide into huge z-scores, so each channel's sd is
        floored at 10% of the median channel sd (and z-scores are clipped to +-8
        in :meth:`condition`).
        """
        self.feat_mean.copy_(mean)
        floor = max(float(std.median()) * 0.1, 1e-6)
        self.feat_std.copy_(std.clamp_min(floor))

    def condition(self, feats: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``c_t = phi([v; e_t])``: (B, F), (B,) -> (B, cond_dim)."""
        v = ((feats - self.feat_mean) / self.feat_std).clamp(-8.0, 8.0)
        return self.phi(torch.cat([v, timestep_embedding(t, self.config.time_dim, self.T)], dim=-1))

    def forward(self, x_t: torch.Tensor, visible: torch.Tensor, t: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        c = self.condition(feats, t)
        h = self.backbone.embed(x_t, self.gene_idx, visible)
        for blk, kv, ma, mf in zip(self.backbone.blocks, self.backbone.kv_masks(visible), self.mod_attn, self.mod_ffn):
            h = blk(h, kv, cond=c, mod_attn=ma, mod_ffn=mf)
        return self.decoder(self.mod_dec(h, c)[0])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def generate(
        self,
        feats: torch.Tensor,
        schedule: MaskSchedule,
        steps: int = 5,
        n_samples: int = 10,
        generator: torch.Generator | None = None,
        batch_size: int = 64,
        progress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample expression for spots with features ``feats`` (N, F).

        Returns ``(mean (N, G), std (N, G))`` over ``n_samples`` reverse runs of
        ``steps`` steps each, in the model's target units. All spots of a chunk
        and all samples are batched together (chunks of ``batch_size`` rows).
        """
        self.eval()
        n = feats.shape[0]
        rows = feats.repeat(n_samples, 1)  # sample-major: (n_samples * N, F)
        out = torch.empty(rows.shape[0], len(self.panel))
        for s in tqdm(range(0, rows.shape[0], batch_size), desc=f"sampling {n_samples}x{n} spots, K={steps}",
                      disable=not progress, unit="batch"):
            f = rows[s : s + batch_size]

            def denoise(x, vis, t, f=f):
                return self(x, vis, torch.full((x.shape[0],), t, dtype=torch.long), f)

            out[s : s + batch_size] = sample_unmasking(denoise, f.shape[0], schedule, steps, generator)
        out = out.view(n_samples, n, -1)
        std = out.std(0, unbiased=False) if n_samples > 1 else torch.zeros(n, out.shape[-1])
        return out.mean(0), std
