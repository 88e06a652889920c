from __future__ import annotations

import json

import numpy as np
import pytest

from stgen.errors import InputError
from stgen.metrics import (
    align_prediction_to_truth,
    evaluate,
    gene_gene_corr_agreement,
    pcc_top_k,
    pearson_per_gene,
)

# 4 spots x 3 genes; hand-computed:
# gene 0: centred t=[-1.5,-.5,.5,1.5], p=[-1.5,.5,-.5,1.5] -> 4/5 = 0.8
# gene 1: centred t=[-.5,-.5,.5,.5], p=[.5,-.5,-.5,.5] -> 0/1 = 0
# gene 2: p reversed t -> -1
TRUE = np.array([[1, 0, 1], [2, 0, 2], [3, 1, 3], [4, 1, 4]], dtype=float)
PRED = np.array([[1, 1, 4], [3, 0, 3], [2, 0, 2], [4, 1, 1]], dtype=float)


def test_pearson_hand_values():
    r = pearson_per_gene(PRED, TRUE)
    assert r.dtype == np.float64 and r.shape == (3,)
    np.testing.assert_allclose(r, [0.8, 0.0, -1.0], atol=1e-12)


def test_pearson_constant_gene_is_nan():
    p = PRED.copy()
    p[:, 1] = 0.1  # constant prediction
    t = TRUE.copy()
    t[:, 2] = 7.0  # constant truth
    r = pearson_per_gene(p, t)
    assert r[0] == pytest.approx(0.8)
    assert np.isnan(r[1]) and np.isnan(r[2])


def test_pcc_top_k():
    assert pcc_top_k(np.array([0.9, 0.1, 0.5]), 2) == pytest.approx(0.7)
    assert pcc_top_k(np.array([0.9, np.nan, 0.5, 0.1]), 2) == pytest.approx(0.7)
    # fewer finite values than k -> mean of all finite
    assert pcc_top_k(np.array([0.9, np.nan, 0.5]), 50) == pytest.approx(0.7)
    assert np.isnan(pcc_top_k(np.array([np.nan, np.nan]), 2))
    with pytest.raises(InputError):
        pcc_top_k(np.array([0.1]), 0)


def test_evaluate_exact_mse_mae():
    out = evaluate(PRED, TRUE, ["a", "b", "c"])
    # squared diffs: gene0 2, gene1 2, gene2 20 -> 24/12; abs: 2+2+8 -> 12/12
    assert out["mse"] == pytest.approx(2.0)
    assert out["mae"] == pytest.approx(1.0)
    assert out["pcc50"] == pytest.approx((0.8 + 0.0 - 1.0) / 3)
    assert out["n_spots"] == 4 and out["n_genes"] == 3
    assert out["per_gene_r"]["a"] == pytest.approx(0.8)
    json.dumps(out)  # JSON-safe


def test_evaluate_per_gene_none_for_nan():
    p = PRED.copy()
    p[:, 0] = 1.0
    out = evaluate(p, TRUE, ["a", "b", "c"])
    assert out["per_gene_r"]["a"] is None
    assert out["pcc50"] == pytest.approx(-0.5)


def test_gsc_affine_is_one_and_shuffle_lower():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(200, 3))
    t = latent @ rng.normal(size=(3, 12)) + 0.3 * rng.normal(size=(200, 12))
    a = rng.uniform(0.5, 3.0, size=12)
    b = rng.normal(size=12)
    assert gene_gene_corr_agreement(t * a + b, t) == pytest.approx(1.0, abs=1e-10)
    shuffled = np.column_stack([rng.permutation(t[:, j]) for j in range(12)])
    assert gene_gene_corr_agreement(shuffled, t) < 0.5


def test_gsc_drops_constant_and_nan_when_too_few_pairs():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(30, 4))
    p = t.copy()
    p[:, 3] = 2.0
    assert gene_gene_corr_agreement(p, t) == pytest.approx(1.0)
    assert np.isnan(gene_gene_corr_agreement(t[:, :2], t[:, :2]))  # only 1 pair


def test_evaluate_errors():
    with pytest.raises(InputError, match=r"\(4, 3\).*\(4, 2\)"):
        evaluate(PRED, TRUE[:, :2], ["a", "b", "c"])
    bad = PRED.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        evaluate(bad, TRUE, ["a", "b", "c"])
    with pytest.raises(InputError):
        evaluate(PRED, TRUE, ["a", "b"])
    with pytest.raises(InputError):
        evaluate(PRED[0], TRUE[0], ["a", "b", "c"])


def test_align():
    ad = pytest.importorskip("anndata")
    import pandas as pd

    pred = ad.AnnData(
        X=np.arange(6, dtype=np.float32).reshape(3, 2),
        obs=pd.DataFrame(index=["s3", "s1", "s9"]),
        var=pd.DataFrame(index=["G2", "G1"]),
    )
    truth = ad.AnnData(
        X=np.arange(12, dtype=np.float32).reshape(4, 3),
        obs=pd.DataFrame(index=["s1", "s2", "s3", "s4"]),
        var=pd.DataFrame(index=["G1", "G2", "G3"]),
    )
    p, t, genes, spots = align_prediction_to_truth(pred, truth)
    assert spots == ["s3", "s1"] and genes == ["G2", "G1"]
    np.testing.assert_array_equal(p, [[0, 1], [2, 3]])
    np.testing.assert_array_equal(t, [[7, 6], [1, 0]])

    other = ad.AnnData(X=np.zeros((1, 3)), obs=pd.DataFrame(index=["x"]), var=pd.DataFrame(index=["G1", "G2", "G3"]))
    with pytest.raises(InputError, match="no spot"):
        align_prediction_to_truth(pred, other)
    nog = ad.AnnData(X=np.zeros((4, 1)), obs=pd.DataFrame(index=["s1", "s2", "s3", "s4"]), var=pd.DataFrame(index=["G1"]))
    with pytest.raises(InputError, match="G2"):
        align_prediction_to_truth(pred, nog)
