"""Per-epoch history and best-validation weights of every training module."""

from __future__ import annotations

import math
import numpy as np
import torch
from stgen.training.state import EpochSampler
from stgen.training.state import _GLOBAL
from stgen.training.state import _rng_state
from stgen.training.state import _set_rng_state
from stgen.training.state import key_seed


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

    Checkpoints (:meth:`on_save_checkpoint`) carry this state, the global RNG
    states, the per-step lists named in ``step_buffers`` (this epoch's training
    losses, for a mid-epoch resume) and, when the module has a ``data_sampler``
    (:class:`EpochSampler`), the epoch and batch reached, so that the sampler
    skips the batches already trained when the fit resumes. A module with
    ``reseed_steps`` reseeds the global torch RNG from ``(cfg.seed, step, rank)``
    before every training step, so dropout does not depend on where a fit resumed.
    """

    step_buffers: tuple[str, ...] = ()
    reseed_steps: bool = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.best_val, self.best_state, self.best_epoch, self.best_step = math.inf, None, -1, -1
        self.history: list[dict] = []
        self.data_sampler: EpochSampler | None = None

    # ------------------------------------------------------------ processes and checkpoints
    @property
    def world(self) -> int:
        """Number of training processes (1 without a trainer)."""
        return self._trainer.world_size if self._trainer is not None else 1

    def synced(self, values: list[float]) -> list[float]:
        """Per-step values averaged over the processes, element-wise (every process has as many steps)."""
        if self.world == 1 or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.trainer.strategy.reduce(t, reduce_op="mean").tolist()

    def setup(self, stage: str) -> None:
        if self.data_sampler is not None:
            self.data_sampler.set_rank(self.global_rank, self.world)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.reseed_steps:
            torch.manual_seed(key_seed(self.cfg.seed, _GLOBAL, self.global_step, self.global_rank))

    def training_state(self) -> dict:
        """Best value, epoch, step and weights and the history (tensors and primitive containers)."""
        return {"best_val": float(self.best_val), "best_epoch": int(self.best_epoch), "best_step": int(self.best_step),
                "best_state": self.best_state, "history": self.history}

    def load_training_state(self, state: dict) -> None:
        self.best_val, self.best_epoch, self.best_step = state["best_val"], state["best_epoch"], state["best_step"]
        self.best_state, self.history = state["best_state"], state["history"]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = {**self.training_state(), "rng": _rng_state(),
                 "buffers": {name: self.synced(getattr(self, name)) for name in self.step_buffers}}
        if self.data_sampler is not None:
            state["data"] = {"epoch": int(self.current_epoch),
                             "batches": int(self.trainer.fit_loop.epoch_loop.batch_progress.current.completed)}
        checkpoint["stgen"] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["stgen"]
        self.load_training_state(state)
        for name, values in state["buffers"].items():
            setattr(self, name, list(values))
        if self.data_sampler is not None and "data" in state:
            self.data_sampler.resume_at(state["data"]["epoch"], state["data"]["batches"])
        _set_rng_state(state["rng"])

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
        if log:  # the same value on every process (validation runs whole on each): sync_dist changes nothing
            self.log(metric, value, prog_bar=True, batch_size=1, sync_dist=self.world > 1)
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
