"""FLAG's hyper-parameters (YAML section ``flag``): architecture, VE-SDE, training and sampler, in one dataclass.

:meth:`FlagConfig.architecture` is the part a trained run needs to rebuild its network
(``run.json['flag']['config']``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from stgen.errors import InputError
from stgen.sampling.vesde import VESDE
from stgen.utils.config import check_divisible, coerce_numbers, spot_pitches

#: where the GFM alignment targets come from (FlagConfig.align_target)
ALIGN_TARGETS = ("contextual", "static")

#: the fields that define the network (stored in run.json; the rest is training and sampling)
ARCH_FIELDS = ("dim", "graph_layers", "graph_heads", "dit_layers", "dit_heads", "mlp_ratio", "align_layer", "dropout",
               "knn", "sigma_min", "sigma_max", "context_radii", "ensemble")


@dataclass
class FlagConfig:
    """FLAG model, VE-SDE and training (FLAG Sec. 3.4-3.6, App. G, Table 5).

    The architecture is much smaller than Table 5 (graph 6 x 384, DiT 12 x 384;
    ``configs/flag-paper.yaml`` is that size, for a GPU) so that one Her2ST
    fold (~2,400 training spots, 300 genes) trains in 7-11 min and a ~600-spot
    section predicts in well under a minute on a 2-core CPU: DiT attention
    over 300 gene tokens dominates the cost, so the DiT is 2 blocks x 32 wide
    with 2 heads (fewer, wider heads run ~3x faster on CPU); two such
    networks (``ensemble``, stgen beyond the paper) train side by side for
    2,000 steps each, and the sampler is Euler (DDIM) with 5 steps x 10 samples
    (50 denoiser calls, alternating between the members) instead of Heun's
    18 x 5 (180). Measured costs:
    ``benchmarks/flag_step_time.py`` and docs/results.md.
    Training uses random spatially contiguous crops (``crop_spots``) instead of
    whole sections for speed; prediction always runs on whole sections.

    Architecture (:data:`ARCH_FIELDS`, stored in ``run.json``): ``dim`` width of graph nodes and gene tokens;
    ``graph_layers``/``graph_heads`` graph-transformer depth and heads; ``dit_layers``/``dit_heads`` gene-DiT
    depth and heads; ``mlp_ratio`` feed-forward expansion; ``align_layer`` the DiT block (1-based) whose gene
    tokens are aligned to the GFM embeddings; ``dropout``; ``knn`` graph neighbours; ``sigma_min``/``sigma_max``
    VE-SDE noise limits; ``context_radii`` (spot pitches, stgen beyond the paper) - each spot's image feature
    is read beside, per radius ``r``, the mean feature of the spots within ``r`` pitches
    (:func:`stgen.nn.graph.neighbour_context`, as HINGE's ``context_radii``), ``[]`` the paper's per-spot
    feature; the graph's image-similarity edges keep reading the spot's own feature; ``ensemble`` (stgen beyond
    the paper) - that many networks trained side by side, each with its own initialisation and noise, sampled
    in turn (:class:`stgen.models.flag.network.FlagEnsemble`; 1 = one network, the paper). InputError names the
    first field out of its range.
    """

    dim: int = 32  # graph-node and gene-token width (Table 5: 384)
    graph_layers: int = 2  # Table 5: 6
    graph_heads: int = 4  # Table 5: 8
    dit_layers: int = 2  # Table 5: 12
    dit_heads: int = 2  # Table 5: 6
    mlp_ratio: float = 2.0  # Table 5: 4.0
    align_layer: int = 1  # DiT block whose tokens are aligned to the GFM (Table 5: 8 of 12)
    dropout: float = 0.0
    knn: int = 32  # graph neighbours per spot, self included (FLAG: dense graph)
    sigma_px: float | None = None  # RBF length scale in pixels; None = features.patch_px (FLAG: 224)
    sigma_min: float = 0.01  # VE-SDE limits (Table 5)
    sigma_max: float = 10.0
    # regional context of the image input (spot pitches; [] = the spot's own feature, the paper)
    context_radii: list[float] = field(default_factory=list)
    # networks trained side by side and sampled in turn (a deep ensemble; 1 = the paper's one network). Each
    # member trains max_steps steps, so the fit costs about ensemble x max_steps single-network steps. Chosen on
    # the nested inner folds B4, C3, C4, C5 of outer C2 (benchmarks/nested_variants.py, docs/results.md): two
    # members of 2,000 steps against one network of 4,000 (the same training cost; the one network's best
    # checkpoint fell at 2,000-2,500 steps) gave inner-mean PCC-50 0.703 against 0.700, GSC 0.714 against 0.707,
    # SSC 0.137 against 0.141, fit 625-707 s
    ensemble: int = 2
    # DSM weight of ||D - x0||^2: edm = (sigma^2 + 1) / sigma^2 (Karras et al., whose VE-SDE FLAG cites) |
    # ve = 1 / sigma^2 (lambda = sigma^2 on the score, Song et al.). With ve the high-noise levels, where the
    # histology decides the sample, get ~1/sigma^2 of the weight: on a synthetic fixture 300 steps of ve left the
    # held-out MSE at the target variance (0.40 -> 0.44), edm reached 0.03 (see stgen.sampling.vesde)
    loss_weighting: str = "edm"
    align_weight: float = 0.5  # weight of the GFM alignment loss (0: off)
    # contextual: per-spot states of the backbone reading the spot's true expression (App. F, the paper) |
    # static: the backbone's per-gene token rows, the same for every spot (the earlier stgen FLAG; an ablation)
    align_target: str = "contextual"
    lr: float = 2e-3  # constant; Table 5: 1e-4 for far more steps, which barely moves in a 500-step budget
    weight_decay: float = 0.01  # AdamW (Table 5)
    grad_clip: float = 1.0  # gradient-norm clip (Table 5)
    # exponential moving average of the weights (decay per step; None = off, the paper): validation scores, and
    # the run keeps, the averaged weights (torch.optim.swa_utils.AveragedModel)
    ema: float | None = None
    # optimiser steps of every ensemble member, one crop (one noise level) each. Nested inner folds C5 and B4 (outer
    # C2): 500 steps gave GSC 0.41 and SSC 0.08, 3,000 steps 0.62 and 0.29 with PCC-50 +0.024; one network of
    # 4,000 steps fits the ~15 min per fold budget, and so do two members of 2,000 (the default, see ensemble)
    max_steps: int = 2000
    val_every: int = 500  # steps between validations (best-validation weights are kept)
    crop_spots: int = 128  # train on random spatially contiguous crops of at most this many spots (speed)
    val_fraction: float = 0.1  # spots of each training section held out of the loss for validation
    # validation generation: None = the inference sampler (``steps`` steps of order ``order``), ``val_samples``
    # averaged samples per ensemble member; a number = that many Euler (= DDIM) steps (the earlier, cheaper selection)
    val_steps: int | None = None
    val_samples: int = 1
    # inference sampler of the probability-flow ODE: order 1 = Euler (the DDIM step, one denoiser call a step),
    # 2 = Heun (the paper; two calls a step, overshoots when a step divides sigma by more than ~3). Chosen on
    # nested folds inside fold C2's training sections (inner C5 and B4, benchmarks/flag_noise.py, docs/results.md):
    # Euler with 5 steps had the higher inner-mean PCC-50 (0.664 against 0.629 for Heun with 10 steps, 3 samples)
    # at a quarter of the denoiser calls, GSC 0.637 against 0.648 and SSC 0.309 against 0.344
    order: int = 1
    steps: int = 5
    # averaged samples, all members together: sample k is drawn by ensemble member k % ensemble (so a count that is
    # not a multiple of ensemble weights the first members more; sd_scale was calibrated at 10)
    samples: int = 10
    # factor on the returned sd (the samples' spread), a calibration chosen on nested folds; 1 = the sampled
    # spread (the paper). Stored in run.json; runs saved before the field use 1. 3.24 is the factor at which the
    # two-member default's inner-mean coverage-90 is 0.90 on the four inner folds (unscaled: 0.47)
    sd_scale: float = 3.24
    seed: int = 42
    precision: str = "32-true"  # Lightning precision for training (also used to sample)

    def __post_init__(self) -> None:
        coerce_numbers(self, "flag")
        for name in ("dim", "graph_heads", "dit_layers", "dit_heads", "knn", "steps", "samples", "val_samples",
                     "ensemble"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"flag.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.graph_layers < 0:
            raise InputError(f"flag.graph_layers must be >= 0, got {self.graph_layers!r}")
        check_divisible(self, "flag", "dim", "graph_heads", "dit_heads")
        if not 1 <= self.align_layer <= self.dit_layers:
            raise InputError(f"flag.align_layer must be in 1..dit_layers ({self.dit_layers}), got {self.align_layer}")
        if not self.mlp_ratio > 0 or not 0 <= self.dropout < 1:
            raise InputError(f"flag.mlp_ratio must be > 0 and flag.dropout in [0, 1), "
                             f"got {self.mlp_ratio}, {self.dropout}")
        VESDE(self.sigma_min, self.sigma_max)  # validates the limits
        if self.align_target not in ALIGN_TARGETS:
            raise InputError(f"flag.align_target must be one of {ALIGN_TARGETS}, got {self.align_target!r}")
        if self.val_steps is not None and self.val_steps < 1:
            raise InputError(f"flag.val_steps must be >= 1 or null (the inference sampler), got {self.val_steps}")
        spot_pitches(self, "flag", "context_radii")
        if self.ema is not None and not 0 < self.ema < 1:
            raise InputError(f"flag.ema must be a decay in (0, 1) or null (off), got {self.ema!r}")
        if not self.sd_scale > 0:
            raise InputError(f"flag.sd_scale must be > 0, got {self.sd_scale!r}")
        if self.order not in (1, 2):
            raise InputError(f"flag.order must be 1 (Euler = DDIM) or 2 (Heun), got {self.order!r}")

    def architecture(self) -> dict:
        """The network-defining fields (:data:`ARCH_FIELDS`) as a dict, as stored in ``run.json``."""
        return {k: getattr(self, k) for k in ARCH_FIELDS}

    @classmethod
    def from_architecture(cls, arch: dict) -> "FlagConfig":
        """A config with a stored :meth:`architecture` (other fields at their defaults)."""
        unknown = set(arch) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown FLAG architecture field(s) {sorted(unknown)}")
        # runs saved before a field was added: context_radii, the spot's feature only; ensemble, one network
        return cls(**{"context_radii": [], "ensemble": 1, **arch})
