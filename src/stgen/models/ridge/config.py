"""Hyper-parameters of the ridge baseline (YAML section ``ridge``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RidgeConfig:
    """``n_components``: upper bound on the PCA components before RidgeCV (see :class:`RidgeBaseline`)."""

    n_components: int = 256
