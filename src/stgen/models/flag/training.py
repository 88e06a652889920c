"""FLAG training (Sec. 3.6 eq. 9, Table 5): VE-SDE DSM + GFM alignment on section crops."""

from __future__ import annotations

import functools
import math
from typing import Callable
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from stgen.models.flag.config import FlagConfig
from stgen.errors import InputError
from stgen.nn.graph import SpotGraph
from stgen.models.flag.network import FLAG, FlagEnsemble, member_networks
from stgen.sampling.vesde import WEIGHTINGS, dsm_loss
from stgen.training.best_weights import BestWeights
from stgen.training.state import EpochSampler
from stgen.training.data import FlagCrops
from stgen.training.state import _NOISE
from stgen.training.trainer import _trainer
from stgen.training.state import key_seed
from stgen.training.best_weights import mean_or_nan
from stgen.training.data import split_validation


@torch.no_grad()
def ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged, decay: float) -> None:
    """One EMA step in place, ``averaged = decay * averaged + (1 - decay) * current`` (the ``multi_avg_fn`` of
    :class:`torch.optim.swa_utils.AveragedModel`, which copies the weights at its first update)."""
    torch._foreach_lerp_(averaged, current, 1.0 - decay)


class FlagModule(BestWeights, L.LightningModule):
    """FLAG training: ``loss = DSM + align_weight * alignment`` on one crop per step.

    All spots of a crop share one noise level ``sigma`` (log-uniform): the
    graph encoder reads the neighbours' noisy states, which must be at the same
    level as at sampling time. The DSM term counts training spots only; the
    alignment term does not involve targets and uses every spot of the crop.
    With contextual alignment (``align_genes`` given, ``batch["align"]`` the
    crop's backbone states) the alignment term counts training spots only: its
    targets are computed from their true expression. Validation generates
    every training section whole with the inference sampler (``steps`` steps
    of order ``order``, ``val_samples`` samples averaged, fixed noise; or ``val_steps``
    Euler = DDIM steps when set) and scores the MSE, in target units, on its
    held-out spots: the weights kept are those whose *samples* are closest.
    The noise level and noise of step ``s`` on process ``r`` are drawn from
    ``key_seed(cfg.seed, s, r)`` (resumable; each process its own crop and noise).
    With ``cfg.ema`` (a decay) an exponential moving average of the weights is updated after every step
    (``torch.optim.swa_utils.AveragedModel``, part of the checkpoint): validation swaps it in, so the
    weights scored and kept are the averaged ones, and swaps the trained ones back for the next steps.
    A :class:`~stgen.models.flag.network.FlagEnsemble` (``cfg.ensemble`` members) trains every member on the
    step's crop, member ``i`` with the noise of ``key_seed(cfg.seed + i, ...)`` (member 0 as a single
    network), the loss is the sum of the members' losses and the gradient norm is clipped per member, so
    each member trains as it would alone; validation scores the ensemble's sampler (``val_samples`` per
    member) and keeps the ensemble's best weights.
    """

    step_buffers = ("_dsm", "_align")
    reseed_steps = True

    def __init__(self, model: FLAG | FlagEnsemble, cfg: FlagConfig, align_genes: torch.Tensor | None = None) -> None:
        super().__init__()
        if cfg.loss_weighting not in WEIGHTINGS:
            raise InputError(f"unknown flag.loss_weighting {cfg.loss_weighting!r}; choose one of {WEIGHTINGS}")
        if not cfg.align_weight >= 0:
            raise InputError(f"flag.align_weight must be >= 0, got {cfg.align_weight}")
        self.model, self.cfg = model, cfg
        self.align = model.has_alignment and cfg.align_weight > 0
        self.align_genes = align_genes
        self._dsm: list[float] = []
        self._align: list[float] = []
        self._val_sq = self._val_n = 0.0
        self.ema = None
        self._trained: dict | None = None
        if cfg.ema is not None:
            from torch.optim.swa_utils import AveragedModel

            # a partial of a module-level function, not torch's closure: ddp_spawn pickles the module
            self.ema = AveragedModel(model, multi_avg_fn=functools.partial(ema_update, decay=float(cfg.ema)))
            self.ema.requires_grad_(False)  # never trained (and no unused gradients under DDP)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def _swap_in(self, params: dict) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(params[name])

    def training_step(self, batch, batch_idx):
        x0 = batch["x0"]
        loss, dsms, aligns = 0.0, [], []
        for i, net in enumerate(member_networks(self.model)):
            gen = torch.Generator().manual_seed(key_seed(self.cfg.seed + i, _NOISE, self.global_step,
                                                         self.global_rank))
            sigma = net.sde.sample_sigma(generator=gen, device=x0.device)
            x = x0 + sigma * torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
            out = net(x, sigma, batch["feats"], batch["graph"], return_align=self.align)
            denoised, tokens = out if self.align else (out, None)
            dsm = dsm_loss(denoised, x0, sigma, net.sde, mask=batch["loss_mask"], weighting=self.cfg.loss_weighting)
            loss = loss + dsm
            dsms.append(float(dsm.detach()))
            if self.align:
                contextual = "align" in batch  # contextual targets read the true expression: training spots only
                al = net.align_loss(tokens, mask=batch["loss_mask"] if contextual else None,
                                    targets=batch["align"].to(tokens.dtype) if contextual else None,
                                    genes=None if self.align_genes is None else self.align_genes.to(tokens.device))
                loss = loss + self.cfg.align_weight * al
                aligns.append(float(al.detach()))
        self._dsm.append(float(np.mean(dsms)))
        if aligns:
            self._align.append(float(np.mean(aligns)))
        self.log("loss", loss, prog_bar=True, batch_size=1)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """An ensemble clips each member's gradient norm on its own (as if it trained alone); one network, or
        another clipping algorithm, clips as Lightning does."""
        nets = member_networks(self.model)
        if len(nets) == 1 or not gradient_clip_val or gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        for net in nets:
            torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None],
                                           float(gradient_clip_val))

    def on_validation_epoch_start(self) -> None:
        self._val_sq, self._val_n = 0.0, 0.0
        self._val_gen = torch.Generator().manual_seed(self.cfg.seed)
        if self.ema is not None and self._trained is None:  # score (and keep) the averaged weights
            self._trained = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            self._swap_in(dict(self.ema.module.named_parameters()))

    def validation_step(self, batch, batch_idx):
        steps, order = (self.cfg.steps, self.cfg.order) if self.cfg.val_steps is None else (self.cfg.val_steps, 1)
        mean, _ = self.model.generate(batch["feats"], batch["graph"], steps=steps, generator=self._val_gen,
                                      n_samples=self.cfg.val_samples * len(member_networks(self.model)), order=order)
        m = batch["val_mask"]
        self._val_sq += float(((mean[m] - batch["y"][m]) ** 2).sum())
        self._val_n += float(m.sum()) * mean.shape[1]

    def on_validation_epoch_end(self) -> None:
        val = self._val_sq / max(self._val_n, 1.0)
        self.record_validation(val, self.model, step=self.global_step, train_dsm=mean_or_nan(self.synced(self._dsm)),
                               train_align=mean_or_nan(self.synced(self._align)))
        self._dsm, self._align = [], []
        if self._trained is not None:  # the trained weights go on training
            self._swap_in(self._trained)
            self._trained = None

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


def train_flag(
    model: FLAG | FlagEnsemble,
    sections: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    cfg: FlagConfig,
    graph_builder: Callable[[np.ndarray, np.ndarray], SpotGraph],
    progress: bool = True,
    align_states: list[torch.Tensor] | None = None,
    align_genes: torch.Tensor | None = None,
) -> dict:
    """Train ``model`` in place on whole training sections; returns the history.

    Parameters
    ----------
    sections : per training section ``(feats (N, F), xy (N, 2) full-resolution
        pixels, targets (N, G) in target units, columns = the panel)``.
    graph_builder : ``(xy, feats) -> SpotGraph`` of a section
        (:func:`stgen.nn.graph.build_spot_graph` with the run's ``sigma_px``, ``knn``).
    align_states : per section the contextual alignment targets (N, G', E) of
        the genes ``align_genes`` (G',) long (panel columns with a backbone state;
        :func:`stgen.backbones.external.contextual_gene_states`); None: the
        network's static embeddings (or no alignment), of the genes ``align_genes``
        (None: the genes whose embedding row is not all zero).

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
        if align_states is not None:
            a = align_states[i]
            if a.ndim != 3 or a.shape[0] != len(f) or align_genes is None or a.shape[1] != len(align_genes):
                raise InputError(f"training section {i}: contextual alignment targets {tuple(a.shape)} must be "
                                 f"({len(f)}, {0 if align_genes is None else len(align_genes)}, E)")
            prepared[-1]["align"] = a
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
    module = FlagModule(model, cfg, align_genes)
    module.data_sampler = sampler
    trainer = _trainer(rounds, progress=progress, precision=cfg.precision, gradient_clip_val=cfg.grad_clip,
                       distributed=True)
    trainer.fit(module, train_dl, DataLoader(val, batch_size=None) if val else None)
    module.restore_best(model)
    if module.ema is not None and module.best_state is None:  # no validation ran: keep the averaged weights
        module._swap_in(dict(module.ema.module.named_parameters()))
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
