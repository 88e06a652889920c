"""Lightning callbacks: end-of-epoch (and SIGTERM) checkpoints, early stopping after a warm-up."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping
from lightning.pytorch.utilities.exceptions import SIGTERMException


class EpochCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt`` at the end of every training epoch, and mid-epoch on SIGTERM.

    The end-of-epoch checkpoint comes after validation, early stopping and the
    module's epoch-end bookkeeping (Lightning calls checkpoint callbacks' epoch
    hooks last). Each is written to ``last.ckpt.tmp`` and renamed (a kill never
    leaves half a checkpoint); ``last.json`` says ``{"epoch", "global_step",
    "mid_epoch"}`` (``epoch`` counts completed epochs when ``mid_epoch`` is
    false). When Lightning stops a fit on SIGTERM after a training step, a
    checkpoint of that step is saved if the module can resume mid-epoch (it has
    a ``data_sampler``, :class:`EpochSampler`); otherwise, or when the signal
    came during validation, the last end-of-epoch checkpoint is what remains.
    Only global rank 0 writes. The callback's own state is whether early
    stopping had stopped the fit.
    """

    def __init__(self, dirpath: str | Path) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.saved: dict | None = None
        self._should_stop = False
        self._stop_on_resume = False

    @property
    def last(self) -> Path:
        return self.dirpath / "last.ckpt"

    def state_dict(self) -> dict:
        return {"should_stop": bool(self._should_stop)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._stop_on_resume = bool(state_dict.get("should_stop", False))

    def on_fit_start(self, trainer, pl_module) -> None:
        if self._stop_on_resume:  # the checkpoint was written on the epoch early stopping stopped at
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save(trainer, mid_epoch=False)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.validating or trainer.sanity_checking:
            return
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if getattr(pl_module, "data_sampler", None) is not None and 0 < done < trainer.num_training_batches:
            self.save(trainer, mid_epoch=True)

    def save(self, trainer, mid_epoch: bool) -> None:
        self._should_stop = bool(trainer.should_stop)
        tmp = self.dirpath / "last.ckpt.tmp"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)  # every process takes part (collectives); rank 0 writes
        epoch = trainer.current_epoch + (0 if mid_epoch else 1)
        self.saved = {"epoch": epoch, "global_step": int(trainer.global_step), "mid_epoch": mid_epoch}
        if trainer.is_global_zero:
            os.replace(tmp, self.last)
            info = self.dirpath / "last.json.tmp"
            info.write_text(json.dumps({**self.saved, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
            os.replace(info, self.dirpath / "last.json")


# ------------------------------------------------------------------------- HINGE
class WarmupEarlyStopping(EarlyStopping):
    """Early stopping that only starts watching after ``warmup`` epochs."""

    def __init__(self, warmup: int, **kwargs) -> None:
        super().__init__(check_on_train_epoch_end=False, **kwargs)
        self.warmup = warmup

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 > self.warmup:
            super().on_validation_end(trainer, pl_module)
