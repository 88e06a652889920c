"""Backbone, SoftAdaLN identity initialisation and the HINGE denoiser."""

from __future__ import annotations

import torch

from stgen.models.hinge.config import HingeConfig
from stgen.backbones.pretrain import PretrainConfig
from stgen.sampling.masking import MaskSchedule
from stgen.backbones.embedded import BackboneConfig, ExpressionBackbone
from stgen.models.hinge.network import HINGE
from stgen.nn.softadaln import SoftAdaLN
from stgen.training.losses import masked_mse
from stgen.backbones.pretrain import pretrain_backbone
from stgen.models.hinge.training import train_hinge

GENES = [f"G{i}" for i in range(24)]
CFG = BackboneConfig(dim=32, n_layers=2, n_heads=4, value_bins=16)


def _inputs(B=5, G=12, F=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, G, generator=g) * 5
    vis = torch.rand(B, G, generator=g) < 0.5
    t = torch.randint(1, 51, (B,), generator=g)
    f = torch.randn(B, F, generator=g)
    return x, vis, t, f


def test_softadaln_is_identity_at_init():
    m = SoftAdaLN(16, 8)
    h, c = torch.randn(3, 7, 16), torch.randn(3, 8)
    out, gate = m(h, c)
    assert torch.equal(out, h)
    assert torch.equal(gate, torch.ones(3, 1, 16))


def test_softadaln_ablations_are_not_identity():
    h, c = torch.randn(3, 7, 16) * 3 + 1, torch.randn(3, 8)
    assert not torch.allclose(SoftAdaLN(16, 8, soft_norm=False)(h, c)[0], h)
    assert not torch.allclose(SoftAdaLN(16, 8, identity_init=False)(h, c)[0], h)


def test_hinge_equals_frozen_backbone_at_init():
    torch.manual_seed(0)
    bb = ExpressionBackbone(GENES, CFG)
    panel = GENES[3:15]
    model = HINGE(bb, panel, feat_dim=10, T=50)
    x, vis, t, f = _inputs()
    out = model(x * vis, vis, t, f)
    ref = bb(x * vis, bb.gene_index(panel), vis)
    assert torch.equal(out, ref)  # exactly, not approximately


def test_hinge_conditioning_changes_output_after_perturbing_heads():
    torch.manual_seed(0)
    bb = ExpressionBackbone(GENES, CFG)
    model = HINGE(bb, GENES[:12], feat_dim=10, T=50)
    with torch.no_grad():
        model.mod_attn[0].head.weight.normal_(std=0.1)
    x, vis, t, f = _inputs()
    a = model(x * vis, vis, t, f)
    b = model(x * vis, vis, t, f + 1.0)
    assert not torch.allclose(a, b)


def test_only_adapter_parameters_train():
    bb = ExpressionBackbone(GENES, CFG)
    model = HINGE(bb, GENES[:12], feat_dim=10, T=50)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("backbone.") for n in trainable)
    assert any(n.startswith("mod_attn.") for n in trainable)
    assert any(n.startswith("mod_ffn.") for n in trainable)
    assert any(n.startswith("phi.") for n in trainable)
    assert any(n.startswith("decoder.") for n in trainable)
    assert any(n.endswith("norm.eta") for n in trainable)


def test_masked_genes_do_not_leak_their_values():
    torch.manual_seed(0)
    bb = ExpressionBackbone(GENES, CFG)
    x, vis, _, _ = _inputs()
    idx = bb.gene_index(GENES[:12])
    y = x.clone()
    y[~vis] += 100.0  # change only masked values
    assert torch.equal(bb(x, idx, vis), bb(y, idx, vis))


def test_masked_mse_uses_masked_entries_only():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    tgt = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    vis = torch.tensor([[True, False], [False, True]])
    assert masked_mse(pred, tgt, vis).item() == (4 + 9) / 2


def _toy_data(n=96, G=12, F=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, F, generator=g)
    w = torch.randn(F, G, generator=g)
    y = torch.nn.functional.softplus(feats @ w) + 0.1 * torch.rand(n, G, generator=g)
    return feats.numpy(), y.numpy()


def test_pretrain_lowers_masked_reconstruction_loss():
    _, y = _toy_data(n=128)
    cfg = PretrainConfig(dim=32, n_layers=2, n_heads=4, value_bins=16, epochs=1, batch_size=32, genes_per_step=12)
    bb0 = ExpressionBackbone(GENES[:12], BackboneConfig(dim=32, n_layers=2, n_heads=4, value_bins=16))
    bb, hist = pretrain_backbone(y, GENES[:12], PretrainConfig(**{**cfg.__dict__, "epochs": 15}), progress=False)
    yt = torch.as_tensor(y)
    vis = torch.rand(yt.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    idx = torch.arange(12)
    with torch.no_grad():
        before = masked_mse(bb0(yt * vis, idx, vis), yt, vis).item()
        after = masked_mse(bb(yt * vis, idx, vis), yt, vis).item()
    assert after < 0.5 * before


def test_train_hinge_learns_histology_signal():
    feats, y = _toy_data()
    torch.manual_seed(0)
    bb = ExpressionBackbone(GENES[:12], CFG)
    model = HINGE(bb, GENES[:12], feat_dim=feats.shape[1], T=10)
    sched = MaskSchedule(12, T=10)
    cfg = HingeConfig(T=10, lr=3e-3, batch_size=16, max_epochs=8, es_warmup=8, curriculum_epochs=1,
                           milestones=[100], val_fraction=0.2, val_steps=3)
    ft = torch.as_tensor(feats)
    before, _ = model.generate(ft, sched, steps=3, n_samples=2, generator=torch.Generator().manual_seed(0))
    hist = train_hinge(model, feats, y, cfg, sched, progress=False)
    after, std = model.generate(ft, sched, steps=3, n_samples=2, generator=torch.Generator().manual_seed(0))
    yt = torch.as_tensor(y)
    # 0.45-0.51 over training seeds 0-3 and 42 (data order and corruption keyed on the seed, stgen.training.trainer)
    assert ((after - yt) ** 2).mean() < 0.55 * ((before - yt) ** 2).mean()
    assert hist["best_epoch"] >= 0 and len(hist["history"]) == hist["epochs_run"]
    assert std.shape == after.shape and torch.all(std >= 0)
    # the frozen backbone did not move
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_masked_kv_only_in_first_half_couples_all_masked_genes():
    """All-masked spot: with masked keys/values in every layer each gene is predicted alone;
    with the CellFM/HINGE rule (first half only) the other genes of the panel matter."""
    vis = torch.zeros(2, 6, dtype=torch.bool)
    x = torch.zeros(2, 6)
    for n_masked, coupled in ((4, False), (None, True)):
        torch.manual_seed(0)
        bb = ExpressionBackbone(GENES, BackboneConfig(dim=32, n_layers=4, n_heads=4, value_bins=16,
                                                      masked_kv_layers=n_masked))
        a = bb(x, bb.gene_index(GENES[:6]), vis)[:, 0]
        b = bb(x, bb.gene_index([GENES[0], *GENES[10:15]]), vis)[:, 0]
        assert torch.allclose(a, b, atol=1e-6) != coupled


def test_spot_keyed_sampling_does_not_depend_on_the_other_spots():
    """With spot keys, a spot's samples are a function of (seed, its pixel position, its features): a bare-slide
    grid point gets the same prediction as the same position in a spot file, whatever else is predicted."""
    from stgen.sampling.masking import spot_keys

    torch.manual_seed(0)
    bb = ExpressionBackbone(GENES, CFG)
    model = HINGE(bb, GENES[:12], feat_dim=10, T=20)
    with torch.no_grad():
        for m in model.mod_attn:
            m.head.weight.normal_(std=0.2)
    sched = MaskSchedule(12, T=20)
    feats = torch.randn(10, 10, generator=torch.Generator().manual_seed(1))
    xy = torch.rand(10, 2, generator=torch.Generator().manual_seed(2)).numpy() * 5000
    sub = [7, 2, 5, 0]

    def run(idx, keyed, batch_size):
        return model.generate(feats[idx], sched, steps=4, n_samples=3, batch_size=batch_size,
                              generator=torch.Generator().manual_seed(0),
                              spot_keys=spot_keys(xy[idx]) if keyed else None)

    full_mean, full_std = run(list(range(10)), True, 64)
    part_mean, part_std = run(sub, True, 5)
    torch.testing.assert_close(part_mean, full_mean[sub], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part_std, full_std[sub], atol=1e-5, rtol=1e-5)
    assert full_std.abs().max() > 1e-3  # the samples do differ: the orders matter
    # without keys the orders are drawn batch-wise, so the same spots get other samples
    assert not torch.allclose(run(sub, False, 5)[0], run(list(range(10)), False, 64)[0][sub], atol=1e-5)
    # another seed gives other samples for the same keys
    other = model.generate(feats[sub], sched, steps=4, n_samples=3, generator=torch.Generator().manual_seed(1),
                           spot_keys=spot_keys(xy[sub]))[0]
    assert not torch.allclose(other, part_mean, atol=1e-5)


def _train_toy(predictive):
    feats, y = _toy_data()
    torch.manual_seed(0)
    bb = ExpressionBackbone(GENES[:12], CFG)
    cfg = HingeConfig(T=10, lr=3e-3, batch_size=16, max_epochs=6, es_warmup=6, curriculum_epochs=1,
                      milestones=[100], val_fraction=0.2, val_steps=3, predictive=predictive)
    model = HINGE(bb, GENES[:12], feat_dim=feats.shape[1], T=10, config=cfg)
    train_hinge(model, feats, y, cfg, MaskSchedule(12, T=10), progress=False)
    return model, torch.as_tensor(feats), torch.as_tensor(y)


def test_predictive_head_leaves_the_papers_mean_path_and_learns_a_calibrated_sd():
    """The Gaussian head reads detached states and is built last: the mean network trains exactly as HINGE's
    (same weights, same prediction), and the head's sd covers the truth about as a 90% interval should."""
    import pytest

    paper, ft, yt = _train_toy("none")
    head, _, _ = _train_toy("gaussian")
    assert paper.sd_head is None and head.has_sd
    shared = {k: v for k, v in head.state_dict().items() if not k.startswith("sd_head.")}
    for k, v in paper.state_dict().items():
        torch.testing.assert_close(shared[k], v, msg=k)
    sched = MaskSchedule(12, T=10)
    kw = dict(steps=3, n_samples=4, generator=torch.Generator().manual_seed(0))
    mean_p, sd_p = paper.generate(ft, sched, **kw)
    mean_h, sd_h = head.generate(ft, sched, **{**kw, "generator": torch.Generator().manual_seed(0)})
    torch.testing.assert_close(mean_h, mean_p)
    assert torch.all(sd_h > sd_p)  # the mixture sd adds the head's variance to the samples' spread
    inside = float(((yt - mean_h).abs() <= 1.645 * sd_h).float().mean())
    assert 0.7 < inside < 0.99, inside  # training spots, 6 epochs: near the nominal 90%
    with pytest.raises(ValueError, match="predictive head"):
        paper.generate(ft, sched, steps=3, reveal="sample")
    with pytest.raises(ValueError, match="reveal"):
        head.generate(ft, sched, steps=3, reveal="draw")


def test_sample_reveal_gives_distinct_samples_with_spot_keyed_draws():
    from stgen.sampling.masking import spot_keys

    head, ft, _ = _train_toy("gaussian")
    sched = MaskSchedule(12, T=10)
    xy = torch.rand(len(ft), 2, generator=torch.Generator().manual_seed(2)).numpy() * 5000
    keys = spot_keys(xy)

    def run(idx, seed=0, reveal="sample"):
        return head.generate(ft[idx], sched, steps=3, n_samples=3, generator=torch.Generator().manual_seed(seed),
                             spot_keys=keys[idx], reveal=reveal)

    mean_s, sd_s = run(list(range(len(ft))))
    mean_m, sd_m = run(list(range(len(ft))), reveal="mean")
    assert not torch.allclose(mean_s, mean_m, atol=1e-4)  # later steps condition on drawn values
    sub = [9, 3, 40]
    torch.testing.assert_close(run(sub)[0], mean_s[sub], atol=1e-5, rtol=1e-5)  # draws keyed on the spot
    assert not torch.allclose(run(sub, seed=1)[0], mean_s[sub], atol=1e-5)
    assert torch.all(sd_s > 0) and torch.isfinite(sd_s).all()


def test_draws_estimate_averages_the_revealed_draws_beside_the_same_mixture_sd():
    """``estimate="draws"`` returns the mean of the revealed draws: with the same seeds its sd is the mixture's,
    its mean differs from the mixture mean by the draws' own noise, which shrinks as 1/sqrt(samples)."""
    import pytest

    from stgen.errors import InputError

    head, ft, _ = _train_toy("gaussian")
    sched = MaskSchedule(12, T=10)

    def run(samples, estimate):
        return head.generate(ft, sched, steps=3, n_samples=samples, generator=torch.Generator().manual_seed(0),
                             reveal="sample", estimate=estimate)

    rms = {}
    for s in (4, 64):
        mean_m, sd_m = run(s, "mixture")
        mean_d, sd_d = run(s, "draws")
        torch.testing.assert_close(sd_d, sd_m)
        rms[s] = float((mean_d - mean_m).pow(2).mean().sqrt())
        # each value: the mean over samples of sd_reveal * N(0, 1), so at most the mixture sd / sqrt(samples)
        assert rms[s] < float(sd_m.pow(2).mean().sqrt()) / s**0.5 * 1.2, (s, rms[s])
    assert rms[4] > 2.5 * rms[64], rms  # sqrt(64 / 4) = 4 in expectation
    with pytest.raises(ValueError, match="estimate"):
        head.generate(ft, sched, steps=3, reveal="mean", estimate="draws")
    with pytest.raises(ValueError, match="estimate"):
        head.generate(ft, sched, steps=3, reveal="sample", estimate="median")
    with pytest.raises(InputError, match="estimate"):
        HingeConfig(estimate="draws", predictive="none")
    with pytest.raises(InputError, match="estimate"):
        HingeConfig(estimate="mode")
    assert HingeConfig(estimate="draws").paper().estimate == "mixture"


def test_condition_token_starts_as_the_network_without_it_and_gives_histology_a_key_at_t_T():
    """``cond_token``: with its gates at 0 the network computes what it computes without the token; once a gate
    opens, an all-masked spot (t = T, no gene key) reads the histology through the token's key alone."""
    from stgen.models.hinge.config import HingeConfig

    cfg = BackboneConfig(dim=32, n_layers=2, n_heads=4, value_bins=16, masked_kv_layers=2)  # every block masked
    torch.manual_seed(0)
    plain = HINGE(ExpressionBackbone(GENES, cfg), GENES[:12], feat_dim=10, T=50)
    torch.manual_seed(0)
    tok = HINGE(ExpressionBackbone(GENES, cfg), GENES[:12], feat_dim=10, T=50,
                config=HingeConfig(cond_token=True))
    x, vis, t, f = _inputs()
    torch.testing.assert_close(tok(x * vis, vis, t, f), plain(x * vis, vis, t, f), atol=1e-6, rtol=0)
    none = torch.zeros_like(vis)
    tT = torch.full((5,), 50)
    # SoftAdaLN heads at identity: histology reaches no block, with or without the closed token
    assert torch.equal(tok(x * 0, none, tT, f), tok(x * 0, none, tT, f + 1.0))
    with torch.no_grad():
        tok.cond_key_gate.fill_(1.0)
    assert not torch.allclose(tok(x * 0, none, tT, f), tok(x * 0, none, tT, f + 1.0), atol=1e-4)
    # the gates train: one step of a masked loss moves them off 0
    tok2 = HINGE(ExpressionBackbone(GENES, cfg), GENES[:12], feat_dim=10, T=50, config=HingeConfig(cond_token=True))
    loss = ((tok2(x * vis, vis, t, f) - x) ** 2).mean()
    loss.backward()
    assert tok2.cond_key_gate.grad is not None and tok2.cond_key_gate.grad.abs().sum() > 0
