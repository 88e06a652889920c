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

Checkpoints, resuming and several processes (:func:`training_context`, set by
:func:`stgen.pipeline.fit`): every trainer made by :func:`_trainer` (HINGE, FLAG,
the benchmark models; not the backbone pre-training) writes
``<ckpt_dir>/last.ckpt`` at the end of every epoch (``last.json`` beside it
says which epoch) and resumes from a given checkpoint, read with
``torch.load(weights_only=True)``: the checkpoint holds only tensors and
primitive containers (weights, optimiser and scheduler, loop counters, early
stopping, :class:`BestWeights`' best weights and history, RNG states). HINGE
and FLAG resume bit-identically to an uninterrupted run: their data order and
noise depend only on ``(seed, epoch)`` and ``(seed, step)``
(:class:`EpochSampler`, :func:`key_seed`), and a SIGTERM (Lightning stops after
the current training step) saves a mid-epoch checkpoint before
:class:`TrainingInterrupted` is raised. The benchmark models resume from their
last end-of-epoch checkpoint (weights, optimiser, early stopping, best weights,
global RNG states), but some draw their data order or augmentation from
generators of their own (HiFusion, ST-Net, STFlow's crops), so a resumed run is
not guaranteed to equal an uninterrupted one.

With ``devices``/``num_nodes`` > 1 (``strategy="ddp"`` etc.) HINGE and FLAG run
on several processes through Lightning. HINGE: every process reads the same
global batch of ``hinge.batch_size`` spots, draws the same corruption for it
and runs the network on its own contiguous share (``batch / world size`` spots);
the shares' losses are scaled so that the gradient averaged by DDP is the
single-process gradient (same result up to reduction order). FLAG: a training
item is one crop, so every process trains on its own crop per step and a step
averages ``world size`` crops (``flag.max_steps`` optimiser steps, ``world size``
times the crops of a single process). Validation runs whole on every process
(the same numbers everywhere, so best weights and early stopping agree), and
only global rank 0 writes checkpoints and outputs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, TQDMProgressBar
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from stgen.config import FlagTrainConfig, HingeTrainConfig, PretrainConfig
from stgen.errors import InputError, StgenError
from stgen.gaussian import GaussianSchedule, gaussian_loss, q_sample
from stgen.graph import SpotGraph
from stgen.masking import MaskSchedule, forward_mask, uniform_ratio_mask
from stgen.models.backbone import BackboneConfig, ExpressionBackbone
from stgen.models.flag import FLAG
from stgen.models.hinge import HINGE
from stgen.vesde import WEIGHTINGS, dsm_loss

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
# HINGE and FLAG restore their data position themselves (EpochSampler), see BestWeights.on_load_checkpoint
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked entries only (``visible == False``)."""
    masked = (~visible).to(pred.dtype)
    return ((pred - target) ** 2 * masked).sum() / masked.sum().clamp_min(1.0)


# ------------------------------------------------------------ checkpoints, resuming, processes
class TrainingInterrupted(StgenError):
    """A fit stopped by SIGTERM; its checkpoint is kept, so the fit can be resumed (``stgen fit --resume``)."""


@dataclass
class TrainingContext:
    """Settings of the trainers made by :func:`_trainer` inside :func:`training_context`.

    ``ckpt_dir``: folder of ``last.ckpt`` (written at the end of every epoch;
    None: no checkpoints); ``resume_from``: checkpoint to continue from (None:
    start fresh); ``accelerator``, ``devices``, ``strategy``, ``num_nodes``:
    passed to the Lightning Trainer (``devices`` x ``num_nodes`` > 1 is allowed
    for HINGE and FLAG only).
    """

    ckpt_dir: Path | None = None
    resume_from: Path | None = None
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    trainers: int = 0  # resumable trainers made so far (one per context: they share ckpt_dir)


_CONTEXT: ContextVar[TrainingContext | None] = ContextVar("stgen_training_context", default=None)


def check_trainer_options(accelerator: str = "auto", devices: int | str = 1, strategy: str = "auto",
                          num_nodes: int = 1) -> None:
    """InputError unless the options name a Lightning accelerator and strategy (or ``auto``), ``devices`` is
    an integer >= 1, -1 or ``auto`` (every device) or a comma-separated list of device indices, and
    ``num_nodes`` >= 1. Whether the devices exist is known only when the Trainer starts."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    accelerators = ["auto", "gpu", *AcceleratorRegistry.available_accelerators()]
    if accelerator not in accelerators:
        raise InputError(f"--accelerator {accelerator!r}: choose one of {', '.join(sorted(set(accelerators)))}")
    if strategy != "auto" and strategy not in StrategyRegistry.available_strategies():
        raise InputError(f"--strategy {strategy!r}: choose auto or a Lightning strategy, e.g. ddp, ddp_spawn, "
                         f"fsdp ({len(StrategyRegistry.available_strategies())} registered)")
    ok = (devices == -1 or devices >= 1) if isinstance(devices, int) and not isinstance(devices, bool) else (
        isinstance(devices, str) and (devices == "auto" or all(p.strip().isdigit() for p in devices.split(","))))
    if not ok:
        raise InputError(f"--devices {devices!r}: give a number >= 1, -1 or auto (every device), or device "
                         "indices such as 0,1")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise InputError(f"--num-nodes must be an integer >= 1, got {num_nodes!r}")


@contextlib.contextmanager
def training_context(ckpt_dir: str | Path | None = None, resume_from: str | Path | None = None,
                     accelerator: str = "auto", devices: int | str = 1, strategy: str = "auto", num_nodes: int = 1):
    """Checkpoint folder, checkpoint to resume from and devices of the next :func:`_trainer` (see
    :class:`TrainingContext`); used by :func:`stgen.pipeline.fit` around the one training of a fit."""
    check_trainer_options(accelerator, devices, strategy, num_nodes)
    if resume_from is not None and not Path(resume_from).is_file():
        raise InputError(f"checkpoint {resume_from} does not exist")
    ctx = TrainingContext(Path(ckpt_dir) if ckpt_dir is not None else None,
                          Path(resume_from) if resume_from is not None else None,
                          accelerator, devices, strategy, int(num_nodes))
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def is_launch_zero() -> bool:
    """Whether this process is global rank 0 of a (possibly multi-process) launch, from the environment
    alone (before any Trainer exists): ``RANK`` (torchrun), else Lightning's ``LOCAL_RANK``/``NODE_RANK``
    (the processes that ``strategy="ddp"`` starts; a node's first process has ``NODE_RANK`` only), else
    ``SLURM_PROCID``. True for an ordinary single process. Only rank 0 writes run directories."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"]) == 0
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")) or 0)
    if "LOCAL_RANK" in env:
        return int(env["LOCAL_RANK"]) == 0 and node == 0
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(env["SLURM_PROCID"]) == 0
    return node == 0


def key_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on the non-negative integers ``keys`` (numpy ``SeedSequence`` hash):
    the randomness of a training step or epoch keyed on ``(seed, stream, epoch or step, ...)``."""
    a, b = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(a) << 31) ^ int(b)


_ORDER, _CORRUPT, _NOISE, _GLOBAL = 1, 2, 3, 4  # key_seed streams


class EpochSampler(torch.utils.data.Sampler):
    """Training order that depends only on ``(seed, epoch)``, resumable mid-epoch.

    ``keyed=False``: a permutation of ``range(n)`` per epoch (HINGE's spots),
    the same on every process; ``keyed=True``: ``n`` item keys per epoch and
    process, ``(epoch * n + i) * world + rank`` (FLAG's crops, which
    :class:`FlagCrops` draws from the key). With ``batch_size`` it yields lists
    of ``batch_size`` consecutive indices (use as ``batch_sampler``), else single
    indices (``sampler``). Lightning calls :meth:`set_epoch` before every epoch
    (the sampler is its own ``.sampler``, where Lightning looks);
    :meth:`resume_at` skips the batches an interrupted epoch already trained.
    """

    def __init__(self, n: int, seed: int, batch_size: int | None = None, keyed: bool = False) -> None:
        self.n, self.seed, self.batch_size, self.keyed = int(n), int(seed), batch_size, keyed
        self.epoch, self.rank, self.world = 0, 0, 1
        self._resume: tuple[int, int] | None = None
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_rank(self, rank: int, world: int) -> None:
        self.rank, self.world = int(rank), int(world)

    def resume_at(self, epoch: int, batches: int) -> None:
        """Skip the first ``batches`` batches when epoch ``epoch`` is iterated next."""
        self._resume = (int(epoch), int(batches))

    def __len__(self) -> int:
        return self.n if self.batch_size is None else math.ceil(self.n / self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """The indices (item keys) of ``epoch``, in order."""
        if self.keyed:
            return [(epoch * self.n + i) * self.world + self.rank for i in range(self.n)]
        gen = torch.Generator().manual_seed(key_seed(self.seed, _ORDER, epoch))
        return torch.randperm(self.n, generator=gen).tolist()

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            if self._resume[0] == self.epoch:
                skip = self._resume[1]
            self._resume = None
        order = self.order(self.epoch)
        if self.batch_size is None:
            yield from order[skip:]
        else:
            for b in range(skip, len(self)):
                yield order[b * self.batch_size : (b + 1) * self.batch_size]


def _rng_state() -> dict:
    """The global RNG states (torch CPU and CUDA, numpy, python) as tensors and primitive containers."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)}}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])


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


class _CarryStateLauncher(_MultiProcessingLauncher):
    """``ddp_spawn``/``ddp_fork``: also brings the :class:`BestWeights` state (best weights, history) and the
    epoch and step counters back from rank 0 to the launching process, which otherwise gets the final weights only."""

    def get_extra_results(self, trainer) -> dict:
        extra = super().get_extra_results(trainer)
        module = trainer.lightning_module
        if isinstance(module, BestWeights):
            # through a file, like Lightning's weights: the launcher reads its queue only after the workers end,
            # so a large message would block the worker
            path = Path(tempfile.mkdtemp(prefix="stgen-")) / "state.pt"
            torch.save({"state": module.training_state(), "epoch": int(trainer.current_epoch),
                        "step": int(trainer.global_step)}, path)
            extra["stgen_state"] = str(path)
        return extra

    def update_main_process_results(self, trainer, extra: dict) -> None:
        super().update_main_process_results(trainer, extra)
        if "stgen_state" in extra:
            path = Path(extra["stgen_state"])
            got = torch.load(path, weights_only=True)
            shutil.rmtree(path.parent, ignore_errors=True)
            trainer.lightning_module.load_training_state(got["state"])
            trainer.fit_loop.epoch_progress.current.completed = got["epoch"]
            steps = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step
            steps.total.completed = got["step"]


class _Trainer(L.Trainer):
    """A Lightning Trainer that resumes from ``resume_from`` (read with ``weights_only=True``) and raises
    :class:`TrainingInterrupted` instead of exiting when Lightning stops on SIGTERM."""

    resume_from: Path | None = None
    epoch_checkpoint: EpochCheckpoint | None = None

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path=None,
            weights_only=None) -> None:
        if ckpt_path is None and self.resume_from is not None:
            ckpt_path, weights_only = str(self.resume_from), True
        try:
            super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path=ckpt_path,
                        weights_only=weights_only)
            progress = self.fit_loop.epoch_progress.current
            if self.epoch_checkpoint is not None and self.epoch_checkpoint._stop_on_resume:
                # resumed from the checkpoint of the epoch early stopping stopped at: Lightning stops at once,
                # before counting that epoch as completed (current_epoch as in the uninterrupted fit)
                progress.completed = max(progress.completed, progress.processed)
        except SIGTERMException:
            cb = self.epoch_checkpoint
            if cb is None or not cb.last.is_file():
                where = "no checkpoint was written yet (resuming starts over)"
            else:
                try:
                    s = cb.saved or json.loads((cb.dirpath / "last.json").read_text())
                    at = f"step {s['global_step']}, mid-epoch" if s["mid_epoch"] else f"{s['epoch']} epoch(s) done"
                except (OSError, ValueError, KeyError):
                    at = "an earlier run's"
                where = f"checkpoint {cb.last} ({at})"
            raise TrainingInterrupted(f"training stopped by SIGTERM after step {self.global_step}; {where}") from None


def _trainer(max_epochs: int, callbacks: list | None = None, progress: bool = True,
             precision: str = "32-true", gradient_clip_val: float | None = None, *, resumable: bool = True,
             distributed: bool = False) -> L.Trainer:
    """The Lightning Trainer of every training here.

    Inside :func:`training_context` a ``resumable`` trainer (all but the
    backbone pre-training) also writes checkpoints (:class:`EpochCheckpoint`),
    resumes from the context's ``resume_from`` and runs on its devices; more
    than one process is refused unless ``distributed`` (HINGE and FLAG, whose
    modules split the work themselves: Lightning's distributed sampler is off).
    """
    ctx = _CONTEXT.get() if resumable else None
    cbs = list(callbacks or [])
    devices = dict(accelerator="auto", devices=1, strategy="auto", num_nodes=1)
    ckpt = None
    if ctx is not None:
        if ctx.trainers:
            raise RuntimeError("one training_context serves one resumable trainer (they would share last.ckpt)")
        ctx.trainers += 1
        devices = dict(accelerator=ctx.accelerator, devices=ctx.devices, strategy=ctx.strategy,
                       num_nodes=ctx.num_nodes)
        if ctx.ckpt_dir is not None:
            ckpt = EpochCheckpoint(ctx.ckpt_dir)
            cbs.append(ckpt)
    try:
        trainer = _Trainer(
            max_epochs=max_epochs,
            gradient_clip_val=gradient_clip_val,
            precision=precision,
            **devices,
            logger=False,
            enable_checkpointing=ckpt is not None,  # EpochCheckpoint only (Lightning adds none beside a Checkpoint)
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[*cbs, *([TQDMProgressBar(refresh_rate=5)] if progress else [])],
            enable_progress_bar=progress,
            deterministic=False,
            use_distributed_sampler=False,
            default_root_dir=ctx.ckpt_dir if ctx is not None and ctx.ckpt_dir is not None else None,
        )
    except (MisconfigurationException, ValueError, TypeError) as e:
        if ctx is None:
            raise
        opts = ", ".join(f"{k}={v!r}" for k, v in devices.items())
        raise InputError(f"cannot train with {opts}: {' '.join(str(e).split())}") from e
    if trainer.world_size > 1 and not distributed:
        raise InputError(f"training on {trainer.world_size} processes (--devices x --num-nodes) is supported for "
                         "hinge and flag only; train this model with --devices 1")
    if type(trainer.strategy.launcher) is _MultiProcessingLauncher:
        trainer.strategy.launcher.__class__ = _CarryStateLauncher
    trainer.epoch_checkpoint = ckpt
    trainer.resume_from = ctx.resume_from if ctx is not None else None
    return trainer


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
    trainer = _trainer(cfg.epochs, progress=progress, resumable=False)  # cached by get_backbone; not checkpointed
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

    def training_step(self, batch, batch_idx):
        feats, x0 = batch  # the global batch (the same on every process)
        gen = torch.Generator().manual_seed(key_seed(self.cfg.seed, _CORRUPT, self.global_step))
        x_t, visible, t = self.corrupt(x0, self.current_epoch, generator=gen)
        rank, world, n = self.global_rank, self.world, x0.shape[0]
        lo, hi = n * rank // world, n * (rank + 1) // world
        weight = 1.0
        if hi == lo:  # fewer spots than processes: a zero-weight spot keeps this process in step
            lo, hi, weight = 0, 1, 0.0
        rows = slice(lo, hi)
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
                       distributed=True)
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
    crops come from one seeded generator (``num_workers=0``), or with ``keyed``
    item ``i`` is drawn from its own generator seeded by ``(seed, i)`` (FLAG,
    with the item keys of :class:`EpochSampler`: resumable, one crop stream per process).
    """

    def __init__(self, sections: list[dict], crop_spots: int, length: int, seed: int, keyed: bool = False) -> None:
        if crop_spots < 1:
            raise InputError(f"flag.crop_spots must be >= 1, got {crop_spots}")
        self.sections, self.crop, self.length = sections, int(crop_spots), int(length)
        sizes = np.array([len(s["xy"]) for s in sections], dtype=np.float64)
        self.p = sizes / sizes.sum()
        self.seed, self.keyed = int(seed), keyed
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, int(i)]) if self.keyed else self.rng
        s = self.sections[int(rng.choice(len(self.sections), p=self.p))]
        xy = s["xy"]
        if len(xy) <= self.crop:
            idx = np.arange(len(xy))
        else:
            d2 = ((xy - xy[rng.integers(len(xy))]) ** 2).sum(1)
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
    The noise level and noise of step ``s`` on process ``r`` are drawn from
    ``key_seed(cfg.seed, s, r)`` (resumable; each process its own crop and noise).
    """

    step_buffers = ("_dsm", "_align")
    reseed_steps = True

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
        gen = torch.Generator().manual_seed(key_seed(self.cfg.seed, _NOISE, self.global_step, self.global_rank))
        sigma = self.model.sde.sample_sigma(generator=gen, device=x0.device)
        x = x0 + sigma * torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
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
        self.record_validation(val, self.model, step=self.global_step, train_dsm=mean_or_nan(self.synced(self._dsm)),
                               train_align=mean_or_nan(self.synced(self._align)))
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
    per_round = math.ceil(cfg.max_steps / rounds)
    sampler = EpochSampler(per_round, cfg.seed, keyed=True)
    train_dl = DataLoader(FlagCrops(prepared, cfg.crop_spots, per_round, cfg.seed, keyed=True), batch_size=None,
                          sampler=sampler)
    val = [{"feats": s["feats"], "graph": s["graph"], "y": s["y"], "val_mask": ~s["train_mask"]}
           for s in prepared if not s["train_mask"].all()]
    module = FlagModule(model, cfg)
    module.data_sampler = sampler
    trainer = _trainer(rounds, progress=progress, precision=cfg.precision, gradient_clip_val=cfg.grad_clip,
                       distributed=True)
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
