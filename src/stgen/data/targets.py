"""Expression targets: transforms of raw spot counts.

Units
-----
``log2``            : log2(count + 1) of raw UMI counts (Stem / HINGE protocol; default).
``log1p``           : ln(count + 1) of raw counts.
``normalize_log1p`` : ln(1 + target_sum * count / spot_total), i.e. counts per
                      ``target_sum`` (default 1e4, "CP10k") then natural log1p.
                      Spots with zero total stay 0.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from stgen.errors import InputError

__all__ = ["TARGET_TRANSFORMS", "transform_counts"]

TARGET_TRANSFORMS = ("log2", "log1p", "normalize_log1p")


def transform_counts(X, method: str = "log2", target_sum: float = 1e4) -> np.ndarray:
    """Transform a spots x genes raw-count matrix into regression targets.

    Parameters
    ----------
    X : dense array or scipy sparse matrix (n_spots, n_genes) of raw counts.
    method : one of :data:`TARGET_TRANSFORMS` (see module docstring for units).
    target_sum : per-spot total after normalisation (``normalize_log1p`` only).

    Returns
    -------
    Dense float32 array (n_spots, n_genes).

    Raises
    ------
    InputError : unknown ``method``, non-2-D input or ``target_sum <= 0``.
    """
    if method not in TARGET_TRANSFORMS:
        raise InputError(f"unknown target transform {method!r}; options: {', '.join(TARGET_TRANSFORMS)}")
    A = X.toarray() if sp.issparse(X) else np.asarray(X)
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2:
        raise InputError(f"count matrix must be 2-D (spots x genes), got shape {A.shape}")
    if method == "log2":
        out = np.log2(A + 1.0)
    elif method == "log1p":
        out = np.log1p(A)
    else:
        if not (target_sum > 0):
            raise InputError(f"target_sum must be > 0, got {target_sum!r}")
        tot = A.sum(axis=1, keepdims=True)
        scale = np.divide(target_sum, tot, out=np.zeros_like(tot), where=tot > 0)
        out = np.log1p(A * scale)
    return out.astype(np.float32)
