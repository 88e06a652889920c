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

  Ablation switches of :class:`~stgen.models.hinge.config.HingeConfig` (see
  :meth:`HingeModule.corrupt`): ``curriculum_epochs = 0`` removes the
  curriculum ("Mask-Diff (NoCurr)"); ``mask_ratio = "uniform"`` draws a mask
  ratio ``U(0, 1)`` per spot ("Mask-Diff (RandMask)"); ``objective = "gauss"``
  trains Gaussian diffusion (:mod:`stgen.sampling.gaussian`, "Gauss-Diff").
* :func:`train_flag` - FLAG (Sec. 3.6 eq. 9, Table 5): VE-SDE denoising score
  matching plus ``align_weight`` x GFM alignment, AdamW (weight decay 0.01,
  constant learning rate), gradient-norm clip 1.0; one training item is one
  spatially contiguous crop of a training section with its graph and a single
  noise level; the weights with the best validation MSE of generated
  expression are kept.

Checkpoints, resuming and several processes (:func:`training_context`, set by
:func:`stgen.workflows.fit.fit`): every trainer made by :func:`_trainer` (HINGE, FLAG,
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
import json
import logging
import os
import shutil
import tempfile
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from stgen.errors import InputError, StgenError
from stgen.training.best_weights import BestWeights
from stgen.training.callbacks import EpochCheckpoint


warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
# HINGE and FLAG restore their data position themselves (EpochSampler), see BestWeights.on_load_checkpoint
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)


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
    :class:`TrainingContext`); used by :func:`stgen.workflows.fit.fit` around the one training of a fit."""
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


class _CarryStateLauncher(_MultiProcessingLauncher):
    """``ddp_spawn``/``ddp_fork``: also brings the :class:`BestWeights` state (best weights, history) and the
    epoch and step counters back from rank 0 to the launching process, which otherwise gets the final weights only."""

    def _wrapping_function(self, *args, **kwargs) -> None:
        """Lightning's worker function, then every worker waits for the others and closes the process group
        before it exits: a worker that exited with its gloo group still open sometimes died in gloo's thread
        teardown ("terminate called without an active exception", SIGABRT: 3 of 24 runs of the ddp_spawn
        test of tests/training/test_ddp.py on 2 cores without these two calls, 0 of 10 with them)."""
        super()._wrapping_function(*args, **kwargs)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

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
