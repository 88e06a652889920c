"""Expression-space masked diffusion (HINGE, Sec. 3.3 and Supp. C).

Forward process
    Every gene of a spot draws a uniform priority ``u_g`` (a random order). At
    timestep ``t`` (0..T) gene ``g`` is *visible* iff ``u_g < alpha_bar(t)``:
    independent Bernoulli masking with probability ``1 - alpha_bar(t)``, nested
    in ``t`` along that order. ``alpha_bar`` is the visible fraction:

    * ``power``  (HINGE default): ``alpha_bar(t) = (1 - t/T)^zeta``, with
      ``zeta = log_T G`` unless given (G = panel size); then exactly one gene is
      visible after the first reverse step, since ``alpha_bar(T-1) = 1/G``;
    * ``linear``: ``zeta = 1``;  ``cosine``: ``cos(pi/2 * t/T)``.

Reverse process (sampler)
    Start from all genes masked (value 0). For a budget of ``K <= T`` steps
    walk ``t_k = round(T k / K)`` from ``k = K`` down to 0; at each step the
    model predicts every gene, and the genes whose rank in a random order falls
    below ``G - masked_count(t_{k-1})`` are revealed with the prediction.
    Revealed genes are never changed again. ``n`` independent orders give ``n``
    samples whose mean is the prediction and whose per-gene standard deviation
    is the uncertainty (HINGE).

Predictive reveal (stgen, beyond the paper)
    A denoiser that also returns a per-gene predictive sd ``sigma`` (a Gaussian
    head trained with the Gaussian NLL) can reveal a *draw*
    ``max(0, x0_hat + sigma * eps)`` instead of ``x0_hat`` (``reveal_noise``),
    so later steps condition on sampled values, as upstream HINGE fills masked
    genes with noise. :func:`sample_unmasking` can return each gene's moments
    at its reveal step (``return_moments``); :func:`mixture_moments` turns
    those of ``n`` samples into the mean and sd of their Gaussian mixture (law
    of total variance), which is finite and calibratable even at ``n = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable
import numpy as np
import torch
from stgen.errors import InputError


SCHEDULES = ("power", "linear", "cosine")


@dataclass(frozen=True)
class MaskSchedule:
    """Visible fraction ``alpha_bar(t)`` for ``t = 0..T``.

    Parameters
    ----------
    n_genes : panel size ``G`` (>= 1).
    T : masking horizon (number of timesteps, default 50).
    kind : ``power`` | ``linear`` | ``cosine``.
    zeta : exponent of the power schedule; ``None`` means ``log_T G``.
    """

    n_genes: int
    T: int = 50
    kind: str = "power"
    zeta: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise InputError(f"unknown masking schedule {self.kind!r}; choose one of {SCHEDULES}")
        if self.T < 1 or self.n_genes < 1:
            raise InputError(f"masking schedule needs T >= 1 and G >= 1, got T={self.T}, G={self.n_genes}")

    @property
    def exponent(self) -> float:
        if self.kind == "linear":
            return 1.0
        if self.zeta is not None:
            return float(self.zeta)
        if self.T == 1:
            return 1.0
        return max(math.log(self.n_genes) / math.log(self.T), 1e-6)

    def alpha_bar(self, t: torch.Tensor | np.ndarray | float) -> torch.Tensor:
        """Visible fraction at timestep(s) ``t`` (same shape as ``t``), in [0, 1]."""
        s = torch.as_tensor(t, dtype=torch.float64) / self.T
        s = s.clamp(0.0, 1.0)
        if self.kind == "cosine":
            a = torch.cos(0.5 * math.pi * s)
        else:
            a = (1.0 - s) ** self.exponent
        a = torch.where(s >= 1.0, torch.zeros_like(a), a)
        return a.clamp(0.0, 1.0)

    def masked_count(self, t: int) -> int:
        """Genes masked at integer timestep ``t`` in the sampler: ``round(G (1 - alpha_bar(t)))``."""
        return int(round(self.n_genes * (1.0 - float(self.alpha_bar(t)))))

    def nearest_timestep(self, ratio: torch.Tensor) -> torch.Tensor:
        """Timestep ``t`` in 1..T whose mask ratio ``1 - alpha_bar(t)`` is nearest to ``ratio``.

        ``ratio`` (B,) float in [0, 1] -> (B,) long on the same device (ties: smaller ``t``).
        """
        ratios = 1.0 - self.alpha_bar(torch.arange(1, self.T + 1))  # (T,) float64
        idx = (ratio.detach().double().cpu()[:, None] - ratios[None]).abs().argmin(dim=1)
        return (idx + 1).to(ratio.device)

    def max_t_for_ratio(self, ratio: float) -> int:
        """Largest ``t >= 1`` with mask ratio ``1 - alpha_bar(t) <= ratio`` (warm-start curriculum)."""
        ts = torch.arange(1, self.T + 1)
        ok = (1.0 - self.alpha_bar(ts)) <= ratio + 1e-12
        return int(ts[ok].max()) if bool(ok.any()) else 1


def forward_mask(
    t: torch.Tensor, n_genes: int, schedule: MaskSchedule, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample visible genes for timesteps ``t`` (B,): returns bool (B, G), True = visible."""
    u = torch.rand(t.shape[0], n_genes, generator=generator, device=t.device)
    return u < schedule.alpha_bar(t.cpu()).to(device=t.device, dtype=u.dtype).unsqueeze(1)


def uniform_ratio_mask(
    n_spots: int,
    n_genes: int,
    schedule: MaskSchedule,
    max_ratio: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """"RandMask" forward masking (HINGE Supp. Tables S2/S3, Objective rows).

    Each spot draws its own mask ratio ``r ~ U(0, max_ratio)`` (instead of the
    schedule's ratio ``1 - alpha_bar(t)`` at ``t ~ U{1..T}``); each gene is then
    masked independently with probability ``r``. The spot's timestep is the
    schedule step whose ratio is nearest to ``r``, so the timestep embedding
    still tells the model how much is masked.

    Returns ``(t (B,) long, visible (B, G) bool, ratio (B,) float)``.
    """
    ratio = torch.rand(n_spots, generator=generator, device=device) * max_ratio
    visible = torch.rand(n_spots, n_genes, generator=generator, device=device) >= ratio[:, None]
    return schedule.nearest_timestep(ratio), visible, ratio


def reverse_timesteps(T: int, steps: int) -> list[int]:
    """Timesteps visited by a ``steps``-step sampler: ``round(T k / K)`` for ``k = K..0``."""
    if not 1 <= steps <= T:
        raise InputError(f"sampling steps K must satisfy 1 <= K <= T={T}, got {steps}")
    return [int(round(T * k / steps)) for k in range(steps, -1, -1)]


Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@torch.no_grad()
def sample_unmasking(
    denoise: Denoiser,
    n_spots: int,
    schedule: MaskSchedule,
    steps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    x0_first: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    order_noise: torch.Tensor | None = None,
    reveal_noise: torch.Tensor | None = None,
    return_moments: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One reverse masked-diffusion run for ``n_spots`` spots.

    Parameters
    ----------
    denoise : ``denoise(x (B, G), visible (B, G) bool, t) -> x0_hat (B, G)``, or
        ``-> (x0_hat, sigma)`` (B, G) each with a predictive sd ``sigma``.
    n_spots : batch size ``B``.
    schedule : the training schedule (its ``T`` and ``n_genes``).
    steps : inference budget ``K`` (1..T).
    on_step : optional ``on_step(t, x0_hat, visible)`` after each step (step analysis).
    x0_first : optional (B, G) prediction of the first step (``t = T``, nothing
        visible) if already known: it depends on the spot only, not on the
        random order, so it can be shared by all samples of a spot.
    order_noise : optional (B, G) uniform draws that fix the random reveal order
        (genes revealed in increasing order of their draw) instead of drawing
        them from ``generator``; :func:`spot_uniforms` makes them per spot.
    reveal_noise : optional (B, G) standard normal draws: a gene revealed at a
        step takes ``max(0, x0_hat + sigma * eps)`` (targets are >= 0) instead
        of ``x0_hat``. Needs a denoiser that returns ``sigma``.
    return_moments : also return each gene's ``x0_hat`` and ``sigma`` at the
        step it was revealed (``sigma`` 0 for a denoiser without one).

    Returns
    -------
    (B, G) float tensor: all genes revealed; with ``return_moments``
    ``(x, mean (B, G), sigma (B, G))``.

    Raises
    ------
    ValueError
        ``order_noise`` or ``reveal_noise`` of the wrong shape, or
        ``reveal_noise`` with a denoiser that returns no ``sigma``.
    """
    g = schedule.n_genes
    ts = reverse_timesteps(schedule.T, steps)
    if order_noise is not None and tuple(order_noise.shape) != (n_spots, g):
        raise ValueError(f"order_noise must be ({n_spots}, {g}), got {tuple(order_noise.shape)}")
    u = order_noise.cpu() if order_noise is not None else torch.rand(n_spots, g, generator=generator)
    order = u.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(g).expand_as(order)).to(device)  # inverse perm.
    if reveal_noise is not None and tuple(reveal_noise.shape) != (n_spots, g):
        raise ValueError(f"reveal_noise must be ({n_spots}, {g}), got {tuple(reveal_noise.shape)}")
    x = torch.zeros(n_spots, g, device=device)
    m = torch.zeros(n_spots, g, device=device) if return_moments else None
    sd = torch.zeros(n_spots, g, device=device) if return_moments else None
    visible = torch.zeros(n_spots, g, dtype=torch.bool, device=device)
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        out = x0_first if i == 0 and x0_first is not None else denoise(x, visible, t_cur)
        x0_hat, sigma = out if isinstance(out, tuple) else (out, None)
        reveal = (rank < g - schedule.masked_count(t_next)) & ~visible
        value = x0_hat
        if reveal_noise is not None:
            if sigma is None:
                raise ValueError("reveal_noise needs a denoiser that returns (x0_hat, sigma)")
            value = (x0_hat + sigma * reveal_noise.to(device)).clamp_min(0.0)
        x = torch.where(reveal, value, x)
        if return_moments:
            m = torch.where(reveal, x0_hat, m)
            if sigma is not None:
                sd = torch.where(reveal, sigma, sd)
        visible |= reveal
        if on_step is not None:
            on_step(t_cur, x0_hat, visible)
    return (x, m, sd) if return_moments else x


def mixture_moments(means: torch.Tensor, sds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd of an equal-weight Gaussian mixture over the first axis.

    ``means``, ``sds`` (S, N, G): ``S`` samples' per-gene predictive means and
    sds -> ``(mean (N, G), sd (N, G))`` with ``mean = E_s[m_s]`` and
    ``sd^2 = E_s[sd_s^2] + Var_s[m_s]`` (law of total variance; population
    variance over the samples). With all ``sds`` zero this is the samples'
    mean and (ddof = 0) sd.
    """
    mean = means.mean(0)
    var = (sds * sds).mean(0) + ((means - mean) ** 2).mean(0)
    return mean, var.clamp_min(0.0).sqrt()


def spot_normals(keys: torch.Tensor, n_samples: int, n_genes: int, base_seed: int) -> torch.Tensor:
    """Standard normal draws ``(n_samples * N, G)`` (sample-major) that depend only on each spot's key,
    as :func:`spot_uniforms` (from a seed derived from ``base_seed``, so they are independent of the
    uniforms of the same spot)."""
    mixed = (int(base_seed) * 0x2545F4914F6CDD1D + 0x632BE59BD9B4E019) & 0x7FFFFFFFFFFFFFFF
    u = spot_uniforms(keys, n_samples, n_genes, mixed).double()
    return (math.sqrt(2.0) * torch.special.erfinv(2.0 * u.clamp(1e-7, 1 - 1e-7) - 1.0)).float()


def spot_uniforms(keys: torch.Tensor, n_samples: int, n_genes: int, base_seed: int) -> torch.Tensor:
    """Uniform draws ``(n_samples * N, G)`` (sample-major) that depend only on each spot's key.

    Spot ``i``'s ``n_samples`` rows come from a generator seeded with
    ``hash(base_seed, keys[i])``, so a spot's samples are the same whatever other
    spots are sampled with it and in whatever order (a spot of a bare-slide grid
    gets the same samples as the same position in a spot file).

    Parameters
    ----------
    keys : (N,) int64 spot keys (e.g. from the rounded pixel position, :func:`spot_keys`).
    n_samples, n_genes : samples per spot and genes.
    base_seed : the sampling seed.
    """
    keys = torch.as_tensor(keys, dtype=torch.int64).cpu()
    n = int(keys.shape[0])
    out = torch.empty(n_samples, n, n_genes)
    gen = torch.Generator()
    mix = np.uint64(0x9E3779B97F4A7C15)
    for i, k in enumerate(keys.tolist()):
        with np.errstate(over="ignore"):
            seed = (np.uint64(k & 0xFFFFFFFFFFFFFFFF) * mix) ^ np.uint64(int(base_seed) & 0xFFFFFFFFFFFFFFFF)
        gen.manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
        out[:, i] = torch.rand(n_samples, n_genes, generator=gen)
    return out.reshape(n_samples * n, n_genes)


def spot_keys(xy) -> torch.Tensor:
    """(N,) int64 keys of spot positions: the pixel ``(floor(x + 0.5), floor(y + 0.5))`` a patch is cut at
    (:func:`stgen.image.patches.extract_patches`), packed as ``x * 2**31 + y``."""
    a = np.floor(np.asarray(xy, dtype=np.float64) + 0.5).astype(np.int64)
    return torch.from_numpy(a[:, 0] * (1 << 31) + a[:, 1])
