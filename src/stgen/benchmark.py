"""Leave-one-section-out benchmark over every imaged section.

For each held-out section and model: fit (re-used when ``runs/<model>/<section>``
holds a run with the same configuration hash), predict the held-out section,
score it. Writes into REPORT_DIR:

* ``metrics.csv`` - one row per (section, model): PCC-50, PCC-200, MSE, MAE,
  gene-gene correlation agreement (GSC), fit and predict time, spots/s;
* ``report.md`` - mean +/- sd across folds per model, and the per-fold table;
* ``maps_<section>.png`` - ground truth vs every model for ERBB2, FASN, GNAS
  (the Her2ST markers of HINGE Fig. S3);
* ``corr_<section>.png`` - gene-gene correlation heatmaps, truth vs models;
* ``pcc50_by_section.png``, ``gsc_by_section.png`` - metric bars.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from .config import StgenConfig
from .data.her2st import list_sections
from .errors import InputError
from .io import atomic_path
from .pipeline import _check_model, config_hash, fit, image_for_section, load_truth, predict, score_prediction
from .plots import plot_corr_heatmaps, plot_metric_bars, plot_spatial_maps

MARKERS = ("ERBB2", "FASN", "GNAS")
METRICS = ("pcc50", "pcc200", "mse", "mae", "gsc")


def _fit_or_reuse(data_dir: Path, section: str, model: str, run_dir: Path, cfg: StgenConfig, cache_dir, progress) -> dict:
    want = config_hash(cfg, model, section)
    meta_path = run_dir / "run.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("config_hash") == want:
            return meta
    return fit(data_dir, section, run_dir, model=model, cfg=cfg, cache_dir=cache_dir, progress=progress)


def run_benchmark(
    data_dir: str | Path,
    out: str | Path,
    models: Sequence[str] = ("hinge", "ridge"),
    cfg: StgenConfig | None = None,
    sections: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the leave-one-section-out benchmark; returns the metrics table."""
    cfg = cfg or StgenConfig()
    data_dir, out = Path(data_dir), Path(out)
    models = [_check_model(m) for m in models]
    if not models:
        raise InputError("no model given to benchmark")
    imaged = list_sections(data_dir, imaged_only=True)
    sections = list(sections or imaged)
    bad = [s for s in sections if s not in imaged]
    if bad:
        raise InputError(f"section(s) {bad} have no image in {data_dir}; available: {imaged}")
    rows = []
    for section in sections:
        preds: dict = {}
        truths: dict = {}  # units -> truth AnnData, read once per section
        counts = data_dir / "ST-cnts" / f"{section}.tsv.gz"
        for model in models:
            run_dir = out / "runs" / model / section
            meta = _fit_or_reuse(data_dir, section, model, run_dir, cfg, cache_dir, progress)
            pred_path = out / "preds" / model / f"{section}.h5ad"
            t0 = time.time()
            pred = predict(run_dir, image_for_section(data_dir, section),
                           data_dir / "ST-spotfiles" / f"{section}_selection.tsv", pred_path,
                           cache_dir=cache_dir, progress=progress)
            t_pred = time.time() - t0
            units = pred.uns["stgen"]["units"]
            if units not in truths:
                truths[units] = load_truth(counts, units)
            sc = score_prediction(pred, truths[units], f"{pred_path} vs {counts}")
            m = sc.metrics
            rows.append({"section": section, "model": model, **{k: m[k] for k in METRICS},
                         "n_spots": m["n_spots"], "n_genes": m["n_genes"],
                         "fit_s": meta.get("timings", {}).get("fit_total_s"),
                         "predict_s": round(t_pred, 2), "spots_per_s": round(m["n_spots"] / t_pred, 1)})
            preds[model] = (sc.pred, sc.genes, pred[sc.spots].obsm["spatial"], sc.true)
        _section_plots(out, section, preds)
    df = pd.DataFrame(rows)
    write_report(df, out, cfg)
    return df


def _section_plots(out: Path, section: str, preds: dict) -> None:
    """Maps and heatmaps on the genes every model predicts (panels can differ by the
    few genes a backbone vocabulary lacks)."""
    common = [g for g in next(iter(preds.values()))[1] if all(g in v[1] for v in preds.values())]
    model_preds, truth, xy = {}, None, None
    for m, (p, genes, xy_m, t) in preds.items():
        idx = [genes.index(g) for g in common]
        model_preds[m] = p[:, idx]
        truth, xy = t[:, idx], xy_m
    plot_spatial_maps(xy, truth, model_preds, MARKERS, common, out / f"maps_{section}.png",
                      title=f"Held-out section {section}: ground truth vs prediction (log2(count+1))")
    plot_corr_heatmaps(truth, model_preds, common, out / f"corr_{section}.png")


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd across folds per model."""
    cols = [*METRICS, "fit_s", "predict_s", "spots_per_s"]
    g = df.groupby("model", sort=False)[cols]
    return g.mean().join(g.std(ddof=0), rsuffix="_sd")


def write_report(df: pd.DataFrame, out: Path, cfg: StgenConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "metrics.csv") as tmp:
        df.to_csv(tmp, index=False)
    s = summarize(df)
    lines = ["# stgen benchmark: leave-one-section-out on Her2ST", "",
             f"Targets: {cfg.data.transform} (log2(count+1) = Stem/HINGE protocol); HMHVG panel from training sections; "
             f"encoder {cfg.features.encoder}, patch {cfg.features.patch_px} px; folds: {', '.join(df.section.unique())}.",
             "GSC = Pearson r between upper triangles of predicted and true gene-gene correlation matrices.", "",
             "| model | PCC-50 | PCC-200 | MSE | MAE | GSC | fit (s) | predict (s) | spots/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, r in s.iterrows():
        cell = lambda k, d=3: f"{r[k]:.{d}f} ± {r[k + '_sd']:.{d}f}"  # noqa: E731
        lines.append(f"| {model} | {cell('pcc50')} | {cell('pcc200')} | {cell('mse')} | {cell('mae')} | {cell('gsc')} "
                     f"| {r['fit_s']:.0f} | {r['predict_s']:.1f} | {r['spots_per_s']:.0f} |")
    lines += ["", "## Per fold", "", "| section | model | PCC-50 | PCC-200 | MSE | MAE | GSC |", "|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        lines.append(f"| {r.section} | {r.model} | {r.pcc50:.3f} | {r.pcc200:.3f} | {r.mse:.3f} | {r.mae:.3f} | {r.gsc:.3f} |")
    lines += ["", "Maps: `maps_<section>.png`; co-expression: `corr_<section>.png`; bars: `pcc50_by_section.png`, "
              "`gsc_by_section.png`.", ""]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines))
    for metric in ("pcc50", "gsc"):
        plot_metric_bars(df, metric, out / f"{metric}_by_section.png")
    print("\n".join(lines[:8 + len(s)]))


__all__ = ["run_benchmark", "summarize", "write_report", "MARKERS"]
