"""FLAG: spatial graph encoder + gene-dimension diffusion transformer with GFM alignment.

"FLAG: Foundation model representation with Latent diffusion Alignment via
Graph for spatial gene expression prediction" (Sec. 3.4-3.6, App. G). One
section (or a crop of it) is denoised at once: all its spots share one noise
level ``sigma``, because the graph encoder reads the neighbours' noisy states.

Shapes: ``N`` spots, ``G`` genes, ``F`` image-feature width, ``K`` neighbour
slots, ``d`` model width, ``E`` gene-embedding width of the frozen gene
foundation model (GFM). Expression enters and leaves the network
*normalised* per gene (``(y - mean_g) / sd_g`` on the training spots, buffers
set by :meth:`FLAG.set_target_stats`); :meth:`FLAG.generate` returns target
units (log2(count+1) by default).

Pieces and the part of the paper each one reproduces:

* noise (App. B, Table 5): VE-SDE, ``sigma`` in [0.01, 10], EDM
  preconditioning ``D = c_skip x + c_out F(c_in x, c_noise)`` and Heun
  sampling of the probability-flow ODE (:mod:`stgen.sampling.vesde`);
* spatial graph encoder (Sec. 3.4, App. G.2 "static mode", D.2): node token =
  ``Linear([c_in x_i ; v_i])`` of the noisy gene state and the standardised
  image feature, plus the noise embedding; graph-transformer blocks with
  edge-biased attention ``q_i.k_j / sqrt(d_h) + sum_c lambda_{h,c} e_ij[c]``
  over each spot's ``K`` neighbours (:mod:`stgen.nn.graph`; learnable per-head
  ``lambda`` initialised to 0.1; FLAG's dynamic edge term is zero in static
  mode), GEGLU feed-forward, pre-norm residuals; a 3-layer bottleneck MLP
  (G.2 eq. 61) maps each spot's output to its spatial context, which is added
  to the noise embedding to form the DiT condition ``c_i`` (N, d);
* gene-dimension DiT (Sec. 3.5 eq. 7): the ``G`` genes of a spot are its
  tokens, ``Linear(c_in x_ig) + gene_emb_g``; DiT blocks with adaLN-Zero
  (shift/scale/gate regressed from ``c_i``, zero-initialised so that every
  block starts as the identity); final adaLN + linear to one scalar per gene;
* GFM alignment (Sec. 3.5 eq. 8, Sec. 3.6 eq. 9, App. F): the gene tokens
  after DiT block ``align_layer`` pass a small MLP projector to width ``E``;
  the loss is ``mean_{i,g} (1 - cos(proj(h_ig), e_ig))`` against the frozen
  backbone's *contextual* state of gene ``g`` when it reads spot ``i``'s true
  expression (``flag.align_target: contextual``, App. F.2.2, precomputed for
  the training spots by :func:`stgen.backbones.external.contextual_gene_states`,
  never an input at inference), or against the static per-gene token rows
  ``e_g`` (``static``, an ablation; a buffer). Genes outside the backbone
  vocabulary have no target and are left out of the mean (as F.2.1 masks
  genes Geneformer does not return).

Simplifications (stated, not hidden): the widths/depths are far smaller than
Table 5 (graph 6 layers x 384, DiT 12 layers x 384) so that a fold trains on a
CPU in minutes; graph attention is restricted to ``K`` nearest neighbours
instead of the dense graph (exact when ``K >= N``); the GFM is the run's
expression backbone (embedded CellFM-architecture model, CellFM or scGPT), not
Geneformer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from stgen.errors import InputError
from stgen.nn.graph import SpotGraph
from stgen.sampling.vesde import VESDE, heun_sample, masked_mean
from stgen.nn.stats import floored_std
from stgen.nn.embedding import timestep_embedding
from stgen.nn.dit import DiTBlock
from stgen.nn.graph import EdgeBiasedGraphAttention
from stgen.nn.dit import FinalLayer
from stgen.models.flag.config import FlagConfig
from stgen.nn.dit import GEGLU


class GraphBlock(nn.Module):
    """Pre-norm graph-transformer block: ``h + Attn(LN h)``, then ``h + GEGLU(LN h)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = EdgeBiasedGraphAttention(dim, heads, dropout=dropout)
        self.ffn = GEGLU(dim, int(dim * mlp_ratio), dropout)

    def forward(self, h: torch.Tensor, graph: SpotGraph) -> torch.Tensor:
        h = h + self.attn(self.norm1(h), graph)
        return h + self.ffn(self.norm2(h))


class SpatialGraphEncoder(nn.Module):
    """Spatial context of every spot (Sec. 3.4 eq. 5, App. G.2 static mode).

    ``forward(x_in (N, G) preconditioned noisy expression, v (N, F) standardised
    features, emb (N, d) noise embedding, graph) -> (N, d)``: node tokens
    ``Linear([x_in; v]) + emb``, ``layers`` graph blocks, final LayerNorm and
    the 3-layer bottleneck MLP ``d -> d/2 -> d/2 -> d`` (G.2 eq. 61).
    """

    def __init__(self, n_genes: int, feat_dim: int, cfg: FlagConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.inp = nn.Linear(n_genes + feat_dim, d)
        self.blocks = nn.ModuleList(GraphBlock(d, cfg.graph_heads, cfg.mlp_ratio, cfg.dropout)
                                    for _ in range(cfg.graph_layers))
        self.norm = nn.LayerNorm(d)
        b = max(d // 2, 1)
        self.head = nn.Sequential(nn.Linear(d, b), nn.SiLU(), nn.Linear(b, b), nn.SiLU(), nn.Linear(b, d))

    def forward(self, x_in: torch.Tensor, v: torch.Tensor, emb: torch.Tensor, graph: SpotGraph) -> torch.Tensor:
        h = self.inp(torch.cat([x_in, v], dim=-1)) + emb
        for blk in self.blocks:
            h = blk(h, graph)
        return self.head(self.norm(h))


class FLAG(nn.Module):
    """FLAG denoiser ``D(x, sigma | v, graph)`` (module docstring).

    Parameters
    ----------
    config : :class:`FlagConfig`.
    n_genes : panel size ``G``.
    feat_dim : image-feature width ``F``.
    gene_embeddings : static GFM embeddings (G, E) of the panel genes (a
        persistent buffer; rows of zeros = genes without one), or None.
    align_dim : width ``E`` of contextual alignment targets (given to
        :meth:`align_loss` per spot); ignored with ``gene_embeddings``. Neither:
        no alignment projector and no alignment loss.
    """

    def __init__(self, config: FlagConfig, n_genes: int, feat_dim: int,
                 gene_embeddings: torch.Tensor | None = None, align_dim: int | None = None) -> None:
        super().__init__()
        if n_genes < 1 or feat_dim < 1:
            raise InputError(f"FLAG needs at least one gene and one feature, got G={n_genes}, F={feat_dim}")
        self.config, self.n_genes, self.feat_dim = config, n_genes, feat_dim
        self.sde = VESDE(config.sigma_min, config.sigma_max)
        d = config.dim
        self.register_buffer("feat_mean", torch.zeros(feat_dim))
        self.register_buffer("feat_std", torch.ones(feat_dim))
        self.register_buffer("target_mean", torch.zeros(n_genes))
        self.register_buffer("target_std", torch.ones(n_genes))
        self.sigma_embed = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.graph_encoder = SpatialGraphEncoder(n_genes, feat_dim, config)
        self.value_proj = nn.Linear(1, d)
        self.gene_emb = nn.Parameter(torch.randn(n_genes, d) * 0.02)
        self.blocks = nn.ModuleList(DiTBlock(d, config.dit_heads, config.mlp_ratio, config.dropout)
                                    for _ in range(config.dit_layers))
        self.final = FinalLayer(d)
        self.align_proj = None  # no projector (and no alignment loss) unless given a target width
        if gene_embeddings is not None:
            e = torch.as_tensor(gene_embeddings, dtype=torch.float32)
            if e.ndim != 2 or e.shape[0] != n_genes:
                raise InputError(f"gene_embeddings must have shape (G={n_genes}, E), got {tuple(e.shape)}")
            self.register_buffer("gene_embeddings", e.clone())
            align_dim = e.shape[1]
        else:
            self.gene_embeddings = None
            if align_dim is not None and int(align_dim) < 1:
                raise InputError(f"align_dim must be >= 1, got {align_dim}")
        if align_dim:
            self.align_proj = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, int(align_dim)))

    # ------------------------------------------------------------ normalisation
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Image-feature standardisation fitted on training spots (sd floored at 10% of
        the median channel sd; z-scores clipped to +-8)."""
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(floored_std(std))

    def set_target_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-gene target mean/sd (G,) of the training spots (sd floored at 10% of the median gene sd)."""
        self.target_mean.copy_(mean)
        self.target_std.copy_(floored_std(std))

    def normalise(self, y: torch.Tensor) -> torch.Tensor:
        """Target units (N, G) -> normalised units."""
        return (y - self.target_mean) / self.target_std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised units (N, G) -> target units."""
        return x * self.target_std + self.target_mean

    def standardise(self, feats: torch.Tensor) -> torch.Tensor:
        return ((feats - self.feat_mean) / self.feat_std).clamp(-8.0, 8.0)

    # ------------------------------------------------------------ network
    def _check(self, x: torch.Tensor, feats: torch.Tensor, graph: SpotGraph) -> None:
        n = x.shape[0]
        if x.ndim != 2 or x.shape[1] != self.n_genes:
            raise InputError(f"FLAG expects expression of shape (N, {self.n_genes}), got {tuple(x.shape)}")
        if feats.shape != (n, self.feat_dim):
            raise InputError(f"FLAG expects image features of shape ({n}, {self.feat_dim}), got {tuple(feats.shape)}")
        if graph.n_spots != n:
            raise InputError(f"the spot graph has {graph.n_spots} spots but the section has {n}")

    def dit(self, x_in: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gene DiT: ``x_in`` (B, G) preconditioned, ``c`` (B, d) -> ``(F (B, G), h_align (B, G, d))``."""
        h = self.value_proj(x_in.unsqueeze(-1)) + self.gene_emb
        h_align = h
        for i, blk in enumerate(self.blocks, start=1):
            h = blk(h, c)
            if i == self.config.align_layer:
                h_align = h
        return self.final(h, c), h_align

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, feats: torch.Tensor, graph: SpotGraph,
                return_align: bool = False, chunk: int | None = None):
        """``D(x, sigma)`` (N, G) in normalised units.

        Parameters
        ----------
        x : (N, G) noisy normalised expression of all spots of a section/crop.
        sigma : scalar or (N,) noise level(s).
        feats : (N, F) raw image features (standardised inside).
        graph : the section's :class:`~stgen.nn.graph.SpotGraph` (N spots).
        return_align : also return the gene tokens after DiT block
            ``align_layer`` (N, G, d), for :meth:`align_loss`.
        chunk : run the DiT on blocks of this many spots (memory; the graph
            encoder always sees the whole section); None = all at once.
        """
        self._check(x, feats, graph)
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(n) if sigma.ndim == 0 else sigma.reshape(n)
        c_in, c_skip, c_out, c_noise = self.sde.precondition(sigma)
        x_in = x * c_in[:, None].to(x.dtype)
        emb = self.sigma_embed(timestep_embedding(c_noise, self.config.dim, 1).to(x.dtype))
        c = self.graph_encoder(x_in, self.standardise(feats).to(x.dtype), emb, graph) + emb
        step = n if not chunk else int(chunk)
        parts = [self.dit(x_in[s : s + step], c[s : s + step]) for s in range(0, n, step)]
        out = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        d = c_skip[:, None] * x + c_out[:, None] * out
        if not return_align:
            return d
        return d, (torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1])

    @property
    def has_alignment(self) -> bool:
        """True when the network has an alignment projector (static or contextual targets)."""
        return self.align_proj is not None

    def align_loss(self, h: torch.Tensor, mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                   genes: torch.Tensor | None = None) -> torch.Tensor:
        """GFM alignment (eq. 8): ``mean_{i, g} (1 - cos(proj(h_ig), e_ig))`` for tokens ``h`` (N, G, d).

        ``targets``: contextual states (N, G', E) of the genes ``genes`` (G',) long (all G genes when None);
        without ``targets`` the static buffer ``gene_embeddings`` (G, E) is the target of every spot, its
        all-zero rows (genes without an embedding) left out. ``mask`` (N,) bool restricts the mean to some
        spots. Zero without a projector or without any target."""
        if self.align_proj is None or (targets is None and self.gene_embeddings is None):
            return h.new_zeros(())
        if targets is None:
            targets = self.gene_embeddings
            genes = torch.nonzero(targets.abs().sum(-1) > 0).squeeze(-1) if genes is None else genes
            targets = targets[genes][None]
        if genes is not None:
            if genes.numel() == 0:
                return h.new_zeros(())
            h = h[:, genes]
        cos = F.cosine_similarity(self.align_proj(h), targets.to(h.dtype), dim=-1, eps=1e-8)
        return masked_mean(1.0 - cos, mask)

    # ------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        feats: torch.Tensor,
        graph: SpotGraph,
        n_samples: int = 3,
        steps: int = 10,
        generator: torch.Generator | None = None,
        progress: bool = False,
        batch_size: int | None = None,
        order: int = 2,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample the expression of a whole section.

        Parameters
        ----------
        feats : (N, F) image features of every spot of the section.
        graph : its :class:`~stgen.nn.graph.SpotGraph`.
        n_samples : independent probability-flow runs (from independent noise) averaged.
        steps : Heun steps per run (``2 steps`` denoiser calls).
        generator : CPU generator of the initial noise (the only randomness).
        batch_size : spots per DiT chunk (memory), None = all.
        order : 2 (Heun, FLAG) or 1 (Euler, which on the VE-SDE is the DDIM step
            ``x <- (s'/s) x + (1 - s'/s) D``). On the geometric grid Heun's
            corrector overshoots when a step divides sigma by more than ~3, so
            Heun needs about 6 or more steps (sigma ratio 1000^(1/steps)) to beat
            Euler; training validation uses Euler with few steps.

        Returns ``(mean (N, G), std (N, G))`` over the samples, in target units
        (std zeros for one sample). All spots and genes of a step move at once.
        """
        return sample_members([self], feats, graph, n_samples, steps, generator, progress, batch_size, order)


@torch.no_grad()
def sample_members(nets: list[FLAG], feats: torch.Tensor, graph: SpotGraph, n_samples: int, steps: int,
                   generator: torch.Generator | None = None, progress: bool = False, batch_size: int | None = None,
                   order: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean (N, G), std (N, G))`` in target units over ``n_samples`` probability-flow runs, run ``k`` with the
    denoiser ``nets[k % len(nets)]`` (one network: :meth:`FLAG.generate`; an ensemble: its members in turn, so
    the samples are draws of the members' equal mixture). The networks share the target statistics
    (:meth:`FLAG.denormalise` of the first); InputError when ``n_samples < 1``."""
    if n_samples < 1:
        raise InputError(f"samples must be >= 1, got {n_samples}")
    first = nets[0]
    n, device = feats.shape[0], feats.device
    graph = graph.to(device)
    for net in nets:
        net.eval()
    runs = []
    for k in range(n_samples):
        net = nets[k % len(nets)]

        def denoise(x, sigma, net=net):
            return net(x, sigma, feats, graph, chunk=batch_size)

        runs.append(first.denormalise(heun_sample(denoise, (n, first.n_genes), first.sde, steps, generator,
                                                  order=order, device=device, progress=progress)))
    runs = torch.stack(runs)
    std = runs.std(0, unbiased=False) if n_samples > 1 else torch.zeros_like(runs[0])
    return runs.mean(0), std


class FlagEnsemble(nn.Module):
    """``M >= 2`` FLAG denoisers of one architecture, trained side by side (``flag.ensemble``, stgen beyond
    the paper; a deep ensemble, Lakshminarayanan et al. 2017, NeurIPS).

    Each member has its own initialisation (drawn one after another from the run seed, so member 0 is the
    single network a one-member fit would build) and, in training
    (:class:`~stgen.models.flag.training.FlagModule`), its own noise levels and noise and its own gradient-norm
    clip; all read the same crops and share the
    feature and target statistics. Sampling (:meth:`generate`, :func:`sample_members`) draws sample ``k``
    from member ``k % M``, so the mean is over the members' mixture and the sd holds their disagreement.
    The attributes that the training and the model read of a :class:`FLAG` (``config``, ``n_genes``,
    ``feat_dim``, ``sde``, statistics, ``has_alignment``, ``gene_embeddings``) are the first member's.
    Weights are saved as ``members.<i>.<FLAG name>``.

    Raises InputError with fewer than two members or members of different shapes.
    """

    def __init__(self, members: list[FLAG]) -> None:
        super().__init__()
        if len(members) < 2:
            raise InputError(f"a FLAG ensemble needs at least 2 members, got {len(members)}")
        shapes = {(m.n_genes, m.feat_dim) for m in members}
        if len(shapes) > 1:
            raise InputError(f"FLAG ensemble members differ in (genes, features): {sorted(shapes)}")
        self.members = nn.ModuleList(members)

    @property
    def first(self) -> FLAG:
        return self.members[0]

    config = property(lambda self: self.first.config)
    n_genes = property(lambda self: self.first.n_genes)
    feat_dim = property(lambda self: self.first.feat_dim)
    sde = property(lambda self: self.first.sde)
    has_alignment = property(lambda self: self.first.has_alignment)
    gene_embeddings = property(lambda self: self.first.gene_embeddings)  # static targets, shared (or None)

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """:meth:`FLAG.set_feature_stats` of every member."""
        for m in self.members:
            m.set_feature_stats(mean, std)

    def set_target_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """:meth:`FLAG.set_target_stats` of every member."""
        for m in self.members:
            m.set_target_stats(mean, std)

    def normalise(self, y: torch.Tensor) -> torch.Tensor:
        return self.first.normalise(y)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return self.first.denormalise(x)

    @torch.no_grad()
    def generate(self, feats: torch.Tensor, graph: SpotGraph, n_samples: int = 3, steps: int = 10,
                 generator: torch.Generator | None = None, progress: bool = False, batch_size: int | None = None,
                 order: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`FLAG.generate`, sample ``k`` drawn by member ``k % M`` (:func:`sample_members`)."""
        return sample_members(list(self.members), feats, graph, n_samples, steps, generator, progress, batch_size,
                              order)


def flag_network(config: FlagConfig, n_genes: int, feat_dim: int, gene_embeddings: torch.Tensor | None = None,
                 align_dim: int | None = None) -> FLAG | FlagEnsemble:
    """The network of a FLAG run: one :class:`FLAG` when ``config.ensemble`` is 1, else a
    :class:`FlagEnsemble` of that many, built one after another from the current torch RNG."""
    if config.ensemble == 1:
        return FLAG(config, n_genes, feat_dim, gene_embeddings, align_dim)
    return FlagEnsemble([FLAG(config, n_genes, feat_dim, gene_embeddings, align_dim)
                         for _ in range(config.ensemble)])


def member_networks(net: FLAG | FlagEnsemble) -> list[FLAG]:
    """The denoisers of a FLAG network: its members, or ``[net]``."""
    return list(net.members) if isinstance(net, FlagEnsemble) else [net]
