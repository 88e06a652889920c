"""Leave-one-section-out benchmark over every imaged section.

For each held-out section and model: fit (re-used when ``runs/<model>/<section>``
holds a run with the same configuration hash), predict the held-out section
(re-used when ``preds/<model>/<section>.h5ad`` came from the current fit with
the default sampler, :func:`stgen.workflows.predict.prediction_is_current`; its stored
predict time is reported), score it. ``models`` may be ``"all"``
(:data:`stgen.models.registry.MODELS`). With ``seeds=N`` (FLAG H.5) the
generative models (:data:`~stgen.models.registry.GENERATIVE`: hinge, flag,
stem, stflow) are predicted with sampling seeds 0..N-1 (seed ``s > 0`` in
``preds/<model>/<section>_seed<s>.h5ad``) and every seed is scored; the
deterministic models are predicted once. A run or prediction is only re-used
when its configuration hash / fit matches, so a report directory written with
another configuration is refitted, never mixed in. Writes into REPORT_DIR:

* ``metrics.csv`` - one row per (section, model): the metrics of
  :data:`METRICS` (mean over seeds), with N > 1 also their sampling sd over
  seeds (``<metric>_seed_sd``, ddof=0; 0 for ridge) and ``n_seeds``; then
  ``n_spots``, ``n_genes``, fit and predict time (s/slide, mean over seeds),
  spots/s;
* ``metrics_seeds.csv`` (N > 1) - one row per (section, model, seed);
* ``report.md`` - mean +/- sd across folds per model (NaN folds ignored, the
  number of finite folds shown when smaller), the per-fold table, with N > 1
  the sampling-variance table, and the metric definitions;
* ``maps_<section>.png`` - ground truth vs every model for ERBB2, FASN, GNAS
  (the Her2ST markers of HINGE Fig. S3);
* ``corr_<section>.png`` - gene-gene correlation heatmaps, truth vs models;
* ``morans_<section>.png`` - per-gene Moran's I, truth vs each model (seed 0);
* ``pcc50_by_section.png``, ``gsc_by_section.png``, ``ssc_by_section.png`` -
  metric bars.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence
import numpy as np
import pandas as pd
from stgen.workflows.config import StgenConfig
from stgen.data.her2st import list_sections
from stgen.evaluation.downstream import domain_and_marker_scores, plot_morans_scatter, spatial_domains
from stgen.errors import InputError
from stgen.utils.io import atomic_path
from stgen.evaluation.spatial import morans_i_pair
from stgen.models.registry import GENERATIVE, expand_models
from stgen.workflows.rundir import config_hash
from stgen.workflows.fit import fit
from stgen.workflows.paths import image_for_section
from stgen.workflows.evaluate import load_truth, score_prediction
from stgen.workflows.predict import predict_or_reuse
from stgen.evaluation.plots import plot_corr_heatmaps, plot_metric_bars, plot_spatial_maps, plot_uncertainty_maps
from stgen.evaluation.metrics import prediction_sd


log = logging.getLogger(__name__)

MARKERS = ("ERBB2", "FASN", "GNAS")
METRICS = ("pcc50", "pcc200", "mse", "mae", "gsc", "ssc", "rvd", "ssim", "ari", "nmi", "deg_top20", "deg_top50",
           "coverage_90", "width_90")
LABELS = {"pcc50": "PCC-50", "pcc200": "PCC-200", "mse": "MSE", "mae": "MAE", "gsc": "GSC", "ssc": "SSC",
          "rvd": "RVD", "ssim": "SSIM", "ari": "ARI", "nmi": "NMI", "deg_top20": "DEG-20", "deg_top50": "DEG-50",
          "coverage_90": "coverage-90", "width_90": "width-90"}
TABLES = (("Accuracy", ("pcc50", "pcc200", "mse", "mae")), ("Structure", ("gsc", "ssc", "rvd", "ssim")),
          ("Downstream", ("ari", "nmi", "deg_top20", "deg_top50")), ("Uncertainty", ("coverage_90", "width_90")))
TIMING = ("fit_s", "predict_s", "spots_per_s")
SEED_SD_METRICS = ("pcc50", "mse", "gsc", "ssc")  # columns of the sampling-variance table
SSC_K = 8  # neighbours of the spatial graph of SSC and the Moran's I figure (FLAG App. C.2)
LEGEND = (
    ("PCC-50 / PCC-200 ↑", "mean of the 50 / 200 largest per-gene Pearson r over spots (Stem, HINGE)"),
    ("MSE / MAE ↓", "mean squared / absolute error over all spots x panel genes"),
    ("GSC ↑", "Pearson r between the upper triangles of the predicted and true gene-gene correlation matrices "
              "(FLAG App. C.2)"),
    ("SSC ↑", f"Pearson r between the per-gene global Moran's I of prediction and truth on the symmetric "
              f"{SSC_K}-NN graph of the spot coordinates (FLAG App. C.2)"),
    ("RVD ↓", "mean over genes of (var_pred - var_true)^2 / var_true^2, variances over spots (Stem)"),
    ("SSIM ↑", "mean gene-wise SSIM of the expression maps rasterised on the spot grid, both scaled by the true "
               "gene's range (HINGE supp. B)"),
    ("ARI / NMI ↑", "agreement of the Leiden domains (scanpy: scale, PCA, 15-NN, resolution 0.5, seed 0) of "
                    "prediction and truth (FLAG 4.5 / H.9)"),
    ("coverage-90 → 0.90 / width-90", "share of true values inside the central 90% Gaussian interval "
                                       "mean ± 1.645 sd of `layers['std']`, and the interval's mean width "
                                       "(n/a for a model without an sd)"),
    ("DEG-20 / DEG-50 ↑", "mean over the true domains of |top-K Wilcoxon markers of prediction ∩ of truth| / K "
                          "(FLAG 4.5 / H.9)"),
)


def _fit_or_reuse(data_dir: Path, section: str, model: str, run_dir: Path, cfg: StgenConfig, cache_dir, progress) -> dict:
    want = config_hash(cfg, model, section)
    meta_path = run_dir / "run.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("config_hash") == want:
            return meta
    # resume: a benchmark killed mid-fit continues that fit from its last checkpoint (same config hash only)
    return fit(data_dir, section, run_dir, model=model, cfg=cfg, cache_dir=cache_dir, progress=progress, resume=True)


def _stains(cfg: StgenConfig, models: list[str]) -> str:
    """``features.stain`` of each model as it trains (``auto`` resolved), e.g. ``macenko (hinge, ridge), none
    (flag)``."""
    by: dict[str, list[str]] = {}
    for m in models:
        by.setdefault(cfg.for_model(m).features.stain, []).append(m)
    return ", ".join(f"{stain} ({', '.join(ms)})" for stain, ms in by.items())


def prediction_path(out: Path, model: str, section: str, seed: int = 0) -> Path:
    """``preds/<model>/<section>.h5ad`` for seed 0, ``preds/<model>/<section>_seed<seed>.h5ad`` otherwise."""
    return Path(out) / "preds" / model / (f"{section}.h5ad" if seed == 0 else f"{section}_seed{seed}.h5ad")


def run_benchmark(
    data_dir: str | Path,
    out: str | Path,
    models: Sequence[str] = ("hinge", "ridge"),
    cfg: StgenConfig | None = None,
    sections: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    seeds: int = 1,
) -> pd.DataFrame:
    """Run the leave-one-section-out benchmark; returns the metrics table (``metrics.csv``).

    ``seeds``: sampling seeds 0..seeds-1 per generative model and fold (ridge: one
    prediction); metrics are averaged over seeds and, for ``seeds > 1``, their sd
    over seeds is reported. Downstream scores (ARI, NMI, DEG-20/50) use the
    default settings of :func:`stgen.evaluation.downstream.domain_and_marker_scores`
    (clustering seed 0) for every model.
    """
    cfg = cfg or StgenConfig()
    data_dir, out = Path(data_dir), Path(out)
    models = expand_models(models)
    if isinstance(seeds, bool) or int(seeds) != seeds or seeds < 1:
        raise InputError(f"--seeds must be a positive integer, got {seeds!r}")
    seeds = int(seeds)
    imaged = list_sections(data_dir, imaged_only=True)
    sections = list(sections or imaged)
    bad = [s for s in sections if s not in imaged]
    if bad:
        raise InputError(f"section(s) {bad} have no image in {data_dir}; available: {imaged}")
    seed_rows = []
    for section in sections:
        plots: dict = {}
        truths: dict = {}  # units -> truth AnnData, read once per section
        domains: dict = {}
        counts = data_dir / "ST-cnts" / f"{section}.tsv.gz"
        image, spots = image_for_section(data_dir, section), data_dir / "ST-spotfiles" / f"{section}_selection.tsv"
        for model in models:
            run_dir = out / "runs" / model / section
            meta = _fit_or_reuse(data_dir, section, model, run_dir, cfg, cache_dir, progress)
            for seed in range(seeds if model in GENERATIVE else 1):
                pred_path = prediction_path(out, model, section, seed)
                pred, predict_s = predict_or_reuse(run_dir, image, spots, pred_path, seed=seed,
                                           cache_dir=cache_dir, progress=progress)
                units = pred.uns["stgen"]["units"]
                if units not in truths:
                    truths[units] = load_truth(counts, units)
                sc = score_prediction(pred, truths[units], f"{pred_path} vs {counts}", k=SSC_K)
                key = (units, tuple(sc.genes), tuple(sc.spots))  # the truth's Leiden domains, once per panel
                if key not in domains:
                    domains[key] = spatial_domains(sc.true)
                m = {**sc.metrics, **domain_and_marker_scores(sc.pred, sc.true, sc.genes, true_domains=domains[key])}
                seed_rows.append({"section": section, "model": model, "seed": seed,
                                  **{k: float(m[k]) for k in METRICS}, "n_spots": m["n_spots"],
                                  "n_genes": m["n_genes"], "fit_s": meta.get("timings", {}).get("fit_total_s"),
                                  "predict_s": predict_s})
                if seed == 0:
                    plots[model] = (sc.pred, sc.genes, pred[sc.spots].obsm["spatial"], sc.true, m["ssc"])
                    sd = prediction_sd(pred, sc.spots)
                    if sd is not None and np.any(sd > 0):
                        _uncertainty_plot(out, model, section, plots[model], sd, m["coverage_90"])
        _section_plots(out, section, plots)
    seed_df = pd.DataFrame(seed_rows)
    df = fold_table(seed_df, seeds)
    write_report(df, out, cfg, seed_df=seed_df if seeds > 1 else None)
    return df


def _finite_stats(df: pd.DataFrame, cols: Sequence[str], by: Sequence[str]) -> pd.DataFrame:
    """Per group of ``by``: mean, sd (ddof=0; suffix ``_sd``) and count (``_n``) of the finite values of ``cols``
    (NaN and inf ignored; the mean is NaN only where no value is finite)."""
    x = df[list(cols)].apply(pd.to_numeric, errors="coerce").replace([np.inf, -np.inf], np.nan)
    g = x.groupby([df[b] for b in by], sort=False)
    return g.mean().join(g.std(ddof=0).add_suffix("_sd")).join(g.count().add_suffix("_n"))


def fold_table(seed_df: pd.DataFrame, seeds: int = 1) -> pd.DataFrame:
    """One row per (section, model) from one row per (section, model, seed).

    Metrics and predict time are the means over the finite seed values; with
    ``seeds > 1`` each metric also gets ``<metric>_seed_sd`` (sd over seeds,
    ddof=0; NaN for a generative model with fewer than 2 finite seeds, 0 for
    ridge's single deterministic prediction) and ``n_seeds``.
    ``spots_per_s = n_spots / predict_s``.
    """
    stats = _finite_stats(seed_df, [*METRICS, "predict_s"], ["section", "model"])
    first = seed_df.groupby(["section", "model"], sort=False)[["n_spots", "n_genes", "fit_s"]].first()
    df = stats[list(METRICS)].copy()
    if seeds > 1:
        sampled = stats.index.get_level_values("model").isin(GENERATIVE)
        for m in METRICS:
            df[f"{m}_seed_sd"] = stats[f"{m}_sd"].where(~sampled | (stats[f"{m}_n"] >= 2))
        df["n_seeds"] = seed_df.groupby(["section", "model"], sort=False).size()
    df = df.join(first)
    df["predict_s"] = stats["predict_s"].round(3)
    df["spots_per_s"] = (df["n_spots"] / df["predict_s"].where(df["predict_s"] > 0)).round(1)
    return df.reset_index()


def _morans_figure(out: Path, section: str, preds: dict) -> None:
    """``morans_<section>.png``: Moran's I per gene, truth vs each model, each on its own panel genes."""
    true_i, pred_i, ssc = {}, {}, {}
    for m, (p, _, xy, t, s) in preds.items():
        if len(xy) < SSC_K + 1:
            log.warning("section %s: %d spots are too few for the Moran's I figure (need %d)", section, len(xy),
                        SSC_K + 1)
            return
        (pred_i[m], true_i[m]), ssc[m] = morans_i_pair(p, t, xy, SSC_K), s
    plot_morans_scatter(true_i, pred_i, out / f"morans_{section}.png", ssc=ssc,
                        title=f"Held-out section {section}: Moran's I per gene (seed-0 predictions)")


def _uncertainty_plot(out: Path, model: str, section: str, scored: tuple, sd: np.ndarray, coverage: float) -> None:
    """``uncertainty_<model>_<section>.png``: truth, mean, error and predictive sd of the marker genes."""
    p, genes, xy, t, _ = scored
    plot_uncertainty_maps(xy, t, p, sd, MARKERS, genes, out / f"uncertainty_{model}_{section}.png",
                          title=f"{model} on held-out {section}: predictive sd (log2(count+1)); "
                                f"panel coverage-90 {coverage:.2f}")


def _section_plots(out: Path, section: str, preds: dict) -> None:
    """Maps and heatmaps on the genes every model predicts (panels can differ by the
    few genes a backbone vocabulary lacks), and the Moran's I figure."""
    common = [g for g in next(iter(preds.values()))[1] if all(g in v[1] for v in preds.values())]
    model_preds, truth, xy = {}, None, None
    for m, (p, genes, xy_m, t, _) in preds.items():
        idx = [genes.index(g) for g in common]
        model_preds[m] = p[:, idx]
        truth, xy = t[:, idx], xy_m
    plot_spatial_maps(xy, truth, model_preds, MARKERS, common, out / f"maps_{section}.png",
                      title=f"Held-out section {section}: ground truth vs prediction (log2(count+1))")
    plot_corr_heatmaps(truth, model_preds, common, out / f"corr_{section}.png")
    _morans_figure(out, section, preds)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Across folds, per model: for every metric and timing column, the mean and sd (``_sd``, ddof=0) over
    the folds where it is finite and their number (``_n``); ``n_folds``; and, with seeds, the mean over
    folds of the across-seed sd (``<metric>_seed_sd``, finite folds in ``<metric>_seed_sd_n``).
    NaN folds are ignored: a mean is NaN only when no fold is finite."""
    cols = [c for c in (*METRICS, *TIMING) if c in df.columns]
    s = _finite_stats(df, cols, ["model"])
    seed_cols = [f"{m}_seed_sd" for m in METRICS if f"{m}_seed_sd" in df.columns]
    if seed_cols:
        seed = _finite_stats(df, seed_cols, ["model"])
        s = s.join(seed[seed_cols]).join(seed[[f"{c}_n" for c in seed_cols]])
    s["n_folds"] = df.groupby("model", sort=False).size()
    s.index.name = "model"
    return s


def _num(v, d: int = 3) -> str:
    return f"{float(v):.{d}f}" if v is not None and math.isfinite(float(v)) else "n/a"


def _folds(r: pd.Series, k: str) -> str:
    """`` (n/N folds)`` when only n of the model's N folds have a finite ``k``, else empty."""
    n, total = int(r[f"{k}_n"]), int(r["n_folds"])
    return f" ({n}/{total} folds)" if 0 < n < total else ""


def _mean_sd(r: pd.Series, k: str, d: int = 3) -> str:
    """``mean ± sd``, with ``(n/N folds)`` when fewer folds than all are finite; ``n/a`` when none is."""
    if int(r[f"{k}_n"]) == 0:
        return "n/a"
    return f"{r[k]:.{d}f} ± {r[k + '_sd']:.{d}f}" + _folds(r, k)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(r) + " |" for r in rows]


def write_report(df: pd.DataFrame, out: Path, cfg: StgenConfig, seed_df: pd.DataFrame | None = None) -> None:
    """``metrics.csv`` (and ``metrics_seeds.csv`` when ``seed_df`` is given), ``report.md`` and the metric bars."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "metrics.csv") as tmp:
        df.to_csv(tmp, index=False)
    if seed_df is not None:
        with atomic_path(out / "metrics_seeds.csv") as tmp:
            seed_df.to_csv(tmp, index=False)
    s = summarize(df)
    n_seeds = int(df["n_seeds"].max()) if "n_seeds" in df.columns else 1
    metrics = [m for m in METRICS if m in df.columns]
    lines = ["# stgen benchmark: leave-one-section-out on Her2ST", "",
             f"Targets: {cfg.data.transform} (log2(count+1) = Stem/HINGE protocol); HMHVG panel from training sections; "
             f"encoder {cfg.features.encoder}, patch {cfg.features.patch_px} px; stain normalisation "
             f"{_stains(cfg, list(dict.fromkeys(df.model)))}; folds: {', '.join(df.section.unique())}.",
             "Mean ± sd across folds; a fold whose value is undefined (NaN) is left out and the number of folds "
             "used is shown. Metric definitions at the end."
             + (f" Generative models ({', '.join(m for m in GENERATIVE if m in set(df.model))}): every fold is the "
                f"mean over {n_seeds} sampling seeds."
                if n_seeds > 1 else ""), ""]
    for title, keys in TABLES:
        keys = [k for k in keys if k in metrics]
        if keys:
            lines += [f"**{title}**", ""]
            lines += _table(["model", *(LABELS[k] for k in keys)],
                            [[str(model), *(_mean_sd(r, k) for k in keys)] for model, r in s.iterrows()]) + [""]
    lines += ["**Timing**", ""]
    lines += _table(["model", "fit (s)", "predict (s/slide)", "spots/s"],
                    [[str(model), *(_num(r[k], d) + _folds(r, k) for k, d in zip(TIMING, (0, 1, 0)))]
                     for model, r in s.iterrows()])
    n_summary = len(lines)
    lines += ["", "## Per fold", ""]
    lines += _table(["section", "model", *(LABELS[m] for m in metrics)],
                    [[str(r.section), str(r.model), *(_num(r[m]) for m in metrics)] for _, r in df.iterrows()])
    if n_seeds > 1:
        keys = [m for m in SEED_SD_METRICS if f"{m}_seed_sd" in s.columns]
        lines += ["", f"## Sampling variance ({n_seeds} seeds)", "",
                  "Per model, the mean over folds of the sd (ddof=0) of each metric across the sampling seeds "
                  "0..N-1 (FLAG H.5). Ridge is deterministic: one prediction, sd 0.", ""]
        lines += _table(["model", *(f"{LABELS[m]} sd" for m in keys)],
                        [[str(model), *(_num(r[f"{m}_seed_sd"], 4) + _folds(r, f"{m}_seed_sd") for m in keys)]
                         for model, r in s.iterrows()])
    lines += ["", "## Metrics", ""] + [f"* **{name}**: {text}." for name, text in LEGEND]
    lines += ["", "Maps: `maps_<section>.png`; co-expression: `corr_<section>.png`; Moran's I: "
              "`morans_<section>.png`; bars: `pcc50_by_section.png`, `gsc_by_section.png`, `ssc_by_section.png`.",
              ""]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines))
    for metric in ("pcc50", "gsc", "ssc"):
        if metric in df.columns:
            plot_metric_bars(df, metric, out / f"{metric}_by_section.png")
    print("\n".join(lines[:n_summary]))


__all__ = ["run_benchmark", "fold_table", "summarize", "write_report", "prediction_path", "METRICS", "MARKERS"]
