"""Evaluation metrics for predicted spatial gene expression.

Follows the Stem / HINGE evaluation protocol: targets and predictions are
log2(count + 1) expression matrices of shape (n_spots, n_genes); per-gene
Pearson correlations over spots are summarised by the mean of the k largest
(PCC-50, PCC-200), together with MSE / MAE over all entries and FLAG's
gene-gene correlation agreement (GSC).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stgen.errors import InputError

__all__ = [
    "pearson_per_gene",
    "pcc_top_k",
    "gene_gene_corr_agreement",
    "evaluate",
    "align_prediction_to_truth",
]


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


def pcc_top_k(r: np.ndarray, k: int) -> float:
    """Mean of the ``k`` largest finite per-gene correlations (PCC-k).

    This is PCC-50 / PCC-200 of Stem and HINGE ("mean of the 50/200 largest
    per-gene Pearson correlations"). NaN entries (constant genes) are skipped.
    If fewer than ``k`` finite values exist, the mean over all finite values is
    returned; NaN only if none is finite.

    Parameters
    ----------
    r : array_like, shape (G,)
        Per-gene correlations, e.g. from :func:`pearson_per_gene`.
    k : int
        Number of top genes, >= 1.

    Raises
    ------
    InputError
        If ``k < 1`` or ``r`` is not 1-D.
    """
    if int(k) != k or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    a = np.asarray(r, dtype=np.float64)
    if a.ndim != 1:
        raise InputError(f"r: expected a 1-D array of per-gene correlations, got shape {a.shape}")
    a = a[np.isfinite(a)]
    if a.size == 0:
        return float("nan")
    k = min(int(k), a.size)
    top = np.partition(a, a.size - k)[a.size - k:]
    return float(top.mean())


def gene_gene_corr_agreement(pred: np.ndarray, true: np.ndarray) -> float:
    """Agreement of gene-gene correlation structure (FLAG's GSC).

    Computes the (G, G) gene-gene Pearson correlation matrices (over spots) of
    ``pred`` and ``true``, takes their strict upper triangles (k=1), drops pairs
    involving a constant gene in either matrix, and returns the Pearson r
    between the two vectors of pair correlations.

    Parameters
    ----------
    pred, true : array_like, shape (N, G)

    Returns
    -------
    float
        In [-1, 1]; NaN if fewer than 2 gene pairs remain or either vector of
        pair correlations is constant.

    Raises
    ------
    InputError
        If the arrays are not 2-D of equal shape.
    """
    p, t = _same_shape_pair(pred, true)
    zp, cp = _standardised_columns(p)
    zt, ct = _standardised_columns(t)
    keep = ~(cp | ct)
    zp, zt = zp[:, keep], zt[:, keep]
    g = zp.shape[1]
    iu = np.triu_indices(g, k=1)
    if iu[0].size < 2:
        return float("nan")
    vp = (zp.T @ zp)[iu]
    vt = (zt.T @ zt)[iu]
    r = pearson_per_gene(vp[:, None], vt[:, None])[0]
    return float(r)


def evaluate(pred: np.ndarray, true: np.ndarray, genes: Sequence[str]) -> dict[str, Any]:
    """All evaluation metrics for one section.

    Parameters
    ----------
    pred, true : array_like, shape (N, G)
        Prediction and ground truth in log2(count + 1) units.
    genes : sequence of str, length G
        Gene names of the columns.

    Returns
    -------
    dict
        ``pcc50``, ``pcc200`` (:func:`pcc_top_k` with k=50/200), ``mse`` and
        ``mae`` (mean over all N*G entries), ``gsc``
        (:func:`gene_gene_corr_agreement`), ``n_spots``, ``n_genes`` and
        ``per_gene_r`` (gene -> r, or None where r is NaN). All values are
        plain Python types (JSON-safe; NaN scalars are kept as float NaN).

    Raises
    ------
    InputError
        If shapes differ, are not 2-D, contain non-finite values, or
        ``len(genes) != G``.
    """
    p, t = _check_pair(pred, true)
    genes = [str(g) for g in genes]
    if len(genes) != p.shape[1]:
        raise InputError(
            f"genes: {len(genes)} names given for {p.shape[1]} columns (pred/true shape {p.shape})"
        )
    r = pearson_per_gene(p, t)
    diff = p - t
    return {
        "pcc50": pcc_top_k(r, 50),
        "pcc200": pcc_top_k(r, 200),
        "mse": float(np.mean(diff * diff)) if diff.size else float("nan"),
        "mae": float(np.mean(np.abs(diff))) if diff.size else float("nan"),
        "gsc": gene_gene_corr_agreement(p, t),
        "n_spots": int(p.shape[0]),
        "n_genes": int(p.shape[1]),
        "per_gene_r": {g: (None if not np.isfinite(v) else float(v)) for g, v in zip(genes, r)},
    }


def align_prediction_to_truth(pred_adata: Any, truth_adata: Any) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Align a prediction AnnData to a ground-truth AnnData.

    Spots are the intersection of ``obs_names`` in prediction order; genes are
    the prediction's ``var_names`` (the panel). The truth must already be in
    the same units as the prediction (e.g. log2(count + 1)).

    Returns
    -------
    pred : np.ndarray, shape (S, G), float64
    true : np.ndarray, shape (S, G), float64
    genes : list of str, length G
    spots : list of str, length S

    Raises
    ------
    InputError
        If no spot is shared, or any panel gene is missing from the truth
        (up to 10 missing genes are named).
    """
    pred_spots = [str(s) for s in pred_adata.obs_names]
    truth_spots = [str(s) for s in truth_adata.obs_names]
    truth_spot_idx = {s: i for i, s in enumerate(truth_spots)}
    spots = [s for s in pred_spots if s in truth_spot_idx]
    if not spots:
        raise InputError(
            f"prediction and truth share no spot ids (prediction: {len(pred_spots)} spots, "
            f"e.g. {pred_spots[:3]}; truth: {len(truth_spots)} spots, e.g. {truth_spots[:3]})"
        )
    genes = [str(g) for g in pred_adata.var_names]
    truth_gene_idx: dict[str, int] = {}
    for i, g in enumerate(str(g) for g in truth_adata.var_names):
        truth_gene_idx.setdefault(g, i)
    missing = [g for g in genes if g not in truth_gene_idx]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise InputError(f"{len(missing)} panel gene(s) of the prediction missing from the truth: {shown}")
    pred_row = {s: i for i, s in enumerate(pred_spots)}
    pi = np.array([pred_row[s] for s in spots], dtype=np.intp)
    ti = np.array([truth_spot_idx[s] for s in spots], dtype=np.intp)
    gi = np.array([truth_gene_idx[g] for g in genes], dtype=np.intp)
    p = _as_2d_float(pred_adata.X[pi], "pred_adata.X")
    t = _as_2d_float(truth_adata.X[ti][:, gi], "truth_adata.X")
    return p, t, genes, spots
