"""What every metric builds on: input checks ((N, G) float matrices, spot coordinates) and the per-gene Pearson r."""

from __future__ import annotations

from typing import Any
import numpy as np
from stgen.errors import InputError


def _as_2d_float(x: Any, name: str) -> np.ndarray:
    """Convert to a 2-D float64 array (densifying sparse input); raise InputError otherwise."""
    if hasattr(x, "toarray"):
        x = x.toarray()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: cannot convert to a float array ({exc})") from exc
    if a.ndim != 2:
        raise InputError(f"{name}: expected a 2-D array (spots x genes), got shape {a.shape}")
    return a


def _same_shape_pair(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both as 2-D float64 arrays of equal shape (InputError otherwise)."""
    p = _as_2d_float(pred, "pred")
    t = _as_2d_float(true, "true")
    if p.shape != t.shape:
        raise InputError(f"pred and true differ in shape: pred {p.shape} vs true {t.shape}")
    return p, t


def _check_pair(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_same_shape_pair` plus finiteness."""
    p, t = _same_shape_pair(pred, true)
    if not np.isfinite(p).all():
        raise InputError(f"pred (shape {p.shape}) contains NaN or infinite values")
    if not np.isfinite(t).all():
        raise InputError(f"true (shape {t.shape}) contains NaN or infinite values")
    return p, t


def _standardised_columns(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre columns and scale them to unit L2 norm.

    Returns ``(z, const)`` where ``z`` has shape (N, G) and ``const`` (G,) marks
    exactly-constant columns (their ``z`` column is all zeros).
    """
    const = np.ptp(x, axis=0) == 0 if x.shape[0] > 0 else np.ones(x.shape[1], dtype=bool)
    xc = x - x.mean(axis=0, keepdims=True)
    norm = np.sqrt(np.einsum("ij,ij->j", xc, xc))
    const |= norm == 0
    safe = np.where(const, 1.0, norm)
    z = xc / safe
    z[:, const] = 0.0
    return z, const


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson correlation over spots for every gene.

    Parameters
    ----------
    pred, true : array_like, shape (N, G)
        Predicted and measured expression (spots x genes), same units.

    Returns
    -------
    np.ndarray, shape (G,), float64
        ``r_g = sum_i (p_ig - mean p_g)(t_ig - mean t_g) /
        sqrt(sum_i (p_ig - mean p_g)^2 * sum_i (t_ig - mean t_g)^2)``,
        clipped to [-1, 1]. NaN where either column is constant (all values
        identical), since r is undefined there.

    Raises
    ------
    InputError
        If the arrays are not 2-D of equal shape.
    """
    p, t = _same_shape_pair(pred, true)
    zp, cp = _standardised_columns(p)
    zt, ct = _standardised_columns(t)
    r = np.einsum("ij,ij->j", zp, zt)
    r = np.clip(r, -1.0, 1.0)
    r[cp | ct] = np.nan
    return r


def _coords(coords: Any, n_spots: int | None = None) -> np.ndarray:
    """Spot centres as a finite (N, 2) float64 array; InputError otherwise."""
    try:
        c = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"coords: cannot convert to a float array ({exc})") from exc
    if c.ndim != 2 or c.shape[1] != 2:
        raise InputError(f"coords: expected shape (N, 2) spot centres, got {c.shape}")
    if n_spots is not None and c.shape[0] != n_spots:
        raise InputError(f"coords: {c.shape[0]} spot centres given for expression with {n_spots} spots")
    bad = ~np.isfinite(c).all(axis=1)
    if bad.any():
        raise InputError(
            f"coords: {int(bad.sum())} of {c.shape[0]} spots have NaN or infinite coordinates "
            f"(first at row {int(np.flatnonzero(bad)[0])})"
        )
    return c


def _finite_mean(x: Any) -> float:
    """Mean of the finite entries of ``x``; NaN if there are none."""
    a = np.asarray(x, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _finite_pair_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two 1-D vectors over the entries finite in both; NaN if < 2 remain or one is constant."""
    keep = np.isfinite(a) & np.isfinite(b)
    if int(keep.sum()) < 2:
        return float("nan")
    return float(pearson_per_gene(a[keep, None], b[keep, None])[0])
