from __future__ import annotations

import zipfile

import numpy as np
import pytest

from stgen.errors import InputError
from stgen.evaluation.basics import pearson_per_gene
from stgen.models.ridge.model import RidgeBaseline


def _data(n=300, f=40, g=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f))
    w = rng.normal(size=(f, g))
    y = x @ w + 0.1 * rng.normal(size=(n, g)) + 2.0
    return x, y


def test_recovers_linear_map():
    x, y = _data()
    m = RidgeBaseline(n_components=256).fit(x[:200], y[:200])
    pred = m.predict(x[200:])
    assert pred.dtype == np.float32 and pred.shape == (100, 8)
    assert np.all(pearson_per_gene(pred, y[200:]) > 0.95)
    ss_res = ((pred - y[200:]) ** 2).sum()
    ss_tot = ((y[200:] - y[200:].mean(0)) ** 2).sum()
    assert 1 - ss_res / ss_tot > 0.9
    assert m.alpha_ in set(np.logspace(-1, 5, 13).tolist())


def test_matches_sklearn_pipeline_and_round_trip(tmp_path):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _data(n=60, f=30, g=5, seed=3)
    m = RidgeBaseline(n_components=10, seed=0).fit(x, y)
    ref = make_pipeline(StandardScaler(), PCA(10, random_state=0), RidgeCV(alphas=np.logspace(-1, 5, 13))).fit(x, y)
    np.testing.assert_allclose(m.predict(x), ref.predict(x), rtol=1e-4, atol=1e-4)

    path = m.save(tmp_path / "model")
    assert path.name == "ridge.npz"
    with zipfile.ZipFile(path) as z:
        assert all(n.endswith(".npy") for n in z.namelist())
    with np.load(path, allow_pickle=False) as z:
        assert z["pca_components"].shape == (10, 30)
    loaded = RidgeBaseline.load(tmp_path / "model")
    np.testing.assert_allclose(loaded.predict(x), m.predict(x), atol=1e-5)
    assert loaded.alpha_ == m.alpha_ and loaded.n_components == 10


def test_small_n_caps_components():
    x, y = _data(n=5, f=30, g=2)
    m = RidgeBaseline(n_components=256).fit(x, y)
    assert m.predict(x).shape == (5, 2)


def test_input_validation(tmp_path):
    x, y = _data(n=20, f=5, g=2)
    m = RidgeBaseline()
    with pytest.raises(InputError):
        m.predict(x)  # unfitted
    with pytest.raises(InputError, match="rows"):
        m.fit(x, y[:10])
    with pytest.raises(InputError, match="2-D"):
        m.fit(x[:, 0], y)
    bad = x.copy()
    bad[0, 0] = np.inf
    with pytest.raises(InputError, match="NaN or infinite"):
        m.fit(bad, y)
    m.fit(x, y)
    with pytest.raises(InputError, match="columns"):
        m.predict(x[:, :3])
    with pytest.raises(InputError, match="not found"):
        RidgeBaseline.load(tmp_path / "nothing")
