"""BLEEP baseline (stgen.models.bleep.model) on tiny synthetic sections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import assert_same_state, fit_one_thread, save_and_load, synthetic_sections

from stgen.errors import InputError
from stgen.models.base import SectionInput
from stgen.models.bleep.model import BLEEP, BLEEPConfig, bleep_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw) -> BLEEPConfig:
    base = dict(proj_dim=32, batch_size=32, max_epochs=40, top_k=5, val_fraction=0.1, seed=3)
    base.update(kw)
    return BLEEPConfig(**base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_sections(tmp_path_factory.mktemp("bleep"), n_sections=4, side=6, n_genes=12)


@pytest.fixture(scope="module")
def fitted(data):
    sections, fs, panel = data
    return fit_one_thread(BLEEP, sections[:3], panel, _cfg(), fs)


def test_loss_matches_definition():
    g = torch.Generator().manual_seed(0)
    img, expr = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    tau = 0.7
    logits = (expr @ img.T / tau).numpy()
    m = ((img @ img.T + expr @ expr.T) / (2 * tau)).numpy()
    t = np.exp(m - m.max(1, keepdims=True))
    t /= t.sum(1, keepdims=True)

    def lsm(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    ref = (-(t * lsm(logits)).sum(1) - (t.T * lsm(logits.T)).sum(1)) / 2
    assert float(bleep_loss(img, expr, tau)) == pytest.approx(float(ref.mean()), rel=1e-5)


def test_shapes_dtypes_and_reference(fitted, data):
    model, hist = fitted
    sections, fs, panel = data
    n_ref = sum(s.n_spots for s in sections[:3])
    assert model.ref_expr.shape == (n_ref, 12) and model.ref_emb.shape == (n_ref, 32)
    assert hist["n_reference"] == n_ref and hist["n_train"] + hist["n_val"] == n_ref
    assert all(np.isfinite(h["val_loss"]) for h in hist["history"])
    mean, sd = model.predict(sections[3], fs)
    assert mean.shape == sd.shape == (36, 12)
    assert mean.dtype == sd.dtype == np.float32
    assert np.isfinite(mean).all() and (sd == 0).all()
    # a prediction is an average of top_k reference rows: inside the reference range per gene
    ref = model.ref_expr.numpy()
    assert (mean >= ref.min(0) - 1e-5).all() and (mean <= ref.max(0) + 1e-5).all()


def test_predict_is_top_k_average(fitted, data):
    model, _ = fitted
    sections, fs, _ = data
    s = sections[3]
    mean, _ = model.predict(s, fs)
    with torch.no_grad():
        q = torch.nn.functional.normalize(model.net.embed_image(torch.as_tensor(s.feats)), dim=-1)
    r = torch.nn.functional.normalize(model.ref_emb, dim=-1)
    sim = (q @ r.T).numpy()
    idx = np.argsort(-sim, axis=1)[:, :5]
    np.testing.assert_allclose(mean, model.ref_expr.numpy()[idx].mean(1), atol=1e-5)


def test_training_lowers_loss_and_predicts_held_out(fitted, data):
    model, hist = fitted
    losses = [h["train_loss"] for h in hist["history"]]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:2])
    # held-out section: image-driven imputation beats the training mean (per-spot error)
    sections, fs, _ = data
    s = sections[3]
    mean, _ = model.predict(s, fs)
    base = model.ref_expr.numpy().mean(0, keepdims=True)
    assert ((mean - s.targets) ** 2).mean() < 0.7 * ((base - s.targets) ** 2).mean()


def test_determinism(data):
    sections, fs, panel = data
    cfg = _cfg(max_epochs=5)
    a, _ = BLEEP.fit(sections[:2], panel, cfg, fs, progress=False)
    ta = assert_same_state(a, BLEEP.fit(sections[:2], panel, cfg, fs, progress=False)[0])
    p1, _ = a.predict(sections[3], fs, seed=0)
    p2, _ = a.predict(sections[3], fs, seed=0)
    np.testing.assert_array_equal(p1, p2)
    c, _ = BLEEP.fit(sections[:2], panel, _cfg(max_epochs=5, seed=4), fs, progress=False)
    assert not torch.equal(c.state()[0]["ref_emb"], ta["ref_emb"])


def test_safetensors_round_trip(fitted, data, tmp_path):
    model, _ = fitted
    sections, fs, _ = data
    loaded = save_and_load(model, _cfg(), tmp_path)
    np.testing.assert_array_equal(loaded.predict(sections[3], fs)[0], model.predict(sections[3], fs)[0])
    assert loaded.panel == model.panel


def test_bad_inputs(data):
    sections, fs, panel = data
    with pytest.raises(InputError, match="target genes"):
        BLEEP.fit(sections[:2], panel[:-1], _cfg(max_epochs=1), fs, progress=False)
    no_targets = SectionInput("X", sections[0].xy, sections[0].feats, sections[0].image, None)
    with pytest.raises(InputError, match="no targets"):
        BLEEP.fit([no_targets], panel, _cfg(max_epochs=1), fs, progress=False)
    model, _ = BLEEP.fit(sections[:1], panel, _cfg(max_epochs=1), fs, progress=False)
    bad = SectionInput("Y", sections[3].xy, sections[3].feats[:, :4], None, None)
    with pytest.raises(InputError, match="features"):
        model.predict(bad, fs)
    with pytest.raises(InputError, match="temperature"):
        _cfg(temperature=0.0)
    with pytest.raises(InputError, match="bleep.top_k"):
        _cfg(top_k="many")


def test_config_coerces_yaml_numbers():
    cfg = BLEEPConfig(lr="1e-3", top_k=20.0)
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.top_k == 20 and isinstance(cfg.top_k, int)
    with pytest.raises(InputError, match="whole number"):
        BLEEPConfig(top_k=2.5)
