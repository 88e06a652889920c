"""Training loops (PyTorch Lightning): backbone pre-training and HINGE.

* :class:`BestWeights` - the per-epoch history and best-validation weights
  of every training module (HINGE, FLAG and the benchmark models in
  :mod:`stgen.models`).
  :class:`SampledValidationMSE` adds the training-loss and validation-MSE
  bookkeeping of the models validated by sampling (Stem, STFlow).
* :func:`pretrain_backbone` - masked auto-encoding of the expression backbone
  (CellFM's pre-training objective): gene subsets drawn with probability
  proportional to mean expression (plus a floor), a random mask ratio
  per spot in ``[min_mask, max_mask]``, MSE on masked genes only.
* :func:`train_hinge` - HINGE Supp. A.6: AdamW (lr 1e-4, wd 0), batch 32,
  MultiStepLR at epochs [20, 30] x0.2, at most 50 epochs, early stopping on the
  validation MSE of sampled expression with patience 5 after a 15-epoch
  warm-up, warm-start curriculum (first 5 epochs: timesteps whose mask ratio is
  <= 20%). The loss is the masked-diffusion objective
  ``E_t || (1 - m_t) * (f(x_t, t, v) - x_0) ||^2`` averaged over masked genes
  (``w_t = 1``). The weights of the epoch with the best validation MSE are kept.

  Ablation switches of :class:`~stgen.config.HingeTrainConfig` (see
  :meth:`HingeModule.corrupt`): ``curriculum_epochs = 0`` removes the
  curriculum ("Mask-Diff (NoCurr)"); ``mask_ratio = "uniform"`` draws a mask
  ratio ``U(0, 1)`` per spot ("Mask-Diff (RandMask)"); ``objective = "gauss"``
  trains Gaussian diffusion (:mod:`stgen.gaussian`, "Gauss-Diff").
* :func:`train_flag` - FLAG (Sec. 3.6 eq. 9, Table 5): VE-SDE denoising score
  matching plus ``align_weight`` x GFM alignment, AdamW (weight decay 0.01,
  constant learning rate), gradient-norm clip 1.0; one training item is one
  spatially contiguous crop of a training section with its graph and a single
  noise level; the weights with the best validation MSE of generated
  expression are kept.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from .config import FlagTrainConfig, HingeTrainConfig, PretrainConfig
from .errors import InputError
from .gaussian import GaussianSchedule, gaussian_loss, q_sample
from .graph import SpotGraph
from .masking import MaskSchedule, forward_mask, uniform_ratio_mask
from .models.backbone import BackboneConfig, ExpressionBackbone
from .models.flag import FLAG
from .models.hinge import HINGE
from .vesde import WEIGHTINGS, dsm_loss

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked entries only (``visible == False``)."""
    masked = (~visible).to(pred.dtype)
    return ((pred - target) ** 2 * masked).sum() / masked.sum().clamp_min(1.0)


def _trainer(max_epochs: int, callbacks: list | None = None, progress: bool = True,
             precision: str = "32-true", gradient_clip_val: float | None = None) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        gradient_clip_val=gradient_clip_val,
        precision=precision,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[*(callbacks or []), *([TQDMProgressBar(refresh_rate=5)] if progress else [])],
        enable_progress_bar=progress,
        deterministic=False,
    )


def mean_or_nan(values) -> float:
    """Mean of a list of per-step losses as a float; NaN for an empty list (no steps, no warning)."""
    return float(np.mean(values)) if len(values) else float("nan")


class BestWeights:
    """LightningModule mixin: per-epoch history and the weights of the best validation value.

    The practice of HINGE (Supp. A.6: the epoch with the best validation MSE is
    kept) and FLAG (the weights with the best validation MSE of generated
    expression), shared by every training module here and in
    :mod:`stgen.models` (Stem, STFlow, ST-Net, BLEEP, HiFusion). Put it before
    ``L.LightningModule`` in the bases; it adds the attributes

    * ``best_val`` - lowest validation value so far (``inf`` before the first;
      NaN never counts as lower, so a run without validation keeps ``inf``);
    * ``best_epoch``, ``best_step`` - ``current_epoch`` and ``global_step`` when
      it was reached (-1 before);
    * ``best_state`` - detached clones of the network's ``state_dict()`` at
      that moment (``None`` before), reloaded by :meth:`restore_best`;
    * ``history`` - one dict per epoch (``{"epoch": ..., **row}``), written
      to run.json as ``training.history``.

    :meth:`record_validation` logs the value (the metric that early-stopping
    callbacks monitor), adds it to the epoch's history row and snapshots the
    weights when it improves; :meth:`record_epoch` adds values without one.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.best_val, self.best_state, self.best_epoch, self.best_step = math.inf, None, -1, -1
        self.history: list[dict] = []

    def record_epoch(self, **row) -> None:
        """Add ``row`` to this epoch's history entry: merged into it when the epoch has one (validation and
        training end hooks may each add values), else appended as ``{"epoch": current_epoch, **row}``."""
        if self.history and self.history[-1]["epoch"] == self.current_epoch:
            self.history[-1].update(row)
        else:
            self.history.append({"epoch": self.current_epoch, **row})

    def record_validation(self, value: float, net: torch.nn.Module, metric: str = "val_mse", log: bool = True,
                          exclude: frozenset | set = frozenset(), **row) -> bool:
        """Record this epoch's validation ``value``; returns whether it is the best so far.

        Logs ``metric`` (progress bar; ``batch_size=1``, which is what Lightning
        uses in epoch-end hooks anyway) unless ``log`` is False, records
        ``{**row, metric: value}`` (:meth:`record_epoch`) and, when ``value <
        best_val``, keeps clones of ``net.state_dict()`` without the keys in
        ``exclude`` (e.g. a frozen backbone) as ``best_state``.
        """
        if log:
            self.log(metric, value, prog_bar=True, batch_size=1)
        self.record_epoch(**row, **{metric: value})
        if not value < self.best_val:  # NaN (no validation data) never improves
            return False
        self.best_val, self.best_epoch, self.best_step = value, self.current_epoch, self.global_step
        self.best_state = {k: v.detach().clone() for k, v in net.state_dict().items() if k not in exclude}
        return True

    def restore_best(self, net: torch.nn.Module) -> None:
        """Load ``best_state`` into ``net`` (keys it leaves out keep their values); no-op without one."""
        if self.best_state is not None:
            net.load_state_dict({**net.state_dict(), **self.best_state})


class SampledValidationMSE(BestWeights):
    """:class:`BestWeights` plus the bookkeeping of a generative model validated by sampling (Stem, STFlow).

    The module defines ``net`` (the trained network), ``cfg`` (with ``lr`` and
    ``weight_decay``), ``loss``/``training_step`` (calling :meth:`add_train_loss`)
    and ``validation_step`` (generating expression and calling
    :meth:`add_validation_error` with it and the truth, both in target units).
    Each epoch records ``{"step", "train_loss", "val_mse"}``, ``val_mse`` being
    the mean squared error over all validation entries; without validation data
    ``{"step", "train_loss"}``. The optimiser is AdamW on ``net``'s parameters.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._losses: list[float] = []
        self._val_sq = self._val_n = 0.0

    def add_train_loss(self, loss: torch.Tensor) -> None:
        """Keep one step's loss for the epoch's ``train_loss``."""
        self._losses.append(float(loss.detach()))

    def add_validation_error(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Accumulate the squared error of generated ``pred`` against ``target`` (same shape, target units)."""
        self._val_sq += float(((pred - target) ** 2).sum())
        self._val_n += target.numel()

    def on_validation_epoch_start(self) -> None:
        self._val_sq, self._val_n = 0.0, 0.0

    def on_validation_epoch_end(self) -> None:
        val = self._val_sq / max(self._val_n, 1.0)
        self.record_validation(val, self.net, step=self.global_step, train_loss=mean_or_nan(self._losses))
        self._losses = []

    def on_train_epoch_end(self) -> None:
        if self.trainer.val_dataloaders is None:  # no validation spots: record the training loss only
            self.record_epoch(step=self.global_step, train_loss=mean_or_nan(self._losses))
            self._losses = []

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


# --------------------------------------------------------------------- pre-training
class BackbonePretrainModule(L.LightningModule):
    """Masked auto-encoding of an :class:`ExpressionBackbone` on spots (B, G_vocab)."""

    def __init__(self, backbone: ExpressionBackbone, cfg: PretrainConfig, total_steps: int,
                 gene_weights: torch.Tensor) -> None:
        super().__init__()
        self.backbone, self.cfg, self.total_steps = backbone, cfg, total_steps
        self.gene_weights = gene_weights

    def training_step(self, batch, batch_idx):
        (x,) = batch
        g = min(self.cfg.genes_per_step, x.shape[1])
        idx = torch.multinomial(self.gene_weights.to(x.device), g, replacement=False)
        xs = x[:, idx]
        ratio = torch.empty(x.shape[0], 1, device=x.device).uniform_(self.cfg.min_mask, self.cfg.max_mask)
        visible = torch.rand(xs.shape, device=x.device) >= ratio
        loss = masked_mse(self.backbone(xs * visible, idx, visible), xs, visible)
        self.log("mae_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.backbone.parameters(), lr=self.cfg.lr, weight_decay=0.01)
        warm = max(1, self.total_steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, self.total_steps) / self.total_steps)),
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def pretrain_backbone(
    values: np.ndarray, genes: list[str], cfg: PretrainConfig, progress: bool = True
) -> tuple[ExpressionBackbone, dict]:
    """Pre-train a backbone on an expression-only corpus.

    Parameters
    ----------
    values : (N spots, G) expression in target units (e.g. log2(count+1)).
    genes : the G gene symbols (the backbone vocabulary).

    Returns the trained backbone (eval mode) and a history dict (final loss).
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    bcfg = BackboneConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, value_bins=cfg.value_bins)
    backbone = ExpressionBackbone(genes, bcfg)
    ds = TensorDataset(torch.as_tensor(values, dtype=torch.float32))
    dl = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=len(ds) > cfg.batch_size)
    mean = torch.as_tensor(values.mean(0), dtype=torch.float32)
    weights = mean + 0.1 * mean.mean() + 1e-6  # favour expressed genes, still visit every gene
    module = BackbonePretrainModule(backbone, cfg, total_steps=max(1, len(dl) * cfg.epochs), gene_weights=weights)
    trainer = _trainer(cfg.epochs, progress=progress)
    trainer.fit(module, dl)
    backbone.eval()
    loss = trainer.callback_metrics.get("mae_loss")
    return backbone, {"final_mae_loss": float(loss) if loss is not None else None, "steps": trainer.global_step}


# ------------------------------------------------------------------------- HINGE
class WarmupEarlyStopping(EarlyStopping):
    """Early stopping that only starts watching after ``warmup`` epochs."""

    def __init__(self, warmup: int, **kwargs) -> None:
        super().__init__(check_on_train_epoch_end=False, **kwargs)
        self.warmup = warmup

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 > self.warmup:
            super().on_validation_end(trainer, pl_module)


MASK_RATIOS = ("schedule", "uniform")


class HingeModule(BestWeights, L.LightningModule):
    """Masked-diffusion training of a :class:`HINGE` denoiser with curriculum.

    The objective follows ``model.config.objective`` (``mask`` | ``gauss``); for
    ``gauss`` the curriculum keeps timesteps whose noise variance
    ``1 - abar_t`` is <= ``cfg.curriculum_max_ratio`` (the analogue of the mask ratio).
    """

    def __init__(self, model: HINGE, cfg: HingeTrainConfig, schedule: MaskSchedule) -> None:
        super().__init__()
        if cfg.mask_ratio not in MASK_RATIOS:
            raise InputError(f"unknown hinge.mask_ratio {cfg.mask_ratio!r}; choose one of {MASK_RATIOS}")
        if cfg.curriculum_epochs < 0:
            raise InputError(f"hinge.curriculum_epochs must be >= 0, got {cfg.curriculum_epochs}")
        self.model, self.cfg, self.schedule = model, cfg, schedule
        self.t_max_curriculum = schedule.max_t_for_ratio(cfg.curriculum_max_ratio)
        self.gauss = GaussianSchedule(schedule.T) if model.config.objective == "gauss" else None
        if self.gauss is not None:
            self.t_max_curriculum = self.gauss.max_t_for_noise(cfg.curriculum_max_ratio)
        self._frozen = model.frozen_state_keys()
        self._val_sq = self._val_n = 0.0
        self._train_losses: list[float] = []

    def on_train_epoch_start(self) -> None:
        self.model.backbone.eval()  # frozen (Scratch/LoRA: trained, still without dropout)

    def corrupt(self, x0: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward process for a training batch ``x0`` (B, G) at ``epoch``.

        Returns ``(x_t (B, G), visible (B, G) bool, t (B,) long)``:

        * masked diffusion: ``t ~ U{1..t_hi}`` and Bernoulli masking at ratio
          ``1 - alpha_bar(t)``; ``t_hi`` is the curriculum bound in the first
          ``curriculum_epochs`` epochs, else ``T``; ``x_t = x0 * visible``;
        * ``mask_ratio="uniform"``: ratio ``~ U(0, r_hi)`` per spot (``r_hi`` =
          ``curriculum_max_ratio`` during the curriculum, else 1), ``t`` nearest;
        * ``objective="gauss"``: ``t ~ U{1..t_hi}``, every gene visible,
          ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.
        """
        curriculum = epoch < self.cfg.curriculum_epochs
        if self.gauss is not None:
            t_hi = self.t_max_curriculum if curriculum else self.gauss.T
            t = torch.randint(1, t_hi + 1, (x0.shape[0],), device=x0.device)
            return q_sample(x0, t, self.gauss), torch.ones_like(x0, dtype=torch.bool), t
        if self.cfg.mask_ratio == "uniform":
            r_hi = self.cfg.curriculum_max_ratio if curriculum else 1.0
            t, visible, _ = uniform_ratio_mask(x0.shape[0], x0.shape[1], self.schedule, r_hi, device=x0.device)
            return x0 * visible, visible, t
        t_hi = self.t_max_curriculum if curriculum else self.schedule.T
        t = torch.randint(1, t_hi + 1, (x0.shape[0],), device=x0.device)
        visible = forward_mask(t, x0.shape[1], self.schedule)
        return x0 * visible, visible, t

    def training_step(self, batch, batch_idx):
        feats, x0 = batch
        x_t, visible, t = self.corrupt(x0, self.current_epoch)
        pred = self.model(x_t, visible, t, feats)
        loss = gaussian_loss(pred, x0) if self.gauss is not None else masked_mse(pred, x0, visible)
        self.log("loss", loss, prog_bar=True)
        self._train_losses.append(float(loss.detach()))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sq, self._val_n = 0.0, 0.0
        self._val_gen = torch.Generator().manual_seed(self.cfg.seed)

    def validation_step(self, batch, batch_idx):
        feats, x0 = batch
        mean, _ = self.model.generate(feats, self.schedule, steps=self.cfg.val_steps, n_samples=1, generator=self._val_gen)
        self._val_sq += float(((mean - x0) ** 2).sum())
        self._val_n += x0.numel()

    def on_validation_epoch_end(self) -> None:
        val = self._val_sq / max(self._val_n, 1.0)
        self.record_validation(val, self.model, exclude=self._frozen, train_loss=mean_or_nan(self._train_losses))
        self._train_losses = []

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.trainable_parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.cfg.milestones), gamma=self.cfg.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation split of ``n`` spots (validation >= 1 spot when n >= 2)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = min(max(1, int(round(fraction * n))), n - 1) if n >= 2 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def train_hinge(
    model: HINGE,
    feats: np.ndarray,
    targets: np.ndarray,
    cfg: HingeTrainConfig,
    schedule: MaskSchedule,
    progress: bool = True,
) -> dict:
    """Train ``model`` in place on training spots; returns the history.

    Parameters
    ----------
    feats : (N, F) histology features of the training spots.
    targets : (N, G) expression in target units, columns = ``model.panel``.

    10% of the spots (``cfg.val_fraction``) are held out for early stopping;
    the feature standardisation is fitted on the remaining 90%.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tr, va = split_validation(len(feats), cfg.val_fraction, cfg.seed)
    f = torch.as_tensor(feats, dtype=torch.float32)
    y = torch.as_tensor(targets, dtype=torch.float32)
    model.set_feature_stats(f[tr].mean(0), f[tr].std(0))
    train_dl = DataLoader(TensorDataset(f[tr], y[tr]), batch_size=cfg.batch_size, shuffle=True)
    val_dl = DataLoader(TensorDataset(f[va], y[va]), batch_size=256)
    module = HingeModule(model, cfg, schedule)
    stopper = WarmupEarlyStopping(cfg.es_warmup, monitor="val_mse", mode="min", patience=cfg.patience)
    trainer = _trainer(cfg.max_epochs, callbacks=[stopper], progress=progress, precision=cfg.precision)
    trainer.fit(module, train_dl, val_dl)
    module.restore_best(model)
    model.eval()
    return {
        "epochs_run": trainer.current_epoch,
        "best_epoch": module.best_epoch,
        "best_val_mse": module.best_val,
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "history": module.history,
    }


# -------------------------------------------------------------------------- FLAG
class FlagCrops(torch.utils.data.Dataset):
    """``length`` random training items: spatially contiguous crops of training sections.

    An item is the ``crop_spots`` spots nearest (in pixels) to a random centre
    spot of a section drawn with probability proportional to its spot count
    (the whole section when it is smaller), as a dict ``feats (M, F)``, ``x0``
    (M, G) normalised targets, ``graph`` (the section graph restricted to the
    crop, :meth:`SpotGraph.subgraph`) and ``loss_mask`` (M,) bool (training
    spots; held-out validation spots stay in the crop and the graph). The
    crops come from one seeded generator (``num_workers=0``).
    """

    def __init__(self, sections: list[dict], crop_spots: int, length: int, seed: int) -> None:
        if crop_spots < 1:
            raise InputError(f"flag.crop_spots must be >= 1, got {crop_spots}")
        self.sections, self.crop, self.length = sections, int(crop_spots), int(length)
        sizes = np.array([len(s["xy"]) for s in sections], dtype=np.float64)
        self.p = sizes / sizes.sum()
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        s = self.sections[int(self.rng.choice(len(self.sections), p=self.p))]
        xy = s["xy"]
        if len(xy) <= self.crop:
            idx = np.arange(len(xy))
        else:
            d2 = ((xy - xy[self.rng.integers(len(xy))]) ** 2).sum(1)
            idx = np.sort(np.argpartition(d2, self.crop - 1)[: self.crop])
        idx = torch.from_numpy(idx)
        return {"feats": s["feats"][idx], "x0": s["x0"][idx], "graph": s["graph"].subgraph(idx),
                "loss_mask": s["train_mask"][idx]}


class FlagModule(BestWeights, L.LightningModule):
    """FLAG training: ``loss = DSM + align_weight * alignment`` on one crop per step.

    All spots of a crop share one noise level ``sigma`` (log-uniform): the
    graph encoder reads the neighbours' noisy states, which must be at the same
    level as at sampling time. The DSM term counts training spots only; the
    alignment term does not involve targets and uses every spot of the crop.
    Validation generates every training section whole (``val_steps`` Euler =
    DDIM steps, which unlike Heun are accurate with very few steps; one sample,
    fixed noise) and scores the MSE, in target units, on its held-out spots.
    """

    def __init__(self, model: FLAG, cfg: FlagTrainConfig) -> None:
        super().__init__()
        if cfg.loss_weighting not in WEIGHTINGS:
            raise InputError(f"unknown flag.loss_weighting {cfg.loss_weighting!r}; choose one of {WEIGHTINGS}")
        if not cfg.align_weight >= 0:
            raise InputError(f"flag.align_weight must be >= 0, got {cfg.align_weight}")
        self.model, self.cfg = model, cfg
        self.align = model.has_alignment and cfg.align_weight > 0
        self._dsm: list[float] = []
        self._align: list[float] = []
        self._val_sq = self._val_n = 0.0

    def training_step(self, batch, batch_idx):
        x0 = batch["x0"]
        sigma = self.model.sde.sample_sigma(device=x0.device)
        x = x0 + sigma * torch.randn_like(x0)
        out = self.model(x, sigma, batch["feats"], batch["graph"], return_align=self.align)
        denoised, tokens = out if self.align else (out, None)
        loss = dsm = dsm_loss(denoised, x0, sigma, self.model.sde, mask=batch["loss_mask"],
                              weighting=self.cfg.loss_weighting)
        self._dsm.append(float(dsm.detach()))
        if self.align:
            al = self.model.align_loss(tokens)
            loss = dsm + self.cfg.align_weight * al
            self._align.append(float(al.detach()))
        self.log("loss", loss, prog_bar=True, batch_size=1)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sq, self._val_n = 0.0, 0.0
        self._val_gen = torch.Generator().manual_seed(self.cfg.seed)

    def validation_step(self, batch, batch_idx):
        mean, _ = self.model.generate(batch["feats"], batch["graph"], n_samples=1, steps=self.cfg.val_steps,
                                      generator=self._val_gen, order=1)
        m = batch["val_mask"]
        self._val_sq += float(((mean[m] - batch["y"][m]) ** 2).sum())
        self._val_n += float(m.sum()) * mean.shape[1]

    def on_validation_epoch_end(self) -> None:
        val = self._val_sq / max(self._val_n, 1.0)
        self.record_validation(val, self.model, step=self.global_step, train_dsm=mean_or_nan(self._dsm),
                               train_align=mean_or_nan(self._align))
        self._dsm, self._align = [], []

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


def train_flag(
    model: FLAG,
    sections: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    cfg: FlagTrainConfig,
    graph_builder: Callable[[np.ndarray, np.ndarray], SpotGraph],
    progress: bool = True,
) -> dict:
    """Train ``model`` in place on whole training sections; returns the history.

    Parameters
    ----------
    sections : per training section ``(feats (N, F), xy (N, 2) full-resolution
        pixels, targets (N, G) in target units, columns = the panel)``.
    graph_builder : ``(xy, feats) -> SpotGraph`` of a section
        (:func:`stgen.graph.build_spot_graph` with the run's ``sigma_px``, ``knn``).

    ``val_fraction`` of the spots of every section are held out of the loss and
    scored after every ``val_every`` steps (``max_steps`` rounded up to whole
    validation rounds). Their noisy states still enter the graph encoder of
    their neighbours during training (the section is denoised as a whole), so
    the validation MSE is slightly optimistic; their targets are never in the
    loss. Feature and target statistics are fitted on the training spots.
    """
    if not sections:
        raise InputError("FLAG needs at least one training section")
    if cfg.max_steps < 1 or cfg.val_every < 1:
        raise InputError(f"flag.max_steps and flag.val_every must be >= 1, got {cfg.max_steps}, {cfg.val_every}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    prepared = []
    for i, (feats, xy, targets) in enumerate(sections):
        f, y = torch.as_tensor(feats, dtype=torch.float32), torch.as_tensor(targets, dtype=torch.float32)
        if not (len(f) == len(y) == len(xy)) or y.ndim != 2 or y.shape[1] != model.n_genes:
            raise InputError(f"training section {i}: feats {tuple(f.shape)}, xy {np.shape(xy)} and targets "
                             f"{tuple(y.shape)} must have the same spots and {model.n_genes} genes")
        tr, _ = split_validation(len(f), cfg.val_fraction, cfg.seed + i)
        train_mask = torch.zeros(len(f), dtype=torch.bool)
        train_mask[torch.from_numpy(tr)] = True
        prepared.append({"feats": f, "y": y, "xy": np.asarray(xy, dtype=np.float64), "train_mask": train_mask,
                         "graph": graph_builder(xy, feats)})
    f_tr = torch.cat([s["feats"][s["train_mask"]] for s in prepared])
    y_tr = torch.cat([s["y"][s["train_mask"]] for s in prepared])
    model.set_feature_stats(f_tr.mean(0), f_tr.std(0))
    model.set_target_stats(y_tr.mean(0), y_tr.std(0))
    with torch.no_grad():
        for s in prepared:
            s["x0"] = model.normalise(s["y"])
    rounds = math.ceil(cfg.max_steps / cfg.val_every)
    train_dl = DataLoader(FlagCrops(prepared, cfg.crop_spots, math.ceil(cfg.max_steps / rounds), cfg.seed),
                          batch_size=None)
    val = [{"feats": s["feats"], "graph": s["graph"], "y": s["y"], "val_mask": ~s["train_mask"]}
           for s in prepared if not s["train_mask"].all()]
    module = FlagModule(model, cfg)
    trainer = _trainer(rounds, progress=progress, precision=cfg.precision, gradient_clip_val=cfg.grad_clip)
    trainer.fit(module, train_dl, DataLoader(val, batch_size=None) if val else None)
    module.restore_best(model)
    model.eval()
    n_train = int(len(f_tr))
    return {
        "steps_run": trainer.global_step,
        "epochs_run": trainer.current_epoch,
        "best_epoch": module.best_epoch,
        "best_step": module.best_step,
        "best_val_mse": module.best_val,
        "n_train": n_train,
        "n_val": int(sum(len(s["y"]) for s in prepared) - n_train),
        "n_sections": len(prepared),
        "history": module.history,
    }
