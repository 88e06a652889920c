"""HINGE as a :class:`~stgen.models.base.SpotModel`: fit, weights, loading and sampling of a run.

The network is :class:`stgen.models.hinge.network.HINGE` (SoftAdaLN-modulated frozen backbone), trained by
:func:`stgen.models.hinge.training.train_hinge` and sampled by its K-step unmasking sampler
(:mod:`stgen.sampling.masking`). ``run.json['hinge']`` holds the architecture (``config``), the masking
schedule (``T``, ``schedule``, ``zeta``) and the default sampler (``steps``, ``samples``);
``run.json['backbone']`` describes the frozen backbone (the embedded one's genes and config, or an external
checkpoint's path and SHA-256, whose weights are then not copied into ``model.safetensors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from stgen.backbones.embedded import BackboneConfig, ExpressionBackbone
from stgen.backbones.external import load_external_backbone
from stgen.errors import InputError
from stgen.models.base import (FeatureSettings, FitContext, SectionInput, SpotModel, autocast_dtype,
                               check_sampler_options, load_state_strict, read_weights,
                               sampling_device)
from stgen.models.hinge.config import HingeConfig
from stgen.models.hinge.network import HINGE
from stgen.models.hinge.training import train_hinge
from stgen.nn.graph import neighbour_context
from stgen.sampling.masking import MaskSchedule, spot_keys


def condition_inputs(section: SectionInput, radii: list[float]) -> np.ndarray:
    """What HINGE's condition reads for each spot of ``section``: (N, F * (1 + len(radii))) float32.

    The spot's own patch feature (N, F), then per radius ``r`` (spot pitches) the mean feature of the spots
    of the same section within ``r`` pitches (:func:`stgen.nn.graph.neighbour_mean`: the regional context a
    pathologist reads around a spot). ``radii = []`` returns the features as they are (the paper).
    InputError when ``radii`` is set and the section has no pixel coordinates.
    """
    if not radii:
        return section.feats
    if section.xy is None:
        raise InputError(f"section {section.name}: this HINGE run conditions on neighbouring spots "
                         f"(hinge.context_radii {radii}) and needs the spots' pixel coordinates")
    return neighbour_context(section.feats, section.xy, radii)


class HingeModel(SpotModel):
    """A fitted HINGE run: the network, its masking schedule and its sampler defaults."""

    name: ClassVar[str] = "hinge"
    generative: ClassVar[bool] = True
    config_cls: ClassVar[type] = HingeConfig
    needs_backbone: ClassVar[bool] = True
    needs_xy: ClassVar[bool] = False  # without xy, reveal orders come from the call's own generator
    in_every_hash: ClassVar[bool] = True
    # Macenko-normalised features: inner-mean PCC-50 0.707 -> 0.735, GSC 0.678 -> 0.713 on the nested folds
    # B4/C3/C4/C5 of outer fold C2 (docs/results.md "Stain normalisation")
    default_stain: ClassVar[str] = "macenko"

    def __init__(self, net: HINGE, meta: dict, backbone_meta: dict, cfg: HingeConfig) -> None:
        self.net, self.meta, self.backbone_meta, self.cfg = net, meta, backbone_meta, cfg

    @property
    def schedule(self) -> MaskSchedule:
        return MaskSchedule(len(self.net.panel), self.meta["T"], self.meta["schedule"], self.meta["zeta"])

    @classmethod
    def fit(cls, train: list[SectionInput], panel: list[str], cfg: HingeConfig, features: FeatureSettings,
            progress: bool = True, context: FitContext | None = None) -> tuple["HingeModel", dict]:
        """Train the adapter on the pooled spots of ``train`` (targets (N_s, G), G = len(panel); the panel
        already restricted to the backbone vocabulary) over ``context.backbone``; returns (model, history)."""
        if context is None or context.backbone is None:
            raise InputError("hinge needs an expression backbone (FitContext.backbone)")
        feats = np.concatenate([condition_inputs(s, cfg.context_radii) for s in train])
        targets = np.concatenate([s.targets for s in train])
        schedule = MaskSchedule(len(panel), cfg.T, cfg.schedule, cfg.zeta)
        torch.manual_seed(cfg.seed)  # the initial weights must not depend on what ran before (pre-training)
        net = HINGE(context.backbone, panel, feats.shape[1], cfg.T, cfg)
        history = train_hinge(net, feats, targets, cfg, schedule, progress=progress)
        meta = {"config": cfg.architecture(), "T": cfg.T, "schedule": cfg.schedule, "zeta": schedule.exponent,
                "steps": cfg.steps, "samples": cfg.samples, "reveal": cfg.reveal, "sd_scale": cfg.sd_scale,
                "estimate": cfg.estimate,
                "mask_ratio": cfg.mask_ratio,
                "curriculum_epochs": cfg.curriculum_epochs,
                "n_trainable": sum(p.numel() for p in net.trainable_parameters())}
        return cls(net, meta, dict(context.backbone_meta or {"kind": "default"}), cfg), history

    @property
    def external(self) -> bool:
        return self.backbone_meta.get("kind", "default") != "default"

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The adapter and, for the embedded backbone, the backbone (an external backbone stays in its own
        file; trained backbone weights - LoRA adapters, a Scratch backbone - are always saved)."""
        frozen = self.net.frozen_state_keys() if self.external else set()
        return {k: v for k, v in self.net.state_dict().items() if k not in frozen}, self.meta

    def run_entries(self) -> dict:
        return {"backbone": self.backbone_meta}

    @classmethod
    def load(cls, folder: Path, meta: dict, cfg) -> "SpotModel":
        """As :meth:`SpotModel.load`, naming the weights file in a mismatch error."""
        path = Path(folder) / cls.weights_file
        return cls.from_state(read_weights(path), meta, cfg, source=str(path))

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, cfg: HingeConfig,
                   source: str = "model.safetensors") -> "HingeModel":
        b = meta["backbone"]
        kind = b.get("kind", "default")
        if kind == "default":
            bb = ExpressionBackbone(b["genes"], BackboneConfig(**b["config"]))
        else:  # refuses a backbone file whose content changed since the fit
            bb, _ = load_external_backbone(kind, Path(b["path"]), expect_sha256=b["sha256"])
        h = meta[cls.name]
        arch = HingeConfig.from_architecture(h["config"])
        net = HINGE(bb, meta["panel"], meta["feature_dim"] * (1 + len(arch.context_radii)), h["T"], arch)
        # adapter only with an external backbone: the frozen backbone comes from its own file
        load_state_strict(net, tensors, source, keep_prefix="backbone." if kind != "default" else None)
        return cls(net.eval(), h, b, cfg)

    def predict(self, section: SectionInput, features: FeatureSettings, samples: int | None = None,
                steps: int | None = None, seed: int = 0, progress: bool = False, batch_size: int | None = None,
                device: str | None = None, precision: str | None = None, reveal: str | None = None,
                estimate: str | None = None, **options) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, sd)`` (N, G) over ``samples`` K-step unmasking samples (K = ``steps``), target units.

        With the predictive head (``hinge.predictive: gaussian``) ``sd`` is the predictive sd (the Gaussian
        mixture of the samples' reveal-time moments); without it (``hinge-paper``, runs saved before the head)
        the samples' sd; either is multiplied by the run's ``sd_scale`` (``hinge.sd_scale``; 1 for runs saved
        before it existed). ``reveal`` (default: the run's, ``mean`` for older runs) is ``mean`` or ``sample``.
        ``estimate`` (default: the run's, ``mixture`` for older runs) is the returned mean: ``mixture`` (the
        predictive mean) or ``draws`` (the mean of the revealed draws, which keeps ``sd**2 / samples`` of
        predictive noise per value: higher GSC and SSC, lower PCC-50; needs ``reveal`` ``sample``); the sd is
        the predictive sd either way. InputError (from :meth:`HINGE.generate`) for an unknown ``estimate`` or
        ``draws`` with ``reveal`` ``mean``.

        A run with a spatial context (``hinge.context_radii``, the default) conditions each spot on its own
        feature and the mean features of its neighbours within each radius (:func:`condition_inputs`), computed
        over all spots of ``section``: predict a whole section (or slide) in one call, not spots one by one.
        InputError when such a run gets no ``section.xy``.

        A spot's reveal orders follow from its pixel position (:func:`stgen.sampling.masking.spot_keys`), so
        its random draws do not depend on the other spots predicted with it; with a spatial context its
        condition does (its neighbours' features), so a bare-slide grid point equals the same position in a
        spot file when the two list the same neighbours. ``device`` defaults to CUDA when available; ``precision`` (default: the
        training precision) ``bf16-mixed``/``16-mixed`` samples under autocast; ``batch_size`` is spots x
        samples per sampler batch (default ``hinge.sample_batch_size``)."""
        steps = steps or self.meta["steps"]
        samples = samples or self.meta["samples"]
        reveal = reveal or self.meta.get("reveal", "mean")  # runs saved before `reveal` revealed the mean
        if reveal == "sample" and not self.net.has_sd:
            raise InputError("reveal 'sample' needs a HINGE run with the predictive head; this run has none "
                             "(hinge-paper, or saved before it existed): refit with hinge.predictive: gaussian")
        estimate = estimate or self.meta.get("estimate", "mixture")  # runs saved before `estimate`: the mixture
        batch_size = batch_size or self.cfg.sample_batch_size
        check_sampler_options(samples, batch_size)
        dtype = autocast_dtype(precision or self.cfg.precision)
        dev = sampling_device(device)
        gen = torch.Generator().manual_seed(seed)
        net = self.net.to(dev)
        keys = {} if section.xy is None else {"spot_keys": spot_keys(section.xy)}
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            inputs = condition_inputs(section, self.net.config.context_radii)
            mean, std = net.generate(torch.as_tensor(inputs, dtype=torch.float32, device=dev), self.schedule,
                                     steps=steps, n_samples=samples, generator=gen, progress=progress,
                                     batch_size=batch_size, reveal=reveal, estimate=estimate, **keys)
        scale = float(self.meta.get("sd_scale", 1.0))  # runs saved before the calibration: the sd as sampled
        return mean.float().cpu().numpy(), (std.float() * scale).cpu().numpy()


class HingePaperModel(HingeModel):
    """HINGE as published (``--model hinge-paper``): the ``hinge`` config section with
    :data:`~stgen.models.hinge.config.PAPER_PRESET` on top (no predictive head, x0_hat revealed, 10 samples
    of K = 5), so :func:`stgen.workflows.benchmark.run_benchmark` can report it beside the default."""

    name: ClassVar[str] = "hinge-paper"
    config_section: ClassVar[str] = "hinge"
    default_stain: ClassVar[str] = "none"  # the paper's features: no stain normalisation

    @classmethod
    def trained_section(cls, section: HingeConfig) -> HingeConfig:
        return section.paper()

    @classmethod
    def fit(cls, train: list[SectionInput], panel: list[str], cfg: HingeConfig, features: FeatureSettings,
            progress: bool = True, context: FitContext | None = None) -> tuple["HingeModel", dict]:
        return super().fit(train, panel, cls.trained_section(cfg), features, progress=progress, context=context)

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, cfg: HingeConfig,
                   source: str = "model.safetensors") -> "HingeModel":
        return super().from_state(tensors, meta, cls.trained_section(cfg), source=source)


__all__ = ["HingeModel", "HingePaperModel"]
