"""Spatial metrics: the symmetric kNN spot graph, Moran's I, SSC (FLAG App. C.2) and gene-wise SSIM (HINGE supp. B)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
import numpy as np
from stgen.errors import InputError
from stgen.evaluation.basics import _as_2d_float
from stgen.evaluation.basics import _check_pair
from stgen.evaluation.basics import _coords
from stgen.evaluation.basics import _finite_pair_correlation


def spatial_knn_graph(coords: Any, k: int = 8) -> Any:
    """Symmetric binary k-nearest-neighbour graph of spot centres.

    FLAG (Si et al., 2026), App. C.2 eq. 20: ``W_ij = 1`` if ``j`` is among the
    ``k`` nearest spots of ``i`` or ``i`` is among those of ``j`` (Euclidean
    distance), else 0; the diagonal is 0.

    Parameters
    ----------
    coords : array_like, shape (N, 2)
        Spot centres, any length unit (array units or image pixels).
    k : int, default 8
        Neighbours per spot, >= 1.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (N, N), float64
        Entries 0/1, symmetric, zero diagonal. Every row has at least ``k``
        non-zeros (more where the symmetrisation adds an edge).

    Notes
    -----
    Neighbours are ordered by (distance, spot index): among spots at exactly
    the same distance the one with the lower row index is taken first, so the
    graph is deterministic also on regular lattices (where ties are the rule)
    and with duplicated coordinates. Duplicated coordinates are allowed; such
    spots are each other's neighbours at distance 0. A spot is never its own
    neighbour. Candidates are found with :class:`sklearn.neighbors.KDTree`
    (``query`` for the k-th distance, then ``query_radius``).

    Raises
    ------
    InputError
        If ``coords`` is not (N, 2), contains NaN/inf, ``k`` is not a positive
        integer, or the section has fewer than ``k + 1`` spots (message names
        N and k).
    """
    from scipy import sparse
    from sklearn.neighbors import KDTree

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    c = _coords(coords)
    n = c.shape[0]
    if n < k + 1:
        raise InputError(
            f"spatial kNN graph: a section with N={n} spots is too small for k={k} neighbours "
            f"(need N >= k + 1 = {k + 1})"
        )
    tree = KDTree(c)
    # The (k+1)-th smallest distance counting the spot itself (distance 0) is the
    # k-th smallest distance to another spot, whatever the duplicates.
    kth = tree.query(c, k=k + 1, return_distance=True)[0][:, -1]
    cand_idx, cand_dist = tree.query_radius(c, r=kth * (1.0 + 1e-9) + 1e-12, return_distance=True)
    cols = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        other = cand_idx[i] != i
        j, d = cand_idx[i][other], cand_dist[i][other]
        cols[i] = j[np.lexsort((j, d))[:k]]
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    a = sparse.csr_matrix((np.ones(n * k), (rows, cols.ravel())), shape=(n, n))
    w = sparse.csr_matrix(((a + a.T) > 0).astype(np.float64))
    w.sort_indices()
    return w


def morans_i(values: Any, graph: Any) -> np.ndarray:
    """Global Moran's I of every gene on a spatial graph.

    ``I_g = (N / W) * (z_g^T A z_g) / (z_g^T z_g)`` with ``z_g`` the gene's
    values centred over spots, ``A`` the (N, N) weight matrix and ``W`` the sum
    of its entries (FLAG App. C.2 eq. 21; Moran 1950). Computed with
    :func:`scanpy.metrics.morans_i` on the CSR graph, one gene at a time.

    Parameters
    ----------
    values : array_like, shape (N, G)
        Expression (spots x genes), any units (I is scale- and shift-invariant).
    graph : scipy.sparse matrix or array_like, shape (N, N)
        Spatial weights, e.g. :func:`spatial_knn_graph`.

    Returns
    -------
    np.ndarray, shape (G,), float64
        Moran's I per gene, about +1 for smooth maps, about -1 for
        checkerboards, about ``-1/(N-1)`` for random ones. NaN for constant
        genes (all spots equal), without a warning.

    Raises
    ------
    InputError
        If ``values`` is not 2-D or has NaN/inf, the graph is not (N, N), has
        non-finite weights, or its weights sum to 0.
    """
    from scipy import sparse

    x = _as_2d_float(values, "values")
    n, g = x.shape
    if not np.isfinite(x).all():
        raise InputError(f"values (shape {x.shape}) contains NaN or infinite values")
    w = sparse.csr_matrix(graph, dtype=np.float64) if not sparse.issparse(graph) else graph.tocsr().astype(np.float64)
    if w.shape != (n, n):
        raise InputError(f"graph: expected shape ({n}, {n}) for {n} spots, got {w.shape}")
    if not np.isfinite(w.data).all():
        raise InputError("graph: contains NaN or infinite weights")
    total = float(w.data.sum())
    if not total > 0:
        raise InputError(f"graph: weights sum to {total}; Moran's I needs a graph with edges")
    from scanpy.metrics import morans_i as scanpy_morans_i

    out = np.full(g, np.nan)
    for j in np.flatnonzero(np.ptp(x, axis=0) > 0):
        out[j] = float(scanpy_morans_i(w, np.ascontiguousarray(x[:, j])))
    return out


def spatial_structural_correlation(pred: Any, true: Any, coords: Any, k: int = 8) -> float:
    """Spatial structural correlation (SSC, FLAG App. C.2 eq. 22).

    Pearson r between the per-gene Moran's I vectors of ``pred`` and ``true``,
    both computed (:func:`morans_i`) on the symmetric kNN graph of the true spot
    coordinates (:func:`spatial_knn_graph`). Genes whose I is NaN in either
    (constant genes) are dropped.

    Parameters
    ----------
    pred, true : array_like, shape (N, G)
        Prediction and ground truth, same spots in the same order.
    coords : array_like, shape (N, 2)
        True spot centres.
    k : int, default 8
        Neighbours of the spatial graph.

    Returns
    -------
    float
        In [-1, 1]; NaN if fewer than 2 genes remain or either I vector is
        constant.

    Raises
    ------
    InputError
        On shape mismatches, non-finite values or coordinates, or a section
        with fewer than ``k + 1`` spots.
    """
    return _finite_pair_correlation(*morans_i_pair(pred, true, coords, k))


def morans_i_pair(pred: Any, true: Any, coords: Any, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene Moran's I of ``pred`` and of ``true``, both on the symmetric kNN graph of ``coords``.

    The two vectors SSC correlates (:func:`spatial_structural_correlation`),
    e.g. for a Moran's I scatter plot.

    Parameters
    ----------
    pred, true : array_like, shape (N, G)
    coords : array_like, shape (N, 2)
        True spot centres.
    k : int, default 8

    Returns
    -------
    (I_pred, I_true) : two np.ndarray of shape (G,), float64 (:func:`morans_i`; NaN for constant genes).

    Raises
    ------
    InputError
        On shape mismatches, non-finite values or coordinates, or fewer than ``k + 1`` spots.
    """
    p, t = _check_pair(pred, true)
    w = spatial_knn_graph(_coords(coords, p.shape[0]), k)
    return morans_i(p, w), morans_i(t, w)


_MAX_GRID_CELLS = 4_000_000


def _raster_layout(c: np.ndarray) -> tuple[np.ndarray, tuple[int, int]] | None:
    """Grid cell (flat index) of every spot and the grid shape; None if no positive spacing."""
    from sklearn.neighbors import NearestNeighbors

    if c.shape[0] < 2:
        return None
    d = NearestNeighbors(n_neighbors=1).fit(c).kneighbors(n_neighbors=1, return_distance=True)[0][:, 0]
    d = d[d > 0]
    if d.size == 0:
        return None
    step = float(np.median(d))
    ij = np.rint((c - c.min(axis=0)) / step).astype(np.int64)
    h, w = (int(v) + 1 for v in ij.max(axis=0))
    if h * w > _MAX_GRID_CELLS:
        raise InputError(
            f"coords: rasterising with grid step {step:g} (median nearest-neighbour distance) gives a "
            f"{h} x {w} grid, more than {_MAX_GRID_CELLS} cells; coordinates are too sparse for a spot grid"
        )
    return ij[:, 0] * w + ij[:, 1], (h, w)


def gene_ssim(pred: Any, true: Any, coords: Any, genes: Sequence[int] | None = None) -> np.ndarray:
    """Gene-wise SSIM of rasterised 2-D expression maps (HINGE supp. B).

    For each gene, prediction and truth are drawn as images on the spot grid
    and compared with :func:`skimage.metrics.structural_similarity`
    (uniform window, K1=0.01, K2=0.03).

    Rasterisation: the grid step is the median positive nearest-neighbour
    distance between spots; spot ``i`` goes to cell
    ``round((coords[i] - coords.min(0)) / step)`` (column 0 of ``coords`` is
    image axis 0). Spots landing in the same cell are averaged (this happens
    on hexagonal Visium lattices; square ST/Her2ST arrays map one-to-one).
    Both maps are min-max scaled with the TRUE gene's range over spots,
    ``(x - min_true) / (max_true - min_true)``, so the truth spans [0, 1]
    (the prediction is not clipped) and ``data_range = 1``. Empty grid cells
    are 0 in both scaled maps (the true minimum). The window is the largest
    odd size <= 7 and <= the smaller grid side.

    Parameters
    ----------
    pred, true : array_like, shape (N, G)
    coords : array_like, shape (N, 2)
        Spot centres (array units or pixels).
    genes : sequence of int, optional
        Column indices to score (default: all G).

    Returns
    -------
    np.ndarray, shape (G,) or (len(genes),), float64
        SSIM in [-1, 1] (1 for identical maps). NaN for genes constant in
        ``true``, and for all genes if the grid is smaller than 3 x 3 (or all
        spots share one position). :func:`evaluate` reports the mean over
        finite genes as ``ssim``.

    Raises
    ------
    InputError
        On shape mismatches, non-finite values/coordinates, gene indices out
        of range, or coordinates so sparse the grid exceeds 4e6 cells.
    """
    from scipy import sparse

    p, t = _check_pair(pred, true)
    c = _coords(coords, p.shape[0])
    n, g = p.shape
    cols = np.arange(g) if genes is None else np.asarray(list(genes), dtype=np.int64).ravel()
    if cols.size and (cols.min() < 0 or cols.max() >= g):
        raise InputError(f"genes: column indices must lie in [0, {g}), got {cols.tolist()[:10]}")
    out = np.full(cols.size, np.nan)
    layout = _raster_layout(c)
    if layout is None or min(layout[1]) < 3:
        return out
    from skimage.metrics import structural_similarity

    cell, (h, w) = layout
    counts = np.bincount(cell, minlength=h * w).astype(np.float64)
    to_grid = sparse.csr_matrix((1.0 / counts[cell], (cell, np.arange(n))), shape=(h * w, n))
    win = min(7, h, w)
    if win % 2 == 0:
        win -= 1
    for o, j in enumerate(cols):
        lo, hi = float(t[:, j].min()), float(t[:, j].max())
        if not hi > lo:
            continue
        img_t = (to_grid @ ((t[:, j] - lo) / (hi - lo))).reshape(h, w)
        img_p = (to_grid @ ((p[:, j] - lo) / (hi - lo))).reshape(h, w)
        out[o] = float(structural_similarity(img_t, img_p, win_size=win, data_range=1.0))
    return out
