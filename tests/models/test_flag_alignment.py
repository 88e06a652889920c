"""FLAG's contextual GFM alignment (App. F), inference-sampler validation and its bad-input behaviours:
genes outside the backbone vocabulary, sections with fewer spots than the graph's k, duplicated coordinates."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from model_fixtures import tiny_backbone

from stgen.backbones.external import contextual_gene_states, genes_in_vocabulary
from stgen.errors import InputError
from stgen.models.base import FeatureSettings, FitContext, SectionInput
from stgen.models.flag.config import FlagConfig
from stgen.models.flag.model import FlagModel
from stgen.models.flag.network import FLAG

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(dim=16, graph_layers=1, graph_heads=2, dit_layers=2, dit_heads=2, mlp_ratio=2.0, align_layer=1, knn=8,
            crop_spots=20, max_steps=4, val_every=2, steps=2, samples=2)


def _backbones():
    torch.manual_seed(0)
    return [tiny_backbone(k) for k in ("embedded", "cellfm", "scgpt")]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["embedded", "cellfm", "scgpt"])
def test_contextual_states_are_the_backbones_gene_tokens_and_follow_expression(which):
    bb = _backbones()[which]
    genes = ["G3", "G0", "G7", "G5"]
    rng = np.random.default_rng(0)
    v = torch.as_tensor(rng.uniform(0, 4, size=(6, 4)), dtype=torch.float32)
    st = contextual_gene_states(bb, genes, v, batch_size=4)  # two batches
    assert st.shape == (6, 4, bb.config.dim) and st.dtype == torch.float32 and not st.requires_grad
    with torch.no_grad():
        h = bb.encode(v, bb.gene_index(genes), torch.ones(6, 4, dtype=torch.bool))
    assert torch.allclose(st, h[:, -4:], atol=1e-5)  # gene tokens; CellFM's cls token (first) dropped
    v2 = v.clone()
    v2[0, 1] += 2.0  # one spot's one gene: that spot's states move (context), the other spots' do not
    st2 = contextual_gene_states(bb, genes, v2)
    assert not torch.allclose(st2[0], st[0], atol=1e-4) and torch.allclose(st2[1:], st[1:], atol=1e-5)
    assert (st2[0, 0] - st[0, 0]).abs().max() > 1e-5  # a gene whose own value is unchanged still moves
    with pytest.raises(InputError, match="NOPE"):
        contextual_gene_states(bb, ["G1", "NOPE"], torch.zeros(2, 2))
    with pytest.raises(InputError, match=r"\(N, 4\)"):
        contextual_gene_states(bb, genes, torch.zeros(2, 3))
    assert genes_in_vocabulary(bb, ["G1", "NOPE", "G2"]).tolist() == [True, False, True]


def test_contextual_align_loss_per_spot_with_gene_and_spot_masks():
    torch.manual_seed(0)
    m = FLAG(FlagConfig(**{k: TINY[k] for k in ("dim", "graph_layers", "graph_heads", "dit_layers", "dit_heads")}),
             5, 3, align_dim=16)
    assert m.has_alignment and m.gene_embeddings is None
    m.align_proj = torch.nn.Identity()
    h = torch.randn(4, 5, 16)
    genes = torch.tensor([0, 2, 4])
    assert float(m.align_loss(h, targets=2.0 * h[:, genes], genes=genes)) < 1e-6  # spot-specific targets met
    assert float(m.align_loss(h, targets=-h[:, genes], genes=genes)) > 1.99
    t = h[:, genes].clone()
    t[0] = -t[0]  # spot 0 wrong: left out by the mask, counted without it
    assert float(m.align_loss(h, mask=torch.tensor([False, True, True, True]), targets=t, genes=genes)) < 1e-6
    assert float(m.align_loss(h, targets=t, genes=genes)) == pytest.approx(0.5, abs=1e-5)
    assert float(m.align_loss(h, targets=h[:, :0], genes=torch.zeros(0, dtype=torch.long))) == 0.0
    assert float(m.align_loss(h)) == 0.0  # contextual network: no static target, no loss without targets
    # static targets: an all-zero row (gene without a token) is left out of the mean
    e = torch.randn(5, 16)
    e[1] = 0.0
    s = FLAG(m.config, 5, 3, e)
    s.align_proj = torch.nn.Identity()
    h2 = e[None].expand(4, -1, -1).clone()
    h2[:, 1] = torch.randn(16)
    assert float(s.align_loss(h2)) < 1e-6


def _sections(n_sections=2, n=30, G=6, F=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_sections):
        xy = np.stack(np.meshgrid(np.arange(6), np.arange(n // 6)), -1).reshape(-1, 2) * 100.0
        f = rng.normal(size=(len(xy), F)).astype(np.float32)
        y = (2.0 + f[:, :1] * np.linspace(-1, 1, G)[None] + 0.1 * rng.normal(size=(len(xy), G))).astype(np.float32)
        out.append(SectionInput(f"S{i}", xy, f, None, y))
    return out


def _fit(panel, backbone, caplog=None, **over):
    cfg = FlagConfig(**{**TINY, **over})
    ctx = FitContext(backbone=backbone, backbone_meta={"kind": "default"}, patch_px=100)
    return FlagModel.fit(_sections(G=len(panel)), panel, cfg, FeatureSettings(), progress=False, context=ctx)


def test_fit_with_genes_outside_the_vocabulary_aligns_the_others(caplog):
    bb = _backbones()[0]
    panel = ["G1", "G2", "NOT1", "G4", "NOT2", "G9"]
    with caplog.at_level(logging.WARNING, logger="stgen.models.flag.model"):
        model, hist = _fit(panel, bb)
    assert "2 of 6 panel genes" in caplog.text
    assert model.meta["align_target"] == "contextual" and model.meta["align_genes"] == 4
    assert model.meta["embedding_dim"] == 8 and all(np.isfinite(r["train_align"]) for r in hist["history"])
    mean, sd = model.predict(_sections(1, G=6, seed=5)[0], FeatureSettings())
    assert mean.shape == (30, 6) and np.isfinite(mean).all() and np.isfinite(sd).all()
    # static ablation: zero rows for the missing genes, the same fallback
    static, hist = _fit(panel, bb, align_target="static")
    e = static.net.gene_embeddings
    assert e.shape == (6, 8) and (e[[2, 4]] == 0).all() and (e[[0, 1, 3, 5]].abs().sum(-1) > 0).all()
    with pytest.raises(InputError, match="align_weight: 0"):
        _fit(["NOT1", "NOT2"], bb)
    none, _ = _fit(["NOT1", "NOT2"], bb, align_weight=0.0)  # no alignment wanted: no target needed
    assert not none.net.has_alignment and none.meta["embedding_dim"] == 0


def test_contextual_run_round_trips_and_old_static_runs_load():
    bb = _backbones()[0]
    panel = ["G1", "G2", "G3", "G4", "G5", "G9"]
    model, _ = _fit(panel, bb)
    tensors, fm = model.state()
    meta = {"flag": fm, "panel": panel, "feature_dim": 4}
    again = FlagModel.from_state(tensors, meta, model.cfg)
    sec = _sections(1, G=6, seed=3)[0]
    assert np.array_equal(model.predict(sec, FeatureSettings(), seed=1)[0], again.predict(sec, FeatureSettings(), seed=1)[0])
    static, _ = _fit(panel, bb, align_target="static")
    tensors, fm = static.state()
    old = {k: v for k, v in fm.items() if k not in ("align_target", "align_genes")}  # run.json before the field
    loaded = FlagModel.from_state(tensors, {"flag": old, "panel": panel, "feature_dim": 4}, static.cfg)
    assert torch.equal(loaded.net.gene_embeddings, static.net.gene_embeddings)
    # a run saved before flag.ensemble and flag.sd_scale: one network, its sd the samples' spread
    single, _ = _fit(panel, bb, ensemble=1, sd_scale=3.0)
    tensors, fm = single.state()
    old = {**{k: v for k, v in fm.items() if k != "sd_scale"},
           "config": {k: v for k, v in fm["config"].items() if k != "ensemble"}}
    before = FlagModel.from_state(tensors, {"flag": old, "panel": panel, "feature_dim": 4}, FlagConfig())
    assert type(before.net) is FLAG and before.net.config.ensemble == 1
    (m_new, sd_new), (m_old, sd_old) = (r.predict(sec, FeatureSettings(), seed=1) for r in (single, before))
    assert np.array_equal(m_new, m_old) and sd_old.max() > 0
    np.testing.assert_allclose(sd_new, 3.0 * sd_old, rtol=1e-6)


def test_validation_runs_the_inference_sampler(monkeypatch):
    calls = []
    from stgen.models.flag.network import FlagEnsemble

    def spy_on(cls):
        orig = cls.generate

        def spy(self, *a, **kw):
            calls.append((kw.get("steps"), kw.get("order", 2), kw.get("n_samples")))
            return orig(self, *a, **kw)

        monkeypatch.setattr(cls, "generate", spy)

    spy_on(FLAG)
    bb = _backbones()[0]
    panel = ["G1", "G2", "G3", "G4", "G5", "G9"]
    _fit(panel, bb, steps=3, val_samples=2, order=2, ensemble=1)
    assert calls and set(calls) == {(3, 2, 2)}  # Heun, the run's steps and val_samples
    calls.clear()
    model, _ = _fit(panel, bb, steps=3, ensemble=1)
    assert set(calls) == {(3, 1, 1)} and model.meta["order"] == 1  # the default sampler: Euler (DDIM)
    calls.clear()
    model.predict(_sections(1, G=6)[0], FeatureSettings())
    assert calls == [(3, 1, 2)]  # predict: the run's steps, order and samples
    calls.clear()
    _fit(panel, bb, val_steps=2, ensemble=1)
    assert set(calls) == {(2, 1, 1)}  # the earlier Euler selection, when asked for
    calls.clear()
    spy_on(FlagEnsemble)
    model, _ = _fit(panel, bb, steps=3, val_samples=2)  # the default: two members, val_samples per member
    assert isinstance(model.net, FlagEnsemble) and set(calls) == {(3, 1, 4)}


def test_sections_with_fewer_spots_than_k_or_duplicated_coordinates_predict():
    bb = _backbones()[0]
    model, _ = _fit(["G1", "G2", "G3", "G4", "G5", "G9"], bb, knn=16)
    rng = np.random.default_rng(1)
    tiny = SectionInput("tiny", rng.uniform(0, 300, size=(5, 2)), rng.normal(size=(5, 4)).astype(np.float32))
    mean, sd = model.predict(tiny, FeatureSettings())  # 5 spots < k = 16: the dense graph of all 5
    assert mean.shape == (5, 6) and np.isfinite(mean).all() and np.isfinite(sd).all()
    xy = np.repeat(rng.uniform(0, 300, size=(4, 2)), 3, axis=0)  # every position three times
    dup = SectionInput("dup", xy, rng.normal(size=(12, 4)).astype(np.float32))
    mean, sd = model.predict(dup, FeatureSettings())
    assert mean.shape == (12, 6) and np.isfinite(mean).all() and np.isfinite(sd).all()
    with pytest.raises(InputError, match="xy"):
        model.predict(SectionInput("bad", None, dup.feats), FeatureSettings())


def test_config_refuses_bad_alignment_and_validation_values():
    for over, word in [({"align_target": "dynamic"}, "align_target"), ({"val_steps": 0}, "val_steps"),
                       ({"val_samples": 0}, "val_samples"), ({"val_steps": "x"}, "val_steps"),
                       ({"order": 3}, "order")]:
        with pytest.raises(InputError, match=word):
            FlagConfig(**over)


def test_paper_size_preset_loads_with_table_5_sizes():
    from pathlib import Path

    from stgen.workflows.config import StgenConfig

    path = Path(__file__).resolve().parents[2] / "configs" / "flag-paper.yaml"
    cfg = StgenConfig.load(path).flag
    assert (cfg.dim, cfg.graph_layers, cfg.graph_heads, cfg.dit_layers, cfg.dit_heads) == (384, 6, 8, 12, 6)
    assert (cfg.mlp_ratio, cfg.align_layer, cfg.lr, cfg.grad_clip, cfg.align_target) == (4.0, 8, 1e-4, 1.0, "contextual")
    assert (cfg.ensemble, cfg.sd_scale) == (1, 1.0)  # the paper's one network and its raw sample spread
    net = FLAG(cfg, 300, 1280, align_dim=128)
    assert len(net.blocks) == 12 and len(net.graph_encoder.blocks) == 6
    n = sum(p.numel() for p in net.parameters())
    assert 40e6 < n < 60e6  # 12 DiT + 6 graph blocks of width 384 with adaLN: 48M


def test_context_radii_feed_neighbour_means_to_the_network_not_to_the_graph_edges():
    """``flag.context_radii``: the network reads (N, F * (1 + radii)) inputs, the spot graph's image-similarity
    edges the spot's own features; the run round-trips, a run.json without the field reads the spot feature
    only and keeps its config hash, bad radii are refused."""
    from stgen.models.flag.model import graph_builder, image_inputs
    from stgen.nn.graph import neighbour_mean
    from stgen.workflows.config import StgenConfig
    from stgen.workflows.rundir import config_hash

    bb = _backbones()[0]
    panel = ["G1", "G2", "G3", "G4", "G5", "G9"]
    model, _ = _fit(panel, bb, context_radii=[1.5])
    assert model.net.feat_dim == 8 and model.meta["config"]["context_radii"] == [1.5]
    sec = _sections(1, G=6, seed=3)[0]
    inputs = image_inputs(sec, [1.5])
    np.testing.assert_array_equal(inputs[:, :4], sec.feats)
    np.testing.assert_allclose(inputs[:, 4:], neighbour_mean(sec.feats, sec.xy, 1.5), rtol=1e-6)
    a = graph_builder(model.meta, 4)(sec.xy, inputs)
    b = graph_builder(model.meta)(sec.xy, sec.feats)
    assert torch.equal(a.edge_attr, b.edge_attr) and torch.equal(a.neighbors, b.neighbors)
    tensors, fm = model.state()
    again = FlagModel.from_state(tensors, {"flag": fm, "panel": panel, "feature_dim": 4}, model.cfg)
    assert np.array_equal(model.predict(sec, FeatureSettings(), seed=1)[0],
                          again.predict(sec, FeatureSettings(), seed=1)[0])
    plain, _ = _fit(panel, bb)
    tensors, fm = plain.state()
    old = {**fm, "config": {k: v for k, v in fm["config"].items() if k != "context_radii"}}
    assert FlagModel.from_state(tensors, {"flag": old, "panel": panel, "feature_dim": 4},
                                plain.cfg).net.config.context_radii == []
    base, ctx = StgenConfig(), StgenConfig()
    ctx.flag = FlagConfig(context_radii=[1.5])
    assert "context_radii" in base.to_dict()["flag"]
    assert config_hash(ctx, "flag", "X") != config_hash(base, "flag", "X")
    for bad in ([0.0], 1.5, [True]):
        with pytest.raises(InputError, match="context_radii"):
            FlagConfig(context_radii=bad)
