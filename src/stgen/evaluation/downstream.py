"""Downstream checks of predicted expression (FLAG Sec. 4.5 and App. H.9).

Besides per-gene accuracy, a useful prediction should support the analyses a
biologist runs on measured spatial data:

* spatial domains: Leiden clusters of the predicted section should agree with
  those of the measured one (ARI, NMI);
* marker genes: one-vs-rest Wilcoxon DEGs of each (true) domain should be
  recovered from the prediction (top-K overlap);
* spatial autocorrelation: per-gene Moran's I of prediction vs truth (SSC),
  shown as a scatter plot, and the gene-gene co-expression of a gene module.

All clustering and testing follows the standard scanpy workflow on AnnData
copies (inputs are never modified). scanpy is imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
import numpy as np
from stgen.errors import InputError
from stgen.evaluation.basics import _as_2d_float, _check_pair, _finite_pair_correlation
from stgen.evaluation.metrics import align_prediction_to_truth, prediction_coords
from stgen.evaluation.spatial import morans_i_pair
from stgen.evaluation.plots import plot_corr_heatmaps, save_figure


__all__ = [
    "spatial_domains",
    "domain_agreement",
    "deg_overlap",
    "domain_and_marker_scores",
    "run_downstream",
    "plot_morans_scatter",
    "plot_coexpression",
]


def _expression(expr: Any, name: str) -> np.ndarray:
    """(N, G) float64 copy of an array or of ``AnnData.X``; finite, else InputError."""
    x = _as_2d_float(expr.X if hasattr(expr, "obs_names") and hasattr(expr, "X") else expr, name)
    if not np.isfinite(x).all():
        raise InputError(f"{name} (shape {x.shape}) contains NaN or infinite values")
    return np.array(x, dtype=np.float64, copy=True)


def spatial_domains(
    expr: Any,
    n_pcs: int = 20,
    n_neighbors: int = 15,
    resolution: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Leiden spatial domains of one section (standard scanpy workflow).

    Steps, on a private AnnData copy: drop zero-variance genes;
    ``sc.pp.scale`` (z-score per gene); ``sc.tl.pca`` with
    ``n_comps = min(n_pcs, G' - 1, N - 1)`` (G' = genes kept);
    ``sc.pp.neighbors(n_neighbors=min(n_neighbors, N - 1))`` on the PCs;
    ``sc.tl.leiden(flavor="igraph", n_iterations=2, resolution=resolution,
    random_state=seed)``. Clustering uses expression only, not coordinates.

    Parameters
    ----------
    expr : array_like (N, G) or anndata.AnnData
        Expression (log2(count + 1)); for AnnData, ``.X`` is used. Never
        modified.
    n_pcs : int, default 20
    n_neighbors : int, default 15
    resolution : float, default 0.5
        Leiden resolution (higher -> more domains).
    seed : int, default 0
        Seed of PCA and Leiden; the result is deterministic for a given seed.

    Returns
    -------
    np.ndarray, shape (N,), int64
        Domain label per spot, 0..D-1 (scanpy's Leiden numbering, largest
        domain first). All 0 (one domain) if no gene varies. With exactly one
        varying gene the neighbour graph is built on that gene (no PCA).

    Raises
    ------
    InputError
        If ``expr`` is not 2-D, has NaN/inf, fewer than 3 spots, or the
        parameters are out of range.
    """
    import anndata as ad
    import scanpy as sc

    x = _expression(expr, "expr")
    n = x.shape[0]
    if n < 3:
        raise InputError(f"expr: spatial domains need at least 3 spots, got shape {x.shape}")
    if int(n_pcs) != n_pcs or n_pcs < 1 or int(n_neighbors) != n_neighbors or n_neighbors < 2:
        raise InputError(f"n_pcs must be >= 1 and n_neighbors >= 2 (integers), got {n_pcs!r}, {n_neighbors!r}")
    if not resolution > 0:
        raise InputError(f"resolution must be > 0, got {resolution!r}")
    x = x[:, np.ptp(x, axis=0) > 0]
    g = x.shape[1]
    if g == 0:
        return np.zeros(n, dtype=np.int64)
    adata = ad.AnnData(x)
    sc.pp.scale(adata)
    n_comps = min(int(n_pcs), g - 1, n - 1)
    if n_comps >= 1:
        sc.tl.pca(adata, n_comps=n_comps, random_state=seed)
        sc.pp.neighbors(adata, n_neighbors=min(int(n_neighbors), n - 1), n_pcs=n_comps, random_state=seed)
    else:
        sc.pp.neighbors(adata, n_neighbors=min(int(n_neighbors), n - 1), use_rep="X", random_state=seed)
    sc.tl.leiden(adata, resolution=float(resolution), flavor="igraph", n_iterations=2,
                 random_state=seed, directed=False)
    return adata.obs["leiden"].astype(int).to_numpy(dtype=np.int64)


def _label_agreement(true_labels: np.ndarray, pred_labels: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {
        "ari": float(adjusted_rand_score(true_labels, pred_labels)),
        "nmi": float(normalized_mutual_info_score(true_labels, pred_labels)),
        "n_domains_true": int(np.unique(true_labels).size),
        "n_domains_pred": int(np.unique(pred_labels).size),
    }


def domain_agreement(pred: Any, true: Any, **kw: Any) -> dict[str, Any]:
    """Agreement of the spatial domains of prediction and truth.

    Each matrix is clustered independently with :func:`spatial_domains`
    (``kw`` is passed on) and the two labelings are compared with
    :func:`sklearn.metrics.adjusted_rand_score` and
    :func:`sklearn.metrics.normalized_mutual_info_score` (arithmetic mean
    normalisation).

    Parameters
    ----------
    pred, true : array_like or AnnData, shape (N, G)
        Same spots in the same order.

    Returns
    -------
    dict
        ``ari`` (in [-0.5, 1], 1 = identical partitions, ~0 = chance),
        ``nmi`` (in [0, 1]), ``n_domains_true``, ``n_domains_pred``.

    Raises
    ------
    InputError
        On shape mismatches or as :func:`spatial_domains`.
    """
    p = _expression(pred, "pred")
    t = _expression(true, "true")
    _check_pair(p, t)
    return _label_agreement(spatial_domains(t, **kw), spatial_domains(p, **kw))


def _top_markers(x: np.ndarray, inside: np.ndarray, n_top: int) -> list[str]:
    """Names (column indices as str) of the ``n_top`` highest-scoring Wilcoxon genes of ``inside`` vs rest."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    adata = ad.AnnData(x)
    adata.var_names = [str(j) for j in range(x.shape[1])]
    adata.obs["group"] = pd.Categorical(np.where(inside, "in", "rest"), categories=["in", "rest"])
    adata.uns["log1p"] = {"base": 2}
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        sc.tl.rank_genes_groups(adata, "group", groups=["in"], reference="rest", method="wilcoxon",
                                n_genes=n_top)
    return [str(v) for v in adata.uns["rank_genes_groups"]["names"]["in"][:n_top]]


def deg_overlap(
    pred: Any,
    true: Any,
    genes: Sequence[str],
    domains: Any = None,
    top: Sequence[int] = (20, 50),
) -> dict[str, Any]:
    """Overlap of per-domain marker genes (DEGs) found in prediction and truth.

    For each domain, a one-vs-rest Wilcoxon rank-sum test
    (``sc.tl.rank_genes_groups(method="wilcoxon")``, genes ranked by score,
    i.e. up-regulated in the domain first) is run on the true and on the
    predicted expression; the overlap of the domain is
    ``|topK_pred ∩ topK_true| / K``. The reported value is the mean over the
    domains with at least 2 spots inside and 2 outside (others are skipped:
    the test needs two samples per group).

    Parameters
    ----------
    pred, true : array_like or AnnData, shape (N, G)
    genes : sequence of str, length G
        Gene names (checked against G; overlap is computed on columns).
    domains : array_like, shape (N,), optional
        Domain label per spot; default: :func:`spatial_domains` of ``true``.
    top : sequence of int, default (20, 50)
        The K values. If G < K, K = G is used (the overlap is then 1 by
        construction); the key keeps the requested K.

    Returns
    -------
    dict
        ``deg_top{K}`` for each K (float in [0, 1]; NaN if no domain
        qualifies) and ``n_domains`` (domains averaged over).

    Raises
    ------
    InputError
        On shape mismatches, ``len(genes) != G``, ``domains`` of the wrong
        length, or K < 1.
    """
    p = _expression(pred, "pred")
    t = _expression(true, "true")
    _check_pair(p, t)
    n, g = t.shape
    n_names = len(list(genes))
    if n_names != g:
        raise InputError(f"genes: {n_names} names given for {g} columns (pred/true shape {t.shape})")
    ks = [int(k) for k in top]
    if not ks or min(ks) < 1:
        raise InputError(f"top: expected positive integers, got {list(top)!r}")
    labels = spatial_domains(t) if domains is None else np.asarray(domains).ravel()
    if labels.shape[0] != n:
        raise InputError(f"domains: {labels.shape[0]} labels given for {n} spots")
    kmax = min(max(ks), g)
    overlaps: dict[int, list[float]] = {k: [] for k in ks}
    values, counts = np.unique(labels, return_counts=True)
    for value, count in zip(values, counts):
        if count < 2 or n - count < 2:
            continue
        inside = labels == value
        ranked_t = _top_markers(t, inside, kmax)
        ranked_p = _top_markers(p, inside, kmax)
        for k in ks:
            kk = min(k, g)
            overlaps[k].append(len(set(ranked_t[:kk]) & set(ranked_p[:kk])) / kk)
    out: dict[str, Any] = {
        f"deg_top{k}": (float(np.mean(v)) if v else float("nan")) for k, v in overlaps.items()
    }
    out["n_domains"] = len(overlaps[ks[0]])
    return out


def domain_and_marker_scores(pred: Any, true: Any, genes: Sequence[str], seed: int = 0,
                             true_domains: Any = None) -> dict[str, Any]:
    """:func:`domain_agreement` and :func:`deg_overlap` of one prediction, default settings.

    The truth is clustered once (:func:`spatial_domains`, ``seed``) and its
    domains serve both checks, so the result equals
    ``{**domain_agreement(pred, true, seed=seed), **deg_overlap(pred, true, genes)}``
    (for ``seed=0``, the default of both). ``true_domains``, if given, must be
    ``spatial_domains(true, seed=seed)`` (a caller scoring several predictions
    of one truth clusters it once).

    Returns
    -------
    dict
        ``ari``, ``nmi``, ``n_domains_true``, ``n_domains_pred``,
        ``deg_top20``, ``deg_top50`` and ``n_domains``.
    """
    p, t = _check_pair(_expression(pred, "pred"), _expression(true, "true"))
    if true_domains is None:
        true_domains = spatial_domains(t, seed=seed)
    out = _label_agreement(np.asarray(true_domains), spatial_domains(p, seed=seed))
    out.update(deg_overlap(p, t, genes, domains=true_domains))
    return out


def plot_morans_scatter(
    morans_true: Any,
    morans_pred: Any,
    out_png: str | os.PathLike,
    ssc: Any = None,
    title: str | None = None,
) -> None:
    """Scatter of per-gene Moran's I, truth (x) vs prediction (y), with y = x.

    One panel, or one panel per model when ``morans_pred`` is a mapping
    (model -> vector; the benchmark's ``morans_<section>.png``).

    Parameters
    ----------
    morans_true : array_like, shape (G,), or mapping name -> array_like
        Moran's I per gene of the truth (:func:`stgen.evaluation.spatial.morans_i`); a
        mapping gives each panel its own truth vector (models whose panels
        differ), keyed like ``morans_pred``.
    morans_pred : array_like, shape (G,), or mapping name -> array_like
        Moran's I per gene of the prediction(s). Genes NaN in the truth or
        the prediction are not drawn (their number is given in the panel title).
    out_png : path
        Destination PNG (written atomically by :func:`stgen.evaluation.plots.save_figure`).
    ssc : float or mapping name -> float, optional
        Spatial structural correlation shown in each panel title ("n/a" if
        missing or NaN).
    title : str, optional
        Figure title (multi-panel figures).

    Raises
    ------
    InputError
        If a pair of vectors is not 1-D of equal length, the mappings' keys
        differ, or ``morans_pred`` is an empty mapping.
    """
    import matplotlib.pyplot as plt

    multi = isinstance(morans_pred, Mapping)
    preds = dict(morans_pred) if multi else {"": morans_pred}
    if not preds:
        raise InputError("morans_pred: no prediction to plot")
    if isinstance(morans_true, Mapping) and set(morans_true) != set(preds):
        raise InputError(f"morans_true / morans_pred: different names {sorted(morans_true)} and {sorted(preds)}")
    panels = []
    for name, pred_i in preds.items():
        it = np.asarray(morans_true[name] if isinstance(morans_true, Mapping) else morans_true, dtype=np.float64)
        ip = np.asarray(pred_i, dtype=np.float64)
        if it.ndim != 1 or it.shape != ip.shape:
            raise InputError(f"morans_true / morans_pred{f'[{name!r}]' if multi else ''}: expected two 1-D vectors "
                             f"of equal length, got {it.shape} and {ip.shape}")
        s = ssc.get(name) if isinstance(ssc, Mapping) else ssc
        panels.append((name, it, ip, s))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    for ax, (name, it, ip, s) in zip(axes[0], panels):
        keep = np.isfinite(it) & np.isfinite(ip)
        ax.scatter(it[keep], ip[keep], s=10, alpha=0.7, linewidths=0)
        both = np.concatenate([it[keep], ip[keep]])
        lo, hi = (float(both.min()), float(both.max())) if both.size else (-1.0, 1.0)
        pad = 0.05 * max(hi - lo, 1e-6)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.4", linewidth=0.8, linestyle="--",
                label="y = x")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("Moran's I (truth)")
        if ax is axes[0, 0]:
            ax.set_ylabel("Moran's I (prediction)")
        ssc_txt = f"{s:.3f}" if s is not None and np.isfinite(s) else "n/a"
        head = f"{name}: SSC = {ssc_txt}" if multi else f"Moran's I per gene, SSC = {ssc_txt}"
        if (~keep).any():
            head += f"\n({int((~keep).sum())} constant gene(s) not shown)"
        ax.set_title(head, fontsize=10)
        ax.legend(frameon=False, fontsize=8, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, out_png)


def plot_coexpression(
    pred: Any,
    true: Any,
    genes: Sequence[str],
    out_png: str | os.PathLike,
    module_genes: Sequence[str] | None = None,
    n_top: int = 30,
) -> list[str]:
    """Side-by-side gene-gene correlation heatmaps (truth, prediction) of a module.

    The module is ``module_genes`` if given, else the ``n_top`` genes with the
    highest variance in ``true``. Drawing is done by
    :func:`stgen.evaluation.plots.plot_corr_heatmaps`: genes ordered by average-linkage
    hierarchical clustering (``scipy.cluster.hierarchy``) of the TRUE
    correlation matrix, distance ``1 - r``; the prediction panel's title
    gives the gene-gene agreement r with the truth.

    Parameters
    ----------
    pred, true : array_like, shape (N, G)
    genes : sequence of str, length G
    out_png : path
        Destination PNG (written atomically).
    module_genes : sequence of str, optional
        Genes of the module; names not in ``genes`` are ignored.
    n_top : int, default 30

    Returns
    -------
    list of str
        The module genes used (panel order).

    Raises
    ------
    InputError
        On shape mismatches, or if fewer than 2 module genes are in the panel.
    """
    p, t = _check_pair(_expression(pred, "pred"), _expression(true, "true"))
    names = [str(x) for x in genes]
    if len(names) != t.shape[1]:
        raise InputError(f"genes: {len(names)} names given for {t.shape[1]} columns (pred/true shape {t.shape})")
    if module_genes is None:
        cols = np.sort(np.argsort(-t.var(axis=0), kind="stable")[: int(n_top)])
    else:
        wanted = {str(x) for x in module_genes}
        cols = np.array([j for j, name in enumerate(names) if name in wanted], dtype=np.int64)
    if cols.size < 2:
        raise InputError(
            f"module: need at least 2 panel genes for a co-expression heatmap, got {cols.size} "
            f"(module_genes={list(module_genes)[:10] if module_genes is not None else None})"
        )
    used = [names[j] for j in cols]
    plot_corr_heatmaps(t[:, cols], {"prediction": p[:, cols]}, used, out_png, max_genes=int(cols.size))
    return used


def run_downstream(
    pred_adata: Any,
    truth_adata: Any,
    out_dir: str | os.PathLike | None = None,
    module_genes: Sequence[str] | None = None,
    k: int = 8,
) -> dict[str, Any]:
    """All downstream checks for one predicted section.

    Spots and genes are aligned with
    :func:`stgen.evaluation.metrics.align_prediction_to_truth` (spots shared, in
    prediction order; the prediction's genes); coordinates are the
    prediction's ``obsm['spatial']`` for those spots.

    Parameters
    ----------
    pred_adata, truth_adata : anndata.AnnData
        Prediction (with ``obsm['spatial']``, shape (N, 2)) and truth, same
        units (log2(count + 1)).
    out_dir : path, optional
        If given, ``morans_scatter.png`` (:func:`plot_morans_scatter`) and
        ``coexpression.png`` (:func:`plot_coexpression`) are written there
        (atomically; the folder is created).
    module_genes : sequence of str, optional
        Module of the co-expression figure (default: 30 most variable true
        genes).
    k : int, default 8
        Neighbours of the spatial graph for Moran's I / SSC.

    Returns
    -------
    dict (JSON-safe)
        ``ari``, ``nmi``, ``n_domains_true``, ``n_domains_pred``
        (:func:`domain_agreement`), ``deg_top20``, ``deg_top50``,
        ``n_domains`` (:func:`deg_overlap` on the true domains), ``ssc``
        (:func:`stgen.evaluation.spatial.spatial_structural_correlation`), ``n_spots``,
        ``n_genes``; with ``out_dir`` also ``figures`` (name -> path) and
        ``module_genes``.

    Raises
    ------
    InputError
        If alignment fails, ``obsm['spatial']`` is missing or not (N, 2), or
        as the functions above.
    """
    p, t, genes, spots = align_prediction_to_truth(pred_adata, truth_adata)
    coords = prediction_coords(pred_adata, spots)
    if coords is None:
        raise InputError("pred_adata: obsm['spatial'] (spot coordinates, shape (N, 2)) is missing")
    p, t = _check_pair(p, t)

    out: dict[str, Any] = domain_and_marker_scores(p, t, genes)
    morans_p, morans_t = morans_i_pair(p, t, coords, k)
    out["ssc"] = _finite_pair_correlation(morans_p, morans_t)  # = spatial_structural_correlation(p, t, coords, k)
    out["n_spots"] = int(t.shape[0])
    out["n_genes"] = int(t.shape[1])
    if out_dir is not None:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        scatter = folder / "morans_scatter.png"
        plot_morans_scatter(morans_t, morans_p, scatter, ssc=out["ssc"])
        coexpr = folder / "coexpression.png"
        out["module_genes"] = plot_coexpression(p, t, genes, coexpr, module_genes=module_genes)
        out["figures"] = {"morans_scatter": str(scatter), "coexpression": str(coexpr)}
    return out
