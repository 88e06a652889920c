"""HINGE training (Supp. A.6): masked diffusion with the warm-start curriculum, early stopping, best weights."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset
from stgen.models.hinge.config import HingeConfig
from stgen.errors import InputError
from stgen.sampling.gaussian import GaussianSchedule, q_sample
from stgen.sampling.masking import MaskSchedule, forward_mask, uniform_ratio_mask
from stgen.models.hinge.network import HINGE
from stgen.training.best_weights import BestWeights
from stgen.training.state import EpochSampler
from stgen.training.callbacks import WarmupEarlyStopping
from stgen.training.state import _CORRUPT
from stgen.training.trainer import _trainer
from stgen.training.state import key_seed
from stgen.training.best_weights import mean_or_nan
from stgen.training.data import split_validation


MASK_RATIOS = ("schedule", "uniform")


class HingeModule(BestWeights, L.LightningModule):
    """Masked-diffusion training of a :class:`HINGE` denoiser with curriculum.

    The objective follows ``model.config.objective`` (``mask`` | ``gauss``); with the predictive head
    (``predictive="gaussian"``) each entry's loss also gets the Gaussian NLL
    ``log sigma + (x0 - x0_hat)^2 / (2 sigma^2)`` with ``x0_hat`` detached, so the mean is trained as in the
    paper and the head learns its error; with ``cfg.feat_dropout`` the condition input of training batches
    passes dropout (:meth:`drop_features`). For
    ``gauss`` the curriculum keeps timesteps whose noise variance
    ``1 - abar_t`` is <= ``cfg.curriculum_max_ratio`` (the analogue of the mask ratio).

    Training batches are global batches (every process gets the same one): the
    corruption of step ``s`` is drawn from ``key_seed(cfg.seed, s)`` for the whole
    batch, and process ``r`` of ``W`` runs the network on rows
    ``[B r / W, B (r + 1) / W)``; its loss is its share of the batch loss times
    ``W`` (DDP averages gradients over processes). The curriculum follows
    ``current_epoch``, which a resumed fit restores. Checkpoints leave out the
    frozen backbone (it is rebuilt, not trained).
    """

    step_buffers = ("_train_losses",)
    reseed_steps = True

    def __init__(self, model: HINGE, cfg: HingeConfig, schedule: MaskSchedule) -> None:
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
        self.strict_loading = False  # checkpoints leave the frozen backbone out
        self._val_sq = self._val_n = 0.0
        self._train_losses: list[float] = []

    def on_train_start(self) -> None:  # also when a fit resumes mid-epoch (no on_train_epoch_start then)
        self.model.backbone.eval()

    def on_train_epoch_start(self) -> None:
        self.model.backbone.eval()  # frozen (Scratch/LoRA: trained, still without dropout)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        frozen = {f"model.{k}" for k in self._frozen}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def corrupt(self, x0: torch.Tensor, epoch: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward process for a training batch ``x0`` (B, G) at ``epoch``.

        Returns ``(x_t (B, G), visible (B, G) bool, t (B,) long)``:

        * masked diffusion: ``t ~ U{1..t_hi}`` and Bernoulli masking at ratio
          ``1 - alpha_bar(t)``; ``t_hi`` is the curriculum bound in the first
          ``curriculum_epochs`` epochs, else ``T``; ``x_t = x0 * visible``;
        * ``mask_ratio="uniform"``: ratio ``~ U(0, r_hi)`` per spot (``r_hi`` =
          ``curriculum_max_ratio`` during the curriculum, else 1), ``t`` nearest;
        * ``objective="gauss"``: ``t ~ U{1..t_hi}``, every gene visible,
          ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.

        The draws come from ``generator`` (a CPU generator; results are moved
        to ``x0``'s device), else from the global RNG on ``x0``'s device.
        """
        curriculum = epoch < self.cfg.curriculum_epochs
        n, g, dev = x0.shape[0], x0.shape[1], x0.device
        draw = torch.device("cpu") if generator is not None else dev
        if self.gauss is not None:
            t_hi = self.t_max_curriculum if curriculum else self.gauss.T
            t = torch.randint(1, t_hi + 1, (n,), generator=generator, device=draw).to(dev)
            noise = None if generator is None else torch.randn(n, g, generator=generator).to(dev, x0.dtype)
            return q_sample(x0, t, self.gauss, noise), torch.ones_like(x0, dtype=torch.bool), t
        if self.cfg.mask_ratio == "uniform":
            r_hi = self.cfg.curriculum_max_ratio if curriculum else 1.0
            t, visible, _ = uniform_ratio_mask(n, g, self.schedule, r_hi, generator=generator, device=draw)
            t, visible = t.to(dev), visible.to(dev)
            return x0 * visible, visible, t
        t_hi = self.t_max_curriculum if curriculum else self.schedule.T
        t = torch.randint(1, t_hi + 1, (n,), generator=generator, device=draw)
        visible = forward_mask(t, g, self.schedule, generator=generator).to(dev)
        t = t.to(dev)
        return x0 * visible, visible, t

    def drop_features(self, feats: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Condition-input dropout (``cfg.feat_dropout`` = p; identity at 0, the paper): each feature of the
        global batch (B, F) is set to its training mean with probability p (a standardised value of 0), the
        others are pushed away from it by 1 / (1 - p): dropout on the standardised input, before the network's
        +-8 clamp. The mask is drawn from the step's ``generator`` for the whole global batch, so several
        processes and a resumed fit drop exactly what one uninterrupted process drops."""
        p = float(self.cfg.feat_dropout)
        if p <= 0:
            return feats
        keep = (torch.rand(feats.shape, generator=generator) >= p).to(feats.device, feats.dtype) / (1.0 - p)
        mean = self.model.feat_mean.to(feats.dtype)
        return mean + (feats - mean) * keep

    def training_step(self, batch, batch_idx):
        feats, x0 = batch  # the global batch (the same on every process)
        gen = torch.Generator().manual_seed(key_seed(self.cfg.seed, _CORRUPT, self.global_step))
        x_t, visible, t = self.corrupt(x0, self.current_epoch, generator=gen)
        feats = self.drop_features(feats, gen)
        rank, world, n = self.global_rank, self.world, x0.shape[0]
        lo, hi = n * rank // world, n * (rank + 1) // world
        weight = 1.0
        if hi == lo:  # fewer spots than processes: a zero-weight spot keeps this process in step
            lo, hi, weight = 0, 1, 0.0
        rows = slice(lo, hi)
        if self.model.has_sd:  # the paper's loss on the mean + the Gaussian NLL of the (detached) head
            pred, sd = self.model.moments(x_t[rows], visible[rows], t[rows], feats[rows])
            err = (pred - x0[rows]) ** 2
            err = err + torch.log(sd) + 0.5 * err.detach() / (sd * sd)
        else:
            pred = self.model(x_t[rows], visible[rows], t[rows], feats[rows])
            err = (pred - x0[rows]) ** 2
        if self.gauss is not None:  # gaussian_loss: mean over all entries of the batch
            share = err.sum() / x0.numel()
        else:  # masked_mse of the batch: sum over masked entries / masked entries of the whole batch
            masked = (~visible).to(err.dtype)
            share = (err * masked[rows]).sum() / masked.sum().clamp_min(1.0)
        loss = share * (weight * world)  # the mean over processes of this is the batch loss
        self.log("loss", loss, prog_bar=True, batch_size=n)
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
        self.record_validation(val, self.model, exclude=self._frozen,
                               train_loss=mean_or_nan(self.synced(self._train_losses)))
        self._train_losses = []

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.trainable_parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.cfg.milestones), gamma=self.cfg.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def train_hinge(
    model: HINGE,
    feats: np.ndarray,
    targets: np.ndarray,
    cfg: HingeConfig,
    schedule: MaskSchedule,
    progress: bool = True,
) -> dict:
    """Train ``model`` in place on training spots; returns the history.

    Parameters
    ----------
    feats : (N, F) histology features of the training spots.
    targets : (N, G) expression in target units, columns = ``model.panel``.

    10% of the spots (``cfg.val_fraction``) are held out for early stopping;
    the feature standardisation is fitted on the remaining 90%. The spots are
    shuffled per epoch by :class:`EpochSampler` (order from ``(seed, epoch)``);
    inside :func:`training_context` the fit checkpoints, resumes and may run on
    several processes (see the module docstring).
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tr, va = split_validation(len(feats), cfg.val_fraction, cfg.seed)
    f = torch.as_tensor(feats, dtype=torch.float32)
    y = torch.as_tensor(targets, dtype=torch.float32)
    model.set_feature_stats(f[tr].mean(0), f[tr].std(0))
    sampler = EpochSampler(len(tr), cfg.seed, batch_size=cfg.batch_size)
    train_dl = DataLoader(TensorDataset(f[tr], y[tr]), batch_sampler=sampler)
    val_dl = DataLoader(TensorDataset(f[va], y[va]), batch_size=256)
    module = HingeModule(model, cfg, schedule)
    module.data_sampler = sampler
    stopper = WarmupEarlyStopping(cfg.es_warmup, monitor="val_mse", mode="min", patience=cfg.patience)
    trainer = _trainer(cfg.max_epochs, callbacks=[stopper], progress=progress, precision=cfg.precision,
                       gradient_clip_val=cfg.grad_clip, distributed=True)
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
