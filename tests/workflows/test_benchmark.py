"""Benchmark report (NaN-safe means, seed aggregation) and the spatial metrics of score_prediction."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from stgen.workflows.benchmark import METRICS, fold_table, summarize, write_report
from stgen.workflows.config import StgenConfig
from stgen.evaluation.spatial import spatial_structural_correlation
from stgen.workflows.evaluate import score_prediction

NAN = float("nan")


def _seed_row(section: str, model: str, seed: int = 0, **over) -> dict:
    base = {m: 0.5 for m in METRICS}
    base.update(mse=1.0 + 0.1 * seed, rvd=0.2)
    return {"section": section, "model": model, "seed": seed, **base, "n_spots": 30, "n_genes": 12, "fit_s": 3.0,
            "predict_s": 1.5, **over}


def _table_lines(md: str) -> list[str]:
    return [ln for ln in md.splitlines() if ln.startswith("|")]


def _rows(md: str, heading: str) -> dict[str, list[str]]:
    """model -> cells of the first markdown table after ``heading``."""
    out, lines = {}, md.split(heading, 1)[1].strip().splitlines()
    for ln in lines[2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


def test_report_means_ignore_a_nan_fold(tmp_path, capsys):
    seed_df = pd.DataFrame([
        _seed_row("A1", "hinge", ssc=0.4), _seed_row("A2", "hinge", ssc=NAN, ssim=NAN),
        _seed_row("A1", "ridge", ssc=0.2, ssim=NAN), _seed_row("A2", "ridge", ssc=0.3, ssim=NAN, predict_s=NAN),
    ])
    df = fold_table(seed_df)
    assert not any(c.endswith("_seed_sd") for c in df.columns) and "n_seeds" not in df.columns
    s = summarize(df)
    assert s.loc["hinge", "ssc"] == pytest.approx(0.4) and s.loc["hinge", "ssc_n"] == 1
    assert s.loc["hinge", "n_folds"] == 2 and s.loc["ridge", "ssc"] == pytest.approx(0.25)
    assert s.loc["ridge", "ssim_n"] == 0  # no finite fold at all
    assert s.loc["ridge", "predict_s"] == pytest.approx(1.5)  # a re-used prediction without a stored time
    write_report(df, tmp_path, StgenConfig())
    md = (tmp_path / "report.md").read_text()
    assert "stain normalisation macenko (hinge, ridge);" in md  # features.stain: auto, resolved per model
    rows = _table_lines(md)
    assert rows and not [ln for ln in rows if "nan" in ln.lower()]  # no NaN leaks into any table
    structure = _rows(md, "**Structure**")  # model -> GSC, SSC, RVD, SSIM
    assert structure["hinge"][1:] == ["0.400 ± 0.000 (1/2 folds)", "0.200 ± 0.000", "0.500 ± 0.000 (1/2 folds)"]
    assert structure["ridge"][1:] == ["0.250 ± 0.050", "0.200 ± 0.000", "n/a"]  # SSIM: no finite fold
    assert _rows(md, "**Timing**")["ridge"] == ["3", "1.5 (1/2 folds)", "20 (1/2 folds)"]
    for head in ("| model | PCC-50 | PCC-200 | MSE | MAE |", "| model | GSC | SSC | RVD | SSIM |",
                 "| model | ARI | NMI | DEG-20 | DEG-50 |", "| model | fit (s) | predict (s/slide) | spots/s |"):
        assert head in md
    assert "## Per fold" in md and "Sampling variance" not in md
    for src in ("FLAG App. C.2", "(Stem)", "HINGE supp. B", "FLAG 4.5 / H.9"):
        assert src in md
    assert (tmp_path / "ssc_by_section.png").stat().st_size > 1000
    assert "nan" not in capsys.readouterr().out.lower().replace("(nan)", "")


def test_fold_table_averages_seeds_and_reports_their_sd(tmp_path):
    seed_df = pd.DataFrame([
        _seed_row("A1", "flag", 0, pcc50=0.4), _seed_row("A1", "flag", 1, pcc50=0.6),
        _seed_row("A2", "flag", 0, ssc=NAN), _seed_row("A2", "flag", 1, ssc=0.7),
        _seed_row("A1", "ridge"), _seed_row("A2", "ridge", ssc=NAN),
    ])
    df = fold_table(seed_df, seeds=2).set_index(["section", "model"])
    assert df.loc[("A1", "flag"), "pcc50"] == pytest.approx(0.5)
    assert df.loc[("A1", "flag"), "pcc50_seed_sd"] == pytest.approx(0.1)  # ddof=0
    assert df.loc[("A1", "flag"), "mse_seed_sd"] == pytest.approx(0.05)
    assert df.loc[("A2", "flag"), "ssc"] == pytest.approx(0.7)  # the NaN seed is ignored
    assert np.isnan(df.loc[("A2", "flag"), "ssc_seed_sd"])  # one finite seed: no sd
    assert df.loc[("A1", "ridge"), "pcc50_seed_sd"] == 0.0 and df.loc[("A1", "ridge"), "n_seeds"] == 1
    assert df.loc[("A1", "flag"), "n_seeds"] == 2 and df.loc[("A1", "flag"), "spots_per_s"] == pytest.approx(20.0)
    write_report(df.reset_index(), tmp_path, StgenConfig(), seed_df=seed_df)
    md = (tmp_path / "report.md").read_text()
    assert "## Sampling variance (2 seeds)" in md and "| model | PCC-50 sd | MSE sd | GSC sd | SSC sd |" in md
    variance = _rows(md, "## Sampling variance (2 seeds)")  # model -> PCC-50, MSE, GSC, SSC sd
    assert variance["flag"][0] == "0.0500"  # mean over folds of the seed sd (0.1 and 0)
    assert variance["flag"][3] == "0.0000 (1/2 folds)"  # A2's SSC has one finite seed: no sd
    assert variance["ridge"] == ["0.0000"] * 3 + ["0.0000 (1/2 folds)"]  # ridge: 0, where its SSC is defined
    assert not [ln for ln in _table_lines(md) if "nan" in ln.lower()]
    assert len(pd.read_csv(tmp_path / "metrics_seeds.csv")) == 6


def _grid_adata(nx: int, ny: int, genes: list[str], rng, spatial: bool = True) -> ad.AnnData:
    xy = np.stack(np.meshgrid(np.arange(nx), np.arange(ny)), -1).reshape(-1, 2) * 100.0
    x = np.log2(1 + rng.poisson(3.0, size=(len(xy), len(genes))).astype(float))
    a = ad.AnnData(x, obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]), var=pd.DataFrame(index=genes))
    if spatial:
        a.obsm["spatial"] = xy
    return a


def test_score_prediction_always_has_the_spatial_metrics(caplog):
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(12)]
    truth = _grid_adata(6, 5, genes + ["EXTRA"], rng, spatial=False)
    pred = _grid_adata(6, 5, genes, rng)
    pred = pred[::-1].copy()  # other spot order than the truth
    m = score_prediction(pred, truth, "p vs t").metrics
    for k in ("ssc", "ssim", "rvd"):
        assert np.isfinite(m[k]), k
    assert set(m["per_gene_r"]) == set(genes)
    t = truth[list(pred.obs_names), genes].X
    assert m["ssc"] == pytest.approx(spatial_structural_correlation(pred.X, t, pred.obsm["spatial"]))
    # no coordinates: spatial metrics NaN, the others unchanged
    bare = pred.copy()
    del bare.obsm["spatial"]
    m2 = score_prediction(bare, truth, "p vs t").metrics
    assert np.isnan(m2["ssc"]) and np.isnan(m2["ssim"]) and m2["rvd"] == m["rvd"] and m2["pcc50"] == m["pcc50"]
    # fewer than k + 1 = 9 scored spots: SSC NaN with a warning, never an exception
    with caplog.at_level(logging.WARNING, logger="stgen.evaluation.metrics"):
        small = score_prediction(pred[:5].copy(), truth, "tiny vs t").metrics
    assert np.isnan(small["ssc"]) and np.isfinite(small["rvd"]) and small["n_spots"] == 5
    assert "tiny vs t" in caplog.text and "SSC is NaN" in caplog.text
