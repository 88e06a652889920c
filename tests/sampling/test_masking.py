"""Masked-diffusion schedule, forward masking and the unmasking sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stgen.errors import InputError
from stgen.sampling.masking import (MaskSchedule, forward_mask, mixture_moments, reverse_timesteps, sample_unmasking,
                                   spot_keys, spot_normals, spot_uniforms)


@pytest.mark.parametrize("G", [7, 50, 244, 1000])
def test_masked_counts_monotone_and_endpoints(G):
    s = MaskSchedule(n_genes=G, T=50)
    counts = [s.masked_count(t) for t in range(51)]
    assert counts[0] == 0
    assert counts[-1] == G
    assert all(a <= b for a, b in zip(counts, counts[1:]))


@pytest.mark.parametrize("G,T", [(244, 50), (200, 50), (30, 10), (1000, 100)])
def test_default_zeta_reveals_one_gene_at_first_reverse_step(G, T):
    s = MaskSchedule(n_genes=G, T=T)
    assert s.exponent == pytest.approx(math.log(G) / math.log(T))
    assert G - s.masked_count(T - 1) == 1  # alpha_bar(T-1) = 1/G


def test_schedule_kinds_and_errors():
    lin = MaskSchedule(100, T=10, kind="linear")
    assert float(lin.alpha_bar(5)) == pytest.approx(0.5)
    cos = MaskSchedule(100, T=10, kind="cosine")
    assert float(cos.alpha_bar(5)) == pytest.approx(math.cos(math.pi / 4))
    p2 = MaskSchedule(100, T=10, zeta=2.0)
    assert float(p2.alpha_bar(5)) == pytest.approx(0.25)
    with pytest.raises(InputError, match="unknown masking schedule"):
        MaskSchedule(10, kind="sqrt")


def test_curriculum_max_t_respects_ratio():
    s = MaskSchedule(244, T=50)
    t = s.max_t_for_ratio(0.2)
    assert 1 - float(s.alpha_bar(t)) <= 0.2
    assert 1 - float(s.alpha_bar(t + 1)) > 0.2


def test_forward_mask_rates_match_schedule():
    s = MaskSchedule(200, T=50)
    g = torch.Generator().manual_seed(0)
    for t_val in (0, 10, 25, 40, 50):
        t = torch.full((400,), t_val)
        vis = forward_mask(t, 200, s, generator=g)
        assert vis.float().mean().item() == pytest.approx(float(s.alpha_bar(t_val)), abs=0.01)


def test_reverse_timesteps():
    assert reverse_timesteps(50, 5) == [50, 40, 30, 20, 10, 0]
    assert reverse_timesteps(50, 50) == list(range(50, -1, -1))
    with pytest.raises(InputError):
        reverse_timesteps(50, 51)
    with pytest.raises(InputError):
        reverse_timesteps(50, 0)


@pytest.mark.parametrize("steps", [1, 5, 50])
def test_sampler_never_changes_revealed_genes(steps):
    G, B = 40, 6
    s = MaskSchedule(G, T=50)
    seen: dict = {}
    calls = []

    def denoise(x, visible, t):
        # every call returns fresh random values: a revealed gene that changed would show it
        calls.append(t)
        vis_vals = x[visible]
        if "x" in seen:
            prev_x, prev_vis = seen["x"], seen["vis"]
            assert torch.equal(x[prev_vis], prev_x[prev_vis])  # kept unchanged
            assert bool((visible | ~prev_vis).all())  # never re-masked
        seen["x"], seen["vis"] = x.clone(), visible.clone()
        assert torch.isfinite(vis_vals).all()
        return torch.randn(x.shape) + 100.0 * t

    out = sample_unmasking(denoise, B, s, steps, generator=torch.Generator().manual_seed(1))
    assert len(calls) == steps
    assert out.shape == (B, G)
    # each value was set at exactly one step: it equals 100*t_step + noise for one of the visited t
    assert not torch.any(out == 0)


def test_sampler_reveal_counts_follow_schedule():
    G, B = 60, 3
    s = MaskSchedule(G, T=50)
    n_visible = []

    def denoise(x, visible, t):
        n_visible.append(visible.sum(1))
        return torch.ones_like(x)

    sample_unmasking(denoise, B, s, 5, generator=torch.Generator().manual_seed(0))
    expected = [G - s.masked_count(t) for t in reverse_timesteps(50, 5)[:-1]]
    for nv, e in zip(n_visible, expected):
        assert torch.all(nv == e)


def test_predictive_reveal_draws_around_the_mean_and_returns_reveal_time_moments():
    G, B = 30, 4000
    s = MaskSchedule(G, T=20)

    def denoise(x, visible, t):  # mean 2 + t/10, sd 0.5 at every step
        return torch.full(x.shape, 2.0 + t / 10), torch.full(x.shape, 0.5)

    eps = torch.randn(B, G, generator=torch.Generator().manual_seed(0))
    x, m, sd = sample_unmasking(denoise, B, s, 4, generator=torch.Generator().manual_seed(1),
                                reveal_noise=eps, return_moments=True)
    torch.testing.assert_close(x, (m + sd * eps).clamp_min(0.0))  # each gene: a draw from its reveal-step moments
    assert set(torch.unique(m).tolist()) <= {2.0 + t / 10 for t in reverse_timesteps(20, 4)[:-1]}
    assert torch.all(sd == 0.5)
    assert abs(float((x - m).std()) - 0.5) < 0.01
    plain = sample_unmasking(lambda x, v, t: denoise(x, v, t)[0], B, s, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain, m)  # same orders: reveal-time means are what reveal 'mean' returns
    with pytest.raises(ValueError, match="reveal_noise"):
        sample_unmasking(denoise, B, s, 4, reveal_noise=eps[:-1])
    with pytest.raises(ValueError, match="sigma"):
        sample_unmasking(lambda x, v, t: denoise(x, v, t)[0], B, s, 4, reveal_noise=eps)


def test_mixture_moments_is_the_law_of_total_variance():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(6, 3, 5, generator=g)
    sds = torch.rand(6, 3, 5, generator=g)
    mean, sd = mixture_moments(means, sds)
    torch.testing.assert_close(mean, means.mean(0))
    torch.testing.assert_close(sd ** 2, (sds ** 2).mean(0) + means.var(0, unbiased=False))
    _, sample_sd = mixture_moments(means, torch.zeros_like(sds))
    torch.testing.assert_close(sample_sd, means.std(0, unbiased=False))
    # a large mixture of draws has the moments the formula gives
    draws = means[:, :1, :1] + sds[:, :1, :1] * torch.randn(6, 200000, 1, generator=g)
    assert abs(float(draws.std()) - float(sd[0, 0])) < 0.01


def test_spot_normals_are_standard_normal_keyed_per_spot_and_independent_of_the_orders():
    keys = spot_keys(np.random.default_rng(0).uniform(0, 9000, size=(300, 2)))
    z = spot_normals(keys, 2, 50, base_seed=7)
    assert z.shape == (600, 50)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1.0) < 0.02
    torch.testing.assert_close(spot_normals(keys[[5, 1]], 2, 50, 7), z[[5, 1, 305, 301]])
    u = spot_uniforms(keys, 2, 50, 7)
    assert abs(np.corrcoef(u.flatten().numpy(), z.flatten().numpy())[0, 1]) < 0.02
    assert not torch.allclose(spot_normals(keys, 2, 50, 8), z)
