"""HINGE's spatial context (``hinge.context_radii``): the condition reads the neighbours' features, a run
keeps its context through save/load, the paper preset and older runs have none, and bad input is refused."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from model_fixtures import TINY, backbone_context, synthetic_sections

from stgen.errors import InputError
from stgen.models.base import SectionInput
from stgen.models.hinge.config import PAPER_PRESET, HingeConfig
from stgen.models.hinge.model import HingeModel, HingePaperModel, condition_inputs
from stgen.nn.graph import neighbour_mean
from stgen.workflows.config import StgenConfig


@pytest.fixture(scope="module")
def fold(tmp_path_factory):
    sections, fs, panel = synthetic_sections(tmp_path_factory.mktemp("hinge_ctx"), n_sections=3, side=5)
    return sections[:2], sections[2], fs, panel


def _fit(fold, radii, model_cls=HingeModel):
    train, _, fs, panel = fold
    cfg = replace(StgenConfig.from_dict(TINY).hinge, context_radii=radii)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return model_cls.fit(train, panel, cfg, fs, progress=False, context=backbone_context(panel))[0], cfg
    finally:
        torch.set_num_threads(n)


def test_condition_inputs_append_one_neighbour_mean_per_radius(fold):
    _, test, _, _ = fold
    out = condition_inputs(test, [1.5, 2.5])
    f = test.feats.shape[1]
    assert out.shape == (test.n_spots, 3 * f)
    np.testing.assert_array_equal(out[:, :f], test.feats)
    np.testing.assert_allclose(out[:, f:2 * f], neighbour_mean(test.feats, test.xy, 1.5), rtol=1e-6)
    np.testing.assert_allclose(out[:, 2 * f:], neighbour_mean(test.feats, test.xy, 2.5), rtol=1e-6)
    assert condition_inputs(test, []) is test.feats
    with pytest.raises(InputError, match="needs the spots' pixel coordinates"):
        condition_inputs(SectionInput("X", None, test.feats), [1.5])


def test_a_context_run_reads_its_neighbours_and_keeps_its_context_through_save_and_load(fold, tmp_path):
    """Changing only the neighbours' features changes a spot's prediction with context, not without it."""
    _, test, fs, _ = fold
    ctx, cfg = _fit(fold, [1.5])
    paper, _ = _fit(fold, [])
    assert ctx.net.phi[0].in_features == paper.net.phi[0].in_features + test.feats.shape[1]
    centre = 12  # (2, 2) of the 5 x 5 grid
    d = np.linalg.norm(test.xy - test.xy[centre], axis=1)
    ring = (d > 0) & (d < 1.5 * np.median(np.sort(d)[1:5]))
    moved = test.feats.copy()
    moved[ring] = moved[ring] + 3.0 * test.feats.std(0)
    other = SectionInput("moved", test.xy, moved)
    for model, reads in ((ctx, True), (paper, False)):
        a = model.predict(test, fs, seed=1)[0][centre]
        b = model.predict(other, fs, seed=1)[0][centre]
        assert (not np.allclose(a, b, atol=1e-6)) == reads
    _, _, _, panel = fold
    run_meta = {"model": "hinge", "panel": panel, "feature_dim": int(test.feats.shape[1]), "hinge": ctx.save(tmp_path),
                **ctx.run_entries()}
    loaded = HingeModel.load(tmp_path, run_meta, cfg)
    assert loaded.net.config.context_radii == [1.5]
    np.testing.assert_allclose(loaded.predict(test, fs, seed=2)[0], ctx.predict(test, fs, seed=2)[0], atol=1e-6)
    with pytest.raises(InputError, match="needs the spots' pixel coordinates"):
        ctx.predict(SectionInput("no-xy", None, test.feats), fs)


def test_the_paper_preset_and_older_runs_have_no_context(fold):
    assert PAPER_PRESET["context_radii"] == [] and HingeConfig(context_radii=[2.0]).paper().context_radii == []
    paper, _ = _fit(fold, [1.5], HingePaperModel)  # hinge-paper ignores the section's context setting
    assert paper.net.config.context_radii == [] and paper.meta["config"]["context_radii"] == []
    arch = {k: v for k, v in paper.meta["config"].items() if k not in ("context_radii", "predictive")}
    assert HingeConfig.from_architecture(arch).context_radii == []  # a run.json written before the field


@pytest.mark.parametrize("field,value,match", [
    ("context_radii", [1.5, 0.0], "context_radii"), ("context_radii", 1.5, "context_radii"),
    ("context_radii", [True], "context_radii"), ("grad_clip", 0, "grad_clip"), ("grad_clip", "x", "grad_clip"),
    ("grad_clip", True, "grad_clip")])
def test_bad_context_and_clip_values_are_refused(field, value, match):
    with pytest.raises(InputError, match=match):
        HingeConfig(**{field: value})
    assert HingeConfig(grad_clip="1.0").grad_clip == 1.0 and HingeConfig(context_radii=[2]).context_radii == [2.0]


def test_condition_dropout_is_drawn_from_the_step_generator_for_the_global_batch():
    """feat_dropout: a dropped feature becomes its training mean (standardised 0), a kept one moves away from
    the mean by 1 / (1 - p); the same generator state gives the same mask (DDP shares, resume replays it)."""
    from stgen.backbones.embedded import BackboneConfig, ExpressionBackbone
    from stgen.models.hinge.network import HINGE
    from stgen.models.hinge.training import HingeModule
    from stgen.sampling.masking import MaskSchedule

    genes = [f"G{i}" for i in range(50)]
    torch.manual_seed(0)
    bb = ExpressionBackbone(genes, BackboneConfig(dim=16, n_layers=2, n_heads=2, value_bins=8))
    feats = torch.randn(64, 10) * 2 + 1

    def module(p):
        cfg = HingeConfig(T=5, feat_dropout=p, context_radii=[])
        net = HINGE(bb, genes, 10, 5, cfg)
        net.set_feature_stats(feats.mean(0), feats.std(0))
        return HingeModule(net, cfg, MaskSchedule(8, T=5))

    assert module(0.0).drop_features(feats, torch.Generator().manual_seed(1)) is feats
    m = module(0.25)
    a = m.drop_features(feats, torch.Generator().manual_seed(1))
    b = m.drop_features(feats, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    mean = m.model.feat_mean
    dropped = torch.isclose(a, mean.expand_as(a))
    assert 0.15 < dropped.float().mean() < 0.35
    torch.testing.assert_close(a[~dropped], (mean + (feats - mean) / 0.75)[~dropped])


def test_draws_estimate_is_a_sampling_switch_saved_with_the_run_and_refused_without_drawn_reveals(fold):
    """``hinge.estimate`` changes what ``predict`` returns, not the network: a run saved before the field predicts
    the mixture mean, ``draws`` keeps the sd, and HINGE as published (revealed means) refuses ``draws``."""
    from stgen.workflows.rundir import config_hash

    _, test, fs, _ = fold
    model, cfg = _fit(fold, [1.5])
    assert model.meta["estimate"] == "mixture"
    mean_m, sd_m = model.predict(test, fs, seed=3)
    mean_d, sd_d = model.predict(test, fs, seed=3, estimate="draws")
    np.testing.assert_allclose(sd_d, sd_m, atol=1e-6)
    assert not np.allclose(mean_d, mean_m, atol=1e-4)
    model.meta["estimate"] = "draws"  # as a run fitted with hinge.estimate: draws stores it
    np.testing.assert_allclose(model.predict(test, fs, seed=3)[0], mean_d, atol=1e-6)
    del model.meta["estimate"]  # a run.json written before the field: the mixture mean, as it predicted then
    np.testing.assert_allclose(model.predict(test, fs, seed=3)[0], mean_m, atol=1e-6)
    with pytest.raises(InputError, match="estimate"):
        model.predict(test, fs, estimate="draws", reveal="mean")
    with pytest.raises(InputError, match="estimate"):
        model.predict(test, fs, estimate="median")
    base = StgenConfig.from_dict(TINY)
    draws = StgenConfig.from_dict(TINY)
    draws.hinge = replace(draws.hinge, estimate="draws")
    assert config_hash(draws, "hinge", "X") != config_hash(base, "hinge", "X")
    assert config_hash(draws, "ridge", "X") == config_hash(base, "ridge", "X")


def test_condition_token_run_saves_loads_and_older_runs_have_none(fold, tmp_path):
    """A ``cond_token`` run rebuilds its token on load; a run.json without the field has no token; the paper
    preset has none; a non-bool value and a backbone that brings its own cls token are refused."""
    from stgen.workflows.rundir import config_hash

    train, test, fs, panel = fold
    cfg = replace(StgenConfig.from_dict(TINY).hinge, cond_token=True)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = HingeModel.fit(train, panel, cfg, fs, progress=False, context=backbone_context(panel))[0]
    finally:
        torch.set_num_threads(n)
    assert model.net.cond_token is not None and model.net.cond_key_gate.abs().sum() > 0  # the gates trained
    run_meta = {"model": "hinge", "panel": panel, "feature_dim": int(test.feats.shape[1]),
                "hinge": model.save(tmp_path), **model.run_entries()}
    loaded = HingeModel.load(tmp_path, run_meta, cfg)
    assert loaded.net.config.cond_token is True
    np.testing.assert_allclose(loaded.predict(test, fs, seed=2)[0], model.predict(test, fs, seed=2)[0], atol=1e-6)
    arch = {k: v for k, v in model.meta["config"].items() if k != "cond_token"}
    assert HingeConfig.from_architecture(arch).cond_token is False  # a run.json written before the field
    assert HingeConfig(cond_token=True).paper().cond_token is False
    with pytest.raises(InputError, match="cond_token"):
        HingeConfig(cond_token="yes")
    from stgen.backbones.cellfm import CellFMBackbone, CellFMConfig
    from stgen.models.hinge.network import HINGE

    genes = [f"G{i}" for i in range(50)]
    with pytest.raises(InputError, match="cond_token needs the embedded backbone"):
        HINGE(CellFMBackbone(CellFMConfig.tiny(), genes), genes, feat_dim=4, T=50, config=HingeConfig(cond_token=True))
    base, tok = StgenConfig.from_dict(TINY), StgenConfig.from_dict(TINY)
    tok.hinge = replace(tok.hinge, cond_token=True)
    assert config_hash(tok, "hinge", "X") != config_hash(base, "hinge", "X")
    assert config_hash(tok, "ridge", "X") == config_hash(base, "ridge", "X")
