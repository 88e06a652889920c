"""Step-wise sampler analysis (stgen.workflows.analysis) on a tiny synthetic HINGE run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file

import stgen.evaluation.sweep_plots as SP
import stgen.workflows.analysis as A
from stgen.workflows.config import StgenConfig
from stgen.errors import InputError
from stgen.sampling.masking import MaskSchedule
from stgen.evaluation.metrics import evaluate
from stgen.backbones.embedded import BackboneConfig, ExpressionBackbone
from stgen.models.hinge.network import HINGE
from stgen.models.hinge.config import HingeConfig
from stgen.models.base import SectionInput
from stgen.models.hinge.model import HingeModel, condition_inputs
from stgen.workflows.rundir import TrainedRun, load_run

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
VOCAB = [f"G{i}" for i in range(24)]
PANEL = VOCAB[2:14]  # 12 genes
BB_CFG = BackboneConfig(dim=32, n_layers=2, n_heads=4, value_bins=16)
F_DIM, N_SPOTS, SAMPLES = 6, 20, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(T: int, seed: int = 0, radii: tuple[float, ...] = ()) -> HINGE:
    """Untrained HINGE whose modulation heads are perturbed so that histology matters (``radii``: its spatial
    context, so the condition reads ``F_DIM * (1 + len(radii))`` inputs)."""
    torch.manual_seed(seed)
    net = HINGE(ExpressionBackbone(VOCAB, BB_CFG), PANEL, F_DIM * (1 + len(radii)), T,
                HingeConfig(cond_dim=16, time_dim=8, context_radii=list(radii)))
    with torch.no_grad():
        for m in [*net.mod_attn, *net.mod_ffn, net.mod_dec]:
            m.head.weight.normal_(std=0.3)
            m.head.bias.normal_(std=0.1)
    return net.eval()


def _cfg(T: int) -> StgenConfig:
    cfg = StgenConfig()
    cfg.hinge.T, cfg.hinge.steps, cfg.hinge.samples = T, 2, SAMPLES
    cfg.hinge.sample_batch_size = 16  # 20 spots x 3 samples -> 4 chunks, the last one partial
    cfg.hinge.cond_dim, cfg.hinge.time_dim, cfg.hinge.context_radii = 16, 8, []
    return cfg


def _meta(net: HINGE, T: int) -> dict:
    sched = MaskSchedule(len(PANEL), T)
    return {"model": "hinge", "test_section": "X1", "train_sections": ["X2"], "units": "log2",
            "panel": PANEL, "feature_dim": F_DIM,
            "backbone": {"kind": "default", "genes": VOCAB, "config": BB_CFG.to_dict()},
            "hinge": {"config": net.config.architecture(), "T": T, "schedule": "power", "zeta": sched.exponent,
                      "steps": 2, "samples": SAMPLES}}


def _run(T: int = 10, seed: int = 0, radii: tuple[float, ...] = ()) -> TrainedRun:
    net = _model(T, seed, radii)
    meta, cfg = _meta(net, T), _cfg(T)
    return TrainedRun(meta, cfg, HingeModel(net, meta["hinge"], meta["backbone"], cfg.hinge))


def _write_run_dir(path: Path, T: int = 10) -> Path:
    """A RUN_DIR as stgen.workflows.fit.fit writes it: run.json, config.yaml, model.safetensors."""
    net = _model(T)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path / "model.safetensors")
    (path / "run.json").write_text(json.dumps(_meta(net, T)))
    (path / "config.yaml").write_text(yaml.safe_dump(_cfg(T).to_dict(), sort_keys=False))
    return path


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(N_SPOTS, F_DIM)).astype(np.float32)
    truth = np.log2(1 + rng.poisson(3.0, size=(N_SPOTS, len(PANEL)))).astype(np.float64)
    return feats, truth


def _is_png(p: Path) -> bool:
    b = p.read_bytes()
    return len(b) > 1000 and b[:8] == PNG


def test_stepwise_table_and_final_state_equals_generate():
    run, (feats, truth) = _run(T=10), _data()
    df, final = A.stepwise_metrics(run, feats, truth, samples=SAMPLES, seed=7, device="cpu", return_final=True)
    assert len(df) == 10
    assert df["step"].tolist() == list(range(1, 11)) and df["t"].tolist() == list(range(10, 0, -1))
    fr = df["frac_revealed"].to_numpy()
    assert np.all(np.diff(fr) >= 0) and fr[-1] == 1.0 and fr[0] > 0
    np.testing.assert_allclose(fr, df["frac_expected"].to_numpy(), atol=1e-12)
    metric_cols = [f"{p}_{m}" for p in ("x0", "state") for m in SP.METRICS] + ["x0_sd"]
    assert np.isfinite(df[metric_cols].to_numpy()).all()
    # step 1 sees an all-masked input, identical for every sample of a spot; later the random orders differ
    assert df["x0_sd"].iloc[0] < 1e-6 and (df["x0_sd"].iloc[1:] > 0).all()

    # the final state is the K = T sampler output of HINGE.generate with the same seed
    ref, _ = run.predict(feats, samples=SAMPLES, steps=10, seed=7, device="cpu")
    np.testing.assert_allclose(final, ref, rtol=1e-5, atol=1e-5)
    ref_m = evaluate(ref, truth, PANEL)
    for m in SP.METRICS:
        assert df[f"state_{m}"].iloc[-1] == pytest.approx(ref_m[m], rel=1e-4, abs=1e-5)


def test_step_analysis_of_a_context_run_reads_the_neighbours_from_coords():
    """A run with a spatial context: the step-wise final state and the budget sweep equal predict with xy."""
    run, (feats, truth) = _run(T=10, radii=(1.5,)), _data()
    gx, gy = np.meshgrid(np.arange(5), np.arange(4))
    coords = np.stack([gx.ravel(), gy.ravel()], 1).astype(float) * 200.0
    assert len(coords) == N_SPOTS
    _, final = A.stepwise_metrics(run, feats, truth, samples=2, seed=3, device="cpu", return_final=True,
                                  coords=coords)
    # HINGE.generate on the spots' condition inputs (own features + neighbour means) with the same seed
    inputs = torch.as_tensor(condition_inputs(SectionInput("X1", coords, feats), [1.5]))
    assert inputs.shape == (N_SPOTS, 2 * F_DIM)
    ref, _ = run.model.net.generate(inputs, run.model.schedule, steps=10, n_samples=2, batch_size=16,
                                    generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(final, ref.numpy(), rtol=1e-5, atol=1e-5)
    df = A.budget_sweep(run, feats, truth, ks=(2,), samples=1, seed=0, device="cpu", coords=coords)
    assert np.isfinite(df["pcc50"]).all()
    with pytest.raises(InputError, match="pixel coordinates"):
        A.stepwise_metrics(run, feats, truth, samples=1, device="cpu")


def test_stepwise_fewer_steps_and_bad_inputs():
    run, (feats, truth) = _run(T=10), _data()
    df = A.stepwise_metrics(run, feats, truth, T=4, samples=2, seed=0, device="cpu")
    assert len(df) == 4 and df["t"].tolist() == [10, 8, 5, 2] and df["frac_revealed"].iloc[-1] == 1.0
    with pytest.raises(InputError):
        A.stepwise_metrics(run, feats, truth[:, :5], device="cpu")
    with pytest.raises(InputError):
        A.stepwise_metrics(run, feats, truth, T=11, device="cpu")
    # truth as a DataFrame: panel columns are picked in panel order
    tdf = pd.DataFrame(truth[:, ::-1], columns=PANEL[::-1])
    d2 = A.stepwise_metrics(run, feats, tdf, T=4, samples=2, seed=0, device="cpu")
    pd.testing.assert_frame_equal(df, d2)
    ridge = TrainedRun({"model": "ridge", "panel": PANEL}, StgenConfig(), object())
    with pytest.raises(InputError, match="HINGE"):
        A.stepwise_metrics(ridge, feats, truth)


def test_budget_sweep_rows_per_k():
    run, (feats, truth) = _run(T=10), _data()
    df = A.budget_sweep(run, feats, truth, ks=(5, 1, 2, 10, 50), samples=2, seed=0, repeats=2, device="cpu")
    assert df["K"].tolist() == [1, 2, 5, 10]  # K > T skipped
    assert (df["time_s"] > 0).all() and (df["spots_per_s"] > 0).all()
    assert np.isfinite(df[list(SP.METRICS)].to_numpy()).all()
    ref, _ = run.predict(feats, samples=2, steps=5, seed=0, device="cpu")
    assert df.loc[df["K"] == 5, "pcc50"].item() == pytest.approx(evaluate(ref, truth, PANEL)["pcc50"])
    with pytest.raises(InputError):
        A.budget_sweep(run, feats, truth, ks=(0, 2))


def test_horizon_sweep_calls_fit_for_T(tmp_path):
    feats, truth = _data()
    calls = []

    def fit_for_T(T):
        calls.append(T)
        if T == 5:  # a RUN_DIR path is accepted too
            return _write_run_dir(tmp_path / f"T{T}", T)
        return _run(T)

    df = A.horizon_sweep(fit_for_T, feats, truth, Ts=(3, 5), samples=2, device="cpu")
    assert calls == [3, 5] and df["T"].tolist() == [3, 5] and df["K"].tolist() == [3, 5]
    assert np.isfinite(df[list(SP.METRICS)].to_numpy()).all() and (df["fit_s"] >= 0).all()
    assert "ssc" not in df.columns  # no coordinates: no SSC, as before
    xy = np.stack(np.meshgrid(np.arange(5), np.arange(4)), -1).reshape(-1, 2) * 100.0
    df2 = A.horizon_sweep(lambda T: _run(T), feats, truth, Ts=(3, 6), steps=4, samples=1, device="cpu", coords=xy)
    assert df2["K"].tolist() == [3, 4] and np.isfinite(df2["ssc"]).all()
    with pytest.raises(InputError, match="trained with T=10"):
        A.horizon_sweep(lambda T: _run(10), feats, truth, Ts=(4,), device="cpu")


def test_plots_are_pngs(tmp_path):
    run, (feats, truth) = _run(T=10), _data()
    step = A.stepwise_metrics(run, feats, truth, T=5, samples=2, device="cpu")
    budget = A.budget_sweep(run, feats, truth, ks=(1, 2, 5), samples=2, device="cpu", warmup=False)
    horizon = budget.drop(columns=["T"]).rename(columns={"K": "T"})
    SP.plot_stepwise(step, tmp_path / "a" / "step.png", x="step")
    SP.plot_stepwise(step, tmp_path / "rev.png", x="frac_revealed")
    SP.plot_budget(budget, tmp_path / "budget.png")
    SP.plot_horizon(horizon, tmp_path / "horizon.png")
    for name in ("a/step.png", "rev.png", "budget.png", "horizon.png"):
        assert _is_png(tmp_path / name)
    with pytest.raises(InputError):
        SP.plot_budget(budget.drop(columns=["spots_per_s"]), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_run_step_analysis_end_to_end(tmp_path, monkeypatch):
    import stgen.data.her2st as her2st
    import stgen.workflows.inputs as inputs

    run_dir = _write_run_dir(tmp_path / "run", T=10)
    feats, truth = _data()
    rng = np.random.default_rng(1)
    genes = [g for g in PANEL if g != "G5"] + ["OTHER"]  # G5 not detected in the section: zero counts
    counts = rng.poisson(3.0, size=(N_SPOTS, len(genes))).astype(np.float32)
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"s{i}" for i in range(N_SPOTS)]),
                       var=pd.DataFrame(index=genes))
    adata.uns["stgen"] = {"section": "X1", "image_path": "none.jpg"}
    adata.obsm["spatial"] = np.stack(np.meshgrid(np.arange(5), np.arange(4)), -1).reshape(-1, 2) * 290.0  # pixels
    seen = {}

    def fake_read_section(root, section, require_image=False):
        seen["section"] = section
        return adata

    monkeypatch.setattr(her2st, "read_section", fake_read_section)
    monkeypatch.setattr(inputs, "section_features", lambda a, cfg, cache, progress=True: feats)
    out = tmp_path / "analysis"
    info = A.run_step_analysis(run_dir, tmp_path, None, out, samples=2, ks=(1, 5, 10), progress=False,
                               device="cpu", cache_dir=tmp_path / "cache")
    assert seen["section"] == "X1" and info["held_out"] and info["missing_genes"] == ["G5"]
    assert {p.name for p in out.iterdir()} == {"stepwise.csv", "budget.csv", "stepwise_vs_step.png",
                                               "stepwise_vs_revealed.png", "budget.png", "summary.md",
                                               "summary.json"}
    step = pd.read_csv(out / "stepwise.csv")
    assert len(step) == 10 and step["frac_revealed"].iloc[-1] == 1.0
    budget = pd.read_csv(out / "budget.csv")
    assert budget["K"].tolist() == [1, 5, 10]
    # the section's coordinates give SSC (and RVD is always there) in every table
    assert np.isfinite(step[["x0_ssc", "state_ssc", "state_rvd"]].to_numpy()).all()
    assert np.isfinite(budget[["ssc", "rvd"]].to_numpy()).all()
    assert "| gsc | rvd | ssc | time_s |" in (out / "summary.md").read_text()
    assert set(info["stepwise"]["final"]) == {*SP.METRICS, "ssc"}
    for p in out.glob("*.png"):
        assert _is_png(p)
    assert "Inference budget K" in (out / "summary.md").read_text()
    assert json.loads((out / "summary.json").read_text())["stepwise"]["steps"] == 10
    # the truth used: log2(count+1) of the panel, G5 = 0
    y, missing = A.section_truth(adata, PANEL, "log2")
    assert missing == ["G5"] and np.all(y[:, PANEL.index("G5")] == 0)
    np.testing.assert_allclose(y[:, PANEL.index("G2")], np.log2(1 + counts[:, 0]))
    # the loaded RUN_DIR predicts like the in-memory model it was written from
    np.testing.assert_allclose(load_run(run_dir).predict(feats, samples=1, steps=2, device="cpu")[0],
                               _run(10).predict(feats, samples=1, steps=2, device="cpu")[0], atol=1e-6)


def test_run_step_analysis_refuses_ridge(tmp_path, monkeypatch):
    from stgen.models.ridge.model import Ridge

    d = tmp_path / "ridge"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"model": "ridge", "panel": PANEL}))
    (d / "config.yaml").write_text(yaml.safe_dump(StgenConfig().to_dict()))
    monkeypatch.setattr(Ridge, "load", classmethod(lambda cls, folder, meta, cfg: object()))
    with pytest.raises(InputError, match="HINGE"):
        A.run_step_analysis(d, tmp_path, "X1", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_inference_speed_help():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "inference_speed.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for flag in ("--run", "--ridge", "--section", "--data", "--ks", "--samples", "--repeats"):
        assert flag in r.stdout


def test_inference_speed_on_synthetic_run(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("inference_speed", ROOT / "benchmarks" / "inference_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run_dir = _write_run_dir(tmp_path / "run", T=10)
    feats, truth = _data()
    np.save(tmp_path / "f.npy", feats)
    np.save(tmp_path / "y.npy", truth)
    res = mod.main(["--run", str(run_dir), "--feats", str(tmp_path / "f.npy"), "--truth", str(tmp_path / "y.npy"),
                    "--ks", "2,10", "--samples", "2", "--repeats", "1", "--device", "cpu", "--matmul-n", "128",
                    "--json", str(tmp_path / "speed.json")])
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "K=2 vs K=10" in out
    assert [r["K"] for r in res["hinge"]] == [2, 10] and res["matmul_fp32_gflops"] > 0
    r2, r10 = res["hinge"]
    assert r10["gflop_per_slide"] == pytest.approx(5 * r2["gflop_per_slide"], rel=1e-6)  # linear in K
    assert r2["achieved_gflops"] > 0 and r2["peak_rss_mb"] > 0 and np.isfinite(r2["pcc50"])
    assert json.loads((tmp_path / "speed.json").read_text())["k_comparison"]["K_large"] == 10


def test_run_horizon_analysis_fits_one_run_per_T_and_reuses_them(tmp_path, monkeypatch):
    """`stgen horizon`: one fit per T with cfg.hinge.T = T (and nothing else changed), K = min(steps, T)."""
    import stgen.workflows.benchmark as benchmark
    import stgen.data.her2st as her2st
    import stgen.workflows.inputs as inputs

    feats, _ = _data()
    rng = np.random.default_rng(2)
    counts = rng.poisson(3.0, size=(N_SPOTS, len(PANEL))).astype(np.float32)
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"s{i}" for i in range(N_SPOTS)]),
                       var=pd.DataFrame(index=PANEL))
    monkeypatch.setattr(her2st, "read_section", lambda root, section, require_image=False: adata)
    monkeypatch.setattr(inputs, "section_features", lambda a, cfg, cache, progress=True: feats)
    fits = []

    def fake_fit_or_reuse(data_dir, section, model, run_dir, cfg, cache_dir, progress):
        fits.append((section, model, cfg.hinge.T, cfg.hinge.lr))
        if not (run_dir / "run.json").is_file():
            _write_run_dir(run_dir, T=cfg.hinge.T)

    monkeypatch.setattr(benchmark, "_fit_or_reuse", fake_fit_or_reuse)
    base = StgenConfig()
    base.hinge.lr = 1e-3
    out = tmp_path / "horizon"
    df = A.run_horizon_analysis(tmp_path, "X1", out, Ts=(3, 8), cfg=base, steps=5, samples=2, progress=False)
    assert fits == [("X1", "hinge", 3, 1e-3), ("X1", "hinge", 8, 1e-3)]
    assert base.hinge.T == 50  # the caller's config is not mutated
    assert df["T"].tolist() == [3, 8] and df["K"].tolist() == [3, 5] and (df["samples"] == 2).all()
    assert "rvd" in df.columns and "ssc" not in df.columns  # no obsm['spatial']: scored as before, without SSC
    assert {"horizon.csv", "horizon.png", "horizon.md", "runs"} == {p.name for p in out.iterdir()}
    assert _is_png(out / "horizon.png")
    # the metrics are those of the T=8 run's own prediction, scored against log2(count + 1)
    run8 = load_run(out / "runs" / "T8")
    mean, _ = run8.predict(feats, samples=2, steps=5, seed=0, device="cpu")
    want = evaluate(mean, np.log2(1 + counts.astype(np.float64)), PANEL)
    assert df.loc[df["T"] == 8, "pcc50"].item() == pytest.approx(want["pcc50"], abs=1e-6)
    assert df["zeta"].tolist() == pytest.approx([MaskSchedule(len(PANEL), t).exponent for t in (3, 8)])
    with pytest.raises(InputError, match="T must be >= 1"):
        A.run_horizon_analysis(tmp_path, "X1", out, Ts=(0, 5), progress=False)
