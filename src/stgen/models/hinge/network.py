"""HINGE: histology-conditioned generation with a frozen expression backbone.

Dong et al., "Adapting a Pre-trained Single-Cell Foundation Model to Spatial
Gene Expression Generation from Histology Images" (CVPR 2026):

* the expression backbone (:class:`~stgen.backbones.embedded.ExpressionBackbone`)
  is frozen;
* a condition ``c_t = phi([v; e_t])`` is built from the standardised histology
  feature ``v`` (B, F) and a sinusoidal timestep embedding ``e_t``;
* an identity-initialised :class:`~stgen.nn.softadaln.SoftAdaLN` sits before
  every retention and GLU sub-layer, and before the value decoder;
* the value decoder is initialised from the backbone's pre-trained decoder and
  trained; only ``phi``, the modulation heads/``eta`` and the decoder train.

The denoiser maps a partially masked expression vector to a prediction of all
genes: ``forward(x_t (B, G), visible (B, G) bool, t (B,), feats (B, F)) -> (B, G)``.

Ablation switches (:class:`HingeConfig`; HINGE Supp. Tables S2/S3, named
overrides in :mod:`stgen.workflows.ablation`); the defaults are HINGE:

* ``adaptation`` - ``hinge`` (frozen backbone + SoftAdaLN before every
  sub-layer), ``scratch`` (same model, backbone randomly re-initialised and
  trained), ``decoder_tune`` (frozen backbone, no per-layer modulation: only
  the SoftAdaLN before the value decoder), ``lora`` (HINGE + rank-``lora_rank``
  LoRA on the backbone's retention/GLU projections, :mod:`stgen.nn.lora`);
* ``objective`` - ``mask`` (masked diffusion, :mod:`stgen.sampling.masking`) or
  ``gauss`` (Gaussian diffusion with x0-prediction and DDIM sampling,
  :mod:`stgen.sampling.gaussian`); :meth:`HINGE.generate` dispatches on it;
* ``soft_norm``, ``identity_init``, ``gate`` - SoftAdaLN switches
  (:mod:`stgen.nn.softadaln`).

Predictive head (stgen, beyond the paper; ``predictive="gaussian"``): a small
MLP on the *detached* decoder input gives each gene a predictive sd
``sigma = softplus(.) + 1e-3`` (target units), trained with the Gaussian NLL
against the detached mean on masked genes (Nix & Weigend 1994; the mean
path's gradients and so its training are the paper's). ``reveal="sample"``
reveals draws from it (:mod:`stgen.sampling.masking`); the returned sd is the
Gaussian-mixture sd over samples (:func:`~stgen.sampling.masking.mixture_moments`).
``predictive="none"`` is the paper's network (the sample sd only).

Condition token (stgen, beyond the paper; ``cond_token=True``, embedded backbone only): a token ``W c_t``
is prepended to the gene tokens and passes through every block; in each block its retention key is scaled
by a learned gate ``g_l`` (one scalar per block, 0 at init) and it is always a key, also in the blocks that
drop masked genes from the keys. At t = T every gene is masked, so without it those blocks have no key and
their retention output is exactly 0 (CellFM and the HINGE code keep an always-visible cls token for this).
With every ``g_l = 0`` the network computes what it computes without the token (up to the order of float sums).
"""

from __future__ import annotations

import copy
import itertools
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm
from stgen.errors import InputError
from stgen.sampling.gaussian import GaussianSchedule, ddim_sample
from stgen.sampling.masking import (MaskSchedule, mixture_moments, sample_unmasking, spot_normals,
                                   spot_uniforms)
from stgen.backbones.embedded import ExpressionBackbone
from stgen.nn.lora import add_lora
from stgen.nn.softadaln import SoftAdaLN
from stgen.models.hinge.config import ESTIMATES, REVEALS, HingeConfig
from stgen.nn.stats import floored_std
from stgen.nn.embedding import timestep_embedding


class HINGE(nn.Module):
    """HINGE denoiser on a frozen backbone.

    Parameters
    ----------
    backbone : pre-trained expression backbone (frozen here, in place; with
        ``adaptation="scratch"`` re-initialised at random and trained instead,
        with ``"lora"`` its block projections get LoRA adapters, in place).
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
        if config.adaptation == "scratch":
            random_init_like_(backbone)
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(config.adaptation == "scratch")
        # HINGE decodes with its own copy; the backbone's decoder is never used
        for p in self.backbone.decoder.parameters():
            p.requires_grad_(False)
        self.register_buffer("gene_idx", backbone.gene_index(self.panel), persistent=True)
        self.register_buffer("feat_mean", torch.zeros(feat_dim), persistent=True)
        self.register_buffer("feat_std", torch.ones(feat_dim), persistent=True)
        d, c = backbone.config.dim, config.cond_dim
        self.phi = nn.Sequential(nn.Linear(feat_dim + config.time_dim, c), nn.SiLU(), nn.Linear(c, c))
        mk = lambda: SoftAdaLN(d, c, soft_norm=config.soft_norm, identity_init=config.identity_init,  # noqa: E731
                               gate=config.gate)
        if config.adaptation == "decoder_tune":  # histology enters only before the value decoder
            self.mod_attn = self.mod_ffn = None
        else:
            self.mod_attn = nn.ModuleList(mk() for _ in backbone.blocks)
            self.mod_ffn = nn.ModuleList(mk() for _ in backbone.blocks)
        self.mod_dec = mk()
        self.decoder = copy.deepcopy(backbone.decoder)
        for p in self.decoder.parameters():
            p.requires_grad_(True)
        self.lora_modules = (add_lora(backbone.blocks, config.lora_rank, config.lora_alpha)
                             if config.adaptation == "lora" else [])
        # built last, so every other weight starts as in the paper's network (same RNG draws)
        self.sd_head = (nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 1))
                        if config.predictive == "gaussian" else None)
        self.cond_token = self.cond_key_gate = None
        if config.cond_token:  # after the head: the other weights start as without the token
            if not isinstance(backbone, ExpressionBackbone):
                raise InputError("hinge.cond_token needs the embedded backbone (CellFM and scGPT bring their own "
                                 f"cls token), got {type(backbone).__name__}")
            self.cond_token = nn.Linear(c, d)
            self.cond_key_gate = nn.Parameter(torch.zeros(len(backbone.blocks)))

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardisation of histology features, fitted on training spots.

        Encoder channels that are (near-)constant on the training spots would turn
        small shifts on a new slide into huge z-scores, so each channel's sd is
        floored at 10% of the median channel sd (and z-scores are clipped to +-8
        in :meth:`condition`).
        """
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(floored_std(std))

    def condition(self, feats: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``c_t = phi([v; e_t])``: (B, F), (B,) -> (B, cond_dim)."""
        v = ((feats - self.feat_mean) / self.feat_std).clamp(-8.0, 8.0)
        return self.phi(torch.cat([v, timestep_embedding(t, self.config.time_dim, self.T)], dim=-1))

    def hidden(self, x_t: torch.Tensor, visible: torch.Tensor, t: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """The modulated tokens the value decoder reads: (B, G), (B, G) bool, (B,), (B, F) -> (B, P + G, D), with
        the backbone's ``n_prefix`` = P leading non-gene tokens (CellFM's and scGPT's cls; 0 for the embedded one)."""
        c = self.condition(feats, t)
        h = self.backbone.embed(x_t, self.gene_idx, visible)
        kvs = self.backbone.kv_masks(visible)
        if self.cond_token is not None:
            # tokens (B, 1 + G, D); per block the key weights [g_l, visible], which retention multiplies keys by
            h = torch.cat([self.cond_token(c).unsqueeze(1).to(h.dtype), h], dim=1)
            gates = self.cond_key_gate.to(h.dtype)
            kvs = [torch.cat([gates[i].expand(h.shape[0], 1),
                              torch.ones_like(visible, dtype=h.dtype) if kv is None else kv.to(h.dtype)], dim=1)
                   for i, kv in enumerate(kvs)]
        mods = zip(self.mod_attn, self.mod_ffn) if self.mod_attn is not None else itertools.repeat((None, None))
        for blk, kv, (ma, mf) in zip(self.backbone.blocks, kvs, mods):
            h = blk(h, kv, cond=c, mod_attn=ma, mod_ffn=mf)
        h = self.mod_dec(h, c)[0]
        return h if self.cond_token is None else h[:, 1:]

    def forward(self, x_t: torch.Tensor, visible: torch.Tensor, t: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """``x0_hat`` (B, G) for all genes (target units)."""
        return self.decoder(self.hidden(x_t, visible, t, feats))

    @property
    def has_sd(self) -> bool:
        """Whether the network has the Gaussian predictive head (``predictive="gaussian"``)."""
        return self.sd_head is not None

    def moments(self, x_t: torch.Tensor, visible: torch.Tensor, t: torch.Tensor,
                feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, sigma)`` (B, G) each: the mean of :meth:`forward` and the predictive sd (target units,
        >= 1e-3) of the Gaussian head, which reads the detached decoder input. ValueError without the head."""
        if self.sd_head is None:
            raise ValueError("this HINGE network has no predictive head (predictive='none')")
        h = self.hidden(x_t, visible, t, feats)
        genes = h[:, getattr(self.backbone, "n_prefix", 0):]  # CellFM/scGPT put a cls token first: not a gene
        return self.decoder(h), F.softplus(self.sd_head(genes.detach()).squeeze(-1)) + 1e-3

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def frozen_state_keys(self) -> set[str]:
        """State-dict keys of the frozen backbone (parameters that do not train, and its buffers).

        Training keeps the best epoch's state minus these keys, and a run on an
        external backbone saves everything else (the adapter, LoRA weights). A
        ``scratch`` backbone is not pre-trained, so nothing counts as frozen.
        """
        if self.config.adaptation == "scratch":
            return set()
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k for k in self.state_dict() if k.startswith("backbone.") and k not in trainable}

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
        spot_keys: torch.Tensor | None = None,
        reveal: str = "mean",
        estimate: str = "mixture",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample expression for spots with features ``feats`` (N, F).

        Returns ``(mean (N, G), std (N, G))`` over ``n_samples`` reverse runs of
        ``steps`` steps each, in the model's target units. All spots of a chunk
        and all samples are batched together (chunks of ``batch_size`` rows).

        Dispatches on ``config.objective``: ``mask`` runs the K-step unmasking
        sampler with ``schedule``; ``gauss`` runs K-step deterministic DDIM from
        pure noise on the cosine schedule over ``schedule.T`` steps
        (:func:`stgen.sampling.gaussian.ddim_sample`; only ``schedule.T`` is used).

        ``spot_keys`` (N,) int64 (:func:`stgen.sampling.masking.spot_keys` of the spots'
        pixel positions) makes each spot's reveal orders depend on its key and
        one seed drawn from ``generator`` only, so a spot's samples do not depend
        on the other spots of the call (mask objective).

        ``reveal`` (mask objective): ``mean`` reveals ``x0_hat`` (HINGE); ``sample`` reveals a draw from the
        predictive head (needs ``predictive="gaussian"``). With the head, the returned mean and sd are those
        of the Gaussian mixture of the samples' reveal-time moments
        (:func:`~stgen.sampling.masking.mixture_moments`); without it, the samples' mean and sd.
        ``estimate="draws"`` (with ``reveal="sample"``) returns instead the mean of the revealed draws, beside
        the same mixture sd. ValueError for an unknown ``reveal`` or ``sample`` without the head; InputError
        (a ValueError) for an unknown ``estimate`` or ``draws`` without ``sample``.
        """
        self.eval()
        if reveal not in REVEALS:
            raise ValueError(f"unknown reveal {reveal!r}; choose one of {REVEALS}")
        if reveal == "sample" and not self.has_sd:
            raise ValueError("reveal='sample' needs the predictive head (hinge.predictive: gaussian)")
        if estimate not in ESTIMATES:  # InputError (a ValueError): HingeModel.predict passes the user's value
            raise InputError(f"unknown HINGE estimate {estimate!r}; choose one of {ESTIMATES}")
        if estimate == "draws" and reveal != "sample":
            raise InputError("estimate 'draws' averages revealed draws: it needs reveal 'sample' and a HINGE run "
                             "with the predictive head")
        n, device, g = feats.shape[0], feats.device, len(self.panel)
        noise = normals = None
        n_rows = n_samples * n  # sample-major rows: row r is spot r % n (features gathered per batch, not copied)
        if spot_keys is not None and self.config.objective != "gauss":
            if tuple(spot_keys.shape) != (n,):
                raise ValueError(f"spot_keys must be ({n},), got {tuple(spot_keys.shape)}")
            base = int(torch.randint(0, 2**62, (1,), generator=generator))
            noise = spot_uniforms(spot_keys, n_samples, g, base)
            if reveal == "sample":
                normals = spot_normals(spot_keys, n_samples, g, base)
        elif reveal == "sample":
            normals = torch.randn(n_rows, g, generator=generator)
        gauss = GaussianSchedule(schedule.T) if self.config.objective == "gauss" else None
        head = self.has_sd and gauss is None

        def net(x, vis, t, f):  # (mean, sd) with the predictive head, else the mean
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
            if head:
                mu, sd = self.moments(x, vis, tt, f)
                return mu.float(), sd.float()
            return self(x, vis, tt, f).float()

        first = None
        if gauss is None and n_samples > 1:  # step 1 (t = T, nothing visible) is the same for every sample
            # written into buffers allocated up front: per-batch results kept in a list sit between the freed
            # temporaries of later batches and fragment the heap (peak RSS grew ~0.2 GB per 1,000 spots)
            first = tuple(torch.empty(n, g, device=device) for _ in range(2 if head else 1))
            for s in range(0, n, batch_size):
                f = feats[s : s + batch_size]
                res = net(torch.zeros(f.shape[0], g, device=device),
                          torch.zeros(f.shape[0], g, dtype=torch.bool, device=device), schedule.T, f)
                for buf, part in zip(first, res if head else (res,)):
                    buf[s : s + f.shape[0]] = part
            first = first if head else first[0]
        out = torch.empty(n_rows, g, device=device)
        sds = torch.zeros(n_rows, g, device=device) if head else None
        draws = torch.empty(n_rows, g, device=device) if estimate == "draws" else None
        for s in tqdm(range(0, n_rows, batch_size), desc=f"sampling {n_samples}x{n} spots, K={steps}",
                      disable=not progress, unit="batch"):
            f = feats[torch.arange(s, min(s + batch_size, n_rows), device=device) % n]

            def denoise(x, vis, t, f=f):
                return net(x, vis, t, f)

            if gauss is not None:
                def denoise_all(x, t, f=f):  # Gauss-Diff: every gene visible, values noised
                    return denoise(x, torch.ones_like(x, dtype=torch.bool), t, f)

                out[s : s + batch_size] = ddim_sample(denoise_all, f.shape[0], g, gauss, steps,
                                                      generator, device=device)
                continue
            idx = torch.arange(s, s + f.shape[0], device=device) % n
            x0_first = None if first is None else (first[0][idx], first[1][idx]) if head else first[idx]
            rows = slice(s, s + f.shape[0])
            res = sample_unmasking(
                denoise, f.shape[0], schedule, steps, generator, device=device, x0_first=x0_first,
                order_noise=None if noise is None else noise[rows],
                reveal_noise=None if normals is None else normals[rows], return_moments=head)
            if head:
                x, out[rows], sds[rows] = res
                if draws is not None:
                    draws[rows] = x
            else:
                out[rows] = res
        out = out.view(n_samples, n, -1)
        if head:
            mean, std = mixture_moments(out, sds.view(n_samples, n, -1))
            return (mean if draws is None else draws.view(n_samples, n, -1).mean(0)), std
        std = out.std(0, unbiased=False) if n_samples > 1 else torch.zeros(n, out.shape[-1], device=device)
        return out.mean(0), std


def random_init_like_(backbone: nn.Module) -> nn.Module:
    """Re-initialise ``backbone`` in place with a fresh random init of the same architecture.

    The "Scratch" ablation (HINGE Supp. Tables S2/S3): same architecture and
    vocabulary, no pre-trained knowledge. The fresh weights are those of a
    newly constructed model of the same class and config (global torch RNG):
    :class:`ExpressionBackbone`, CellFM (:class:`~stgen.backbones.cellfm.CellFMBackbone`)
    or scGPT (:class:`~stgen.backbones.scgpt.ScGPTBackbone`); InputError for any other type.
    """
    from stgen.backbones.cellfm import CellFMBackbone
    from stgen.backbones.scgpt import ScGPTBackbone

    if isinstance(backbone, ExpressionBackbone):
        fresh = ExpressionBackbone(backbone.genes, backbone.config)
    elif isinstance(backbone, CellFMBackbone):
        fresh = CellFMBackbone(backbone.config, backbone.genes, aliases=backbone.aliases)
    elif isinstance(backbone, ScGPTBackbone):
        fresh = ScGPTBackbone(backbone.vocab, backbone.config)
    else:
        raise InputError(f"Scratch ablation: cannot re-initialise a backbone of type {type(backbone).__name__}")
    backbone.load_state_dict(fresh.state_dict(), strict=True)  # copies into the existing tensors (device, dtype)
    return backbone
