"""FLAG's hyper-parameters (YAML section ``flag``): architecture, VE-SDE, training and sampler, in one dataclass.

:meth:`FlagConfig.architecture` is the part a trained run needs to rebuild its network
(``run.json['flag']['config']``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from stgen.errors import InputError
from stgen.sampling.vesde import VESDE
from stgen.utils.config import check_divisible, coerce_numbers

#: the fields that define the network (stored in run.json; the rest is training and sampling)
ARCH_FIELDS = ("dim", "graph_layers", "graph_heads", "dit_layers", "dit_heads", "mlp_ratio", "align_layer", "dropout",
               "knn", "sigma_min", "sigma_max")


@dataclass
class FlagConfig:
    """FLAG model, VE-SDE and training (FLAG Sec. 3.4-3.6, App. G, Table 5).

    The architecture is much smaller than Table 5 (graph 6 x 384, DiT 12 x 384)
    so that one Her2ST fold (~2,000 training spots, 300 genes) trains in ~5 min
    and a ~600-spot section predicts in ~1 min on a 2-core CPU: DiT attention
    over 300 gene tokens dominates the cost, so the DiT is 2 blocks x 32 wide
    with 2 heads (fewer, wider heads run ~3x faster on CPU), and
    steps x samples = 10 x 10 (200 denoiser calls) instead of 18 x 5. Measured
    with one torch thread beside another job (synthetic 4 x 500 spots, 300
    genes, 1280-d features): 0.38-0.42 s per training step (a 128-spot crop),
    6-8 s per validation (2 Euler steps), 0.6-0.8 s per denoiser call on 600
    spots: 3.7-4.2 min of training, ~2-2.5 min to predict a 600-spot section
    (C2, 187 spots: 996 s of training and 44 s for 3 samples, both beside other jobs).
    Training uses random spatially contiguous crops (``crop_spots``) instead of
    whole sections for speed; prediction always runs on whole sections.

    Architecture (:data:`ARCH_FIELDS`, stored in ``run.json``): ``dim`` width of graph nodes and gene tokens;
    ``graph_layers``/``graph_heads`` graph-transformer depth and heads; ``dit_layers``/``dit_heads`` gene-DiT
    depth and heads; ``mlp_ratio`` feed-forward expansion; ``align_layer`` the DiT block (1-based) whose gene
    tokens are aligned to the GFM embeddings; ``dropout``; ``knn`` graph neighbours; ``sigma_min``/``sigma_max``
    VE-SDE noise limits. InputError names the first field out of its range.
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
    # DSM weight of ||D - x0||^2: edm = (sigma^2 + 1) / sigma^2 (Karras et al., whose VE-SDE FLAG cites) |
    # ve = 1 / sigma^2 (lambda = sigma^2 on the score, Song et al.). With ve the high-noise levels, where the
    # histology decides the sample, get ~1/sigma^2 of the weight: on a synthetic fixture 300 steps of ve left the
    # held-out MSE at the target variance (0.40 -> 0.44), edm reached 0.03 (see stgen.sampling.vesde)
    loss_weighting: str = "edm"
    align_weight: float = 0.5  # weight of the GFM alignment loss (0: off)
    lr: float = 2e-3  # constant; Table 5: 1e-4 for far more steps, which barely moves in a 500-step budget
    weight_decay: float = 0.01  # AdamW (Table 5)
    grad_clip: float = 1.0  # gradient-norm clip (Table 5)
    max_steps: int = 500  # optimiser steps, one crop (one noise level) each
    val_every: int = 100  # steps between validations (best-validation weights are kept)
    crop_spots: int = 128  # train on random spatially contiguous crops of at most this many spots (speed)
    val_fraction: float = 0.1  # spots of each training section held out of the loss for validation
    val_steps: int = 2  # Euler (= DDIM) steps of the validation generation (1 sample; Heun needs >= ~6 steps)
    steps: int = 10  # default Heun steps at inference (2 steps denoiser calls per sample)
    samples: int = 10  # averaged samples; on C2 PCC-50 0.475 (1 sample), 0.573 (3), 0.634 (10): FLAG samples are noisy
    seed: int = 42
    precision: str = "32-true"  # Lightning precision for training (also used to sample)

    def __post_init__(self) -> None:
        coerce_numbers(self, "flag")
        for name in ("dim", "graph_heads", "dit_layers", "dit_heads", "knn"):
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

    def architecture(self) -> dict:
        """The network-defining fields (:data:`ARCH_FIELDS`) as a dict, as stored in ``run.json``."""
        return {k: getattr(self, k) for k in ARCH_FIELDS}

    @classmethod
    def from_architecture(cls, arch: dict) -> "FlagConfig":
        """A config with a stored :meth:`architecture` (other fields at their defaults)."""
        unknown = set(arch) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown FLAG architecture field(s) {sorted(unknown)}")
        return cls(**arch)
