"""Gaussian diffusion in expression space: the "Gauss-Diff" objective ablation.

HINGE Supp. Tables S2/S3, "Objective" rows, contrast HINGE's masked diffusion
(:mod:`stgen.sampling.masking`) with a standard Gaussian diffusion on the same backbone
and adapter. Every gene is *visible* (the backbone sees a value for every gene,
never a mask token); the values are noised:

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I),  t = 1..T

with the cosine schedule of Nichol & Dhariwal (ICML 2021):
``abar_t = f(t) / f(0)``, ``f(t) = cos^2(pi/2 (t/T + s) / (1 + s))``,
``s = 0.008``, per-step ``beta_t = 1 - abar_t / abar_{t-1}`` clipped to 0.999.
``x_0`` is the expression in the run's target units (log2(count+1) by default),
not re-standardised, exactly as the masked objective sees it.

The network predicts ``x_0`` (x0-parameterisation); the loss is the MSE over
*all* genes (:func:`gaussian_loss`). Sampling (:func:`ddim_sample`) is
deterministic DDIM (Song et al., ICLR 2021, ``eta = 0``) from pure noise
``x_T ~ N(0, I)`` over the ``K``-step timestep grid of the masked sampler
(:func:`stgen.sampling.masking.reverse_timesteps`):

    eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)
    x_s     = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_hat       (s < t)

ending at ``s = 0`` where ``abar_0 = 1`` so the sample is the last ``x0_hat``.
Independent noise draws give independent samples, averaged by
:meth:`stgen.models.hinge.network.HINGE.generate` like the masked sampler's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable
import torch
from stgen.errors import InputError
from stgen.sampling.masking import reverse_timesteps


@dataclass(frozen=True)
class GaussianSchedule:
    """Cosine ``abar_t`` for ``t = 0..T`` (``abar_0 = 1``, ``abar_T`` ~ 1e-5 after clipping).

    Parameters
    ----------
    T : number of diffusion steps (>= 1), the same ``T`` as the masked objective.
    s : cosine offset (0.008 as in improved DDPM).
    max_beta : clip of the per-step ``beta_t``.
    """

    T: int = 50
    s: float = 0.008
    max_beta: float = 0.999

    def __post_init__(self) -> None:
        if self.T < 1:
            raise InputError(f"Gaussian diffusion needs T >= 1, got T={self.T}")

    @property
    def table(self) -> torch.Tensor:
        """``abar_t`` for ``t = 0..T``, float64 (T + 1,)."""
        t = torch.arange(self.T + 1, dtype=torch.float64)
        f = torch.cos(0.5 * math.pi * (t / self.T + self.s) / (1 + self.s)) ** 2
        raw = f / f[0]
        beta = (1 - raw[1:] / raw[:-1]).clamp(0.0, self.max_beta)
        return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - beta, 0)])

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        """``abar_t`` (float64, same shape as ``t``); ``t`` integer in 0..T."""
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        if bool((t < 0).any()) or bool((t > self.T).any()):
            raise InputError(f"Gaussian diffusion timesteps must lie in 0..{self.T}, got {t.tolist()}")
        return self.table[t]

    def max_t_for_noise(self, fraction: float) -> int:
        """Largest ``t >= 1`` with noise variance ``1 - abar_t <= fraction`` (warm-start curriculum)."""
        ts = torch.arange(1, self.T + 1)
        ok = (1.0 - self.table[1:]) <= fraction + 1e-12
        return int(ts[ok].max()) if bool(ok.any()) else 1


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, schedule: GaussianSchedule, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Forward noising ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.

    ``x0`` (B, G), ``t`` (B,) long in 1..T, ``noise`` (B, G) or None (drawn
    from the global RNG). Returns ``x_t`` (B, G), dtype of ``x0``.
    """
    if noise is None:
        noise = torch.randn_like(x0)
    ab = schedule.alpha_bar(t).to(device=x0.device, dtype=x0.dtype).unsqueeze(1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def gaussian_loss(pred_x0: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """x0-prediction MSE over all genes and spots: ``mean((f(x_t, t, v) - x_0)^2)``."""
    return ((pred_x0 - x0) ** 2).mean()


GaussDenoiser = Callable[[torch.Tensor, int], torch.Tensor]


@torch.no_grad()
def ddim_sample(
    denoise: GaussDenoiser,
    n_spots: int,
    n_genes: int,
    schedule: GaussianSchedule,
    steps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One deterministic DDIM run (``eta = 0``) from ``x_T ~ N(0, I)``.

    Parameters
    ----------
    denoise : ``denoise(x_t (B, G), t) -> x0_hat (B, G)``.
    n_spots, n_genes : output shape ``(B, G)``.
    steps : inference budget ``K`` (1..T); timesteps ``round(T k / K)``, ``k = K..0``.
    generator : CPU generator of the initial noise (the only randomness).

    Returns ``x_0`` (B, G) float32.
    """
    ts = reverse_timesteps(schedule.T, steps)
    x = torch.randn(n_spots, n_genes, generator=generator).to(device)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x0_hat = denoise(x, t_cur).float()
        a_cur, a_next = float(schedule.alpha_bar(t_cur)), float(schedule.alpha_bar(t_next))
        eps_hat = (x - math.sqrt(a_cur) * x0_hat) / math.sqrt(max(1.0 - a_cur, 1e-12))
        x = math.sqrt(a_next) * x0_hat + math.sqrt(max(1.0 - a_next, 0.0)) * eps_hat
    return x


__all__ = ["GaussianSchedule", "q_sample", "gaussian_loss", "ddim_sample"]
