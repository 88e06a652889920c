"""The fixed spot graph of FLAG (App. G.1, "Construction of Observable Topology").

Every spot ``i`` of a section gets an edge to its ``K`` nearest spots ``j`` (by
distance between spot centres in full-resolution pixels, ``i`` itself
included) with a 2-channel edge attribute:

* channel 0 - physical proximity, a Gaussian RBF ``exp(-d_ij^2 / (2 sigma^2))``
  of the pixel distance ``d_ij``; FLAG sets ``sigma`` to the patch size (224 px,
  stgen's default ``features.patch_px``);
* channel 1 - histology similarity, the cosine similarity of the spots' image
  features.

The graph depends only on coordinates and image features, never on
expression, and stays fixed through training and sampling (FLAG's "static
mode": an immutable structural prior for the graph encoder).

FLAG builds the *dense* graph over all spot pairs. Here attention is
restricted to each spot's ``K = min(k, N)`` nearest neighbours (default 32),
which keeps the memory of the graph encoder linear in the number of spots for
large slides; with ``k >= N`` every spot is connected to every spot and the
graph is exactly the dense one (with the RBF making far spots contribute
little anyway). The neighbour search runs in row blocks, so building the
graph needs ``O(block * N)`` memory, not ``O(N^2)``.

Duplicated coordinates are allowed: such spots are at distance 0 (RBF 1) and
are ordinary neighbours of each other; each spot's own row still lists the
spot itself first.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence
import numpy as np
import torch
import torch.nn.functional as F
from stgen.errors import InputError
import math
import torch.nn as nn


_BLOCK = 4096  # query rows per block of the neighbour search


class SpotGraph(NamedTuple):
    """A fixed kNN spot graph of ``N`` spots with ``K`` neighbour slots each.

    Attributes
    ----------
    neighbors : (N, K) long - neighbour spot indices, nearest first; slot 0 is
        the spot itself.
    edge_attr : (N, K, 2) float32 - ``[RBF proximity, cosine image similarity]``.
    valid : (N, K) bool - False marks padding slots (neighbours outside a
        :meth:`subgraph`); padded slots point at the spot itself.
    """

    neighbors: torch.Tensor
    edge_attr: torch.Tensor
    valid: torch.Tensor

    @property
    def n_spots(self) -> int:
        return int(self.neighbors.shape[0])

    def to(self, device: torch.device | str) -> "SpotGraph":
        return SpotGraph(*(t.to(device) for t in self))

    def subgraph(self, idx: torch.Tensor) -> "SpotGraph":
        """The graph restricted to spots ``idx`` (M,) (distinct indices), renumbered 0..M-1.

        Neighbours outside ``idx`` become invalid slots (pointing at the spot
        itself), so a spot inside a crop keeps exactly the neighbours it has in
        the whole section that lie in the crop.
        """
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.neighbors.device)
        local = torch.full((self.n_spots,), -1, dtype=torch.long, device=idx.device)
        local[idx] = torch.arange(len(idx), device=idx.device)
        nb = local[self.neighbors[idx]]
        valid = self.valid[idx] & (nb >= 0)
        self_idx = torch.arange(len(idx), device=idx.device)[:, None].expand_as(nb)
        return SpotGraph(torch.where(valid, nb, self_idx), self.edge_attr[idx], valid)


def _as_matrix(a, name: str, cols: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a, dtype=np.float64) if not torch.is_tensor(a) else a).double()
    if t.ndim != 2 or (cols is not None and t.shape[1] != cols):
        raise InputError(f"{name} must be a 2-d array (N, {cols or 'F'}), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise InputError(f"{name} has no spots (N == 0)")
    bad = ~torch.isfinite(t).all(1)
    if bad.any():
        raise InputError(f"{name} has {int(bad.sum())} spot(s) with NaN or infinite values, "
                         f"e.g. row(s) {torch.nonzero(bad).flatten()[:5].tolist()}")
    return t


def build_spot_graph(xy, feats, sigma_px: float = 224.0, k: int = 32) -> SpotGraph:
    """Build the fixed spot graph of one section (FLAG App. G.1, kNN-restricted).

    Parameters
    ----------
    xy : (N, 2) spot centres in full-resolution pixels (``obsm['spatial']``:
        ``pixel_x``, ``pixel_y``).
    feats : (N, F) image features of the spots (any scale; only their cosine
        similarity is used).
    sigma_px : RBF length scale in pixels (FLAG: the patch size, 224).
    k : neighbours per spot, self included; ``K = min(k, N)``; ``k >= N`` gives
        the dense graph.

    Returns a :class:`SpotGraph` (all slots valid). Raises InputError naming
    ``xy`` or ``feats`` for NaN/infinite values, no spots, a wrong shape or
    mismatched spot counts, and for ``sigma_px <= 0`` or ``k < 1``.
    """
    xy_t = _as_matrix(xy, "spot coordinates xy", 2)
    f_t = _as_matrix(feats, "image features feats")
    n = xy_t.shape[0]
    if f_t.shape[0] != n:
        raise InputError(f"image features feats have {f_t.shape[0]} rows but spot coordinates xy have {n}")
    if not sigma_px or sigma_px <= 0 or not np.isfinite(sigma_px):
        raise InputError(f"graph sigma_px must be a positive number of pixels, got {sigma_px!r}")
    if int(k) < 1:
        raise InputError(f"graph k (neighbours per spot) must be >= 1, got {k!r}")
    kk = min(int(k), n)
    unit = F.normalize(f_t, dim=1, eps=1e-12)
    nbrs = torch.empty(n, kk, dtype=torch.long)
    edge_attr = torch.empty(n, kk, 2, dtype=torch.float32)
    for s in range(0, n, _BLOCK):
        rows = torch.arange(s, min(s + _BLOCK, n))
        d2 = torch.cdist(xy_t[rows], xy_t, compute_mode="donot_use_mm_for_euclid_dist").square()
        d2[torch.arange(len(rows)), rows] = -1.0  # the spot itself first, even among duplicates
        top = torch.topk(d2, kk, dim=1, largest=False, sorted=True)
        nbrs[rows] = top.indices
        edge_attr[rows, :, 0] = torch.exp(-top.values.clamp_min(0.0) / (2.0 * float(sigma_px) ** 2)).float()
        edge_attr[rows, :, 1] = torch.gather(unit[rows] @ unit.T, 1, top.indices).float()
    return SpotGraph(nbrs, edge_attr, torch.ones(n, kk, dtype=torch.bool))


__all__ = ["SpotGraph", "build_spot_graph", "spot_spacing", "neighbour_mean"]


class EdgeBiasedGraphAttention(nn.Module):
    """Static edge-modulated attention (App. G.2 eq. 60) over each spot's ``K`` neighbours.

    ``score_ijh = q_ih . k_jh / sqrt(d_h) + sum_c lambda_{h,c} e_ij[c]`` for ``j`` in
    the neighbour slots of ``i``; padded slots get ``-inf``. ``forward(h (N, d),
    graph) -> (N, d)``. ``lambda`` (heads, edge channels) starts at 0.1.
    """

    def __init__(self, dim: int, heads: int, edge_dim: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.edge_scale = nn.Parameter(torch.full((heads, edge_dim), 0.1))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, graph: SpotGraph) -> torch.Tensor:
        n = h.shape[0]
        q, k, v = self.qkv(h).view(n, 3, self.heads, self.head_dim).unbind(1)  # (N, H, Dh) each
        kn, vn = k[graph.neighbors], v[graph.neighbors]  # (N, K, H, Dh)
        scores = torch.einsum("nhd,nkhd->nhk", q, kn) / math.sqrt(self.head_dim)
        edge = graph.edge_attr.to(scores.dtype)
        scores = scores + torch.einsum("nkc,hc->nhk", edge, self.edge_scale.to(scores.dtype))
        scores = scores.masked_fill(~graph.valid[:, None, :], float("-inf"))
        attn = self.drop(torch.softmax(scores, dim=-1))
        return self.out(torch.einsum("nhk,nkhd->nhd", attn, vn).reshape(n, -1))


def _nearest_positive_distances(xy: np.ndarray):
    """``(tree, d)``: a :class:`scipy.spatial.cKDTree` of ``xy`` (N, 2) and, per spot, the distance to its nearest
    other spot at a positive distance among its 8 nearest (spots whose 8 nearest share their position are
    left out of ``d``). Memory is linear in the spots."""
    from scipy.spatial import cKDTree

    tree = cKDTree(xy)
    d, _ = tree.query(xy, k=min(len(xy), 9))
    d = np.where(d[:, 1:] > 0, d[:, 1:], np.inf).min(1)
    return tree, d[np.isfinite(d)]


def spot_spacing(xy: np.ndarray) -> float:
    """Median distance (pixels) from each spot to its nearest other spot at a positive distance (1 if none):
    the spot pitch of a section (200 um of a Her2ST array in pixels)."""
    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 2:
        return 1.0
    _, d = _nearest_positive_distances(xy)
    return float(np.median(d)) if len(d) else 1.0


def neighbour_mean(values: np.ndarray, xy: np.ndarray, radius: float = 1.5) -> np.ndarray:
    """Mean of ``values`` over each spot's spatial neighbours: the regional context of a spot.

    ``values`` (N, F) (e.g. encoder features), ``xy`` (N, 2) spot centres in full-resolution pixels. Spot
    ``j != i`` is a neighbour of ``i`` when ``|xy_j - xy_i| <= radius * pitch``, with ``pitch`` the
    :func:`spot_spacing` of the section; ``radius`` 1.5 takes the first
    ring (8 spots of a square ST array, 6 of a hexagonal Visium one). A spot without neighbours (an
    isolated spot, a one-spot section) keeps its own row. Returns (N, F) float32. Neighbour pairs come from a
    k-d tree (:class:`scipy.spatial.cKDTree`), so memory is linear in the spots.

    Raises InputError for a shape mismatch, NaN/infinite coordinates or ``radius <= 0``.
    """
    from scipy import sparse

    v = np.asarray(values, dtype=np.float32)
    xy_t = _as_matrix(xy, "spot coordinates xy", 2).numpy()
    n = len(xy_t)
    if v.ndim != 2 or len(v) != n:
        raise InputError(f"neighbour_mean: values must be ({n}, F) for {n} spots, got {v.shape}")
    if not (np.isfinite(radius) and radius > 0):
        raise InputError(f"neighbour radius must be a positive number of spot pitches, got {radius!r}")
    if n < 2:
        return v.copy()
    tree, d = _nearest_positive_distances(xy_t)
    if not len(d):  # every spot at one position
        return v.copy()
    pairs = tree.query_pairs(float(radius) * float(np.median(d)), output_type="ndarray")
    i = np.concatenate([pairs[:, 0], pairs[:, 1]])
    j = np.concatenate([pairs[:, 1], pairs[:, 0]])
    adj = sparse.csr_matrix((np.ones(len(i), dtype=np.float32), (i, j)), shape=(n, n))
    deg = np.asarray(adj.sum(1)).ravel()
    out = np.asarray(adj @ v) / np.maximum(deg, 1.0)[:, None]
    out[deg == 0] = v[deg == 0]
    return out.astype(np.float32)


def neighbour_context(values: np.ndarray, xy: np.ndarray, radii: Sequence[float]) -> np.ndarray:
    """``values`` with, per radius ``r`` (spot pitches), the :func:`neighbour_mean` of the spots within ``r``
    pitches appended: (N, F) -> (N, F * (1 + len(radii))) float32, the spot's own columns first. ``radii = []``
    returns ``values`` as they are. What HINGE's and FLAG's ``context_radii`` feed their networks.

    Raises InputError as :func:`neighbour_mean`.
    """
    if not len(radii):
        return values
    return np.concatenate([np.asarray(values, dtype=np.float32),
                           *(neighbour_mean(values, xy, r) for r in radii)], axis=1)
