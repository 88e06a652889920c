"""Masked-diffusion schedule, forward masking and the unmasking sampler."""

from __future__ import annotations

import math

import pytest
import torch

from stgen.errors import InputError
from stgen.sampling.masking import MaskSchedule, forward_mask, reverse_timesteps, sample_unmasking


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
