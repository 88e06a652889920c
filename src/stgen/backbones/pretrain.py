"""Masked auto-encoding pre-training of the embedded expression backbone, and its cache."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from stgen.backbones.config import PretrainConfig
from stgen.errors import InputError
from stgen.utils.zoo import zoo_backbone_dir
import json
import logging
import time
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset
from stgen.backbones.embedded import BackboneConfig, ExpressionBackbone
from typing import Sequence
from safetensors.torch import load_file, save_file
from stgen.data.dataset import Dataset, as_dataset
from stgen.data.panel import load_vocabulary
from stgen.data.targets import transform_counts
from stgen.utils.io import atomic_dir, sha256_file, sha256_json, write_json
from stgen.training.trainer import _trainer
from stgen.training.losses import masked_mse

log = logging.getLogger(__name__)


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

BACKBONE_FORMAT = 2


# ------------------------------------------------------------------ backbone
def _pretrain_corpus(ds: Dataset, cfg: Any, evaluated: Sequence[str]) -> list[str]:
    corpus = cfg.pretrain.corpus
    if corpus is None:
        imaged = set(ds.sections(imaged_only=True))
        corpus = [s for s in ds.sections() if s not in imaged and s not in evaluated]
    leak = sorted(set(corpus) & set(evaluated))
    if leak:
        raise InputError(f"pre-training corpus contains evaluated section(s) {leak}: remove them from pretrain.corpus")
    if not corpus:
        raise InputError(f"pre-training corpus is empty: {ds.root} ({ds.format}) has no expression-only section "
                         f"outside the evaluated ones; list sections in pretrain.corpus, or give HINGE a released "
                         f"backbone (--backbone cellfm:PATH | scgpt:DIR)")
    unknown = [s for s in corpus if s not in ds]
    if unknown:
        raise InputError(f"pretrain.corpus names section(s) {unknown} that are not in {ds.root}")
    return sorted(corpus)


def get_backbone(
    data_dir: Path, cfg: Any, cache_dir: Path, evaluated: Sequence[str] = (), progress: bool = True,
    force: bool = False,
) -> tuple[ExpressionBackbone, dict]:
    """The pre-trained expression backbone for this corpus and config (cached).

    Looked up, by the key of corpus, pre-training config and target transform: the cache
    (``<cache_dir>/backbones/<key>``), then the backbone shipped in the package's zoo for the same key
    (:func:`stgen.utils.zoo.zoo_backbone_dir`: the default Her2ST corpus and config, checked by SHA-256),
    else pre-trained here and cached. ``force`` pre-trains again (and replaces the cached one).

    The corpus defaults to every Her2ST section that has no image (none of
    them is ever evaluated); ``evaluated`` sections are refused in it.
    The vocabulary is every gene of CellFM's ``gene_info.csv`` detected in the
    corpus (capped at the ``pretrain.n_genes`` of highest mean, if set).
    """
    ds = as_dataset(data_dir)
    corpus = _pretrain_corpus(ds, cfg, evaluated)
    key = sha256_json({"format": BACKBONE_FORMAT, "corpus": corpus, "pretrain": cfg.pretrain.__dict__,
                       "transform": cfg.data.transform})[:16]
    bdir = cache_dir / "backbones" / key
    cached = None if force else _load_cached_backbone(bdir)
    if cached is None and not force and (shipped := zoo_backbone_dir(key)) is not None:
        cached = _load_cached_backbone(shipped)
        if cached is not None:
            log.info("using the pre-trained backbone shipped with stgen (%s); `stgen pretrain --force` re-trains it",
                     shipped)
    if cached is not None:
        return cached
    t0 = time.time()
    vocab = set(load_vocabulary())
    adatas = [ds.counts(s) for s in corpus]
    # a Her2ST table lists the genes detected in that section: absent genes are zero counts
    genes_all = sorted(set().union(*(a.var_names for a in adatas)) & vocab)
    if not genes_all:
        raise InputError("pre-training corpus shares no genes with the CellFM vocabulary")
    col = {g: i for i, g in enumerate(genes_all)}
    values = np.zeros((sum(a.n_obs for a in adatas), len(genes_all)), dtype=np.float32)
    row = 0
    for a in adatas:
        keep = [j for j, g in enumerate(a.var_names) if g in col]
        values[row : row + a.n_obs, [col[a.var_names[j]] for j in keep]] = transform_counts(a.X, cfg.data.transform)[:, keep]
        row += a.n_obs
    order = np.argsort(-values.mean(0), kind="stable")[: cfg.pretrain.n_genes]
    genes = [genes_all[i] for i in order]
    # reorder columns block by block in place: the dense corpus matrix (~1 GB for
    # Her2ST) is never copied whole
    for r in range(0, values.shape[0], 1024):
        values[r : r + 1024, : len(order)] = values[r : r + 1024][:, order]
    values = values[:, : len(order)]
    bb, hist = pretrain_backbone(values, genes, cfg.pretrain, progress=progress)
    meta = {"genes": genes, "config": bb.config.to_dict(), "corpus": corpus, "n_spots": int(values.shape[0]),
            "pretrain_seconds": round(time.time() - t0, 1), **hist}
    with atomic_dir(bdir) as tmp:
        save_file(bb.state_dict(), tmp / "backbone.safetensors")
        meta["safetensors_sha256"] = sha256_file(tmp / "backbone.safetensors")
        write_json(tmp / "backbone.json", meta)
    return bb, meta


def _load_cached_backbone(bdir: Path) -> tuple[ExpressionBackbone, dict] | None:
    """The cached pre-trained backbone in ``bdir``, or None when it must be rebuilt: missing, unreadable,
    not matching its recorded SHA-256 (caches written before the checksum are checked by loading only),
    or not matching its own config. Never unpickles (JSON + safetensors)."""
    meta_path, weights = bdir / "backbone.json", bdir / "backbone.safetensors"
    if not (meta_path.is_file() and weights.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        want = meta.get("safetensors_sha256")
        if want is not None and sha256_file(weights) != want:
            raise ValueError("weights do not match their SHA-256")
        bb = ExpressionBackbone(meta["genes"], BackboneConfig(**meta["config"]))
        bb.load_state_dict(load_file(weights), strict=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        log.warning("backbone cache %s is corrupted (%s): rebuilding it", bdir, e)
        return None
    return bb.eval(), meta
