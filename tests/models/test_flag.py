"""FLAG: spot graph, VE-SDE / Heun sampler, model, training and the run-directory round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from stgen.models.flag.config import FlagConfig
from stgen.workflows.config import StgenConfig
from stgen.errors import InputError
from stgen.nn.graph import build_spot_graph
from stgen.models.flag.network import FLAG
from stgen.nn.dit import DiTBlock
from stgen.workflows.rundir import config_hash
from stgen.models.flag.training import train_flag
from stgen.sampling.vesde import VESDE, dsm_loss, heun_sample

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(dim=16, graph_layers=1, graph_heads=2, dit_layers=2, dit_heads=2, mlp_ratio=2.0, align_layer=1)


def _grid_xy(nx=6, ny=5, step=100.0) -> np.ndarray:
    return np.stack(np.meshgrid(np.arange(nx), np.arange(ny)), -1).reshape(-1, 2) * step


def _model(G=10, F=6, E=8, seed=0, **kw) -> FLAG:
    torch.manual_seed(seed)
    emb = torch.randn(G, E) if E else None
    return FLAG(FlagConfig(**{**TINY, **kw}), G, F, emb)


def _section(n_side=(6, 5), G=10, F=6, seed=0):
    """A section whose expression follows its first image feature (so the histology signal is learnable)."""
    rng = np.random.default_rng(seed)
    xy = _grid_xy(*n_side)
    f = rng.normal(size=(len(xy), F))
    y = 2.0 + f[:, :1] * np.linspace(-1, 1, G)[None] + 0.1 * rng.normal(size=(len(xy), G))
    return f, xy, y


# ---------------------------------------------------------------- graph
def test_graph_shapes_self_first_and_edge_channels():
    rng = np.random.default_rng(0)
    xy, feats = rng.uniform(0, 1000, size=(20, 2)), rng.normal(size=(20, 7))
    g = build_spot_graph(xy, feats, sigma_px=224.0, k=5)
    assert g.neighbors.shape == (20, 5) and g.neighbors.dtype == torch.long
    assert g.edge_attr.shape == (20, 5, 2) and g.edge_attr.dtype == torch.float32
    assert g.valid.shape == (20, 5) and g.valid.all()
    assert torch.equal(g.neighbors[:, 0], torch.arange(20))  # self loop first
    nb = g.neighbors.numpy()
    d = np.linalg.norm(xy[:, None] - xy[nb], axis=-1)
    assert (np.diff(d, axis=1) >= 0).all()  # nearest first
    full = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    assert np.allclose(d[:, -1], np.sort(full, axis=1)[:, 4])  # exactly the 5 nearest
    np.testing.assert_allclose(g.edge_attr[..., 0].numpy(), np.exp(-d**2 / (2 * 224.0**2)), rtol=1e-5)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    np.testing.assert_allclose(g.edge_attr[..., 1].numpy(), (unit[:, None] * unit[nb]).sum(-1), atol=1e-5)
    assert np.allclose(g.edge_attr[:, 0].numpy(), [1.0, 1.0])  # self: RBF 1, cosine 1


def test_graph_with_k_at_least_n_is_dense_and_symmetric():
    rng = np.random.default_rng(1)
    xy, feats = rng.uniform(0, 500, size=(7, 2)), rng.normal(size=(7, 4))
    g = build_spot_graph(xy, feats, sigma_px=100.0, k=50)
    assert g.neighbors.shape == (7, 7)
    assert all(sorted(row) == list(range(7)) for row in g.neighbors.tolist())
    dense = torch.zeros(7, 7, 2)
    dense[torch.arange(7)[:, None], g.neighbors] = g.edge_attr
    assert torch.allclose(dense, dense.transpose(0, 1), atol=1e-6)  # both channels symmetric
    assert (dense[..., 0] > 0).all() and (dense[..., 0] <= 1).all()


def test_graph_duplicates_subgraph_and_errors():
    xy = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [300.0, 0.0]])
    feats = np.eye(4)
    g = build_spot_graph(xy, feats, k=3)
    assert torch.equal(g.neighbors[:, 0], torch.arange(4))  # each duplicate lists itself first
    assert torch.allclose(g.edge_attr[:3, :, 0], torch.ones(3, 3))  # distance 0 -> RBF 1
    sub = build_spot_graph(_grid_xy(4, 4), np.ones((16, 3)), k=5).subgraph(torch.tensor([0, 1, 4, 5]))
    assert sub.n_spots == 4 and (sub.neighbors < 4).all() and sub.valid[:, 0].all()
    assert not sub.valid.all()  # neighbours outside the crop are padding
    assert torch.equal(sub.neighbors[~sub.valid], torch.arange(4)[:, None].expand(4, 5)[~sub.valid])
    bad_xy = xy.copy()
    bad_xy[1, 0] = np.nan
    for args, word in [((bad_xy, feats), "xy"), ((xy, np.full((4, 4), np.nan)), "feats"),
                       ((np.zeros((0, 2)), np.zeros((0, 3))), "xy"), ((xy, feats[:3]), "feats"),
                       ((np.zeros((4, 3)), feats), "xy")]:
        with pytest.raises(InputError, match=word):
            build_spot_graph(*args)
    with pytest.raises(InputError, match="sigma_px"):
        build_spot_graph(xy, feats, sigma_px=0)


# ---------------------------------------------------------------- VE-SDE
def test_sigma_schedule_endpoints_monotone_and_log_uniform():
    sde = VESDE()
    t = torch.linspace(0, 1, 101)
    s = sde.sigma(t)
    assert math.isclose(float(s[0]), 0.01, rel_tol=1e-6) and math.isclose(float(s[-1]), 10.0, rel_tol=1e-6)
    assert (s.diff() > 0).all()
    grid = sde.grid(4)
    assert math.isclose(float(grid[0]), 10.0, rel_tol=1e-6) and math.isclose(float(grid[-1]), 0.01, rel_tol=1e-5)
    ratios = grid[1:] / grid[:-1]
    assert torch.allclose(ratios, ratios[0].expand(4), rtol=1e-4)  # geometric
    draws = sde.sample_sigma((20000,), torch.Generator().manual_seed(0))
    assert draws.min() >= 0.01 and draws.max() <= 10.0
    assert abs(float(draws.log().mean()) - math.log(math.sqrt(0.01 * 10.0))) < 0.05  # log-uniform
    with pytest.raises(InputError):
        VESDE(1.0, 0.5)


def _gaussian_denoiser(mu, s):
    return lambda x, sig: (s**2 * x + sig**2 * mu) / (s**2 + sig**2)


def test_heun_recovers_gaussian_data_and_beats_euler():
    sde, mu, s = VESDE(), 0.5, 1.0
    den = _gaussian_denoiser(mu, s)
    out = heun_sample(den, (20000, 4), sde, 18, torch.Generator().manual_seed(0))
    assert abs(float(out.mean()) - mu) < 0.1 and abs(float(out.std()) - s) < 0.1
    # exact probability-flow map of the same initial noise
    z = torch.randn((20000, 4), generator=torch.Generator().manual_seed(1)) * sde.sigma_max
    exact = den(mu + (z - mu) * math.sqrt(s**2 + sde.sigma_min**2) / math.sqrt(s**2 + sde.sigma_max**2), sde.sigma_min)
    err = {order: float((heun_sample(den, (20000, 4), sde, 10, torch.Generator().manual_seed(1), order=order)
                         - exact).abs().mean()) for order in (1, 2)}
    assert err[2] < 0.6 * err[1]
    assert torch.equal(heun_sample(den, (5, 3), sde, 3, torch.Generator().manual_seed(2)),
                       heun_sample(den, (5, 3), sde, 3, torch.Generator().manual_seed(2)))


def test_dsm_loss_is_zero_for_the_exact_denoiser_of_a_point_mass():
    sde, g = VESDE(), torch.Generator().manual_seed(0)
    x0 = torch.full((8, 5), 1.3)  # point mass: E[x0 | x_sigma] = 1.3 whatever x_sigma
    sigma = sde.sample_sigma((8,), g)
    x = x0 + sigma[:, None] * torch.randn(8, 5, generator=g)
    assert float(dsm_loss(torch.full_like(x, 1.3), x0, sigma, sde)) == 0.0
    assert float(dsm_loss(x, x0, sigma, sde)) > 0.5  # the identity is no denoiser
    # lambda(sigma) = sigma^2 on the score error equals ||D - x0||^2 / sigma^2
    d = x0 + 0.1 * torch.randn(8, 5, generator=g)
    score, target = (d - x) / sigma[:, None] ** 2, (x0 - x) / sigma[:, None] ** 2
    ref = (sigma[:, None] ** 2 * (score - target) ** 2).mean()
    assert torch.allclose(dsm_loss(d, x0, sigma, sde), ref, rtol=1e-4)
    mask = torch.tensor([True] * 4 + [False] * 4)
    assert torch.allclose(dsm_loss(d, x0, sigma, sde, mask=mask), dsm_loss(d[:4], x0[:4], sigma[:4], sde))


# ---------------------------------------------------------------- model
def test_forward_shapes_sigma_forms_and_chunks():
    m = _model().eval()
    f, xy, _ = _section()
    feats, g = torch.as_tensor(f, dtype=torch.float32), build_spot_graph(xy, f, k=8)
    x = torch.randn(len(xy), 10)
    d, h = m(x, torch.tensor(0.7), feats, g, return_align=True)
    assert d.shape == (30, 10) and h.shape == (30, 10, 16)
    assert torch.allclose(d, m(x, torch.full((30,), 0.7), feats, g), atol=1e-6)
    assert torch.allclose(d, m(x, 0.7, feats, g, chunk=7), atol=1e-5)
    with pytest.raises(InputError, match="graph"):
        m(x[:20], 0.7, feats[:20], g)


def test_dit_blocks_are_identity_at_init_and_output_is_the_skip():
    torch.manual_seed(0)
    blk = DiTBlock(16, 2, 2.0, 0.0)
    h, c = torch.randn(3, 9, 16), torch.randn(3, 16)
    assert torch.equal(blk(h, c), h)
    m = _model().eval()
    f, xy, _ = _section()
    x, sigma = torch.randn(30, 10), torch.tensor(2.0)
    c_skip = m.sde.precondition(sigma)[1]
    assert torch.allclose(m(x, sigma, torch.as_tensor(f, dtype=torch.float32), build_spot_graph(xy, f)), c_skip * x)
    blk.ada[1].bias.data.normal_()  # a trained modulation head is no longer the identity
    assert not torch.allclose(blk(h, c), h)


def test_alignment_loss_zero_when_aligned_and_decreases_when_trained():
    m = _model(E=16)
    e = m.gene_embeddings
    proj = m.align_proj
    m.align_proj = torch.nn.Identity()
    assert float(m.align_loss(3.0 * e[None].expand(4, -1, -1))) < 1e-6
    assert float(m.align_loss(-e[None].expand(4, -1, -1))) > 1.9
    m.align_proj = proj
    h = torch.randn(4, 10, 16)
    opt = torch.optim.Adam(m.align_proj.parameters(), lr=1e-2)
    before = float(m.align_loss(h).detach())
    for _ in range(20):
        opt.zero_grad()
        m.align_loss(h).backward()
        opt.step()
    assert float(m.align_loss(h).detach()) < before - 0.1
    assert float(_model(E=0).align_loss(h)) == 0.0  # no embeddings, no alignment


def _fixed_dsm(m: FLAG, sec, graph) -> float:
    """DSM loss of ``m`` over fixed noise levels and noise (normalised units)."""
    f, _, y = sec
    feats = torch.as_tensor(f, dtype=torch.float32)
    x0 = m.normalise(torch.as_tensor(y, dtype=torch.float32))
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        losses = []
        for sigma in m.sde.grid(7):
            x = x0 + sigma * torch.randn(x0.shape, generator=g)
            losses.append(float(dsm_loss(m(x, sigma, feats, graph), x0, sigma, m.sde, weighting="edm")))
    return float(np.mean(losses))


def test_a_few_training_steps_lower_the_dsm_loss_and_keep_best_weights():
    secs = [_section(seed=s) for s in range(2)]
    cfg = FlagConfig(**TINY, max_steps=200, val_every=100, crop_spots=30, val_steps=2, lr=5e-3, knn=8)
    m = _model()
    graph = build_spot_graph(secs[0][1], secs[0][0], k=8)
    y = torch.as_tensor(np.concatenate([s[2] for s in secs]), dtype=torch.float32)
    m.set_target_stats(y.mean(0), y.std(0))
    before = _fixed_dsm(m, secs[0], graph)
    hist = train_flag(m, secs, cfg, lambda xy, f: build_spot_graph(xy, f, k=8), progress=False)
    assert _fixed_dsm(m, secs[0], graph) < 0.8 * before
    assert hist["steps_run"] == 200 and len(hist["history"]) == 2 and hist["n_val"] == 6
    assert hist["best_val_mse"] == min(r["val_mse"] for r in hist["history"])
    assert all(np.isfinite(r["train_align"]) for r in hist["history"])
    assert not m.training


def test_weight_ema_is_what_validation_scores_and_the_run_keeps_and_training_is_unchanged_by_it():
    """``flag.ema``: a decay near 0 keeps (almost) the trained weights, so the kept weights and validation match a
    fit without EMA (the swap back after each validation leaves training as it was); decay 0.9 keeps other
    weights and scores other values; a decay outside (0, 1) is refused."""
    secs = [_section(seed=s) for s in range(2)]

    dsm: dict = {}

    def run(ema):
        cfg = FlagConfig(**TINY, max_steps=60, val_every=20, crop_spots=30, val_steps=2, lr=5e-3, knn=8, ema=ema)
        m = _model()
        hist = train_flag(m, secs, cfg, lambda xy, f: build_spot_graph(xy, f, k=8), progress=False)
        dsm[ema] = [r["train_dsm"] for r in hist["history"]]
        return {k: v.clone() for k, v in m.state_dict().items()}, [r["val_mse"] for r in hist["history"]]

    plain, plain_val = run(None)
    near, near_val = run(1e-7)
    avg, avg_val = run(0.9)
    assert all(torch.allclose(plain[k], near[k], atol=1e-5) for k in plain)
    np.testing.assert_allclose(near_val, plain_val, rtol=1e-4)
    assert not all(torch.allclose(plain[k], avg[k], atol=1e-4) for k in plain)
    assert not np.allclose(avg_val, plain_val, rtol=1e-4)
    assert dsm[None] == dsm[0.9]  # training itself does not see the average (swapped back after validation)
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(InputError, match="flag.ema"):
            FlagConfig(ema=bad)
    import pickle

    from stgen.models.flag.training import FlagModule

    module = FlagModule(_model(), FlagConfig(**TINY, ema=0.9))  # ddp_spawn pickles the module
    assert pickle.loads(pickle.dumps(module)).ema is not None


def test_the_kept_weights_are_the_exponential_average_of_every_steps_weights(monkeypatch):
    """With one validation at the end, the run keeps ``e_1 = w_1, e_s = d e_(s-1) + (1 - d) w_s`` over the trained
    weights ``w_s`` after every step, computed here by hand; when no validation value counts (NaN every round, so
    no best weights) it keeps the average too."""
    from stgen.models.flag import training as FT

    secs = [_section(seed=s) for s in range(2)]
    steps: list[dict] = []
    own = FT.FlagModule.on_train_batch_end

    def record(self, outputs, batch, batch_idx):
        own(self, outputs, batch, batch_idx)
        steps.append({n: p.detach().clone() for n, p in self.model.named_parameters()})

    monkeypatch.setattr(FT.FlagModule, "on_train_batch_end", record)
    for no_validation in (False, True):
        if no_validation:
            scored = FT.FlagModule.record_validation
            monkeypatch.setattr(FT.FlagModule, "record_validation",
                                lambda self, value, net, **kw: scored(self, float("nan"), net, **kw))
        steps.clear()
        cfg = FlagConfig(**TINY, max_steps=12, val_every=12, crop_spots=30, val_steps=2, lr=5e-3, knn=8, ema=0.8)
        m = _model()
        hist = train_flag(m, secs, cfg, lambda xy, f: build_spot_graph(xy, f, k=8), progress=False)
        assert len(steps) == 12 and (hist["best_step"] == -1) == no_validation
        expected = dict(steps[0])
        for w in steps[1:]:
            expected = {n: 0.8 * expected[n] + 0.2 * w[n] for n in expected}
        for n, p in m.named_parameters():
            assert torch.allclose(p, expected[n], atol=1e-6), n
            assert not torch.allclose(p, steps[-1][n], atol=1e-6) or not p.requires_grad, n


def _fit_network(secs, **kw):
    """A tiny FLAG network (or ensemble, ``ensemble=``) built from torch seed 0 and trained on ``secs``:
    ``(network, history)``; ``kw`` overrides the config."""
    from stgen.models.flag.network import flag_network

    cfg = FlagConfig(**{**TINY, "max_steps": 10, "val_every": 10, "crop_spots": 30, "val_steps": 2, "lr": 5e-3,
                        "knn": 8, **kw})
    torch.manual_seed(0)
    net = flag_network(cfg, 10, 6, torch.randn(10, 8))
    return net, train_flag(net, secs, cfg, lambda xy, f: build_spot_graph(xy, f, k=8), progress=False)


def test_each_ensemble_member_trains_as_it_would_alone_and_the_members_differ(monkeypatch):
    """``flag.ensemble: 2``: member 0 ends bit-for-bit where a one-network fit of the same seed ends (same
    initialisation, noise, crops; a gradient clip so tight that it acts every step is applied per member), member
    1 has other weights and draws its noise from the next seed; the members share the statistics; a fit with two
    validation rounds keeps the ensemble of the round it scored best."""
    from stgen.models.flag import training as FT
    from stgen.models.flag.network import FlagEnsemble

    secs = [_section(seed=s) for s in range(2)]
    noise_seeds: set = set()
    keyed = FT.key_seed

    def recording(seed, *rest):
        if rest and rest[0] == FT._NOISE:
            noise_seeds.add(seed)
        return keyed(seed, *rest)

    def fit(ensemble, **kw):
        return _fit_network(secs, grad_clip=1e-3, ensemble=ensemble, **kw)

    one, _ = fit(1, val_fraction=0.0)
    with monkeypatch.context() as m:
        m.setattr(FT, "key_seed", recording)
        two, _ = fit(2, val_fraction=0.0)
    assert noise_seeds == {42, 43}
    assert isinstance(one, FLAG) and isinstance(two, FlagEnsemble) and len(two.members) == 2
    first, second = two.members[0].state_dict(), two.members[1].state_dict()
    for k, v in one.state_dict().items():
        assert torch.equal(v, first[k]), k
    trained = [k for k, _ in one.named_parameters()]
    assert all(not torch.allclose(first[k], second[k]) for k in trained if k != "graph_encoder.blocks.0.attn.lam")
    assert torch.equal(first["target_std"], second["target_std"]) and torch.equal(first["feat_mean"],
                                                                                  second["feat_mean"])
    first_round, _ = fit(2, max_steps=5, val_every=5)
    scored = FT.FlagModule.record_validation
    with monkeypatch.context() as m:  # the validation value is the step, so the first of two rounds is the best
        m.setattr(FT.FlagModule, "record_validation",
                  lambda self, value, net, **kw: scored(self, float(self.global_step), net, **kw))
        kept, hist = fit(2, max_steps=10, val_every=5)
    assert hist["best_step"] == 5 and len(hist["history"]) == 2 and hist["n_val"] == 6 and not kept.training
    for k, v in first_round.state_dict().items():
        assert torch.equal(v, kept.state_dict()[k]), k
    with pytest.raises(InputError, match="flag.ensemble"):
        FlagConfig(ensemble=0)
    with pytest.raises(InputError, match="at least 2"):
        FlagEnsemble([_model()])


def test_weight_ema_averages_every_ensemble_member():
    """``flag.ema`` with ``flag.ensemble: 2``: a decay near 0 keeps the trained weights of both members, a decay
    of 0.9 keeps other weights in both."""
    secs = [_section(seed=s) for s in range(2)]

    def run(ema):
        net, _ = _fit_network(secs, max_steps=12, val_every=6, ensemble=2, ema=ema)
        return {k: v.clone() for k, v in net.named_parameters()}

    plain, near, avg = run(None), run(1e-7), run(0.9)
    assert all(torch.allclose(plain[k], near[k], atol=1e-5) for k in plain)
    for member in ("members.0.", "members.1."):
        assert not all(torch.allclose(plain[k], avg[k], atol=1e-4) for k in plain if k.startswith(member)), member


def test_ensemble_samples_alternate_between_the_members():
    """Sample ``k`` of an ensemble is member ``k % M``'s probability-flow run from the shared generator's next
    noise: the mean and sd of 4 samples equal those of the members' own runs taken in turn."""
    from stgen.models.flag.network import FlagEnsemble

    a, b = _model(seed=1).eval(), _model(seed=2).eval()
    with torch.no_grad():  # a fresh FLAG's output is its skip term whatever its weights (adaLN-Zero): perturb them
        for p in [*a.parameters(), *b.parameters()]:
            p.add_(0.2 * torch.randn_like(p))
    ens = FlagEnsemble([a, b])
    f, xy, _ = _section()
    graph = build_spot_graph(xy, f, k=8)
    feats = torch.as_tensor(f, dtype=torch.float32)
    mean, sd = ens.generate(feats, graph, n_samples=4, steps=3, generator=torch.Generator().manual_seed(5), order=1)
    g = torch.Generator().manual_seed(5)
    runs = torch.stack([m.generate(feats, graph, n_samples=1, steps=3, generator=g, order=1)[0]
                        for m in (a, b, a, b)])
    torch.testing.assert_close(mean, runs.mean(0))
    torch.testing.assert_close(sd, runs.std(0, unbiased=False))
    alone, _ = a.generate(feats, graph, n_samples=4, steps=3, generator=torch.Generator().manual_seed(5), order=1)
    assert not torch.allclose(alone, mean)


def test_the_returned_sd_is_the_sample_spread_times_the_runs_sd_scale():
    """``flag.sd_scale`` multiplies the sd ``predict`` returns (stored in run.json at fit time); the mean is
    unchanged; a run saved before the field returns the spread itself; a scale <= 0 is refused."""
    from stgen.models.base import FeatureSettings, SectionInput
    from stgen.models.flag.model import FlagModel

    net = _model(seed=3).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    f, xy, _ = _section()
    base = {"config": net.config.architecture(), "steps": 2, "samples": 3, "order": 1, "sigma_px": 100.0, "knn": 8}
    out = {}
    for name, meta in {"before": base, "one": {**base, "sd_scale": 1.0}, "two": {**base, "sd_scale": 2.5}}.items():
        out[name] = FlagModel(net, meta, None, FlagConfig(**TINY)).predict(SectionInput("S", xy, f),
                                                                          FeatureSettings())
    assert np.array_equal(out["before"][1], out["one"][1]) and out["one"][1].max() > 0
    np.testing.assert_allclose(out["two"][1], 2.5 * out["one"][1], rtol=1e-6)
    assert np.array_equal(out["two"][0], out["one"][0])
    with pytest.raises(InputError, match="flag.sd_scale"):
        FlagConfig(sd_scale=0)


def test_generate_is_deterministic_finite_and_in_target_units():
    m = _model().eval()
    f, xy, y = _section()
    m.set_target_stats(torch.full((10,), 100.0), torch.full((10,), 0.01))
    feats, g = torch.as_tensor(f, dtype=torch.float32), build_spot_graph(xy, f, k=8)
    a = m.generate(feats, g, n_samples=3, steps=4, generator=torch.Generator().manual_seed(0))
    b = m.generate(feats, g, n_samples=3, steps=4, generator=torch.Generator().manual_seed(0))
    c = m.generate(feats, g, n_samples=3, steps=4, generator=torch.Generator().manual_seed(1))
    assert a[0].shape == a[1].shape == (30, 10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert torch.isfinite(a[0]).all() and (a[1] > 0).all()
    assert (a[0] - 100.0).abs().max() < 5.0  # denormalised around the target mean (sd 0.01 x O(1))
    one = m.generate(feats, g, n_samples=1, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one[1], torch.zeros(30, 10))


def test_gene_token_embeddings_for_every_backbone():
    from model_fixtures import tiny_backbone

    from stgen.backbones.external import gene_token_embeddings

    torch.manual_seed(0)
    emb, cellfm, scgpt = (tiny_backbone(k) for k in ("embedded", "cellfm", "scgpt"))
    genes = ["G3", "G0", "G7"]
    for bb, table, rows in [(emb, emb.gene_emb.weight, [3, 0, 7]), (cellfm, cellfm.gene_emb, [4, 1, 8]),
                            (scgpt, scgpt.encoder.embedding.weight, [4, 1, 8])]:
        e = gene_token_embeddings(bb, genes)
        assert e.shape == (3, table.shape[1]) and not e.requires_grad
        assert torch.equal(e, table.detach()[rows])
        with pytest.raises(InputError, match="NOPE"):
            gene_token_embeddings(bb, ["G1", "NOPE"])
    with pytest.raises(InputError, match="Linear"):
        gene_token_embeddings(torch.nn.Linear(2, 2), genes)


# ---------------------------------------------------------------- config hashes and the pipeline
def test_hinge_and_ridge_config_hashes_are_unchanged_by_the_flag_section():
    cfg = StgenConfig()  # the default hashes themselves are pinned in test_benchmark_models
    other = StgenConfig.from_dict({"flag": {"dim": 8, "dit_heads": 1, "ema": 0.99}})
    for model in ("hinge", "ridge", "hinge-paper"):
        assert config_hash(other, model, "C2") == config_hash(cfg, model, "C2"), model
    assert config_hash(other, "flag", "C2") != config_hash(cfg, "flag", "C2")
    with pytest.raises(InputError, match="flag.nope"):
        StgenConfig.from_dict({"flag": {"nope": 1}})


def _synthetic_setup(tmp_path, monkeypatch, n_top: int, seed: int, **flag) -> None:
    """A Her2ST-like folder ``her2st`` (imaged A1-A3; 30 genes, ERBB2/FASN/GNAS first) and
    ``cfg.yaml``, a configuration that fits FLAG in about a second; the cache goes under ``tmp_path``."""
    from model_fixtures import synthetic_her2st as _synthetic_her2st

    from stgen.data.panel import default_vocab_path, load_vocabulary

    if default_vocab_path() is None:
        pytest.skip("CellFM vocabulary not available")
    markers = ["ERBB2", "FASN", "GNAS"]  # the benchmark maps these
    genes = markers + [g for g in load_vocabulary()[100:130] if g not in markers][:27]
    _synthetic_her2st(tmp_path / "her2st", genes, np.random.default_rng(seed))
    cfg = {"data": {"n_top": n_top}, "features": {"encoder": "rgb-stats", "patch_px": 16},
           "pretrain": {"dim": 16, "n_layers": 2, "n_heads": 2, "value_bins": 8, "epochs": 1, "genes_per_step": 30},
           "flag": {**TINY, "knn": 8, "crop_spots": 16, "val_steps": 1, "steps": 2, "samples": 2, **flag}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("STGEN_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("ensemble", [1, 2])
def test_fit_load_predict_round_trip_on_synthetic_data(tmp_path, monkeypatch, ensemble):
    from typer.testing import CliRunner

    from stgen.cli import app
    from stgen.workflows.rundir import load_run
    from stgen.workflows.predict import predict

    _synthetic_setup(tmp_path, monkeypatch, n_top=20, seed=0, max_steps=6, val_every=3, ensemble=ensemble)
    run_dir = tmp_path / "run"
    r = CliRunner().invoke(app, ["fit", "--model", "flag", "--data", str(tmp_path / "her2st"), "--test-section", "A1",
                                 "--out", str(run_dir), "--config", str(tmp_path / "cfg.yaml"), "--quiet"])
    assert r.exit_code == 0, r.output
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["model"] == "flag" and meta["flag"]["steps"] == 2 and meta["flag"]["samples"] == 2
    assert meta["flag"]["sigma_px"] == 16.0 and meta["flag"]["knn"] == 8 and meta["flag"]["embedding_dim"] == 16
    assert meta["flag"]["config"]["dim"] == 16 and meta["flag"]["n_trainable"] > 0
    assert meta["flag"]["config"]["ensemble"] == ensemble
    keys = list(load_run(run_dir).model.net.state_dict())
    assert {k.split(".")[1] for k in keys if k.startswith("members.")} == ({"0", "1"} if ensemble == 2 else set())
    assert meta["training"]["steps_run"] == 6 and meta["config_hash"] == config_hash(
        StgenConfig.load(tmp_path / "cfg.yaml"), "flag", "A1")
    assert "genes" not in meta["backbone"]
    image = next((tmp_path / "her2st" / "ST-imgs" / "A" / "A1").glob("*.jpg"))
    spots = tmp_path / "her2st" / "ST-spotfiles" / "A1_selection.tsv"
    a = predict(run_dir, image, spots, tmp_path / "p1.h5ad", cache_dir=tmp_path / "cache", progress=False)
    b = predict(run_dir, image, spots, tmp_path / "p2.h5ad", cache_dir=tmp_path / "cache", progress=False)
    assert a.shape == (30, len(meta["panel"])) and np.isfinite(a.X).all()
    assert np.array_equal(a.X, b.X) and np.array_equal(a.layers["std"], b.layers["std"])  # reloaded: identical
    assert a.uns["stgen"]["model"] == "flag" and a.uns["stgen"]["steps"] == 2 and a.uns["stgen"]["samples"] == 2
    run = load_run(run_dir)
    feats = np.random.default_rng(0).normal(size=(30, meta["feature_dim"]))
    with pytest.raises(InputError, match="xy"):
        run.predict(feats)
    m1, _ = run.predict(feats, xy=a.obsm["spatial"])
    m2, _ = load_run(run_dir).predict(feats, xy=a.obsm["spatial"])
    assert np.array_equal(m1, m2)


def test_stgen_benchmark_runs_flag(tmp_path, monkeypatch):
    """`stgen benchmark --seeds 2`: two predictions per generative model, one for ridge, seed-sd columns and
    the sampling-variance table; a second run re-uses every current prediction (no predict call)."""
    from stgen.cli import app
    import anndata as ad
    import pandas as pd
    from typer.testing import CliRunner

    import stgen.workflows.predict as pipeline
    from stgen.workflows.benchmark import METRICS

    _synthetic_setup(tmp_path, monkeypatch, n_top=30, seed=1, max_steps=4, val_every=4)  # every gene: the markers too
    calls, real_predict = [], pipeline.predict

    def counting_predict(run_dir, image, spots, out, **kw):
        calls.append(f"{out.parent.name}/{out.name}")
        return real_predict(run_dir, image, spots, out, **kw)

    monkeypatch.setattr(pipeline, "predict", counting_predict)
    bench = tmp_path / "bench"
    args = ["benchmark", "--models", "flag,ridge", "--sections", "A2", "--data", str(tmp_path / "her2st"), "--out",
            str(bench), "--config", str(tmp_path / "cfg.yaml"), "--quiet"]
    r = CliRunner().invoke(app, [*args, "--seeds", "2"])
    assert r.exit_code == 0, r.output
    assert sorted(calls) == ["flag/A2.h5ad", "flag/A2_seed1.h5ad", "ridge/A2.h5ad"]
    assert sorted(p.name for p in (bench / "preds" / "flag").iterdir()) == ["A2.h5ad", "A2_seed1.h5ad"]
    assert [p.name for p in (bench / "preds" / "ridge").iterdir()] == ["A2.h5ad"]
    assert ad.read_h5ad(bench / "preds" / "flag" / "A2_seed1.h5ad").uns["stgen"]["seed"] == 1
    df = pd.read_csv(bench / "metrics.csv").set_index("model")
    assert list(df.index) == ["flag", "ridge"] and df.loc["flag", "n_seeds"] == 2 and df.loc["ridge", "n_seeds"] == 1
    assert {f"{m}_seed_sd" for m in METRICS} <= set(df.columns)
    assert (df.loc["ridge", [f"{m}_seed_sd" for m in ("pcc50", "mse", "gsc", "ssc")]] == 0).all()
    seeds = pd.read_csv(bench / "metrics_seeds.csv")
    flag = seeds[seeds.model == "flag"]
    assert sorted(flag.seed) == [0, 1] and (seeds.model == "ridge").sum() == 1
    for m in ("pcc50", "mse", "ssc", "ari", "deg_top20"):
        assert df.loc["flag", m] == pytest.approx(flag[m].mean())
        assert df.loc["flag", f"{m}_seed_sd"] == pytest.approx(flag[m].std(ddof=0), abs=1e-12)
    assert np.isfinite(df[["pcc50", "mse", "ssc", "rvd", "ssim", "ari", "nmi", "predict_s"]].to_numpy()).all()
    report = (bench / "report.md").read_text()
    assert "## Sampling variance (2 seeds)" in report and "SSC sd" in report
    assert not [ln for ln in report.splitlines() if ln.startswith("|") and "nan" in ln.lower()]
    for name in ("morans_A2.png", "ssc_by_section.png", "pcc50_by_section.png", "gsc_by_section.png"):
        assert (bench / name).stat().st_size > 1000, name
    # a second run re-uses all three predictions and reports their stored predict time
    calls.clear()
    r = CliRunner().invoke(app, [*args, "--seeds", "2"])
    assert r.exit_code == 0, r.output
    assert calls == []
    again = pd.read_csv(bench / "metrics.csv").set_index("model")
    assert np.allclose(again[["predict_s", "pcc50", "ssc"]], df[["predict_s", "pcc50", "ssc"]])
    # --seeds 1 (the default): seed 0 only, re-used; no seed columns, no sampling-variance table
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    one = pd.read_csv(bench / "metrics.csv")
    assert calls == [] and not any(c.endswith("_seed_sd") for c in one.columns) and "n_seeds" not in one.columns
    assert set(METRICS) <= set(one.columns) and "Sampling variance" not in (bench / "report.md").read_text()
    r = CliRunner().invoke(app, [*args, "--seeds", "0"])
    assert r.exit_code == 2 and "--seeds" in r.output
    r = CliRunner().invoke(app, ["fit", "--model", "nope", "--data", str(tmp_path / "her2st"), "--test-section", "A1",
                                 "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "flag" in r.output
