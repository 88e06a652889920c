"""BLEEP baseline: bi-modal contrastive embedding + query-reference imputation.

Xie et al., "Spatially Resolved Gene Expression Prediction from H&E Histology
Images via Bi-modal Contrastive Learning" (NeurIPS 2023); HINGE Supp. A.5 and
FLAG Sec. 4.1 / App. A use it as a discriminative baseline.

Pieces and what each reproduces:

* two projection heads (:class:`ProjectionHead`, BLEEP's head: ``Linear ->
  GELU -> Linear -> dropout``, residual to the first linear's output, then
  LayerNorm) map the image feature of a spot and its expression profile to a
  shared ``proj_dim``-d (256) embedding;
* BLEEP's modified CLIP loss (:func:`bleep_loss`): the cross-modal logits are
  ``e_expr @ e_img.T / tau`` and the targets are *soft*, ``softmax`` of the
  mean of the within-modality similarities ``(e_img e_img^T + e_expr
  e_expr^T) / 2`` (instead of CLIP's identity targets), so that spots with
  similar images or similar expression are not pushed apart; the loss averages
  the expression-side and image-side cross-entropies. Embeddings are not
  L2-normalised in the loss (as in BLEEP). tau = 1 as in BLEEP;
* training as in BLEEP: AdamW (lr 1e-3, weight decay 1e-3), batch 256, a
  random held-out fraction of spots scored by the same loss after every epoch,
  the weights of the best validation epoch kept;
* prediction (BLEEP's "average" imputation, :meth:`BLEEP.predict`): the test
  image embedding is compared by cosine similarity with the expression
  embeddings of *all* training spots (the reference); the prediction is the
  mean expression of the ``top_k`` (50) most similar reference spots, in target
  units. :meth:`BLEEP.state` therefore carries the reference expression
  matrix (N_train, G) and its embeddings (N_train, proj_dim).

Simplifications vs the paper (stated, not hidden):

* BLEEP fine-tunes a ResNet-50 image encoder end to end on the spot patches;
  here the image side is the run's *frozen* cached encoder feature
  ``section.feats`` (EfficientNet-Lite0, 1280-d, standardised per dimension
  with :func:`stgen.nn.stats.floored_std` on the training spots) followed
  by the trainable projection head. Only the two heads train.
* BLEEP's expression input is the batch-corrected (Harmony) normalised
  expression of ~3,500 HVGs; here it is the run's target panel (G genes,
  log2(count+1)), standardised per gene on the training spots.
* Temperature: BLEEP's released code divides the logits by tau and
  *multiplies* the within-modality similarities by tau before the target
  softmax; here tau divides both. The two agree at BLEEP's tau = 1 (the
  default). As in the released code, the targets are not detached and the
  image-side term uses the transposed (column) targets.
* Epochs: ``max_epochs`` = 150 is our choice (BLEEP's released script takes
  the epoch count as an argument); only the heads train, so it is cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from stgen.utils.config import check_ranges, coerce_numbers
from stgen.errors import InputError
from stgen.training.best_weights import BestWeights, mean_or_nan
from stgen.training.trainer import _trainer
from stgen.training.data import split_validation
from stgen.models.base import FitContext, FeatureSettings, SectionInput, SpotModel, check_training_sections
from stgen.nn.stats import floored_std


__all__ = ["BLEEPConfig", "ProjectionHead", "BLEEPNet", "bleep_loss", "BLEEP"]


@dataclass
class BLEEPConfig:
    """Hyper-parameters of :class:`BLEEP` (YAML section ``bleep``).

    Attributes
    ----------
    proj_dim : width of the joint embedding (BLEEP: 256).
    dropout : dropout inside the projection heads (BLEEP: 0.1).
    temperature : contrastive temperature tau (BLEEP: 1.0).
    lr, weight_decay : AdamW settings (BLEEP: 1e-3, 1e-3).
    batch_size : spots per contrastive batch (BLEEP: 256).
    max_epochs : training epochs (our choice, see the module docstring).
    val_fraction : fraction of training spots held out to pick the best epoch
        by validation loss (0 = no validation, keep the last epoch).
    top_k : reference spots averaged per query (BLEEP's "average of top 50").
    precision : Lightning precision string.
    seed : seeds the split, the initialisation and the batch order.
    """

    proj_dim: int = 256
    dropout: float = 0.1
    temperature: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 150
    val_fraction: float = 0.1
    top_k: int = 50
    precision: str = "32-true"
    seed: int = 42

    def __post_init__(self) -> None:
        coerce_numbers(self, "bleep")
        check_ranges(self, "bleep", at_least_1=("proj_dim", "batch_size", "max_epochs", "top_k"),
                     positive=("temperature",), fraction=("dropout", "val_fraction"))


class ProjectionHead(nn.Module):
    """BLEEP's projection head: ``LN(p + Drop(W2 GELU(p)))`` with ``p = W1 x``.

    ``forward(x (B, d_in)) -> (B, proj_dim)``.
    """

    def __init__(self, d_in: int, proj_dim: int, dropout: float) -> None:
        super().__init__()
        self.projection = nn.Linear(d_in, proj_dim)
        self.fc = nn.Linear(proj_dim, proj_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.projection(x)
        return self.norm(p + self.dropout(self.fc(F.gelu(p))))


def bleep_loss(img: torch.Tensor, expr: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BLEEP's contrastive loss of a batch of paired embeddings (scalar).

    Parameters
    ----------
    img, expr : (B, D) image and expression embeddings of the same B spots.
    temperature : tau.

    ``logits = expr @ img.T / tau``, ``T = softmax_rows((img img^T + expr
    expr^T) / (2 tau))``; loss ``= mean_i (CE(logits_i, T_i) + CE(logits^T_i,
    T^T_i)) / 2`` with ``CE(z, t) = -sum_j t_j log_softmax(z)_j``.
    """
    logits = expr @ img.T / temperature
    targets = F.softmax((img @ img.T + expr @ expr.T) / (2.0 * temperature), dim=-1)
    expr_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(1)
    img_loss = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(1)
    return ((expr_loss + img_loss) / 2.0).mean()


class BLEEPNet(nn.Module):
    """The two heads plus the standardisation buffers.

    Inputs are raw: ``embed_image(feats (B, F))`` standardises the image
    features (buffers ``feat_mean``/``feat_sd``), ``embed_expr(y (B, G))`` the
    expression in target units (``target_mean``/``target_sd``); both return
    (B, proj_dim) embeddings.
    """

    def __init__(self, feat_dim: int, n_genes: int, proj_dim: int, dropout: float) -> None:
        super().__init__()
        self.image_proj = ProjectionHead(feat_dim, proj_dim, dropout)
        self.expr_proj = ProjectionHead(n_genes, proj_dim, dropout)
        self.register_buffer("feat_mean", torch.zeros(feat_dim))
        self.register_buffer("feat_sd", torch.ones(feat_dim))
        self.register_buffer("target_mean", torch.zeros(n_genes))
        self.register_buffer("target_sd", torch.ones(n_genes))

    def set_stats(self, feats: torch.Tensor, targets: torch.Tensor) -> None:
        """Fit the standardisation on training spots: feats (N, F), targets (N, G)."""
        self.feat_mean.copy_(feats.mean(0))
        self.feat_sd.copy_(floored_std(feats.std(0)))
        self.target_mean.copy_(targets.mean(0))
        self.target_sd.copy_(floored_std(targets.std(0)))

    def embed_image(self, feats: torch.Tensor) -> torch.Tensor:
        return self.image_proj((feats - self.feat_mean) / self.feat_sd)

    def embed_expr(self, y: torch.Tensor) -> torch.Tensor:
        return self.expr_proj((y - self.target_mean) / self.target_sd)


class _BLEEPModule(BestWeights, L.LightningModule):
    """Lightning wrapper: contrastive training, best-validation-loss weights kept."""

    def __init__(self, net: BLEEPNet, cfg: BLEEPConfig) -> None:
        super().__init__()
        self.net, self.cfg = net, cfg
        self._train: list[float] = []
        self._val: list[tuple[float, int]] = []

    def _loss(self, batch) -> torch.Tensor:
        f, y = batch
        return bleep_loss(self.net.embed_image(f), self.net.embed_expr(y), self.cfg.temperature)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self._train.append(float(loss.detach()))
        self.log("loss", loss, prog_bar=True, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch, batch_idx):
        self._val.append((float(self._loss(batch)), len(batch[0])))

    def on_train_epoch_end(self) -> None:
        if self._val:
            val = sum(v * n for v, n in self._val) / sum(n for _, n in self._val)
        else:
            val = math.nan
        self.record_validation(val, self.net, metric="val_loss", log=False, train_loss=mean_or_nan(self._train))
        self._train, self._val = [], []

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


def _check_train(train: list[SectionInput], panel: list[str]) -> tuple[np.ndarray, np.ndarray]:
    check_training_sections(train, panel, "bleep")
    feats = np.concatenate([s.feats for s in train])
    targets = np.concatenate([s.targets for s in train])
    if len(feats) < 2:
        raise InputError(f"bleep needs at least 2 training spots, got {len(feats)}")
    return feats, targets


class BLEEP(SpotModel):
    """BLEEP (see the module docstring): contrastive heads + top-k reference imputation.

    Attributes
    ----------
    net : the trained :class:`BLEEPNet` (eval mode, CPU).
    ref_expr : (N_ref, G) float32 reference expression (all training spots, target units).
    ref_emb : (N_ref, proj_dim) float32 expression embeddings of the reference.
    panel : the G gene symbols.
    """

    name = "bleep"
    generative = False
    config_cls = BLEEPConfig

    def __init__(self, net: BLEEPNet, ref_expr: torch.Tensor, ref_emb: torch.Tensor, panel: list[str],
                 cfg: BLEEPConfig) -> None:
        self.net, self.panel, self.cfg = net.eval(), list(panel), cfg
        self.ref_expr = ref_expr.float().contiguous()
        self.ref_emb = ref_emb.float().contiguous()

    @classmethod
    def fit(cls, train: list[SectionInput], panel: list[str], cfg: BLEEPConfig, features: FeatureSettings,
            progress: bool = True, context: FitContext | None = None) -> tuple["BLEEP", dict]:
        """Train the heads on all training spots; the reference is every training spot.

        ``train[i].feats`` (N_i, F) and ``targets`` (N_i, G = len(panel)).
        Returns ``(model, history)`` with per-epoch train/validation losses.
        """
        feats, targets = _check_train(train, panel)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        n = len(feats)
        if cfg.val_fraction > 0:
            tr, va = split_validation(n, cfg.val_fraction, cfg.seed)
        else:
            tr, va = np.arange(n), np.arange(0)
        f = torch.as_tensor(feats)
        y = torch.as_tensor(targets)
        net = BLEEPNet(f.shape[1], y.shape[1], cfg.proj_dim, cfg.dropout)
        net.set_stats(f[tr], y[tr])
        train_dl = DataLoader(TensorDataset(f[tr], y[tr]), batch_size=cfg.batch_size, shuffle=True)
        val_dl = DataLoader(TensorDataset(f[va], y[va]), batch_size=max(len(va), 1)) if len(va) else None
        module = _BLEEPModule(net, cfg)
        trainer = _trainer(cfg.max_epochs, progress=progress, precision=cfg.precision)
        trainer.fit(module, train_dl, val_dl)
        module.restore_best(net)
        net = net.cpu().eval()
        with torch.no_grad():
            ref_emb = net.embed_expr(y)
        model = cls(net, y, ref_emb, panel, cfg)
        history = {"epochs_run": trainer.current_epoch, "best_epoch": module.best_epoch,
                   "best_val_loss": module.best_val, "n_train": int(len(tr)), "n_val": int(len(va)),
                   "n_reference": n, "history": module.history}
        return model, history

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors ``net.*`` (heads + standardisation), ``ref_expr`` (N_ref, G), ``ref_emb`` (N_ref, D)."""
        tensors = {f"net.{k}": v.detach().cpu().contiguous().clone() for k, v in self.net.state_dict().items()}
        tensors["ref_expr"] = self.ref_expr.clone()
        tensors["ref_emb"] = self.ref_emb.clone()
        meta = {"panel": self.panel, "feat_dim": int(self.net.feat_mean.numel()),
                "n_genes": len(self.panel), "proj_dim": int(self.ref_emb.shape[1]),
                "n_reference": int(self.ref_expr.shape[0])}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, cfg: BLEEPConfig) -> "BLEEP":
        """Rebuild from :meth:`state` (architecture from ``meta``, weights from ``tensors``)."""
        meta = meta[cls.name]
        try:
            net = BLEEPNet(int(meta["feat_dim"]), int(meta["n_genes"]), int(meta["proj_dim"]), cfg.dropout)
            net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
            return cls(net, tensors["ref_expr"], tensors["ref_emb"], list(meta["panel"]), cfg)
        except (KeyError, RuntimeError) as e:
            raise InputError(f"bleep: saved state does not match the model ({e})") from e

    @torch.no_grad()
    def predict(self, section: SectionInput, features: FeatureSettings, samples: int | None = None,
                steps: int | None = None, seed: int = 0, progress: bool = False,
                **options) -> tuple[np.ndarray, np.ndarray]:
        """Top-k reference average: mean (N, G) float32 in target units, sd zeros (deterministic).

        Cosine similarity between the image embedding of each query spot and
        the reference expression embeddings; ``k = min(top_k, N_ref)``.
        """
        f = torch.as_tensor(section.feats)
        d = int(self.net.feat_mean.numel())
        if f.ndim != 2 or f.shape[1] != d:
            raise InputError(f"bleep: section {section.name} has features {tuple(f.shape)}, the model needs (N, {d})")
        if not torch.isfinite(f).all():
            raise InputError(f"bleep: section {section.name} features contain NaN or infinite values")
        q = F.normalize(self.net.embed_image(f), dim=-1)
        ref = F.normalize(self.ref_emb, dim=-1)
        k = min(int(self.cfg.top_k), len(ref))
        mean = torch.empty(len(f), self.ref_expr.shape[1])
        for i in range(0, len(f), 1024):
            idx = torch.topk(q[i:i + 1024] @ ref.T, k, dim=1).indices  # (b, k)
            mean[i:i + 1024] = self.ref_expr[idx].mean(1)
        mean = mean.numpy().astype(np.float32)
        return mean, np.zeros_like(mean)
