"""TRIPLEX's hyper-parameters (YAML section ``triplex``).

Defaults follow the authors' Her2ST configuration (``config/her2st/TRIPLEX.yaml`` of NEXGEM/TRIPLEX, read for
its settings): a 5 x 5 neighbourhood, depths 1 (fusion) / 5 (global) / 4 (neighbour), MLP ratio 4, dropouts
0.4 / 0.3 / 0.3, distillation weight 0.3, Adam at 1e-4 with StepLR(50, 0.9), batch 128, at most 200 epochs,
early stopping patience 20. The width is 128 instead of the authors' 512 (ResNet-18 features): the frozen
encoder features are projected to it, and a 2-core CPU trains it in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

from stgen.errors import InputError
from stgen.utils.config import check_divisible, check_ranges, coerce_numbers

STRIDES = ("pitch", "patch")
#: the fields that fix the network (stored in run.json)
ARCH_FIELDS = ("dim", "fusion_layers", "global_layers", "neighbour_layers", "fusion_heads", "global_heads",
               "neighbour_heads", "mlp_ratio", "fusion_dropout", "global_dropout", "neighbour_dropout",
               "n_neighbours", "kernel_size", "neighbour_stride", "snap")


@dataclass
class TriplexConfig:
    """Hyper-parameters of :class:`stgen.models.triplex.model.Triplex`.

    Attributes
    ----------
    dim : token width (authors: 512).
    fusion_layers, global_layers, neighbour_layers : depths of the fusion cross-attention, the global
        (whole-section) and the neighbourhood transformers (authors, Her2ST: 1, 5, 4). The global encoder is one
        layer, the positional-encoding generator, then ``global_layers - 1`` layers.
    fusion_heads, global_heads, neighbour_heads : attention heads (authors: 4, 8, 4).
    mlp_ratio : feed-forward width / ``dim`` (authors: 4).
    fusion_dropout, global_dropout, neighbour_dropout : dropout rates (authors: 0.4, 0.3, 0.3).
    n_neighbours : side of the neighbourhood grid (authors: 5, i.e. 5 x 5 patches).
    neighbour_stride : ``pitch`` (neighbour patches centred at the spot pitch around the spot, default) or
        ``patch`` (adjacent tiles of the spot-patch size, as the authors' preprocessing cuts them).
    snap : a neighbour position closer than ``snap x stride`` to a measured spot takes that spot's own patch
        features (the same tile up to the spot's offset from the lattice); only the others are encoded
        (0: every position is encoded).
    kernel_size : kernel of the positional-encoding generator on the spot lattice (authors: 3).
    alpha : distillation weight of each single-view head (authors: 0.3).
    lr, step_size, gamma : Adam learning rate and StepLR schedule in epochs (authors: 1e-4, 50, 0.9).
    batch_size, max_epochs, patience : spots per step, epoch limit, early-stopping patience on the validation
        MSE (authors: 128, 200, 20 on the mean Pearson r).
    val_fraction : spots of each training section held out to pick the best epoch.
    predict_batch_size : spots per forward pass at prediction.
    seed : initialisation, validation split and batch order.
    """

    dim: int = 128
    fusion_layers: int = 1
    global_layers: int = 5
    neighbour_layers: int = 4
    fusion_heads: int = 4
    global_heads: int = 8
    neighbour_heads: int = 4
    mlp_ratio: float = 4.0
    fusion_dropout: float = 0.4
    global_dropout: float = 0.3
    neighbour_dropout: float = 0.3
    n_neighbours: int = 5
    neighbour_stride: str = "pitch"
    snap: float = 0.25
    kernel_size: int = 3
    alpha: float = 0.3
    lr: float = 1e-4
    step_size: int = 50
    gamma: float = 0.9
    batch_size: int = 128
    max_epochs: int = 200
    patience: int = 20
    val_fraction: float = 0.1
    predict_batch_size: int = 512
    seed: int = 42

    def __post_init__(self) -> None:
        coerce_numbers(self, "triplex")
        check_ranges(self, "triplex",
                     at_least_1=("dim", "fusion_layers", "global_layers", "neighbour_layers", "fusion_heads",
                                 "global_heads", "neighbour_heads", "n_neighbours", "kernel_size", "step_size",
                                 "batch_size", "predict_batch_size"),
                     at_least_0=("max_epochs", "patience", "snap"), positive=("mlp_ratio", "lr", "gamma"),
                     fraction=("fusion_dropout", "global_dropout", "neighbour_dropout", "val_fraction", "alpha"))
        check_divisible(self, "triplex", "dim", "fusion_heads", "global_heads", "neighbour_heads")
        if self.n_neighbours % 2 == 0 or self.kernel_size % 2 == 0:
            raise InputError(f"triplex.n_neighbours and triplex.kernel_size must be odd (the spot at the centre), "
                             f"got {self.n_neighbours}, {self.kernel_size}")
        if self.neighbour_stride not in STRIDES:
            raise InputError(f"unknown triplex.neighbour_stride {self.neighbour_stride!r}; choose one of {STRIDES}")
        if self.snap >= 0.5:
            raise InputError(f"triplex.snap must be < 0.5 (a fraction of the stride), got {self.snap}")

    def architecture(self) -> dict:
        """The network-defining fields (:data:`ARCH_FIELDS`) as stored in ``run.json``."""
        return {k: getattr(self, k) for k in ARCH_FIELDS}
