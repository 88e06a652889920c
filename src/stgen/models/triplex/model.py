"""TRIPLEX (Chung et al., CVPR 2024) as a :class:`~stgen.models.base.SpotModel`.

Network, loss and settings: :mod:`stgen.models.triplex.network`, :mod:`stgen.models.triplex.config`.
Simplifications against the paper and the authors' code (NEXGEM/TRIPLEX, read for its design):

* **Encoder**: every view reads the run's frozen patch encoder (EfficientNet-Lite0 by default, cached
  features) instead of a ResNet-18 pre-trained on histology (Ciga et al.), fine-tuned end to end for the
  target view and frozen for the other two. The target view is therefore one token (the pooled feature)
  rather than the 7 x 7 map of the fine-tuned ResNet.
* **Width**: 128 instead of 512 (CPU); depths, heads, MLP ratios, dropouts, the distillation weight
  (0.3), Adam 1e-4 with StepLR(50, 0.9), batch 128, 200 epochs and patience 20 are the authors' Her2ST
  settings. Early stopping and the kept weights follow the validation MSE (10% of each training
  section's spots) like every model here; the authors monitor the mean Pearson r.
* **Neighbourhood**: the 5 x 5 patches are centred at the spot pitch around the spot
  (``neighbour_stride="pitch"``); the authors' preprocessing cuts a 5 x 5 block of adjacent
  patch-sized tiles (``neighbour_stride="patch"``). A neighbour position within ``snap`` x stride of a
  measured spot uses that spot's patch features; the others are encoded (and cached) with the run's
  encoder. Positions off the image are padded white, as spot patches are; no token is masked (the
  authors' flash-attention path ignores its mask too).
* **Global positions**: the positional-encoding generator runs on a lattice of half-pitch cells built
  from the pixel coordinates (:func:`spot_lattice`), so sections without array coordinates (bare-slide
  grids, any layout) work; the authors scatter spots by their array coordinates.
* **Batches**: each training step takes up to ``batch_size`` spots of one section and runs the global
  encoder on that whole section (the authors batch spots of several patients and encode each patient's
  whole slide per step).

The section's spot pitch is the median nearest-neighbour distance of its spots (the patch size for a
single spot), so a section with fewer spots than the neighbourhood grid predicts as any other.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import replace
from typing import ClassVar

import lightning as L
import numpy as np
import torch
from scipy.spatial import cKDTree
from torch.utils.data import DataLoader

from stgen.errors import InputError
from stgen.models.base import (FeatureSettings, FitContext, SectionInput, SpotModel, check_predict_section,
                               check_training_sections)
from stgen.models.triplex.config import ARCH_FIELDS, TriplexConfig
from stgen.models.triplex.network import TriplexNet, triplex_loss
from stgen.nn.graph import spot_spacing
from stgen.training.best_weights import BestWeights
from stgen.training.callbacks import WarmupEarlyStopping
from stgen.training.data import split_validation
from stgen.training.state import key_seed
from stgen.training.trainer import _trainer


def section_pitch(xy: np.ndarray, patch_px: int) -> float:
    """Spot pitch of a section in full-resolution pixels: the median nearest-neighbour distance, or
    ``patch_px`` for a single spot."""
    return float(spot_spacing(xy)) if len(xy) > 1 else float(patch_px)


def spot_lattice(xy: np.ndarray, pitch: float) -> np.ndarray:
    """(N, 2) int64 half-pitch cells (column, row) of the spots, from 0: ``round((xy - min) / (pitch / 2))``."""
    xy = np.asarray(xy, dtype=np.float64)
    return np.rint((xy - xy.min(0)) / (pitch / 2.0)).astype(np.int64)


def neighbour_centres(xy: np.ndarray, stride: float, n: int) -> np.ndarray:
    """(N, n*n, 2) centres of each spot's ``n x n`` neighbourhood, row-major from the top left, at ``stride``
    full-resolution pixels; the spot itself is the centre entry."""
    r = (np.arange(n) - n // 2) * stride
    oy, ox = np.meshgrid(r, r, indexing="ij")
    return np.asarray(xy, dtype=np.float64)[:, None] + np.stack([ox.ravel(), oy.ravel()], 1)[None]


def neighbour_features(section: SectionInput, features: FeatureSettings, cfg: TriplexConfig,
                       pitch: float) -> np.ndarray:
    """(N, K, F) features of each spot's neighbourhood (see the module docstring): the spot's own and snapped
    positions reuse ``section.feats``; the rest are encoded by ``features.encode`` (spot-patch size, cached).
    InputError when the section has no image."""
    image = section.require_image("triplex")
    stride = pitch if cfg.neighbour_stride == "pitch" else float(features.patch_px)
    centres = neighbour_centres(section.xy, stride, cfg.n_neighbours)
    n, k = centres.shape[:2]
    flat = centres.reshape(-1, 2)
    dist, idx = cKDTree(section.xy).query(flat)
    snapped = dist < cfg.snap * stride
    out = np.empty((n * k, section.feats.shape[1]), dtype=np.float32)
    out[snapped] = section.feats[idx[snapped]]
    todo = np.flatnonzero(~snapped)
    if len(todo):
        # positions in one cell of snap x stride (one lattice site seen from several spots, up to their jitter) are
        # encoded once, at the first such position in spot order
        key = np.rint(flat[todo] / max(cfg.snap * stride, 1.0)).astype(np.int64)
        _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
        enc = np.asarray(features.encode(image, flat[todo][first]), dtype=np.float32)
        if enc.shape[1] != out.shape[1]:
            raise InputError(f"section {section.name}: feats have {out.shape[1]} columns but the {features.encoder} "
                             f"encoder gives {enc.shape[1]}-d features: feats must come from the run's encoder")
        out[todo] = enc[inverse.ravel()]
    return out.reshape(n, k, -1)


def _prepare(section: SectionInput, features: FeatureSettings, cfg: TriplexConfig) -> dict:
    """A section's tensors: ``feats`` (N, F), ``neighbours`` (N, K, F), ``lattice`` (N, 2) and its ``pitch``."""
    pitch = section_pitch(section.xy, features.patch_px)
    return {"feats": torch.from_numpy(section.feats), "pitch": pitch,
            "neighbours": torch.from_numpy(neighbour_features(section, features, cfg, pitch)),
            "lattice": torch.from_numpy(spot_lattice(section.xy, pitch))}


class _Keys(torch.utils.data.Dataset):
    """The sampler's items themselves (``dataset[item] = item``)."""

    def __getitem__(self, item):
        return item


class _SectionBatches(torch.utils.data.Sampler):
    """Batches of up to ``batch_size`` training spots of one section, ``(section, rows)``; shuffled anew every
    epoch from ``(seed, epoch)``."""

    def __init__(self, rows: list[np.ndarray], batch_size: int, seed: int) -> None:
        self.rows, self.batch_size, self.seed, self.epoch = rows, batch_size, seed, 0

    def __len__(self) -> int:
        return sum(math.ceil(len(r) / self.batch_size) for r in self.rows)

    def __iter__(self):
        rng = np.random.default_rng(key_seed(self.seed, 7, self.epoch))
        self.epoch += 1
        batches = []
        for s, r in enumerate(self.rows):
            r = rng.permutation(r)
            batches += [(s, r[i: i + self.batch_size]) for i in range(0, len(r), self.batch_size)]
        for j in rng.permutation(len(batches)):
            yield batches[j]


class TriplexModule(BestWeights, L.LightningModule):
    """Lightning training of :class:`TriplexNet` with :func:`triplex_loss`; validation scores the fused
    prediction's MSE (target units) on the held-out spots of every training section."""

    def __init__(self, net: TriplexNet, cfg: TriplexConfig, sections: list[dict]) -> None:
        super().__init__()
        self.net, self.cfg, self.sections = net, cfg, sections
        self._losses: list[float] = []
        self._val_sq = self._val_n = 0.0

    def on_fit_start(self) -> None:  # the sections are not batches: Lightning does not move them to the device
        for sec in self.sections:
            for k in ("feats", "neighbours", "lattice", "y"):
                sec[k] = sec[k].to(self.device)

    def _forward(self, s: int, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        sec = self.sections[s]
        rows = rows.to(self.device)
        g = self.net.encode_global(sec["feats"], sec["lattice"])
        return self.net(sec["feats"][rows], sec["neighbours"][rows], g[rows])

    def training_step(self, batch, batch_idx):
        s, rows = batch
        rows = torch.as_tensor(rows)
        loss = triplex_loss(self._forward(int(s), rows), self.sections[int(s)]["y"][rows.to(self.device)], self.cfg.alpha)
        self._losses.append(float(loss.detach()))
        self.log("loss", loss, prog_bar=True, batch_size=len(rows))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sq, self._val_n = 0.0, 0.0

    def validation_step(self, batch, batch_idx):
        s, rows = batch
        rows = torch.as_tensor(rows)
        pred = self._forward(int(s), rows)["fused"]
        self._val_sq += float(((pred - self.sections[int(s)]["y"][rows.to(self.device)]) ** 2).sum())
        self._val_n += pred.numel()

    def on_validation_epoch_end(self) -> None:
        self.record_validation(self._val_sq / max(self._val_n, 1.0), self.net,
                               train_loss=float(np.mean(self._losses)) if self._losses else float("nan"))
        self._losses = []

    def on_train_epoch_end(self) -> None:
        if self.trainer.val_dataloaders is None:
            self.record_epoch(train_loss=float(np.mean(self._losses)) if self._losses else float("nan"))
            self._losses = []

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.cfg.step_size, gamma=self.cfg.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class Triplex(SpotModel):
    """TRIPLEX on the run's frozen patch encoder (module docstring); needs the sections' images and spot
    coordinates. ``predict`` returns the fused prediction (N, G) in target units and zeros."""

    name: ClassVar[str] = "triplex"
    generative: ClassVar[bool] = False
    config_cls: ClassVar[type] = TriplexConfig
    cuts_own_patches: ClassVar[bool] = True  # neighbour patches at the run's patch_px

    def __init__(self, net: TriplexNet, panel: list[str], cfg: TriplexConfig, encoder: str, patch_px: int,
                 feat_dim: int) -> None:
        self.net, self.panel, self.cfg = net.eval(), list(panel), cfg
        self.encoder, self.patch_px, self.feat_dim = str(encoder), int(patch_px), int(feat_dim)

    @classmethod
    def fit(cls, train: list[SectionInput], panel: list[str], cfg: TriplexConfig, features: FeatureSettings,
            progress: bool = True, context: FitContext | None = None) -> tuple["Triplex", dict]:
        """Train on whole training sections (targets (N_s, G), target units); returns ``(model, history)``.
        InputError for no sections, misshapen or non-finite inputs, or a section without image."""
        f_dim = check_training_sections(train, panel, "triplex")
        t0 = time.perf_counter()
        prepared = [_prepare(s, features, cfg) for s in train]
        feature_seconds = time.perf_counter() - t0
        train_rows, val_rows = [], []
        for i, (s, p) in enumerate(zip(train, prepared)):
            p["y"] = torch.from_numpy(s.targets)
            if cfg.val_fraction > 0 and s.n_spots >= 2:
                tr, va = split_validation(s.n_spots, cfg.val_fraction, cfg.seed + i)
            else:
                tr, va = np.arange(s.n_spots), np.arange(0)
            train_rows.append(tr)
            val_rows.append(va)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        net = TriplexNet(f_dim, len(panel), cfg)
        net.set_stats(torch.cat([p["feats"][r] for p, r in zip(prepared, train_rows)]),
                      torch.cat([p["y"][r] for p, r in zip(prepared, train_rows)]))
        module = TriplexModule(net, cfg, prepared)
        train_dl = DataLoader(_Keys(), batch_size=None, sampler=_SectionBatches(train_rows, cfg.batch_size, cfg.seed))
        val_batches = [(s, r[i: i + cfg.predict_batch_size]) for s, r in enumerate(val_rows)
                       for i in range(0, len(r), cfg.predict_batch_size)]
        val_dl = DataLoader(val_batches, batch_size=None) if val_batches else None
        callbacks = ([WarmupEarlyStopping(0, monitor="val_mse", mode="min", patience=cfg.patience)]
                     if cfg.patience > 0 and val_dl is not None else [])
        trainer = _trainer(cfg.max_epochs, callbacks=callbacks, progress=progress)
        t1 = time.perf_counter()
        if cfg.max_epochs > 0:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*but have no .val_dataloader.")
                trainer.fit(module, train_dl, val_dl)
        module.restore_best(net)
        net.cpu().eval()
        history = {"epochs_run": trainer.current_epoch, "best_epoch": module.best_epoch,
                   "best_val_mse": module.best_val if val_dl is not None else None,
                   "n_train": int(sum(len(r) for r in train_rows)), "n_val": int(sum(len(r) for r in val_rows)),
                   "pitch_px": [round(p["pitch"], 2) for p in prepared],
                   "feature_seconds": feature_seconds, "train_seconds": time.perf_counter() - t1,
                   "history": module.history}
        return cls(net, panel, cfg, features.encoder, features.patch_px, f_dim), history

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(state_dict tensors, meta)``: meta holds the panel, encoder, patch size, width and architecture."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        return tensors, {"panel": self.panel, "encoder": self.encoder, "patch_px": self.patch_px,
                         "feat_dim": self.feat_dim, "arch": self.cfg.architecture()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, cfg: TriplexConfig | None) -> "Triplex":
        """Rebuild from :meth:`state` (``meta[name]``); the architecture comes from ``meta["arch"]``."""
        meta = meta[cls.name]
        try:
            cfg = replace(cfg or TriplexConfig(), **{k: meta["arch"][k] for k in ARCH_FIELDS})
            net = TriplexNet(int(meta["feat_dim"]), len(meta["panel"]), cfg)
            net.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=True)
        except (KeyError, RuntimeError, TypeError) as e:
            raise InputError(f"triplex: saved state does not match the model ({e})") from e
        return cls(net, meta["panel"], cfg, meta["encoder"], meta["patch_px"], meta["feat_dim"])

    @torch.no_grad()
    def predict(self, section: SectionInput, features: FeatureSettings, samples: int | None = None,
                steps: int | None = None, seed: int = 0, progress: bool = False,
                **options) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, zeros)`` (N, G) float32: the fused prediction of the whole section (one global encoding).
        ``samples``/``steps``/``seed`` are ignored (deterministic). InputError for a section without image,
        features of another width, or features from another encoder."""
        check_predict_section(section, self.feat_dim, "triplex")
        if features.encoder != self.encoder:
            raise InputError(f"triplex was trained on {self.encoder} features, got {features.encoder} for "
                             f"section {section.name}")
        p = _prepare(section, features, self.cfg)
        self.net.eval()
        g = self.net.encode_global(p["feats"], p["lattice"])
        b = self.cfg.predict_batch_size
        out = [self.net(p["feats"][i: i + b], p["neighbours"][i: i + b], g[i: i + b])["fused"]
               for i in range(0, section.n_spots, b)]
        mean = torch.cat(out).float().numpy()
        return mean, np.zeros_like(mean)


__all__ = ["Triplex", "TriplexModule", "neighbour_centres", "neighbour_features", "section_pitch", "spot_lattice"]
