"""STFlow: whole-section flow matching with local spatial attention.

Huang et al., "Scalable generation of spatial transcriptomics from histology
images via whole-slide flow matching" (ICML 2025), as a baseline of HINGE
(Supp. A.5: "models the joint distribution of gene expressions across all
spatial locations ... E(2)-invariant Transformer denoiser with local spatial
attention"; Table S5: 10 sampling steps) and FLAG (Sec. 4.1, "STFlow (G)";
Sec. 4.5: its graph attention "tends to over-smooth spot-spot interactions").

The expression of all ``N`` spots of a section is one state ``x`` (N, G) that
is transported from a prior sample ``x_0`` to the data ``x_1`` along the
straight path ``x_t = (1 - t) x_0 + t x_1``, ``t`` in [0, 1]. A spatial
transformer ``f(x_t, t, v, graph)`` reads every spot's image feature, its
current expression state and the flow time and predicts the clean expression
``x_1``; the velocity is ``(f - x_t) / (1 - t)``. Sampling starts from the
prior and takes ``steps`` (10) Euler steps on the uniform grid,
``x <- x + (t' - t) (f(x, t) - x) / (1 - t)`` (the last step lands on ``f``).

Pieces (``N`` spots, ``G`` genes, ``F`` feature width, ``d`` width, ``K``
neighbour slots, ``B`` distance basis functions):

* units: targets (log2(count+1), the run's target units) are standardised per
  gene on the training spots, ``(y - mean_g) / sd_g`` (sd floored at 10% of the
  median, :func:`stgen.nn.stats.floored_std`); the flow runs in these
  units and ``predict`` returns target units;
* prior (``prior="zinb"``): STFlow starts from a zero-inflated negative
  binomial prior fitted to the training expression (Huang et al.; the HINGE
  and FLAG texts do not describe the prior). Here: per gene a ZINB fitted to
  the training *counts* ``c = 2^y - 1`` by moment matching (:func:`fit_zinb`:
  zero fraction, mean and variance), sampled as counts and
  mapped back to ``log2(c + 1)``, then standardised. The counts are exact for
  the default log2(count+1) targets; for other non-negative units the same
  invertible transform pair still fits the prior to the training values, only
  the ZINB shape is less natural. ``prior="gaussian"`` uses ``N(mean_g, sd_g^2)``
  (standard normal in standardised units) instead;
* spot graph: each spot attends to its ``K = min(knn, N)`` nearest spots (itself
  included; neighbours from :func:`stgen.nn.graph.build_spot_graph`); the edge
  feature is a fixed Gaussian RBF expansion of the centre distance in units of
  the section's spot spacing (median nearest-neighbour distance), so the model
  depends on positions only through distances (E(2)-invariant) and on no
  absolute pixel scale (:func:`distance_graph`);
* denoiser (:class:`STFlowNet`): node token ``Linear(v) + Linear(x_t) +
  MLP(timestep_embedding(t))``; ``layers`` pre-norm blocks of local attention
  with a learned per-head bias on the distance,
  ``q_i.k_j / sqrt(d_h) + sum_b lambda_{h,b} rbf_b(d_ij)``
  (:class:`stgen.nn.graph.EdgeBiasedGraphAttention` on the RBF basis), and a
  GEGLU feed-forward (:class:`stgen.nn.dit.GEGLU`); final LayerNorm and
  ``Linear(d -> G)`` predicting ``x_1``;
* training: the flow-matching regression ``|| f(x_t, t) - x_1 ||^2`` on random
  spatially contiguous crops (``crop_spots`` nearest spots to a random centre,
  :class:`stgen.training.data.FlagCrops`, with the section graph restricted to the
  crop), one flow time ``t ~ U(0, 1)`` per crop (all spots of a section share
  ``t`` at sampling time), a fresh prior draw per crop.

Simplifications vs the paper (stated, not hidden): a small transformer (3
blocks x 128 wide by default); the E(2)-invariant transformer is reduced to
attention with distance-only biases (no coordinate inputs at all); the image feature is the
run's encoder feature (EfficientNet-Lite0 by default), not a pathology
foundation model; the ZINB is fitted by moments on de-logged targets, not by
maximum likelihood on raw counts; training is ``max_steps`` AdamW steps at a
constant learning rate; ``val_fraction`` of each training section's spots
are left out of the loss and scored every ``val_every`` steps by generating
the whole section (``steps`` Euler steps, one sample, fixed noise), and the
best round's weights are kept. The held-out spots stay in the crops (the
whole section is generated jointly), so during training their neighbours
read their states ``x_t``, which mix in their true expression; the
validation MSE is therefore slightly optimistic, but their targets never
enter the loss. The prior is fitted on the training spots only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
import lightning as L
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from stgen.utils.config import check_divisible, check_ranges, coerce_numbers
from stgen.errors import InputError
from stgen.nn.graph import SpotGraph, build_spot_graph, spot_spacing
from stgen.training.data import FlagCrops, split_validation
from stgen.training.best_weights import SampledValidationMSE
from stgen.training.trainer import _trainer
from stgen.models.base import (FitContext, FeatureSettings, SectionInput, SpotModel, check_predict_section, check_training_sections,
                   resolve_count)
from stgen.nn.dit import GEGLU
from stgen.nn.graph import EdgeBiasedGraphAttention
from stgen.nn.stats import floored_std
from stgen.nn.embedding import timestep_embedding


__all__ = ["STFlowConfig", "STFlowNet", "STFlow", "fit_zinb", "distance_graph"]

PRIORS = ("zinb", "gaussian")


@dataclass
class STFlowConfig:
    """Hyper-parameters of :class:`STFlow` (YAML section ``stflow``).

    Architecture: ``dim`` (``d``), ``layers``, ``heads``, ``mlp_ratio``,
    ``dropout``; graph: ``knn`` (neighbours per spot, self included),
    ``dist_basis`` RBF functions with centres evenly on ``[0, dist_max]`` spot
    spacings; ``prior`` (``zinb`` | ``gaussian``). Inference: ``steps`` Euler
    steps, ``samples`` draws averaged. Training: ``crop_spots``, ``lr``,
    ``weight_decay``, ``max_steps`` (rounded up to whole validation rounds),
    ``val_every`` (steps per validation round), ``val_fraction``,
    ``grad_clip``, ``seed``.
    """

    dim: int = 128
    layers: int = 3
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    knn: int = 16
    dist_basis: int = 16
    dist_max: float = 4.0
    prior: str = "zinb"
    steps: int = 10
    samples: int = 5
    crop_spots: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.0
    max_steps: int = 1500
    val_every: int = 150
    val_fraction: float = 0.1
    grad_clip: float = 1.0
    seed: int = 42

    def __post_init__(self) -> None:
        coerce_numbers(self, "stflow")  # YAML gives e.g. 1e-3 as a string; integers are whole numbers after it
        check_ranges(self, "stflow", at_least_1=("dim", "layers", "heads", "knn", "dist_basis", "steps", "samples",
                                                 "crop_spots", "max_steps", "val_every"),
                     positive=("dist_max", "mlp_ratio", "lr"), fraction=("dropout", "val_fraction"))
        check_divisible(self, "stflow", "dim", "heads")
        if self.prior not in PRIORS:
            raise InputError(f"unknown stflow.prior {self.prior!r}; choose one of {PRIORS}")


ARCH_FIELDS = ("dim", "layers", "heads", "mlp_ratio", "dropout", "knn", "dist_basis", "dist_max", "prior")


# ------------------------------------------------------------------ prior
def fit_zinb(counts: np.ndarray, iters: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-gene zero-inflated negative binomial by moment matching.

    ``counts`` (N, G) >= 0. The ZINB ``P(0) = pi + (1 - pi) NB(0)``, with NB
    mean ``mu`` and inverse dispersion ``theta`` (variance ``mu + mu^2/theta``),
    is matched to the observed zero fraction (``c < 0.5``), mean and second
    moment by the fixed-point iteration ``mu = m / (1 - pi)``,
    ``var_NB = E[c^2] / (1 - pi) - mu^2``, ``theta = mu^2 / (var_NB - mu)``,
    ``pi = (p0 - NB(0)) / (1 - NB(0))`` clipped to [0, 0.99]; under-dispersed
    genes get ``theta = 1e4`` (Poisson). Returns float64 ``(mu, theta, pi)``, (G,) each.
    """
    c = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    m, s2, p0 = c.mean(0), (c**2).mean(0), (c < 0.5).mean(0)
    pi = np.zeros_like(m)
    for _ in range(iters):
        mu = m / (1.0 - pi)
        excess = s2 / (1.0 - pi) - mu**2 - mu
        theta = np.where(excess > 1e-8 * np.maximum(mu, 1e-12), mu**2 / np.maximum(excess, 1e-300), 1e4)
        theta = np.clip(theta, 1e-3, 1e4)
        nb0 = np.where(mu > 0, (theta / (theta + mu)) ** theta, 1.0)
        pi = np.where(nb0 < 1 - 1e-9, np.clip((p0 - nb0) / np.maximum(1.0 - nb0, 1e-9), 0.0, 0.99), 0.0)
    mu = m / (1.0 - pi)
    return mu, theta, pi


def sample_zinb(mu: np.ndarray, theta: np.ndarray, pi: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` ZINB draws per gene, (n, G) float64 counts (gamma-Poisson NB, zero with probability ``pi``)."""
    mu, theta, pi = (np.asarray(a, dtype=np.float64) for a in (mu, theta, pi))
    nb = rng.negative_binomial(theta, theta / (theta + mu), size=(n, len(mu))).astype(np.float64)
    return np.where(rng.random((n, len(mu))) < pi, 0.0, nb)


# ------------------------------------------------------------------ graph
def distance_graph(xy: np.ndarray, feats: np.ndarray, k: int, n_basis: int, dist_max: float) -> SpotGraph:
    """kNN spot graph whose edge feature is an RBF expansion of the distance in spot spacings.

    ``xy`` (N, 2) full-resolution pixels, ``feats`` (N, F) (checked for NaNs).
    Neighbours: :func:`stgen.nn.graph.build_spot_graph` (``K = min(k, N)``, self
    first). ``edge_attr`` (N, K, n_basis) float32:
    ``exp(-(d_ij / spacing - c_b)^2 / (2 w^2))`` with centres ``c_b`` evenly
    on ``[0, dist_max]`` and ``w`` their gap (``dist_max`` for one centre).
    """
    g = build_spot_graph(xy, feats, k=k)
    xy_t = torch.as_tensor(np.asarray(xy, dtype=np.float64))
    d = (xy_t[:, None, :] - xy_t[g.neighbors]).norm(dim=-1) / spot_spacing(xy)  # (N, K)
    centres = torch.linspace(0.0, float(dist_max), n_basis, dtype=torch.float64)
    w = float(dist_max) / (n_basis - 1) if n_basis > 1 else float(dist_max)
    rbf = torch.exp(-((d[..., None] - centres) ** 2) / (2 * w**2)).float()
    return SpotGraph(g.neighbors, rbf, g.valid)


def repeat_graph(graph: SpotGraph, copies: int) -> SpotGraph:
    """``copies`` disjoint copies of ``graph`` (block-diagonal, copy ``s`` = spots ``s N .. (s + 1) N - 1``)."""
    n = graph.n_spots
    offs = (torch.arange(copies) * n).view(-1, 1, 1)
    return SpotGraph((graph.neighbors[None] + offs).reshape(copies * n, -1),
                     graph.edge_attr.repeat(copies, 1, 1), graph.valid.repeat(copies, 1))


# ------------------------------------------------------------------ network
class LocalBlock(nn.Module):
    """Pre-norm block: ``h + Attn(LN h)`` (distance-biased, over the K nearest spots), ``h + GEGLU(LN h)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, n_basis: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = EdgeBiasedGraphAttention(dim, heads, edge_dim=n_basis, dropout=dropout)
        self.ffn = GEGLU(dim, int(dim * mlp_ratio), dropout)

    def forward(self, h: torch.Tensor, graph: SpotGraph) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), graph)
        return h + self.ffn(self.norm2(h))


class STFlowNet(nn.Module):
    """STFlow's clean-expression predictor ``f(x_t, t, v, graph)`` (module docstring).

    ``forward(x_t (N, G) standardised state, t scalar or (N,) flow time in [0, 1],
    feats (N, F) raw features, graph (N spots, edge_attr (N, K, B))) -> x1_hat (N, G)``
    standardised. Buffers: ``feat_mean/std`` (F,), ``target_mean/std`` (G,) and the
    prior ``prior_mu/theta/pi`` (G,) (ZINB counts; unused by the Gaussian prior).
    """

    def __init__(self, n_genes: int, feat_dim: int, cfg: STFlowConfig) -> None:
        super().__init__()
        if n_genes < 1 or feat_dim < 1:
            raise InputError(f"STFlow needs at least one gene and one feature, got G={n_genes}, F={feat_dim}")
        self.n_genes, self.feat_dim, self.dim, self.prior = n_genes, feat_dim, cfg.dim, cfg.prior
        d = cfg.dim
        for name, size in (("feat_mean", feat_dim), ("feat_std", feat_dim), ("target_mean", n_genes),
                           ("target_std", n_genes), ("prior_mu", n_genes), ("prior_theta", n_genes),
                           ("prior_pi", n_genes)):
            self.register_buffer(name, torch.ones(size) if name.endswith(("std", "theta")) else torch.zeros(size))
        self.feat_in = nn.Linear(feat_dim, d)
        self.expr_in = nn.Linear(n_genes, d)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(LocalBlock(d, cfg.heads, cfg.mlp_ratio, cfg.dist_basis, cfg.dropout)
                                    for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, n_genes)

    def set_stats(self, feats: torch.Tensor, targets: torch.Tensor) -> None:
        """Fit standardisations and the prior on training spots: feats (N, F), targets (N, G) target units."""
        self.feat_mean.copy_(feats.mean(0))
        self.feat_std.copy_(floored_std(feats.std(0)))
        self.target_mean.copy_(targets.mean(0))
        self.target_std.copy_(floored_std(targets.std(0)))
        mu, theta, pi = fit_zinb(np.exp2(targets.double().numpy()) - 1.0)
        self.prior_mu.copy_(torch.as_tensor(mu))
        self.prior_theta.copy_(torch.as_tensor(theta))
        self.prior_pi.copy_(torch.as_tensor(pi))

    def normalise(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.target_mean) / self.target_std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.target_std + self.target_mean

    def sample_prior(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """``n`` prior draws (n, G) float32 in standardised units; all randomness from ``rng``."""
        device = self.target_mean.device
        if self.prior == "gaussian":
            return torch.as_tensor(rng.standard_normal((n, self.n_genes)), dtype=torch.float32, device=device)
        mu, theta, pi = (b.detach().cpu().double().numpy() for b in (self.prior_mu, self.prior_theta, self.prior_pi))
        counts = sample_zinb(mu, theta, pi, n, rng)
        return self.normalise(torch.as_tensor(np.log2(counts + 1.0), dtype=torch.float32, device=device))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float, feats: torch.Tensor,
                graph: SpotGraph) -> torch.Tensor:
        n = x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).reshape(-1).expand(n)
        v = ((feats - self.feat_mean) / self.feat_std).clamp(-8.0, 8.0)
        h = self.feat_in(v) + self.expr_in(x_t) + self.time_mlp(timestep_embedding(t, self.dim, 1))
        for blk in self.blocks:
            h = blk(h, graph)
        return self.out(self.norm(h))


@torch.no_grad()
def flow_sample(net: STFlowNet, feats: torch.Tensor, graph: SpotGraph, steps: int, n_samples: int,
                rng: np.random.Generator, progress: bool = False) -> torch.Tensor:
    """``n_samples`` joint draws of a whole section: (n_samples, N, G) in target units.

    All samples run at once on ``n_samples`` disjoint copies of ``graph``;
    ``steps`` Euler steps on ``t_k = k / steps`` with the x1-prediction
    velocity ``(f - x) / (1 - t)``; the prior draw (from ``rng``) is the only
    randomness. Runs on the network's device.
    """
    net.eval()
    n, device = feats.shape[0], net.target_mean.device
    big = repeat_graph(graph.to(device), n_samples)
    f = feats.to(device).repeat(n_samples, 1)
    x = net.sample_prior(n * n_samples, rng)
    for k in tqdm(range(steps), desc=f"flow {n_samples}x{n} spots", disable=not progress):
        t, t_next = k / steps, (k + 1) / steps
        x1 = net(x, t, f, big)
        x = x + (t_next - t) / (1.0 - t) * (x1 - x)
    return net.denormalise(x).view(n_samples, n, net.n_genes)


# ------------------------------------------------------------------ training
class STFlowModule(SampledValidationMSE, L.LightningModule):
    """Flow-matching training on crops (:class:`stgen.training.data.FlagCrops` items) with best-validation weights.

    Loss: ``mean over training spots of the crop || f(x_t, t) - x_1 ||^2`` with
    ``x_t = (1 - t) x_0 + t x_1``, ``t ~ U(0, 1)`` one per crop, ``x_0`` a
    fresh prior draw (numpy generator seeded by ``seed + 1``). Validation items
    are whole sections ``{feats, graph, y, val_mask}``; MSE in target units on
    the held-out spots of a ``steps``-step, one-sample generation.
    """

    def __init__(self, net: STFlowNet, cfg: STFlowConfig) -> None:
        super().__init__()
        self.net, self.cfg = net, cfg
        self.prior_rng = np.random.default_rng(cfg.seed + 1)

    def loss(self, batch: dict) -> torch.Tensor:
        x1, mask = batch["x0"], batch["loss_mask"]
        x0 = self.net.sample_prior(x1.shape[0], self.prior_rng).to(x1.device)
        t = torch.rand((), device=x1.device)
        pred = self.net((1 - t) * x0 + t * x1, t, batch["feats"], batch["graph"])
        err = ((pred - x1) ** 2).mean(1)
        return (err * mask).sum() / mask.sum().clamp_min(1)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("loss", loss, prog_bar=True, batch_size=1)
        self.add_train_loss(loss)
        return loss

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_rng = np.random.default_rng(self.cfg.seed + 2)

    def validation_step(self, batch, batch_idx):
        mean = flow_sample(self.net, batch["feats"], batch["graph"], self.cfg.steps, 1, self._val_rng)[0]
        m = batch["val_mask"]
        self.add_validation_error(mean[m], batch["y"][m])


# ------------------------------------------------------------------ SpotModel
class STFlow(SpotModel):
    """STFlow baseline (module docstring): ``fit`` / ``state`` / ``from_state`` / ``predict``."""

    name = "stflow"
    generative = True
    config_cls = STFlowConfig

    def __init__(self, net: STFlowNet, cfg: STFlowConfig, panel: list[str]) -> None:
        self.net, self.cfg, self.panel = net.eval(), cfg, list(panel)

    def graph(self, section: SectionInput) -> SpotGraph:
        """The section's distance graph (:func:`distance_graph` with the config's ``knn``, basis)."""
        return distance_graph(section.xy, section.feats, self.cfg.knn, self.cfg.dist_basis, self.cfg.dist_max)

    @classmethod
    def fit(cls, train: list[SectionInput], panel: list[str], cfg: STFlowConfig, features: FeatureSettings,
            progress: bool = True, context: FitContext | None = None) -> tuple["STFlow", dict]:
        """Train on crops of the training sections (uses ``section.xy``); returns (model, history).

        ``val_fraction`` of each section's spots (split seeded by ``seed + i``)
        are left out of the loss and of the statistics and used for validation.
        """
        f_dim = check_training_sections(train, panel, "stflow")
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        net = STFlowNet(len(panel), f_dim, cfg)
        prepared = []
        for i, s in enumerate(train):
            train_mask = torch.ones(s.n_spots, dtype=torch.bool)
            if cfg.val_fraction > 0:
                _, va = split_validation(s.n_spots, cfg.val_fraction, cfg.seed + i)
                train_mask[torch.from_numpy(va)] = False
            prepared.append({"feats": torch.as_tensor(s.feats), "y": torch.as_tensor(s.targets), "xy": s.xy,
                             "train_mask": train_mask,
                             "graph": distance_graph(s.xy, s.feats, cfg.knn, cfg.dist_basis, cfg.dist_max)})
        net.set_stats(torch.cat([p["feats"][p["train_mask"]] for p in prepared]),
                      torch.cat([p["y"][p["train_mask"]] for p in prepared]))
        with torch.no_grad():
            for p in prepared:
                p["x0"] = net.normalise(p["y"])
        rounds = math.ceil(cfg.max_steps / cfg.val_every)
        train_dl = DataLoader(FlagCrops(prepared, cfg.crop_spots, cfg.val_every, cfg.seed), batch_size=None)
        val = [{"feats": p["feats"], "graph": p["graph"], "y": p["y"], "val_mask": ~p["train_mask"]}
               for p in prepared if not p["train_mask"].all()]
        module = STFlowModule(net, cfg)
        trainer = _trainer(rounds, progress=progress, gradient_clip_val=cfg.grad_clip or None)
        trainer.fit(module, train_dl, DataLoader(val, batch_size=None) if val else None)
        module.restore_best(net)
        n_train = int(sum(int(p["train_mask"].sum()) for p in prepared))
        return cls(net, cfg, panel), {
            "steps_run": int(trainer.global_step),
            "epochs_run": int(trainer.current_epoch),
            "best_epoch": int(module.best_epoch),
            "best_step": int(module.best_step),
            "best_val_mse": float(module.best_val) if math.isfinite(module.best_val) else None,
            "n_train": n_train,
            "n_val": int(sum(p["y"].shape[0] for p in prepared) - n_train),
            "n_sections": len(prepared),
            "history": module.history,
        }

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.net.state_dict().items()}
        meta = {"model": self.name, "n_genes": self.net.n_genes, "feat_dim": self.net.feat_dim,
                "panel": self.panel, "arch": {k: getattr(self.cfg, k) for k in ARCH_FIELDS}}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, cfg: STFlowConfig) -> "STFlow":
        """Rebuild from :meth:`state`; architecture, graph and prior settings come from ``meta``."""
        meta = meta[cls.name]
        try:
            run_cfg = STFlowConfig(**{**asdict(cfg), **meta.get("arch", {})})
            net = STFlowNet(int(meta["n_genes"]), int(meta["feat_dim"]), run_cfg)
            net.load_state_dict(tensors, strict=True)
        except (KeyError, RuntimeError) as exc:
            raise InputError(f"stflow: saved state does not match the model ({exc})") from exc
        return cls(net, run_cfg, meta.get("panel", [f"g{i}" for i in range(net.n_genes)]))

    def predict(self, section: SectionInput, features: FeatureSettings, samples: int | None = None,
                steps: int | None = None, seed: int = 0, progress: bool = False,
                **options) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, sd)`` (N, G) float32 over ``samples`` joint generations of the whole section, target units.

        Uses ``section.xy`` (the spot graph) and ``section.feats``; the prior
        draws come from ``numpy.random.default_rng(seed)``.
        """
        check_predict_section(section, self.net.feat_dim, "stflow")
        samples = resolve_count(samples, self.cfg.samples, "samples", "stflow")
        steps = resolve_count(steps, self.cfg.steps, "steps", "stflow")
        draws = flow_sample(self.net, torch.as_tensor(section.feats, dtype=torch.float32), self.graph(section),
                            steps, samples, np.random.default_rng(int(seed)), progress)
        draws = draws.cpu()
        sd = draws.std(0, unbiased=False) if samples > 1 else torch.zeros_like(draws[0])
        return draws.mean(0).numpy().astype(np.float32), sd.numpy().astype(np.float32)
