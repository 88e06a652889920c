"""Training loops (PyTorch Lightning): backbone pre-training and HINGE.

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
"""

from __future__ import annotations

import copy
import logging
import math
import warnings

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from .config import HingeTrainConfig, PretrainConfig
from .errors import InputError
from .gaussian import GaussianSchedule, gaussian_loss, q_sample
from .masking import MaskSchedule, forward_mask, uniform_ratio_mask
from .models.backbone import BackboneConfig, ExpressionBackbone
from .models.hinge import HINGE

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
             precision: str = "32-true") -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
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


class HingeModule(L.LightningModule):
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
        self.best_val = math.inf
        self.best_state: dict | None = None
        self.best_epoch = -1
        self.history: list[dict] = []
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
        self.log("val_mse", val, prog_bar=True)
        train = float(np.mean(self._train_losses)) if self._train_losses else float("nan")
        self._train_losses = []
        self.history.append({"epoch": self.current_epoch, "train_loss": train, "val_mse": val})
        if val < self.best_val:
            self.best_val, self.best_epoch = val, self.current_epoch
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k not in self._frozen}

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
    if module.best_state is not None:
        model.load_state_dict({**model.state_dict(), **module.best_state})
    model.eval()
    return {
        "epochs_run": trainer.current_epoch,
        "best_epoch": module.best_epoch,
        "best_val_mse": module.best_val,
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "history": module.history,
    }
