"""The pre-training settings of the embedded backbone (YAML section ``pretrain``); no torch import, so the
configuration loads fast."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PretrainConfig:
    """Masked auto-encoding pre-training of the embedded expression backbone."""

    corpus: list[str] | None = None  # default: all Her2ST sections except the imaged (evaluated) ones
    n_genes: int | None = None  # backbone vocabulary cap (top by corpus mean); None = every corpus gene in CellFM's vocabulary
    genes_per_step: int = 256  # gene subset per step, drawn with probability ~ corpus mean + 10% of its average
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 8
    value_bins: int = 64
    epochs: int = 10  # ~1,900 optimizer steps on the 12,427 corpus spots (3 epochs left gene-gene coupling weak)
    batch_size: int = 64
    lr: float = 1e-3
    min_mask: float = 0.1
    max_mask: float = 1.0  # up to fully masked spots: HINGE's sampler starts there
    seed: int = 42
