from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("scanpy")
pytest.importorskip("leidenalg")

from stgen.evaluation.downstream import deg_overlap, domain_agreement, run_downstream, spatial_domains
from stgen.errors import InputError  # noqa: E402

H = W = 20
G = 30


@pytest.fixture(scope="module")
def section():
    """20 x 20 grid, 3 vertical blocks; block b over-expresses genes 10b..10b+9."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    coords = np.column_stack([xx.ravel(), yy.ravel()]).astype(float) * 150.0
    block = np.digitize(xx.ravel(), [7, 14])
    expr = rng.normal(2.0, 0.5, size=(H * W, G))
    for b in range(3):
        expr[block == b, 10 * b:10 * (b + 1)] += 2.0
    genes = [f"G{j}" for j in range(G)]
    return coords, expr, block, genes


def test_spatial_domains_recovers_blocks_and_keeps_input(section):
    from sklearn.metrics import adjusted_rand_score

    _, expr, block, _ = section
    before = expr.copy()
    labels = spatial_domains(expr)
    np.testing.assert_array_equal(expr, before)  # input untouched (scaling is on a copy)
    assert labels.shape == (H * W,) and labels.dtype == np.int64
    assert adjusted_rand_score(block, labels) == 1.0
    # a constant gene is dropped, not fatal; an all-constant section is one domain
    with_const = np.column_stack([expr, np.full(H * W, 7.0)])
    assert adjusted_rand_score(block, spatial_domains(with_const)) == 1.0
    np.testing.assert_array_equal(spatial_domains(np.ones((10, 4))), np.zeros(10, dtype=np.int64))
    with pytest.raises(InputError, match="at least 3 spots"):
        spatial_domains(expr[:2])


def test_spatial_domains_accepts_anndata(section):
    ad = pytest.importorskip("anndata")
    _, expr, _, _ = section
    adata = ad.AnnData(expr.copy())
    np.testing.assert_array_equal(spatial_domains(adata), spatial_domains(expr))
    assert "X_pca" not in adata.obsm and "leiden" not in adata.obs  # not modified


def test_domain_agreement_identity_and_shuffle(section):
    _, expr, _, _ = section
    same = domain_agreement(expr, expr)
    assert same["ari"] == 1.0 and same["nmi"] == pytest.approx(1.0)
    assert same["n_domains_true"] == same["n_domains_pred"] == 3
    shuffled = expr[np.random.default_rng(1).permutation(H * W)]
    out = domain_agreement(shuffled, expr)
    assert abs(out["ari"]) < 0.1 and out["nmi"] < 0.1


def test_deg_overlap_identity_and_swapped_markers(section):
    _, expr, block, genes = section
    same = deg_overlap(expr, expr, genes)  # domains from the truth's Leiden clusters
    assert same == {"deg_top20": 1.0, "deg_top50": 1.0, "n_domains": 3}
    # swap the marker genes of blocks 0 and 1: their top-10 markers no longer match
    swapped = expr[:, list(range(10, 20)) + list(range(10)) + list(range(20, G))]
    out = deg_overlap(swapped, expr, genes, domains=block, top=(10, 50))
    assert out["n_domains"] == 3
    assert out["deg_top10"] == pytest.approx(1.0 / 3.0)  # only block 2 keeps its markers
    assert out["deg_top50"] == 1.0  # K = G = 30: every gene is in the top K
    # a domain with a single spot is skipped
    lonely = block.copy()
    lonely[0] = 9
    assert deg_overlap(expr, expr, genes, domains=lonely)["n_domains"] == 3
    with pytest.raises(InputError, match="names given"):
        deg_overlap(expr, expr, genes[:-1], domains=block)


def test_run_downstream_writes_figures(section, tmp_path):
    ad = pytest.importorskip("anndata")
    pd = pytest.importorskip("pandas")
    from PIL import Image

    coords, expr, _, genes = section
    spots = [f"s{i}" for i in range(H * W)]
    rng = np.random.default_rng(2)
    pred = ad.AnnData(expr + rng.normal(0, 0.3, size=expr.shape),
                      obs=pd.DataFrame(index=spots), var=pd.DataFrame(index=genes))
    pred.obsm["spatial"] = coords
    # truth has the spots in another order and an extra gene: alignment must handle both
    order = rng.permutation(H * W)
    truth = ad.AnnData(np.column_stack([expr[order], np.zeros(H * W)]),
                       obs=pd.DataFrame(index=[spots[i] for i in order]),
                       var=pd.DataFrame(index=genes + ["EXTRA"]))
    out = run_downstream(pred, truth, out_dir=tmp_path / "figs", module_genes=genes[:8])
    for key in ("ari", "nmi", "n_domains_true", "n_domains_pred", "deg_top20", "deg_top50", "n_domains", "ssc"):
        assert key in out and np.isfinite(out[key]), key
    assert out["ari"] == 1.0 and out["ssc"] > 0.5
    assert out["module_genes"] == genes[:8]
    for name in ("morans_scatter.png", "coexpression.png"):
        path = tmp_path / "figs" / name
        assert path.is_file()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100
    json.dumps(out)

    no_xy = pred.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(InputError, match="spatial"):
        run_downstream(no_xy, truth)


def test_cli_evaluate_with_downstream_dir(section, tmp_path):
    """`stgen evaluate --downstream-dir`: SSC/SSIM/RVD in the JSON, downstream numbers under "downstream", both PNGs."""
    ad = pytest.importorskip("anndata")
    pd = pytest.importorskip("pandas")
    from typer.testing import CliRunner

    from stgen.cli import app

    coords, expr, _, genes = section
    rng = np.random.default_rng(3)
    counts = np.rint(np.clip(2.0 ** expr - 1.0, 0.0, None))
    spots = [f"s{i}" for i in range(H * W)]
    ad.AnnData(counts, obs=pd.DataFrame(index=spots), var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "t.h5ad")
    pred = ad.AnnData(np.log2(1.0 + counts) + rng.normal(0, 0.3, size=counts.shape),
                      obs=pd.DataFrame(index=spots), var=pd.DataFrame(index=genes))
    pred.obsm["spatial"] = coords
    pred.uns["stgen"] = {"units": "log2", "model": "ridge"}
    pred.write_h5ad(tmp_path / "p.h5ad")
    base = ["evaluate", "--pred", str(tmp_path / "p.h5ad"), "--counts", str(tmp_path / "t.h5ad")]

    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "m.json"), "--downstream-dir", str(tmp_path / "ds")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    for key in ("pcc50", "gsc", "ssc", "rvd", "ssim"):
        assert np.isfinite(m[key]), key
    assert m["ssc"] > 0.5 and "per_gene_r" in m
    for key in ("ari", "nmi", "deg_top20", "deg_top50"):
        assert np.isfinite(m["downstream"][key]), key
    assert m["downstream"]["ari"] > 0.5
    for name in ("morans_scatter.png", "coexpression.png"):
        assert (tmp_path / "ds" / name).stat().st_size > 1000, name
    assert json.loads(r.output.strip().splitlines()[-1])["downstream"]["nmi"] == m["downstream"]["nmi"]

    # without --downstream-dir: no downstream block; without coordinates: SSC/SSIM NaN, not an error
    del pred.obsm["spatial"]
    pred.write_h5ad(tmp_path / "bare.h5ad")
    bare = ["evaluate", "--pred", str(tmp_path / "bare.h5ad"), "--counts", str(tmp_path / "t.h5ad")]
    r = CliRunner().invoke(app, [*bare, "--out", str(tmp_path / "m2.json")])
    assert r.exit_code == 0, r.output
    m2 = json.loads((tmp_path / "m2.json").read_text())
    assert "downstream" not in m2 and np.isnan(m2["ssc"]) and np.isnan(m2["ssim"]) and m2["rvd"] == m["rvd"]
    r = CliRunner().invoke(app, [*bare, "--out", str(tmp_path / "m3.json"), "--downstream-dir", str(tmp_path / "d3")])
    assert r.exit_code == 2 and "spatial" in r.output and not (tmp_path / "m3.json").exists()


def test_morans_scatter_one_panel_per_model(tmp_path):
    from PIL import Image

    from stgen.evaluation.downstream import plot_morans_scatter

    rng = np.random.default_rng(4)
    it = rng.uniform(-0.1, 0.8, size=25)
    plot_morans_scatter(it, it + 0.05, tmp_path / "one.png", ssc=0.9)
    preds = {"hinge": it + rng.normal(0, 0.05, 25), "ridge": np.append(it[:-1], np.nan)}
    plot_morans_scatter(it, preds, tmp_path / "two.png", ssc={"hinge": 0.8, "ridge": float("nan")}, title="A1")
    with Image.open(tmp_path / "one.png") as one, Image.open(tmp_path / "two.png") as two:
        assert two.size[0] > 1.6 * one.size[0]  # side-by-side panels
    with pytest.raises(InputError, match="different names"):
        plot_morans_scatter({"hinge": it}, preds, tmp_path / "bad.png")
    with pytest.raises(InputError, match="ridge"):
        plot_morans_scatter(it, {"ridge": it[:3]}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
