"""Stem baseline: DDPM schedule and samplers, training, determinism, safetensors round trip, bad input."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import yaml
from model_fixtures import (assert_same_state, assert_seed_fixes_samples, fit_one_thread, save_and_load,
                            synthetic_sections)

from stgen.errors import InputError
from stgen.sampling.gaussian import ddim_sample, q_sample
from stgen.models.base import SectionInput
from stgen.models.stem.model import LinearSchedule, Stem, StemConfig, StemNet, ddpm_ancestral_sample

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = StemConfig(dim=32, layers=2, heads=2, genes_per_token=5, max_steps=600, val_every=150, val_steps=20,
                  steps=50, samples=3, lr=2e-3, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    secs, fs, panel = synthetic_sections(tmp_path_factory.mktemp("stem"), n_sections=4, side=6, n_genes=12)
    return secs[:3], secs[3], fs, panel


@pytest.fixture(scope="module")
def fitted(data):
    train, _, fs, panel = data
    return fit_one_thread(Stem, train, panel, TINY, fs)


def _gauss_oracle(m: torch.Tensor, s: torch.Tensor, schedule: LinearSchedule):
    """Exact ``E[eps | x_t]`` for data ``x0 ~ N(m, s^2)`` per gene."""

    def eps(x, t):
        ab = float(schedule.alpha_bar(t))
        return math.sqrt(1 - ab) * (x - math.sqrt(ab) * m) / (ab * s**2 + 1 - ab)

    return eps


# ---------------------------------------------------------------- schedule and samplers
def test_linear_schedule_is_ddpm():
    sch = LinearSchedule()
    assert sch.T == 1000 and sch.betas[0] == pytest.approx(1e-4) and sch.betas[-1] == pytest.approx(0.02)
    ab = sch.table
    assert ab.shape == (1001,) and ab[0] == 1.0
    np.testing.assert_allclose(ab[1:].numpy(), np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-10)
    assert float(ab[-1]) < 1e-4 and bool((ab[1:] < ab[:-1]).all())
    x0, noise = torch.ones(2, 3), torch.zeros(2, 3)
    out = q_sample(x0, torch.tensor([1, 1000]), sch, noise)
    np.testing.assert_allclose(out[:, 0].numpy(), np.sqrt(ab[[1, 1000]].numpy()), rtol=1e-6)
    with pytest.raises(InputError, match="timesteps"):
        sch.alpha_bar(1001)


def test_samplers_recover_a_gaussian_with_the_exact_denoiser():
    """With the exact noise predictor of N(m, s^2) data, ancestral DDPM and DDIM both return N(m, s^2)."""
    sch = LinearSchedule()
    m, s = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])
    eps = _gauss_oracle(m, s, sch)
    anc = ddpm_ancestral_sample(eps, 6000, 2, sch, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(anc.mean(0).numpy(), m.numpy(), atol=0.06)
    np.testing.assert_allclose(anc.std(0).numpy(), s.numpy(), rtol=0.05)

    def x0_fn(x, t):
        ab = float(sch.alpha_bar(t))
        return (x - math.sqrt(1 - ab) * eps(x, t)) / math.sqrt(ab)

    ddim = ddim_sample(x0_fn, 6000, 2, sch, 250, torch.Generator().manual_seed(1))  # 50 steps: sd 5% low
    np.testing.assert_allclose(ddim.mean(0).numpy(), m.numpy(), atol=0.06)
    np.testing.assert_allclose(ddim.std(0).numpy(), s.numpy(), rtol=0.05)


def test_network_shapes_and_zero_init():
    net = StemNet(12, 6, TINY)
    assert net.n_tokens == 3 and net.patch == 5  # 12 genes -> 3 tokens of 5 (3 padded)
    x, f = torch.randn(4, 12), torch.randn(4, 6)
    out = net(x, torch.tensor([1, 10, 100, 1000]), f)
    assert out.shape == (4, 12) and torch.equal(out, torch.zeros(4, 12))  # adaLN-Zero final layer
    with torch.no_grad():
        net.final.out.weight.normal_()
    out = net(x, torch.tensor(7), f)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    torch.testing.assert_close(net(x, torch.tensor(7), f), net(x, torch.full((4,), 7), f))


# ---------------------------------------------------------------- fit / predict
def test_fit_learns_and_predict_shapes(data, fitted):
    train, test, fs, panel = data
    model, hist = fitted
    json.dumps(hist)
    losses = [r["train_loss"] for r in hist["history"]]
    assert losses[-1] < 0.7 * losses[0]  # training lowers the DDPM loss
    assert hist["n_val"] > 0 and hist["best_val_mse"] is not None and hist["steps_run"] == 600
    mean, sd = model.predict(test, fs, seed=0)
    assert mean.shape == sd.shape == (test.n_spots, len(panel))
    assert mean.dtype == sd.dtype == np.float32 and np.isfinite(mean).all() and np.isfinite(sd).all()
    assert (sd >= 0).all() and sd.mean() > 0  # 3 samples differ
    baseline = ((test.targets - np.concatenate([s.targets for s in train]).mean(0)) ** 2).mean()
    assert ((mean - test.targets) ** 2).mean() < 0.5 * baseline  # the image condition is used


def test_default_full_ancestral_chain(data, fitted):
    _, test, fs, _ = data
    model, _ = fitted
    few = SectionInput("few", test.xy[:4], test.feats[:4])
    m1, sd1 = model.predict(few, fs, samples=1, steps=1000, seed=0)
    assert m1.shape == (4, 12) and np.isfinite(m1).all() and (sd1 == 0).all()
    err_full = ((m1 - test.targets[:4]) ** 2).mean()
    err_ddim = ((model.predict(few, fs, samples=1, steps=50, seed=0)[0] - test.targets[:4]) ** 2).mean()
    assert err_full < 2 * err_ddim + 0.05  # the 1000-step chain is as good as the validated DDIM
    assert StemConfig().steps == StemConfig().T == 1000


def test_determinism_and_seeds(data, fitted):
    train, test, fs, panel = data
    cfg = replace(TINY, max_steps=40, val_every=20)
    ta = assert_same_state(Stem.fit(train, panel, cfg, fs, progress=False)[0],
                           Stem.fit(train, panel, cfg, fs, progress=False)[0])
    c, _ = Stem.fit(train, panel, replace(cfg, seed=4), fs, progress=False)
    assert not torch.equal(ta["token_in.weight"], c.state()[0]["token_in.weight"])
    assert_seed_fixes_samples(fitted[0], test, fs)


def test_safetensors_round_trip(data, fitted, tmp_path):
    _, test, fs, _ = data
    model, _ = fitted
    loaded = save_and_load(model, TINY, tmp_path)
    for steps in (50, 1000):
        a = model.predict(test, fs, samples=2, steps=steps, seed=1)
        b = loaded.predict(test, fs, samples=2, steps=steps, seed=1)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    tensors, meta = model.state()
    bad = dict(tensors)
    bad.pop("pos")
    with pytest.raises(InputError, match="saved state"):
        Stem.from_state(bad, {"stem": meta}, TINY)


def test_config_yaml_round_trip_and_validation():
    cfg = StemConfig()
    assert StemConfig(**yaml.safe_load(yaml.safe_dump(asdict(cfg)))) == cfg
    assert cfg.seed == 42
    with pytest.raises(InputError, match="steps"):
        StemConfig(steps=2000)
    with pytest.raises(InputError, match="divisible"):
        StemConfig(dim=30, heads=4)
    with pytest.raises(InputError, match="betas"):
        StemConfig(beta_start=0.1, beta_end=0.01)


def test_bad_inputs(data, fitted):
    train, test, fs, panel = data
    with pytest.raises(InputError, match="genes"):
        Stem.fit(train, panel[:-1], TINY, fs, progress=False)  # targets have 12 genes, panel 11
    no_targets = SectionInput("S9", train[0].xy, train[0].feats)
    with pytest.raises(InputError, match="S9 has no targets"):
        Stem.fit([train[0], no_targets], panel, TINY, fs, progress=False)
    with pytest.raises(InputError, match="at least one"):
        Stem.fit([], panel, TINY, fs, progress=False)
    model, _ = fitted
    with pytest.raises(InputError, match="features"):
        model.predict(SectionInput("W", test.xy, test.feats[:, :4]), fs)
    with pytest.raises(InputError, match="samples"):
        model.predict(test, fs, samples=0)
    with pytest.raises(InputError, match="steps"):
        model.predict(test, fs, steps=1001)


def test_config_from_yaml_strings():
    cfg = StemConfig(**yaml.safe_load("lr: 1e-3\nmax_steps: 10.0\nsamples: 2"))
    assert cfg.lr == 1e-3 and isinstance(cfg.max_steps, int) and cfg.max_steps == 10
    with pytest.raises(InputError, match="whole number"):
        StemConfig(layers=1.5)
