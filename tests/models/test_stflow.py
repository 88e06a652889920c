"""STFlow baseline: ZINB prior, distance graph, Euler flow sampler, training, determinism, round trip, bad input."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import yaml
from model_fixtures import (assert_same_state, assert_seed_fixes_samples, fit_one_thread, save_and_load,
                            synthetic_sections)

from stgen.errors import InputError
from stgen.models.base import SectionInput
from stgen.models.stflow.model import (
    STFlow, STFlowConfig, STFlowNet, distance_graph, fit_zinb, flow_sample, repeat_graph, sample_zinb,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = STFlowConfig(dim=32, layers=2, heads=2, knn=8, dist_basis=8, crop_spots=24, max_steps=500, val_every=125,
                    samples=3, lr=1e-3, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    secs, fs, panel = synthetic_sections(tmp_path_factory.mktemp("stflow"), n_sections=4, side=6, n_genes=12)
    return secs[:3], secs[3], fs, panel


@pytest.fixture(scope="module")
def fitted(data):
    train, _, fs, panel = data
    return fit_one_thread(STFlow, train, panel, TINY, fs)


# ---------------------------------------------------------------- prior and graph
def test_zinb_moment_fit_recovers_parameters():
    rng = np.random.default_rng(0)
    mu, theta, pi = np.array([20.0, 5.0, 0.0, 3.0]), np.array([2.0, 10.0, 1.0, 1e4]), np.array([0.3, 0.0, 0.0, 0.5])
    c = sample_zinb(mu, theta, pi, 20000, rng)
    assert c.shape == (20000, 4) and (c == np.round(c)).all() and (c >= 0).all()
    m, th, p = fit_zinb(c)
    np.testing.assert_allclose(m, mu, rtol=0.03, atol=1e-9)
    np.testing.assert_allclose(p, pi, atol=0.02)
    assert th[0] == pytest.approx(2.0, rel=0.1) and th[1] == pytest.approx(10.0, rel=0.2) and th[3] >= 1e3


def test_distance_graph_is_e2_and_scale_invariant():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 1000, size=(30, 2))
    feats = rng.normal(size=(30, 5))
    g = distance_graph(xy, feats, k=6, n_basis=8, dist_max=4.0)
    assert g.neighbors.shape == (30, 6) and g.edge_attr.shape == (30, 6, 8) and g.valid.all()
    assert torch.equal(g.neighbors[:, 0], torch.arange(30))
    a = 0.7
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    g2 = distance_graph(3.0 * xy @ rot.T + np.array([5000.0, -20.0]), feats, k=6, n_basis=8, dist_max=4.0)
    assert torch.equal(g.neighbors, g2.neighbors)
    torch.testing.assert_close(g.edge_attr, g2.edge_attr, atol=1e-5, rtol=1e-5)
    # self slot: distance 0 -> first basis function 1
    assert torch.allclose(g.edge_attr[:, 0, 0], torch.ones(30))
    big = repeat_graph(g, 3)
    assert big.n_spots == 90 and torch.equal(big.neighbors[60:] - 60, g.neighbors)
    with pytest.raises(InputError, match="NaN"):
        distance_graph(np.full((3, 2), np.nan), feats[:3], k=2, n_basis=4, dist_max=4.0)


def test_euler_sampler_transports_the_gaussian_prior_with_the_exact_denoiser():
    """With the exact ``E[x_1 | x_t]`` of N(m, s^2) data and a N(0, 1) prior, the Euler flow returns N(m, s^2)."""
    m, s = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])

    class Oracle(STFlowNet):
        def forward(self, x, t, feats, graph):
            return m + t * s**2 * (x - t * m) / ((1 - t) ** 2 + t**2 * s**2)

    net = Oracle(2, 1, replace(TINY, prior="gaussian"))
    xy = np.stack([np.arange(4000.0), np.zeros(4000)], 1)
    g = distance_graph(xy, np.ones((4000, 1)), k=2, n_basis=2, dist_max=4.0)
    out = flow_sample(net, torch.zeros(4000, 1), g, 200, 1, np.random.default_rng(0))[0]
    np.testing.assert_allclose(out.mean(0).numpy(), m.numpy(), atol=0.06)
    np.testing.assert_allclose(out.std(0).numpy(), s.numpy(), rtol=0.05)


# ---------------------------------------------------------------- fit / predict
def test_fit_learns_and_predict_shapes(data, fitted):
    train, test, fs, panel = data
    model, hist = fitted
    json.dumps(hist)
    losses = [r["train_loss"] for r in hist["history"]]
    assert losses[-1] < 0.5 * losses[0]  # training lowers the flow-matching loss
    assert hist["n_val"] > 0 and hist["steps_run"] == 500 and hist["best_val_mse"] is not None
    mean, sd = model.predict(test, fs, seed=0)
    assert mean.shape == sd.shape == (test.n_spots, len(panel))
    assert mean.dtype == sd.dtype == np.float32 and np.isfinite(mean).all() and np.isfinite(sd).all()
    assert (sd >= 0).all() and sd.mean() > 0
    baseline = ((test.targets - np.concatenate([s.targets for s in train]).mean(0)) ** 2).mean()
    assert ((mean - test.targets) ** 2).mean() < 0.5 * baseline  # the image features are used
    assert model.net.prior == "zinb" and (model.net.prior_mu > 0).all()
    one = model.predict(SectionInput("one", test.xy[:1], test.feats[:1]), fs, seed=0)[0]
    assert one.shape == (1, len(panel)) and np.isfinite(one).all()


def test_predictions_are_invariant_to_rotating_and_scaling_the_section(data, fitted):
    _, test, fs, _ = data
    model, _ = fitted
    dense = STFlow(model.net, replace(model.cfg, knn=64), model.panel)  # dense graph: no kNN ties at the border
    a = 0.3
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    moved = SectionInput("moved", 2.5 * test.xy @ rot.T + 1000.0, test.feats)
    p1, p2 = dense.predict(test, fs, seed=2)[0], dense.predict(moved, fs, seed=2)[0]
    np.testing.assert_allclose(p1, p2, atol=1e-4)
    # ... but not to moving spots relative to each other (the attention reads the distances)
    shuffled = SectionInput("shuf", test.xy[np.random.default_rng(0).permutation(test.n_spots)], test.feats)
    assert not np.allclose(p1, dense.predict(shuffled, fs, seed=2)[0], atol=1e-4)


def test_determinism_and_seeds(data, fitted):
    train, test, fs, panel = data
    cfg = replace(TINY, max_steps=30, val_every=15)
    ta = assert_same_state(STFlow.fit(train, panel, cfg, fs, progress=False)[0],
                           STFlow.fit(train, panel, cfg, fs, progress=False)[0])
    c, _ = STFlow.fit(train, panel, replace(cfg, seed=4), fs, progress=False)
    assert not torch.equal(ta["out.weight"], c.state()[0]["out.weight"])
    assert_seed_fixes_samples(fitted[0], test, fs)


def test_safetensors_round_trip(data, fitted, tmp_path):
    _, test, fs, _ = data
    model, _ = fitted
    loaded = save_and_load(model, TINY, tmp_path)
    a, b = model.predict(test, fs, seed=1), loaded.predict(test, fs, seed=1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    tensors, meta = model.state()
    bad = dict(tensors)
    bad.pop("prior_pi")
    with pytest.raises(InputError, match="saved state"):
        STFlow.from_state(bad, {"stflow": meta}, TINY)


def test_gaussian_prior_variant_trains(data):
    train, test, fs, panel = data
    model, hist = STFlow.fit(train, panel, replace(TINY, prior="gaussian", max_steps=40, val_every=20), fs,
                             progress=False)
    x = model.net.sample_prior(5000, np.random.default_rng(0))
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
    assert np.isfinite(model.predict(test, fs, samples=2, seed=0)[0]).all()


def test_config_yaml_round_trip_and_validation():
    cfg = STFlowConfig()
    assert STFlowConfig(**yaml.safe_load(yaml.safe_dump(asdict(cfg)))) == cfg
    assert cfg.seed == 42 and cfg.steps == 10
    with pytest.raises(InputError, match="prior"):
        STFlowConfig(prior="poisson")
    with pytest.raises(InputError, match="knn"):
        STFlowConfig(knn=0)


def test_bad_inputs(data, fitted):
    train, test, fs, panel = data
    with pytest.raises(InputError, match="genes"):
        STFlow.fit(train, panel + ["EXTRA"], TINY, fs, progress=False)  # targets have 12 genes, panel 13
    model, _ = fitted
    with pytest.raises(InputError, match="features"):
        model.predict(SectionInput("W", test.xy, test.feats[:, :3]), fs)
    bad_xy = test.xy.copy()
    bad_xy[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        model.predict(SectionInput("X", bad_xy, test.feats), fs)


def test_config_from_yaml_strings():
    cfg = STFlowConfig(**yaml.safe_load("lr: 5e-4\nknn: 8.0\nprior: gaussian"))
    assert cfg.lr == 5e-4 and isinstance(cfg.knn, int) and cfg.prior == "gaussian"
    with pytest.raises(InputError, match="number"):
        STFlowConfig(dim="wide")
