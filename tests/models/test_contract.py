"""One contract for every registered model: fit -> save -> load -> predict on a toy fold.

Each model of :data:`stgen.models.registry.MODELS` is fitted on the same tiny synthetic sections (with a tiny
untrained embedded backbone for the models that need one), written to a RUN_DIR-like folder by its own
``save``, rebuilt by ``load`` from the run metadata the workflow would write, and must predict the held-out
section identically, deterministically for a seed, with a non-zero sd exactly when it is sampled.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import TINY, backbone_context, synthetic_sections

from stgen.models.base import FitContext, SpotModel
from stgen.models.registry import GENERATIVE, MODELS, spot_model
from stgen.workflows.config import StgenConfig


def _context(cls: type[SpotModel], panel: list[str]) -> FitContext:
    if not cls.needs_backbone:
        return FitContext(patch_px=16, seed=3)
    return backbone_context(panel)


@pytest.fixture(scope="module")
def fold(tmp_path_factory):
    sections, fs, panel = synthetic_sections(tmp_path_factory.mktemp("contract"), n_sections=3, side=5)
    return sections[:2], sections[2], fs, panel


@pytest.mark.parametrize("name", MODELS)
def test_every_model_fits_saves_loads_and_predicts(name, fold, tmp_path, one_thread):
    train, test, fs, panel = fold
    cls = spot_model(name)
    assert cls.name == name and (name in GENERATIVE) == cls.generative
    cfg = cls.section_of(StgenConfig.from_dict(TINY))
    assert isinstance(cfg, cls.config_cls)
    model, history = cls.fit(train, panel, cfg, fs, progress=False, context=_context(cls, panel))
    assert isinstance(model, SpotModel)
    state_meta = model.save(tmp_path)
    assert (tmp_path / cls.weights_file).is_file()
    run_meta = {"model": name, "panel": panel, "feature_dim": int(train[0].feats.shape[1]),
                **({name: state_meta} if state_meta else {}), **model.run_entries()}
    loaded = cls.load(tmp_path, run_meta, cfg)

    a = model.predict(test, fs, seed=7)
    b = model.predict(test, fs, seed=7)
    c = loaded.predict(test, fs, seed=7)
    g = len(panel)
    for mean, sd in (a, b, c):
        assert mean.shape == sd.shape == (test.n_spots, g) and np.isfinite(mean).all() and (sd >= 0).all()
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), "same seed, same prediction"
    np.testing.assert_allclose(c[0], a[0], rtol=0, atol=1e-6, err_msg="the loaded model predicts as the fitted one")
    np.testing.assert_allclose(c[1], a[1], rtol=0, atol=1e-6)
    if cls.generative:
        assert a[1].max() > 0, "a sampled model reports its sample sd"
        assert not np.array_equal(model.predict(test, fs, seed=8)[0], a[0]), "another seed, other samples"
    else:
        assert not a[1].any(), "a deterministic model has zero sd"
