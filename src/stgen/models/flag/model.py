"""FLAG as a :class:`~stgen.models.base.SpotModel`: fit, weights, loading and whole-section sampling.

The network is :class:`stgen.models.flag.network.FLAG` (spatial graph encoder + gene DiT on a VE-SDE),
trained by :func:`stgen.models.flag.training.train_flag` and sampled with the probability-flow sampler
(:mod:`stgen.sampling.vesde`; Euler = DDIM by default, ``flag.order``). ``run.json['flag']`` holds the architecture (``config``), the spot-graph
settings (``sigma_px``, ``knn``), the default sampler (``steps``, ``samples``), the GFM embedding width and
where the alignment targets came from (``align_target``: ``contextual`` per-spot backbone states, or
``static`` gene-token rows, stored inside ``model.safetensors``; runs saved before the field are static);
``run.json['backbone']`` describes the backbone. Loading and predicting need no backbone: the targets are
used in training only.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import logging

from stgen.backbones.external import contextual_gene_states, gene_token_embeddings, genes_in_vocabulary
from stgen.errors import InputError
from stgen.models.base import (FeatureSettings, FitContext, SectionInput, SpotModel, autocast_dtype,
                               check_sampler_options, load_state_strict, read_weights,
                               sampling_device)
from stgen.models.flag.config import FlagConfig
from stgen.models.flag.network import FLAG, FlagEnsemble, flag_network
from stgen.models.flag.training import train_flag
from stgen.nn.graph import build_spot_graph, neighbour_context

log = logging.getLogger(__name__)


def flag_graph_settings(cfg: FlagConfig, patch_px: int) -> dict:
    """FLAG's spot-graph settings, as stored in ``run.json``: ``sigma_px`` (RBF length scale in
    full-resolution pixels, ``flag.sigma_px`` defaulting to the spot patch side ``patch_px``) and ``knn``."""
    return {"sigma_px": float(cfg.sigma_px if cfg.sigma_px is not None else patch_px), "knn": int(cfg.knn)}


def graph_builder(settings: dict, feat_dim: int | None = None):
    """``(xy, feats) -> SpotGraph`` with ``settings`` of :func:`flag_graph_settings` (or a FLAG run's
    ``meta['flag']``, which holds them). With ``feat_dim`` the image-similarity edges read only the first
    ``feat_dim`` columns of ``feats`` (the spot's own feature, not the appended neighbour means)."""
    cols = slice(None) if feat_dim is None else slice(0, feat_dim)
    return lambda xy, feats: build_spot_graph(xy, feats[:, cols], sigma_px=settings["sigma_px"], k=settings["knn"])


def image_inputs(section: SectionInput, radii: list[float]) -> np.ndarray:
    """What FLAG's network reads of ``section``'s image: (N, F * (1 + len(radii))), the spot features with
    their neighbour means per radius (:func:`stgen.nn.graph.neighbour_context`; ``[]``: the features)."""
    return neighbour_context(section.feats, section.xy, radii)


class FlagModel(SpotModel):
    """A fitted FLAG run: the network (one :class:`FLAG`, or a :class:`FlagEnsemble` with ``flag.ensemble`` > 1)
    and its graph and sampler settings."""

    name: ClassVar[str] = "flag"
    generative: ClassVar[bool] = True
    config_cls: ClassVar[type] = FlagConfig
    needs_backbone: ClassVar[bool] = True
    panel_from_backbone: ClassVar[bool] = False  # genes outside the vocabulary stay, without alignment targets
    needs_xy: ClassVar[bool] = False  # checked in predict, with FLAG's own message

    def __init__(self, net: FLAG | FlagEnsemble, meta: dict, backbone_meta: dict | None, cfg: FlagConfig) -> None:
        self.net, self.meta, self.backbone_meta, self.cfg = net, meta, backbone_meta, cfg

    @classmethod
    def fit(cls, train: list[SectionInput], panel: list[str], cfg: FlagConfig, features: FeatureSettings,
            progress: bool = True, context: FitContext | None = None) -> tuple["FlagModel", dict]:
        """Train on whole training sections (their spot graphs; crops of them per step) with the GFM alignment
        targets of ``cfg.align_target`` from the backbone ``context.backbone``: the contextual states of each
        training spot's true expression, or the panel's gene-token rows. Panel genes outside the backbone
        vocabulary get no target (left out of the alignment loss, a warning names how many); InputError when
        none has one while ``align_weight > 0``. Returns (model, history)."""
        if context is None or context.backbone is None:
            raise InputError("flag needs an expression backbone for its GFM embeddings (FitContext.backbone)")
        bb = context.backbone
        known = genes_in_vocabulary(bb, panel)
        if cfg.align_weight > 0 and not bool(known.any()):
            raise InputError(f"none of the {len(panel)} panel genes is in the backbone vocabulary, so FLAG has no "
                             "alignment target: use a backbone that knows them, or flag.align_weight: 0")
        if not bool(known.all()):
            missing = [g for g, k in zip(panel, known.tolist()) if not k]
            log.warning("FLAG: %d of %d panel genes are not in the backbone vocabulary and are left out of the GFM "
                        "alignment loss (e.g. %s)", len(missing), len(panel), missing[:5])
        genes = [g for g, k in zip(panel, known.tolist()) if k]
        width = int(bb.config.dim)
        states = None
        emb = None
        if cfg.align_target == "static":
            emb = torch.zeros(len(panel), width)
            if genes:
                emb[known] = gene_token_embeddings(bb, genes)
        elif cfg.align_weight > 0:  # float16 halves the memory of (N, G', E) per section; the loss is a cosine
            states = [contextual_gene_states(bb, genes, torch.as_tensor(s.targets)[:, known]).half() for s in train]
        torch.manual_seed(cfg.seed)
        f = train[0].feats.shape[1]
        net = flag_network(cfg, len(panel), f * (1 + len(cfg.context_radii)), emb,
                           align_dim=width if cfg.align_weight > 0 else None)
        graph = flag_graph_settings(cfg, context.patch_px)
        sections = [(image_inputs(s, cfg.context_radii), s.xy, s.targets) for s in train]
        history = train_flag(net, sections, cfg, graph_builder(graph, f), progress=progress, align_states=states,
                             align_genes=torch.nonzero(known).squeeze(-1))
        meta = {"config": cfg.architecture(), "steps": cfg.steps, "samples": cfg.samples, "order": cfg.order,
                "sd_scale": cfg.sd_scale, **graph,
                "embedding_dim": width if net.has_alignment else 0, "align_weight": cfg.align_weight,
                "align_target": cfg.align_target, "align_genes": len(genes),
                "n_trainable": sum(p.numel() for p in net.parameters() if p.requires_grad)}
        bmeta = dict(context.backbone_meta or {"kind": "default"})
        bmeta.pop("genes", None)  # not needed to load a FLAG run: the embeddings are in the model
        return cls(net, meta, bmeta, cfg), history

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return dict(self.net.state_dict()), self.meta

    def run_entries(self) -> dict:
        return {"backbone": self.backbone_meta} if self.backbone_meta is not None else {}

    @classmethod
    def load(cls, folder: Path, meta: dict, cfg) -> "SpotModel":
        """As :meth:`SpotModel.load`, naming the weights file in a mismatch error."""
        path = Path(folder) / cls.weights_file
        return cls.from_state(read_weights(path), meta, cfg, source=str(path))

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, cfg: FlagConfig,
                   source: str = "model.safetensors") -> "FlagModel":
        fm = meta[cls.name]
        width = fm.get("embedding_dim") or None
        static = fm.get("align_target", "static") == "static"  # runs saved before contextual alignment are static
        emb = torch.zeros(len(meta["panel"]), width) if static and width else None
        arch = FlagConfig.from_architecture(fm["config"])
        net = flag_network(arch, len(meta["panel"]), meta["feature_dim"] * (1 + len(arch.context_radii)), emb,
                           align_dim=width)
        load_state_strict(net, tensors, source)
        return cls(net.eval(), fm, meta.get("backbone"), cfg)

    def predict(self, section: SectionInput, features: FeatureSettings, samples: int | None = None,
                steps: int | None = None, seed: int = 0, progress: bool = False, batch_size: int | None = None,
                device: str | None = None, precision: str | None = None, **options) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, sd)`` (N, G) over ``samples`` probability-flow samples (``steps`` steps of the run's sampler
        order: ``run.json['flag']['order']``, 1 = Euler/DDIM, 2 = Heun; runs saved before the field are Heun) of
        the whole section at once (its spot graph from ``section.xy``), target units; the sd is the samples'
        spread times the run's ``sd_scale`` (``flag.sd_scale``; 1 for runs saved before it). ``batch_size``: spots
        per DiT chunk (default: all); ``device``/``precision`` as for HINGE."""
        if section.xy is None:
            raise InputError("FLAG predicts whole sections from a spot graph: give the spots' pixel coordinates xy")
        steps = steps or self.meta["steps"]
        samples = samples or self.meta["samples"]
        batch_size = batch_size or None  # 0 or None: every spot in one DiT chunk
        check_sampler_options(samples, batch_size)
        dtype = autocast_dtype(precision or self.cfg.precision)
        dev = sampling_device(device)
        graph = graph_builder(self.meta)(section.xy, section.feats)
        inputs = image_inputs(section, self.net.config.context_radii)
        gen = torch.Generator().manual_seed(seed)
        net = self.net.to(dev)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            mean, std = net.generate(torch.as_tensor(inputs, dtype=torch.float32, device=dev), graph,
                                     steps=steps, n_samples=samples, generator=gen, progress=progress,
                                     batch_size=batch_size, order=int(self.meta.get("order", 2)))
        scale = float(self.meta.get("sd_scale", 1.0))  # runs saved before the calibration: the sd as sampled
        return mean.float().cpu().numpy(), (std.float() * scale).cpu().numpy()


__all__ = ["FlagModel", "flag_graph_settings", "graph_builder", "image_inputs"]
