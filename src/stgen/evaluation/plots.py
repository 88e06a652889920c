"""Figures: spatial expression maps, gene-gene correlation heatmaps, metric bars.

All figures are rendered with the non-interactive Agg backend and written to PNG
atomically (a failed render never leaves a partial file at the destination).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from stgen.errors import InputError  # noqa: E402
from stgen.utils.io import atomic_path
from stgen.evaluation.metrics import gene_gene_corr_agreement


__all__ = ["plot_spatial_maps", "plot_corr_heatmaps", "plot_metric_bars", "plot_slide_maps", "plot_uncertainty_maps"]

_DPI = 120


def save_figure(fig: Any, out_png: str | os.PathLike) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    try:
        with atomic_path(out_png, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=_DPI, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)


def _matrix(x: Any, name: str, n_genes: int, n_spots: int | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != n_genes or (n_spots is not None and a.shape[0] != n_spots):
        want = f"({n_spots if n_spots is not None else 'N'}, {n_genes})"
        raise InputError(f"{name}: expected shape {want} (spots x panel genes), got {a.shape}")
    return a


def _corr(x: np.ndarray) -> np.ndarray:
    """Gene-gene Pearson matrix (G, G) of a (N, G) matrix; NaN rows/cols for constant genes."""
    xc = x - x.mean(axis=0, keepdims=True)
    norm = np.sqrt((xc * xc).sum(axis=0))
    const = (np.ptp(x, axis=0) == 0) | (norm == 0)
    z = xc / np.where(const, 1.0, norm)
    c = np.clip(z.T @ z, -1.0, 1.0)
    c[const, :] = np.nan
    c[:, const] = np.nan
    return c


def _map_panel(ax: Any, xy: np.ndarray, values: np.ndarray, size: float, cmap: str, vmin: float, vmax: float,
               title: str | None, ylabel: str | None) -> Any:
    """One spot map on ``ax`` (y inverted, no ticks); returns the scatter for a colour bar."""
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=size, cmap=cmap, vmin=vmin, vmax=vmax, linewidths=0)
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=10)
    return sc


def plot_spatial_maps(
    coords_xy: np.ndarray,
    truth: np.ndarray,
    preds: Mapping[str, np.ndarray],
    genes: Sequence[str],
    gene_names: Sequence[str],
    out_png: str | os.PathLike,
    title: str | None = None,
    spot_size: float | None = None,
) -> None:
    """Grid of spatial expression maps: one row per gene, truth then each model.

    Parameters
    ----------
    coords_xy : array_like, shape (N, 2)
        Spot centres in image pixels (x, y); the y axis is drawn inverted.
    truth : array_like, shape (N, G)
        Ground-truth expression over the panel ``gene_names``.
    preds : mapping model name -> array_like (N, G)
        Predictions in the same units and gene order as ``truth``.
    genes : sequence of str
        Genes to draw; those not in ``gene_names`` are skipped and listed in
        the figure title.
    gene_names : sequence of str, length G
    out_png : path
        Destination PNG (written atomically, ~120 dpi).
    title : str, optional
    spot_size : float, optional
        Marker area (points^2); default scales with the number of spots.

    Notes
    -----
    Each row shares a colour scale set by the 1st-99th percentile of the truth.

    Raises
    ------
    InputError
        On shape mismatches, or if none of ``genes`` is in ``gene_names``.
    """
    gene_names = [str(g) for g in gene_names]
    g_count = len(gene_names)
    xy = np.asarray(coords_xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise InputError(f"coords_xy: expected shape (N, 2), got {xy.shape}")
    n = xy.shape[0]
    t = _matrix(truth, "truth", g_count, n)
    p = {str(k): _matrix(v, f"preds[{k!r}]", g_count, n) for k, v in preds.items()}
    index = {g: i for i, g in enumerate(gene_names)}
    present = [str(g) for g in genes if str(g) in index]
    skipped = [str(g) for g in genes if str(g) not in index]
    if not present:
        raise InputError(
            f"genes: none of the requested genes {list(genes)[:10]} is in the panel of {g_count} genes"
        )
    columns = [("truth", t)] + list(p.items())
    nrow, ncol = len(present), len(columns)
    size = spot_size if spot_size is not None else float(np.clip(6000.0 / max(n, 1), 2.0, 40.0))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.8 * ncol + 0.8, 2.8 * nrow + 0.6), squeeze=False)
    for r, gene in enumerate(present):
        j = index[gene]
        vmin, vmax = np.percentile(t[:, j], [1, 99]) if n else (0.0, 1.0)
        if not vmax > vmin:
            vmax = vmin + 1e-6
        sc = None
        for c, (name, mat) in enumerate(columns):
            sc = _map_panel(axes[r, c], xy, mat[:, j], size, "viridis", vmin, vmax,
                            name if r == 0 else None, gene if c == 0 else None)
        if sc is not None:
            fig.colorbar(sc, ax=list(axes[r, :]), shrink=0.8, pad=0.01)
    heading = title or ""
    if skipped:
        shown = ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        heading = (heading + "\n" if heading else "") + f"skipped (not in panel): {shown}"
    if heading:
        fig.suptitle(heading, fontsize=11)
    save_figure(fig, out_png)


def plot_uncertainty_maps(
    coords_xy: np.ndarray,
    truth: np.ndarray,
    mean: np.ndarray,
    sd: np.ndarray,
    genes: Sequence[str],
    gene_names: Sequence[str],
    out_png: str | os.PathLike,
    title: str | None = None,
) -> None:
    """How to read a predictive sd: per gene, truth, predicted mean, absolute error and predicted sd.

    ``coords_xy`` (N, 2) spot centres (pixels, y drawn inverted); ``truth``, ``mean``, ``sd`` (N, G) over
    ``gene_names``, e.g. log2(count + 1). Truth and mean share a colour scale (1st-99th percentile of the
    truth), error and sd another (``magma``, 0 to the 99th percentile of both): where the sd is calibrated
    the two right-hand maps look alike, and each row's label gives the gene's ``coverage_90`` (the share of
    spots inside mean +- 1.645 sd). Genes not in ``gene_names`` are skipped; InputError on shape
    mismatches or when none of ``genes`` is in the panel.
    """
    from stgen.evaluation.metrics import Z90

    gene_names = [str(g) for g in gene_names]
    xy = np.asarray(coords_xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise InputError(f"coords_xy: expected shape (N, 2), got {xy.shape}")
    n, g_count = xy.shape[0], len(gene_names)
    t, m, s = (_matrix(a, name, g_count, n) for a, name in ((truth, "truth"), (mean, "mean"), (sd, "sd")))
    index = {g: i for i, g in enumerate(gene_names)}
    present = [str(g) for g in genes if str(g) in index]
    if not present:
        raise InputError(f"genes: none of the requested genes {list(genes)[:10]} is in the panel of {g_count} genes")
    size = float(np.clip(6000.0 / max(n, 1), 2.0, 40.0))
    fig, axes = plt.subplots(len(present), 4, figsize=(2.8 * 4 + 1.2, 2.8 * len(present) + 0.6), squeeze=False)
    for r, gene in enumerate(present):
        j = index[gene]
        err = np.abs(t[:, j] - m[:, j])
        lo, hi = np.percentile(t[:, j], [1, 99])
        hi = hi if hi > lo else lo + 1e-6
        ehi = max(float(np.percentile(np.concatenate([err, s[:, j]]), 99)), 1e-6)
        cov = float(np.mean(err <= Z90 * s[:, j]))
        panels = [("truth", t[:, j], "viridis", lo, hi), ("predicted mean", m[:, j], "viridis", lo, hi),
                  ("|truth - mean|", err, "magma", 0.0, ehi), ("predicted sd", s[:, j], "magma", 0.0, ehi)]
        for c, (name, v, cmap, vmin, vmax) in enumerate(panels):
            sc = _map_panel(axes[r, c], xy, v, size, cmap, vmin, vmax, name if r == 0 else None,
                            f"{gene}\ncoverage-90 {cov:.2f}" if c == 0 else None)
            if c in (1, 3):
                fig.colorbar(sc, ax=list(axes[r, c - 1 : c + 1]), shrink=0.8, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=11)
    save_figure(fig, out_png)


def plot_corr_heatmaps(
    truth: np.ndarray,
    preds: Mapping[str, np.ndarray],
    gene_names: Sequence[str],
    out_png: str | os.PathLike,
    max_genes: int = 60,
) -> None:
    """Side-by-side gene-gene Pearson correlation heatmaps (truth, each model).

    Parameters
    ----------
    truth : array_like, shape (N, G)
    preds : mapping model name -> array_like (N, G)
    gene_names : sequence of str, length G
    out_png : path
        Destination PNG (written atomically).
    max_genes : int
        Use at most this many genes: those with the largest variance in truth.

    Notes
    -----
    Genes are ordered by average-linkage hierarchical clustering of the truth
    matrix with distance ``1 - r`` (scipy ``leaves_list``). Panel titles give
    the gene-gene agreement r (:func:`stgen.evaluation.metrics.gene_gene_corr_agreement`)
    of each model vs truth on the shown genes. Colour scale [-1, 1], 'RdBu_r';
    NaN correlations (constant genes) are displayed as 0.

    Raises
    ------
    InputError
        On shape mismatches, ``max_genes < 2``, or fewer than 2 genes.
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    gene_names = [str(g) for g in gene_names]
    if int(max_genes) != max_genes or max_genes < 2:
        raise InputError(f"max_genes must be an integer >= 2, got {max_genes!r}")
    g_count = len(gene_names)
    if g_count < 2:
        raise InputError(f"gene_names: need at least 2 genes for a correlation heatmap, got {g_count}")
    t = _matrix(truth, "truth", g_count)
    p = {str(k): _matrix(v, f"preds[{k!r}]", g_count, t.shape[0]) for k, v in preds.items()}
    if t.shape[0] < 2:
        raise InputError(f"truth: need at least 2 spots, got shape {t.shape}")
    var = t.var(axis=0)
    sel = np.sort(np.argsort(-var, kind="stable")[: int(max_genes)])
    ct = np.nan_to_num(_corr(t[:, sel]), nan=0.0)
    np.fill_diagonal(ct, 1.0)
    dist = np.clip(1.0 - ct, 0.0, 2.0)
    dist = (dist + dist.T) / 2.0
    np.fill_diagonal(dist, 0.0)
    order = leaves_list(linkage(squareform(dist, checks=False), method="average"))
    idx = sel[order]
    names = [gene_names[i] for i in idx]
    panels: list[tuple[str, np.ndarray]] = [("truth", np.nan_to_num(_corr(t[:, idx]), nan=0.0))]
    for name, mat in p.items():
        r = gene_gene_corr_agreement(mat[:, idx], t[:, idx])
        label = f"{name}\nr vs truth = {r:.3f}" if np.isfinite(r) else f"{name}\nr vs truth = n/a"
        panels.append((label, np.nan_to_num(_corr(mat[:, idx]), nan=0.0)))
    k = len(idx)
    side = float(np.clip(0.12 * k + 2.0, 3.5, 9.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(side * len(panels) + 1.0, side + 0.6), squeeze=False)
    im = None
    fs = float(np.clip(300.0 / max(k, 1), 3.0, 9.0))
    for c, (label, mat) in enumerate(panels):
        ax = axes[0, c]
        im = ax.imshow(mat, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels(names, rotation=90, fontsize=fs)
        ax.set_yticklabels(names if c == 0 else [], fontsize=fs)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0, :]), shrink=0.8, pad=0.01, label="Pearson r")
    save_figure(fig, out_png)


def plot_metric_bars(df: Any, metric: str, out_png: str | os.PathLike) -> None:
    """Grouped bar chart of one metric: sections (folds) on x, one bar per model.

    Parameters
    ----------
    df : pandas.DataFrame
        Long format with columns ``section``, ``model`` and ``metric``; if a
        (section, model) pair repeats, its values are averaged.
    metric : str
        Column to plot (e.g. ``"pcc50"``).
    out_png : path
        Destination PNG (written atomically).

    Raises
    ------
    InputError
        If a required column is missing or the frame has no rows.
    """
    missing = [c for c in ("section", "model", metric) if c not in getattr(df, "columns", [])]
    if missing:
        cols = list(getattr(df, "columns", []))
        raise InputError(f"df: missing column(s) {missing} (have {cols})")
    if len(df) == 0:
        raise InputError("df: no rows to plot")
    table = df.pivot_table(index="section", columns="model", values=metric, aggfunc="mean", sort=False)
    sections = [str(s) for s in table.index]
    models = [str(m) for m in table.columns]
    x = np.arange(len(sections))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(sections) * max(len(models), 1) + 2.0), 3.8))
    for i, m in enumerate(models):
        vals = table.iloc[:, i].to_numpy(dtype=np.float64)
        ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width=width, label=m)
    ax.set_xticks(x)
    ax.set_xticklabels(sections, rotation=45 if len(sections) > 6 else 0, ha="right" if len(sections) > 6 else "center")
    ax.set_xlabel("section")
    ax.set_ylabel(metric)
    ax.axhline(0.0, color="0.4", linewidth=0.6)
    ax.legend(title="model", fontsize=8, frameon=False)
    ax.set_title(f"{metric} by section")
    save_figure(fig, out_png)


def plot_slide_maps(adata: Any, out_dir: str | os.PathLike, genes: Sequence[str] | None = None,
                    n_auto: int = 4) -> list[str]:
    """PNG maps of a prediction over its slide thumbnail: one per gene, plus the uncertainty.

    Parameters
    ----------
    adata : a prediction of :func:`stgen.workflows.predict.predict`: ``.X`` (N, G) mean expression in the run's
        units, ``layers['std']`` (N, G) the sample sd, ``obsm['spatial']`` full-resolution (x, y) px and
        ``uns['spatial'][library_id]`` with ``images['hires']`` and ``scalefactors`` (as scanpy reads them).
    out_dir : folder for ``<gene>.png`` and ``uncertainty.png`` (written atomically).
    genes : genes to draw (default: the ``n_auto`` genes whose predictions vary most over the spots).

    Spots are drawn as discs of the spot diameter (``spot_diameter_fullres``) over the thumbnail;
    the colour scale of a gene is its 1st-99th percentile. ``uncertainty.png`` shows the mean over genes
    of the per-spot sample sd (zero for deterministic models). Returns the written paths.

    Raises
    ------
    InputError : a gene not in ``adata.var_names``, or no ``uns['spatial']`` thumbnail.
    """
    from pathlib import Path

    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

    lib = next(iter(adata.uns.get("spatial", {}) or {}), None)
    if lib is None or "hires" not in adata.uns["spatial"][lib].get("images", {}):
        raise InputError("prediction has no uns['spatial'][...]['images']['hires'] thumbnail to draw on")
    sp = adata.uns["spatial"][lib]
    img, sf = np.asarray(sp["images"]["hires"]), sp["scalefactors"]
    scale, radius = float(sf["tissue_hires_scalef"]), 0.5 * float(sf["spot_diameter_fullres"])
    X = np.asarray(adata.X, dtype=np.float64)
    names = [str(g) for g in adata.var_names]
    if genes:
        missing = [g for g in genes if g not in names]
        if missing:
            raise InputError(f"gene(s) {missing} are not in the prediction's {len(names)} genes")
        chosen = list(genes)
    else:
        chosen = [names[j] for j in np.argsort(-X.var(0), kind="stable")[:n_auto]]
    std = np.asarray(adata.layers["std"], dtype=np.float64) if "std" in adata.layers else np.zeros_like(X)
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64) * scale
    units = (adata.uns.get("stgen") or {}).get("units", "")
    panels = [(g, X[:, names.index(g)], f"{g} ({units})" if units else g) for g in chosen]
    panels.append(("uncertainty", std.mean(1), "uncertainty: mean sample sd over genes"))
    out_dir = Path(out_dir)
    written = []
    for stem, values, title in panels:
        fig, ax = plt.subplots(figsize=(6.0, 6.0 * img.shape[0] / max(img.shape[1], 1) + 0.4))
        ax.imshow(img)
        vmin, vmax = np.percentile(values, [1, 99]) if len(values) else (0.0, 1.0)
        if not vmax > vmin:
            vmax = vmin + 1e-6
        coll = PatchCollection([Circle((x, y), radius * scale) for x, y in xy], cmap="magma" if stem ==
                               "uncertainty" else "viridis", linewidths=0, alpha=0.85)
        coll.set_array(values)
        coll.set_clim(vmin, vmax)
        ax.add_collection(coll)
        fig.colorbar(coll, ax=ax, shrink=0.7, pad=0.01)
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
        path = out_dir / f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in stem)}.png"
        save_figure(fig, path)
        written.append(str(path))
    return written
