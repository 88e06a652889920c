from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from stgen.errors import InputError
from stgen.evaluation.metrics import (
    Z90, align_prediction_to_truth, evaluate, gene_gene_corr_agreement, interval_coverage, nanmean_metrics,
    pcc_top_k,
    relative_variance_distance,
)
from stgen.evaluation.spatial import gene_ssim, morans_i, spatial_knn_graph, spatial_structural_correlation
from stgen.evaluation.basics import pearson_per_gene

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


# ---------------------------------------------------------------- structural metrics


def _grid(h: int, w: int, step: float = 1.0) -> np.ndarray:
    """(h*w, 2) coordinates of a square lattice, row-major."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.column_stack([yy.ravel(), xx.ravel()]).astype(float) * step


def _reference_knn(coords: np.ndarray, k: int) -> np.ndarray:
    """Dense brute-force kNN graph: neighbours ordered by (distance, index), OR-symmetrised."""
    d = np.sqrt(((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1))
    n = len(coords)
    a = np.zeros((n, n))
    for i in range(n):
        others = np.array([j for j in range(n) if j != i])
        order = np.lexsort((others, d[i, others]))[:k]
        a[i, others[order]] = 1.0
    return np.maximum(a, a.T)


def test_knn_graph_matches_bruteforce_and_is_symmetric_binary():
    rng = np.random.default_rng(0)
    c = rng.uniform(0, 100, size=(60, 2))
    w = spatial_knn_graph(c, k=5)
    dense = w.toarray()
    assert w.shape == (60, 60)
    np.testing.assert_array_equal(dense, dense.T)
    assert set(np.unique(dense)) == {0.0, 1.0}
    assert np.all(np.diag(dense) == 0)
    assert dense.sum(axis=1).min() >= 5
    np.testing.assert_array_equal(dense, _reference_knn(c, 5))


def test_knn_graph_ties_go_to_lower_index():
    # spot 0 has spots 1 and 2 at distance 1; spot 1 has spots 0 and 3 at distance 1.
    c = np.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    dense = spatial_knn_graph(c, k=1).toarray()
    want = np.array([[0, 1, 1, 0], [1, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=float)
    np.testing.assert_array_equal(dense, want)


def test_knn_graph_duplicated_coordinates_deterministic():
    c = _grid(5, 5)
    c = np.vstack([c, c[[0, 7, 7, 12]]])  # spot 7 appears three times
    w1 = spatial_knn_graph(c, k=4).toarray()
    w2 = spatial_knn_graph(c.copy(), k=4).toarray()
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(w1, w1.T)
    assert np.all(np.diag(w1) == 0) and w1.sum(axis=1).min() >= 4
    assert w1[7, 26] == 1 and w1[26, 27] == 1 and w1[0, 25] == 1  # duplicates are neighbours (distance 0)
    np.testing.assert_array_equal(w1, _reference_knn(c, 4))


def test_knn_graph_errors():
    with pytest.raises(InputError, match=r"N=5.*k=8"):
        spatial_knn_graph(_grid(1, 5), k=8)
    spatial_knn_graph(_grid(3, 3), k=8)  # N = k + 1 is enough
    bad = _grid(4, 4)
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        spatial_knn_graph(bad, k=3)
    with pytest.raises(InputError, match=r"\(N, 2\)"):
        spatial_knn_graph(np.zeros((10, 3)), k=3)
    with pytest.raises(InputError, match="positive integer"):
        spatial_knn_graph(_grid(4, 4), k=0)


def test_morans_i_matches_numpy_formula_on_weighted_graph():
    sparse = pytest.importorskip("scipy.sparse")
    rng = np.random.default_rng(1)
    n, g = 80, 6
    a = sparse.random(n, n, density=0.08, random_state=2, format="csr")
    a = sparse.csr_matrix(a + a.T)
    a.setdiag(0)
    a.eliminate_zeros()
    x = rng.normal(size=(n, g))
    x[:, 4] = 3.0  # constant gene
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = morans_i(x, a)
    dense = a.toarray()
    z = x - x.mean(axis=0)
    with np.errstate(invalid="ignore"):  # 0/0 for the constant gene
        want = n / dense.sum() * np.einsum("ig,ij,jg->g", z, dense, z) / np.einsum("ig,ig->g", z, z)
    assert got.shape == (g,) and got.dtype == np.float64
    assert np.isnan(got[4])
    keep = np.arange(g) != 4
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(morans_i(x, dense)[keep], want[keep], rtol=1e-12)  # dense graph too


def test_morans_i_gradient_checkerboard_noise():
    h = w = 20
    yy, xx = np.mgrid[0:h, 0:w]
    gradient = (yy + xx).ravel().astype(float)
    checker = ((yy + xx) % 2).ravel().astype(float)
    noise = np.random.default_rng(3).normal(size=h * w)
    vals = np.column_stack([gradient, checker, noise])
    # exact rook (4-neighbour) lattice: every edge joins opposite colours -> I = -1 exactly
    idx = np.arange(h * w).reshape(h, w)
    rook = np.zeros((h * w, h * w))
    for a, b in [(idx[:, :-1], idx[:, 1:]), (idx[:-1, :], idx[1:, :])]:
        rook[a.ravel(), b.ravel()] = rook[b.ravel(), a.ravel()] = 1.0
    assert morans_i(vals, rook)[1] == pytest.approx(-1.0, abs=1e-12)
    # kNN with k=4 is the rook graph except at the border
    i_knn = morans_i(vals, spatial_knn_graph(_grid(h, w), k=4))
    assert i_knn[0] > 0.95
    assert i_knn[1] < -0.8
    assert abs(i_knn[2]) < 0.1


def test_morans_i_errors():
    x = np.random.default_rng(0).normal(size=(9, 2))
    with pytest.raises(InputError, match=r"\(9, 9\)"):
        morans_i(x, np.ones((8, 8)))
    with pytest.raises(InputError, match="edges"):
        morans_i(x, np.zeros((9, 9)))
    x[0, 0] = np.inf
    with pytest.raises(InputError, match="NaN or infinite"):
        morans_i(x, np.ones((9, 9)))


def _smooth_section(h: int = 16, w: int = 14, g: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(coords, expression) with gene maps of differing spatial smoothness."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    maps = []
    for j in range(g):
        fy, fx = rng.uniform(0.1, 0.9, size=2)
        smooth = np.sin(fy * yy + rng.uniform(0, 6)) + np.cos(fx * xx + rng.uniform(0, 6))
        maps.append((smooth + (j / g) * 2.0 * rng.normal(size=(h, w))).ravel() + 3.0)
    return _grid(h, w, step=137.0) + 500.0, np.column_stack(maps)


def test_ssc_identity_affine_and_shuffle():
    c, t = _smooth_section()
    assert spatial_structural_correlation(t, t, c) == pytest.approx(1.0)
    scale = np.linspace(0.5, 2.0, t.shape[1])
    assert spatial_structural_correlation(t * scale + 1.0, t, c) == pytest.approx(1.0)  # I is affine-invariant
    shuffled = t[np.random.default_rng(1).permutation(len(t))]
    assert spatial_structural_correlation(shuffled, t, c) < 0.5


def test_ssc_drops_constant_genes_and_nan_when_too_few():
    c, t = _smooth_section()
    p = t.copy()
    p[:, 0] = 1.0
    assert spatial_structural_correlation(p, t, c) == pytest.approx(1.0)
    assert np.isnan(spatial_structural_correlation(p[:, :2], t[:, :2], c))  # 1 gene left
    with pytest.raises(InputError, match=r"N=4.*k=8"):
        spatial_structural_correlation(t[:4], t[:4], c[:4])


def test_rvd_hand_values():
    t = np.array([[0, 1, 5], [2, 1, 5], [0, 3, 5], [2, 3, 5]], dtype=float)
    p = np.array([[0, 1, 0], [4, 2, 9], [0, 1, 1], [4, 2, 2]], dtype=float)
    # gene0: var 1 -> 4: (3)^2/1 = 9; gene1: var 1 -> 0.25: 0.5625; gene2: constant truth, excluded
    assert relative_variance_distance(p, t) == pytest.approx((9 + 0.5625) / 2)
    assert relative_variance_distance(t, t) == 0.0
    assert np.isnan(relative_variance_distance(p[:, 2:], t[:, 2:]))
    # a constant truth whose float variance is not exactly 0 (rounding) is still excluded
    t3 = np.array([[0.1, 0.0], [0.1, 1.0], [0.1, 2.0]])
    p3 = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    assert np.var(t3[:, 0]) > 0
    assert relative_variance_distance(p3, t3) == 0.0


def test_gene_ssim_identity_noise_constant():
    c, t = _smooth_section()
    t[:, 3] = 2.0
    s = gene_ssim(t, t, c)
    assert s.shape == (t.shape[1],) and s.dtype == np.float64
    assert np.isnan(s[3])
    np.testing.assert_allclose(np.delete(s, 3), 1.0, atol=1e-12)
    noisy = t + np.random.default_rng(2).normal(0, 0.7, size=t.shape)
    sn = np.delete(gene_ssim(noisy, t, c), 3)
    assert np.all(sn < 0.95) and np.all(sn > -1)
    sub = gene_ssim(noisy, t, c, genes=[5, 0])
    np.testing.assert_allclose(sub, gene_ssim(noisy, t, c)[[5, 0]])


def test_gene_ssim_equals_skimage_on_the_grid_image():
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    rng = np.random.default_rng(4)
    h, w = 9, 11
    img_t = rng.uniform(1, 5, size=(h, w))
    img_p = img_t + rng.normal(0, 0.5, size=(h, w))
    c = _grid(h, w, step=200.0)
    perm = rng.permutation(h * w)  # spot order must not matter
    got = gene_ssim(img_p.ravel()[perm, None], img_t.ravel()[perm, None], c[perm])[0]
    lo, hi = img_t.min(), img_t.max()
    want = structural_similarity((img_t - lo) / (hi - lo), (img_p - lo) / (hi - lo), win_size=7, data_range=1.0)
    assert got == pytest.approx(want, abs=1e-12)
    # missing spots are empty cells = 0 (true minimum) in both maps
    keep = np.ones(h * w, dtype=bool)
    keep[[12, 40]] = False
    got_gap = gene_ssim(img_p.ravel()[keep, None], img_t.ravel()[keep, None], c[keep])[0]
    it, ip = (img_t - lo) / (hi - lo), (img_p - lo) / (hi - lo)
    it.ravel()[[12, 40]] = 0.0
    ip.ravel()[[12, 40]] = 0.0
    assert got_gap == pytest.approx(structural_similarity(it, ip, win_size=7, data_range=1.0), abs=1e-12)


def test_gene_ssim_small_grid_is_nan():
    c = _grid(2, 10)
    x = np.random.default_rng(0).normal(size=(20, 3))
    assert np.isnan(gene_ssim(x, x, c)).all()
    assert np.isfinite(gene_ssim(np.vstack([x, x[:10]]), np.vstack([x, x[:10]]), _grid(3, 10))).all()


def test_evaluate_with_coords_and_rvd():
    c, t = _smooth_section()
    p = t + np.random.default_rng(5).normal(0, 0.3, size=t.shape)
    genes = [f"g{j}" for j in range(t.shape[1])]
    plain = evaluate(p, t, genes)
    assert "ssc" not in plain and "ssim" not in plain
    assert plain["rvd"] == pytest.approx(relative_variance_distance(p, t))
    out = evaluate(p, t, genes, coords=c)
    for key in ("ssc", "ssim", "rvd"):
        assert np.isfinite(out[key]), key
    assert out["ssc"] == pytest.approx(spatial_structural_correlation(p, t, c))
    assert out["ssim"] == pytest.approx(float(np.mean(gene_ssim(p, t, c))))
    same = [k for k in plain if k != "per_gene_r"]
    np.testing.assert_equal([out[k] for k in same], [plain[k] for k in same])  # NaN == NaN here
    assert np.isnan(plain["coverage_90"]) and np.isnan(plain["width_90"])  # no sd: no interval
    json.dumps(out)
    with pytest.raises(InputError, match="spot centres"):
        evaluate(p, t, genes, coords=c[:-1])


def test_nanmean_metrics_ignores_nan_none_missing():
    records = [
        {"ssc": 0.5, "ssim": float("nan"), "rvd": 1.0},
        {"ssc": float("nan"), "ssim": None, "rvd": 3.0},
        {"ssc": 0.7, "rvd": np.float64(2.0)},
        {"ssc": np.nan, "ssim": float("nan"), "rvd": float("inf")},
    ]
    out = nanmean_metrics(records, ["ssc", "ssim", "rvd"])
    assert out["ssc"] == {"mean": pytest.approx(0.6), "n_finite": 2, "n": 4}
    assert out["ssim"] == {"mean": None, "n_finite": 0, "n": 4}
    assert out["rvd"]["mean"] == pytest.approx(2.0) and out["rvd"]["n_finite"] == 3
    json.dumps(out, allow_nan=False)  # no NaN can leak into a report
    with pytest.raises(InputError, match=r"records\[0\]\['x'\]"):
        nanmean_metrics([{"x": "abc"}], ["x"])


def test_evaluate_records_with_nan_average_cleanly():
    c, t = _smooth_section()
    genes = [f"g{j}" for j in range(t.shape[1])]
    flat = np.full_like(t, 1.0)  # constant prediction: ssc NaN, gsc NaN
    recs = [evaluate(t + 0.1, t, genes, coords=c), evaluate(flat, t, genes, coords=c)]
    assert np.isnan(recs[1]["ssc"]) and np.isnan(recs[1]["gsc"])
    out = nanmean_metrics(recs, ["pcc50", "gsc", "ssc", "ssim", "rvd"])
    assert out["ssc"]["n_finite"] == 1 and out["ssc"]["mean"] == pytest.approx(1.0)
    assert all(v["mean"] is not None and np.isfinite(v["mean"]) for v in out.values())


def test_interval_coverage_is_calibrated_for_the_true_sd_and_flags_bad_sds():
    rng = np.random.default_rng(0)
    pred = rng.uniform(1, 3, size=(4000, 5))
    sd = rng.uniform(0.2, 1.0, size=pred.shape)
    true = pred + sd * rng.standard_normal(pred.shape)
    cal = interval_coverage(pred, sd, true)
    assert cal["coverage_90"] == pytest.approx(0.90, abs=0.01)
    assert cal["width_90"] == pytest.approx(2 * Z90 * sd.mean())
    assert interval_coverage(pred, 0.5 * sd, true)["coverage_90"] < 0.65  # over-confident sd under-covers
    assert interval_coverage(pred, 3 * sd, true)["coverage_90"] > 0.99
    assert np.isnan(interval_coverage(pred, np.zeros_like(sd), true)["coverage_90"])
    assert np.isnan(interval_coverage(pred, None, true)["width_90"])
    with pytest.raises(InputError, match="sd"):
        interval_coverage(pred, sd[:-1], true)
    with pytest.raises(InputError, match="sd"):
        interval_coverage(pred, -sd, true)
    out = evaluate(pred, true, [f"g{j}" for j in range(5)], sd=sd)
    assert out["coverage_90"] == pytest.approx(cal["coverage_90"])
