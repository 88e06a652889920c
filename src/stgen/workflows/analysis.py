"""Step-wise analysis of HINGE's masked-diffusion sampler (HINGE Supp. Figs. S7, S8).

Three studies of a trained HINGE run (:class:`stgen.workflows.rundir.TrainedRun`):

* :func:`stepwise_metrics` - one full reverse run (``K = T`` steps) in which,
  after every step, two estimates are scored against the truth (Fig. S7a):

  - ``x0``: the model's intermediate prediction ``x0_hat(t)`` of *all* genes at
    that step, averaged over the samples;
  - ``state``: the current partially revealed state - genes revealed so far
    keep the value they were revealed with, the rest take ``x0_hat(t)`` -
    averaged over the samples. After the last step it is the sampler's output.

  Together with the fraction of genes revealed.
* :func:`budget_sweep` - final metrics and wall time (s, spots/s) versus the
  inference budget ``K`` for the fixed trained model (Fig. S7b, Table S5).
* :func:`horizon_sweep` - metrics versus the masking horizon ``T`` (Fig. S8).
  ``T`` is a training choice (the timestep embedding and the schedule are
  fitted for it), so every ``T`` needs its own trained model: the caller passes
  ``fit_for_T(T) -> TrainedRun | RUN_DIR`` and decides how to train.

:func:`run_step_analysis` loads a RUN_DIR, scores its held-out section and
writes CSVs, PNGs and a markdown summary (all atomically).

Metrics are those of :func:`stgen.evaluation.metrics.evaluate` (PCC-50, PCC-200, MSE,
MAE, GSC, RVD and, when the spots' coordinates are given, SSC), in the run's
target units (log2(count + 1) by default). The ``run_*`` jobs take the
coordinates from the section's ``obsm['spatial']`` (pixels); the lower-level
functions score without SSC unless ``coords`` is passed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence
import matplotlib
matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from stgen.errors import InputError  # noqa: E402
from stgen.utils.io import atomic_dir, write_json
from stgen.sampling.masking import MaskSchedule, reverse_timesteps, sample_unmasking
from stgen.evaluation.metrics import evaluate_section
from stgen.evaluation.sweep_plots import METRICS, SPATIAL_METRICS, _present, plot_budget, plot_horizon, plot_stepwise
from stgen.models.base import SectionInput, autocast_dtype, sampling_device
from stgen.models.hinge.model import condition_inputs

log = logging.getLogger(__name__)


DEFAULT_KS = (1, 2, 5, 10, 25, 50)


# ------------------------------------------------------------------ helpers
def _hinge_parts(run: Any) -> tuple[torch.nn.Module, MaskSchedule, dict]:
    """The HINGE model, its training schedule and ``meta['hinge']`` (``hinge-paper`` runs: their own section;
    InputError for other models' runs)."""
    model = run.meta.get("model")
    if model not in ("hinge", "hinge-paper"):
        raise InputError(f"step-wise analysis needs a HINGE run, got model {model!r}")
    h = run.meta[model]
    return run.model.net, MaskSchedule(len(run.panel), h["T"], h["schedule"], h["zeta"]), h


def _truth_matrix(run: Any, truth: Any, n_spots: int) -> np.ndarray:
    """Truth (N, G) in the run's panel order: an array already in panel order, or a
    DataFrame with gene columns (the panel's columns are picked)."""
    if isinstance(truth, pd.DataFrame):
        missing = [g for g in run.panel if g not in truth.columns]
        if missing:
            raise InputError(f"truth: {len(missing)} panel gene(s) missing, e.g. {missing[:10]}")
        truth = truth.loc[:, list(run.panel)].to_numpy()
    t = np.asarray(truth, dtype=np.float64)
    if t.ndim != 2 or t.shape != (n_spots, len(run.panel)):
        raise InputError(f"truth: expected shape ({n_spots}, {len(run.panel)}) (spots x panel genes), got {t.shape}")
    if not np.isfinite(t).all():
        raise InputError("truth contains NaN or infinite values")
    return t


def _feats(feats: Any) -> np.ndarray:
    f = np.asarray(feats, dtype=np.float32)
    if f.ndim != 2 or f.shape[0] < 1:
        raise InputError(f"feats: expected a (N, F) array with N >= 1, got shape {f.shape}")
    return f


def _scores(pred: np.ndarray, truth: np.ndarray, genes: Sequence[str], coords: Any = None) -> dict[str, float]:
    """:data:`METRICS` of one prediction, and :data:`SPATIAL_METRICS` with ``coords`` (``ssc`` NaN on a section
    too small for the spatial graph, :func:`stgen.evaluation.metrics.evaluate_section`)."""
    m = evaluate_section(pred, truth, genes, coords=coords)
    return {k: float(m[k]) for k in (*METRICS, *SPATIAL_METRICS) if k in m}


def _predict_kwargs(batch_size: int | None, device: str | None, precision: str | None, coords: Any = None) -> dict:
    """Keyword arguments of :meth:`TrainedRun.predict`; ``coords`` (N, 2) become ``xy`` (a run with a spatial
    context reads each spot's neighbours from them)."""
    kw = {"batch_size": batch_size, "device": device, "precision": precision,
          "xy": None if coords is None else np.asarray(coords, dtype=np.float64)}
    return {k: v for k, v in kw.items() if v is not None}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ------------------------------------------------------------------ step-wise
def stepwise_metrics(
    run: Any,
    feats: np.ndarray,
    truth: Any,
    T: int | None = None,
    samples: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    progress: bool = False,
    return_final: bool = False,
    coords: Any = None,
) -> pd.DataFrame | tuple[pd.DataFrame, np.ndarray]:
    """Metrics of the intermediate estimates after every step of one reverse run.

    Parameters
    ----------
    run : a HINGE :class:`~stgen.workflows.rundir.TrainedRun` (``meta``, ``cfg``, ``model``).
    feats : (N, F) histology features of the spots.
    truth : (N, G) truth in the run's target units and panel order, or a
        DataFrame with the panel genes as columns.
    T : number of reverse steps recorded; default (and normally) the run's
        training horizon ``T``, i.e. the full ``K = T`` run of Fig. S7(a). A
        smaller value records a ``K = T`` -step run over the trained horizon
        (timesteps :func:`~stgen.sampling.masking.reverse_timesteps`).
    samples : reverse runs averaged (default: the run's ``hinge.samples``).
    seed, batch_size, device, precision : as :meth:`TrainedRun.predict`; with the
        same values the final state equals ``run.predict(feats, samples, steps=T,
        seed)[0]`` (same random orders, same chunking of spots x samples).
    return_final : also return the final (N, G) mean prediction.
    coords : (N, 2) spot centres (full-resolution pixels); adds ``ssc`` to the scored metrics, and is what a
        run with a spatial context (``hinge.context_radii``) reads its neighbours from (InputError without).

    Returns
    -------
    DataFrame with one row per reverse step (``T`` rows): ``step`` (1..T),
    ``t`` (timestep the model was conditioned on), ``t_next``,
    ``frac_revealed`` (mean fraction of genes revealed after the step, over
    spots x samples), ``frac_expected`` (``1 - masked_count(t_next) / G``), then
    ``x0_<metric>`` for the averaged intermediate prediction ``x0_hat(t)``,
    ``state_<metric>`` for the averaged partially revealed state, and ``x0_sd``
    (mean over spots x genes of the per-entry sd of ``x0_hat(t)`` across samples).
    """
    model, schedule, h = _hinge_parts(run)
    objective = getattr(getattr(model, "config", None), "objective", "mask")
    if objective != "mask":
        raise InputError(f"step-wise analysis follows the unmasking sampler; this run's objective is {objective!r}")
    f_np = _feats(feats)
    n, g = f_np.shape[0], len(run.panel)
    y = _truth_matrix(run, truth, n)
    # what the network's condition reads: with a spatial context (hinge.context_radii) the neighbours' features
    f_np = condition_inputs(SectionInput("steps", coords, f_np), model.config.context_radii)
    steps = int(T or h["T"])
    ts = reverse_timesteps(schedule.T, steps)  # validates 1 <= steps <= T
    samples = int(samples or h["samples"])
    batch_size = int(batch_size or run.cfg.hinge.sample_batch_size)
    if samples < 1 or batch_size < 1:
        raise InputError(f"samples and batch_size must be >= 1, got {samples}, {batch_size}")
    dev = sampling_device(device)
    dtype = autocast_dtype(precision or run.cfg.hinge.precision)
    model = model.to(dev).eval()

    # per-step accumulators over samples, on the CPU: sums of x0_hat, x0_hat^2 and of the state
    x0_sum = torch.zeros(steps, n, g, dtype=torch.float64)
    x0_sq = torch.zeros(steps, n, g, dtype=torch.float64)
    st_sum = torch.zeros(steps, n, g, dtype=torch.float64)
    revealed = torch.zeros(steps, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.as_tensor(f_np, device=dev).repeat(samples, 1)  # sample-major, as HINGE.generate
    final = torch.empty(rows.shape[0], g)
    chunks = range(0, rows.shape[0], batch_size)
    for s in tqdm(chunks, desc=f"step-wise {samples}x{n} spots, K={steps}", disable=not progress, unit="batch"):
        f = rows[s : s + batch_size]
        b = f.shape[0]
        spot = torch.arange(s, s + b) % n
        state = {"k": 0, "x": torch.zeros(b, g, device=dev), "vis": torch.zeros(b, g, dtype=torch.bool, device=dev)}

        def denoise(x, vis, t, f=f):  # the same call as HINGE.generate's closure
            return model(x, vis, torch.full((x.shape[0],), t, dtype=torch.long, device=dev), f).float()

        def on_step(t, x0_hat, visible, state=state, spot=spot):
            k = state["k"]
            reveal = visible & ~state["vis"]  # `visible` is updated in place by the sampler
            state["x"] = torch.where(reveal, x0_hat, state["x"])
            state["vis"] = visible.clone()
            cur = torch.where(visible, state["x"], x0_hat)
            x0 = x0_hat.detach().double().cpu()
            x0_sum[k].index_add_(0, spot, x0)
            x0_sq[k].index_add_(0, spot, x0 * x0)
            st_sum[k].index_add_(0, spot, cur.double().cpu())
            revealed[k] += float(visible.sum()) / g
            state["k"] = k + 1

        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            out = sample_unmasking(denoise, b, schedule, steps, gen, device=dev, on_step=on_step)
        final[s : s + b] = out.float().cpu()
    _sync(dev)

    genes = list(run.panel)
    records = []
    for k in range(steps):
        x0_mean = x0_sum[k] / samples
        var = (x0_sq[k] / samples - x0_mean * x0_mean).clamp_min(0.0)
        rec = {"step": k + 1, "t": ts[k], "t_next": ts[k + 1],
               "frac_revealed": float(revealed[k]) / (n * samples),
               "frac_expected": 1.0 - schedule.masked_count(ts[k + 1]) / g}
        rec.update({f"x0_{m}": v for m, v in _scores(x0_mean.numpy(), y, genes, coords).items()})
        rec.update({f"state_{m}": v for m, v in _scores((st_sum[k] / samples).numpy(), y, genes, coords).items()})
        rec["x0_sd"] = float(var.sqrt().mean())
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    if return_final:
        return df, final.view(samples, n, g).mean(0).numpy()
    return df


# ------------------------------------------------------------------ budget K
def _valid_ks(ks: Sequence[int], T: int) -> list[int]:
    out = sorted({int(k) for k in ks})
    if not out or out[0] < 1:
        raise InputError(f"inference budgets K must be >= 1, got {list(ks)}")
    dropped = [k for k in out if k > T]
    if dropped:
        log.warning("K=%s exceed the run's horizon T=%d and are skipped", dropped, T)
    out = [k for k in out if k <= T]
    if not out:
        raise InputError(f"no inference budget K <= T={T} in {list(ks)}")
    return out


def _timed_predict(run: Any, feats: np.ndarray, repeats: int, **kw) -> tuple[np.ndarray, list[float]]:
    times, mean = [], None
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        mean, _ = run.predict(feats, **kw)  # returns CPU numpy arrays: includes device sync
        times.append(time.perf_counter() - t0)
    return mean, times


def budget_sweep(
    run: Any,
    feats: np.ndarray,
    truth: Any,
    ks: Sequence[int] = DEFAULT_KS,
    samples: int | None = None,
    seed: int = 0,
    repeats: int = 1,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    warmup: bool = True,
    coords: Any = None,
) -> pd.DataFrame:
    """Final metrics and wall time versus the inference budget ``K`` (fixed trained model).

    Each ``K`` runs :meth:`TrainedRun.predict` (``samples`` averaged reverse runs,
    same ``seed``) ``repeats`` times; ``K`` larger than the run's ``T`` is
    skipped with a warning. ``warmup`` first runs one tiny prediction so that
    one-off costs (thread pools, CUDA context, kernels) are not timed.
    ``coords`` (N, 2 spot centres) adds ``ssc`` to the metrics.

    Returns
    -------
    DataFrame, one row per ``K`` (ascending): ``K``, ``T``, ``samples``,
    ``n_spots``, the metrics of :data:`METRICS` (and ``ssc`` with ``coords``), ``time_s`` (median over
    repeats, per slide), ``time_min_s``, ``spots_per_s`` (``n_spots / time_s``).
    """
    _, schedule, h = _hinge_parts(run)
    f_np = _feats(feats)
    y = _truth_matrix(run, truth, f_np.shape[0])
    samples = int(samples or h["samples"])
    kw = _predict_kwargs(batch_size, device, precision, coords)
    ks = _valid_ks(ks, schedule.T)
    if warmup:
        m = min(4, len(f_np))
        run.predict(f_np[:m], samples=1, steps=1, seed=seed, **{**kw, **({"xy": kw["xy"][:m]} if "xy" in kw else {})})
    records = []
    for k in ks:
        mean, times = _timed_predict(run, f_np, repeats, samples=samples, steps=k, seed=seed, **kw)
        t_med = float(np.median(times))
        records.append({"K": k, "T": schedule.T, "samples": samples, "n_spots": int(len(f_np)),
                        **_scores(mean, y, run.panel, coords), "time_s": t_med, "time_min_s": float(min(times)),
                        "spots_per_s": len(f_np) / t_med if t_med > 0 else float("inf")})
    return pd.DataFrame.from_records(records)


# ------------------------------------------------------------------ horizon T
def horizon_sweep(
    fit_for_T: Callable[[int], Any],
    feats: np.ndarray,
    truth: Any,
    Ts: Sequence[int] = (5, 10, 25, 50, 100),
    steps: int | None = None,
    samples: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    coords: Any = None,
) -> pd.DataFrame:
    """Metrics versus the masking horizon ``T`` (Fig. S8): one trained model per ``T``.

    Parameters
    ----------
    fit_for_T : ``fit_for_T(T)`` returns a HINGE :class:`TrainedRun` (or a RUN_DIR
        path, loaded with :func:`stgen.workflows.rundir.load_run`) trained with horizon
        ``T`` and otherwise fixed settings. The caller chooses how (e.g.
        ``stgen.workflows.fit.fit`` with ``cfg.hinge.T = T`` into ``runs/T{T}``, or
        re-using existing runs); its wall time is reported as ``fit_s``.
    feats, truth : held-out spots, as in :func:`stepwise_metrics` (``truth`` as a
        DataFrame with gene columns if the panels may differ between runs).
    Ts : horizons, in the order given.
    steps : inference budget ``K``: ``None`` = the full run ``K = T`` (default);
        an integer uses ``min(steps, T)`` for every ``T``.
    coords : (N, 2) spot centres; adds ``ssc`` to the metrics.

    Returns
    -------
    DataFrame, one row per ``T``: ``T``, ``K``, ``samples``, ``n_spots``, the
    metrics, ``fit_s``, ``time_s`` and ``spots_per_s`` of the prediction.
    """
    f_np = _feats(feats)
    kw = _predict_kwargs(batch_size, device, precision, coords)
    records = []
    for T in Ts:
        T = int(T)
        if T < 1:
            raise InputError(f"masking horizons T must be >= 1, got {T}")
        t0 = time.perf_counter()
        run = fit_for_T(T)
        fit_s = time.perf_counter() - t0
        if isinstance(run, (str, os.PathLike)):
            from stgen.workflows.rundir import load_run

            run = load_run(run)
        _, schedule, h = _hinge_parts(run)
        if schedule.T != T:
            raise InputError(f"fit_for_T({T}) returned a run trained with T={schedule.T}")
        y = _truth_matrix(run, truth, f_np.shape[0])
        k = T if steps is None else min(int(steps), T)
        s = int(samples or h["samples"])
        mean, times = _timed_predict(run, f_np, 1, samples=s, steps=k, seed=seed, **kw)
        records.append({"T": T, "K": k, "samples": s, "n_spots": int(len(f_np)), **_scores(mean, y, run.panel, coords),
                        "fit_s": fit_s, "time_s": times[0], "spots_per_s": len(f_np) / times[0]})
    return pd.DataFrame.from_records(records)


# ------------------------------------------------------------------ the job
def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "nan" if not math.isfinite(float(v)) else f"{float(v):.4g}"
    return str(v)


def _md_table(df: pd.DataFrame, cols: Sequence[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for _, r in df.iterrows()]
    return "\n".join(lines)


def _summary_markdown(info: dict, step_df: pd.DataFrame, budget_df: pd.DataFrame) -> str:
    first, last = step_df.iloc[0], step_df.iloc[-1]
    best = step_df.loc[step_df["x0_pcc50"].idxmax()]
    sw = info["stepwise"]
    lines = [
        f"# Step-wise analysis: {info['run_dir']} on section {info['section']}",
        "",
        f"- spots: {info['n_spots']}, panel genes: {info['n_genes']} ({info['n_missing_genes']} absent from the "
        f"section's count table, taken as 0 counts), units: {info['units']}",
        f"- horizon T = {info['T']}, samples = {info['samples']}, seed = {info['seed']}, device = {info['device']}",
        "",
        f"## Full {len(step_df)}-step reverse run (stepwise.csv, stepwise_vs_step.png, stepwise_vs_revealed.png)",
        "",
        f"- x0_hat PCC-50: {_fmt(first['x0_pcc50'])} after step 1 (t = {int(first['t'])}), best "
        f"{_fmt(best['x0_pcc50'])} at step {int(best['step'])}, final {_fmt(last['x0_pcc50'])}",
        f"- x0_hat MSE: {_fmt(first['x0_mse'])} -> {_fmt(last['x0_mse'])}; final state (sampler output) "
        f"PCC-50 {_fmt(last['state_pcc50'])}, MSE {_fmt(last['state_mse'])}, GSC {_fmt(last['state_gsc'])}",
        f"- late-step degradation of x0_hat PCC-50 (best - final): {_fmt(sw['x0_pcc50_drop_from_best'])}",
        f"- wall time of the step-wise run: {_fmt(sw['time_s'])} s",
        "",
        "## Inference budget K (budget.csv, budget.png)",
        "",
        _md_table(budget_df, ["K", *_present(budget_df), "time_s", "spots_per_s"]),
        "",
    ]
    if len(budget_df) > 1:
        lo, hi = budget_df.iloc[0], budget_df.iloc[-1]
        lines += [f"K={int(lo['K'])} vs K={int(hi['K'])}: throughput x{_fmt(lo['spots_per_s'] / hi['spots_per_s'])}, "
                  f"PCC-50 difference {_fmt(lo['pcc50'] - hi['pcc50'])}", ""]
    return "\n".join(lines)


def section_truth(adata: Any, panel: Sequence[str], units: str) -> tuple[np.ndarray, list[str]]:
    """Truth (N, G) of a section's AnnData of raw counts, in the run's ``units`` and panel order.

    As in :func:`stgen.workflows.fit.fit`, the panel's count columns are transformed
    together. Her2ST count tables list only the genes detected in a section, so
    panel genes absent from the table are zero counts; their names are returned.
    """
    import scipy.sparse as sp

    from stgen.data.targets import transform_counts

    col = {str(v): j for j, v in enumerate(adata.var_names)}
    missing = [gname for gname in panel if gname not in col]
    pos = [i for i, gname in enumerate(panel) if gname in col]
    counts = np.zeros((adata.n_obs, len(panel)), dtype=np.float64)
    if pos:
        x = adata.X[:, [col[panel[i]] for i in pos]]
        counts[:, pos] = x.toarray() if sp.issparse(x) else np.asarray(x)
    return transform_counts(counts, units).astype(np.float64), missing


def _section_coords(adata: Any) -> np.ndarray | None:
    """The section's spot centres ``obsm['spatial']`` (pixels, (N, 2)), or None when it has none (no SSC)."""
    obsm = getattr(adata, "obsm", None)
    if obsm is None or "spatial" not in obsm:
        return None
    return np.asarray(obsm["spatial"], dtype=np.float64)[:, :2]


def run_step_analysis(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None,
    section: str | None,
    out_dir: str | os.PathLike,
    *,
    samples: int | None = None,
    seed: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    T: int | None = None,
    repeats: int = 1,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    progress: bool = True,
) -> dict:
    """Step-wise analysis and budget sweep of a HINGE RUN_DIR on one section.

    Parameters
    ----------
    run_dir : a HINGE run written by ``stgen fit``.
    data_dir : Her2ST root (``None``: :func:`stgen.workflows.paths.default_data_dir`).
    section : section to score (``None``: the run's held-out ``test_section``;
        a training section is allowed but flagged in the summary).
    out_dir : folder written atomically (replaced if it exists) with
        ``stepwise.csv``, ``budget.csv``, ``stepwise_vs_step.png``,
        ``stepwise_vs_revealed.png``, ``budget.png``, ``summary.md`` and
        ``summary.json``.
    samples, seed, batch_size, device, precision : sampling settings (defaults:
        the run's).
    ks : inference budgets of the sweep (those > T are skipped).
    T : steps of the step-wise run (default: the run's horizon, the full run).
    repeats : timed repeats per K (median reported).
    cache_dir : feature cache (default :func:`stgen.workflows.paths.default_cache_dir`).

    Returns
    -------
    The summary dict (also ``summary.json``).
    """
    from stgen.data.her2st import read_section
    from stgen.workflows.paths import default_cache_dir, default_data_dir
    from stgen.workflows.rundir import load_run
    from stgen.workflows.inputs import section_features

    run = load_run(run_dir)
    _, schedule, h = _hinge_parts(run)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    section = section or run.meta.get("test_section")
    if not section:
        raise InputError(f"{run_dir}: run.json names no test_section; pass the section to analyse")
    in_train = section in (run.meta.get("train_sections") or [])
    if in_train:
        log.warning("section %s was used to train %s: its metrics are not held-out", section, run_dir)
    adata = read_section(data_dir, section, require_image=True)
    feats = section_features(adata, run.cfg, Path(cache_dir or default_cache_dir()), progress=progress)
    truth, missing = section_truth(adata, list(run.panel), run.meta.get("units", "log2"))
    if missing:
        log.warning("%d panel gene(s) absent from section %s are taken as zero counts: %s",
                    len(missing), section, missing[:10])
    samples = int(samples or h["samples"])
    dev = sampling_device(device)
    coords = _section_coords(adata)

    t0 = time.perf_counter()
    step_df = stepwise_metrics(run, feats, truth, T=T, samples=samples, seed=seed, batch_size=batch_size,
                               device=str(dev), precision=precision, progress=progress, coords=coords)
    step_s = time.perf_counter() - t0
    budget_df = budget_sweep(run, feats, truth, ks=ks, samples=samples, seed=seed, repeats=repeats,
                             batch_size=batch_size, device=str(dev), precision=precision, coords=coords)
    best = float(step_df["x0_pcc50"].max())
    info = {
        "run_dir": str(run_dir), "section": section, "held_out": not in_train, "n_spots": int(len(feats)),
        "n_genes": len(run.panel), "n_missing_genes": len(missing), "missing_genes": missing,
        "units": run.meta.get("units", "log2"), "T": schedule.T, "samples": samples, "seed": seed,
        "device": str(dev),
        "stepwise": {"steps": int(len(step_df)), "time_s": step_s,
                     "x0_pcc50_first": float(step_df["x0_pcc50"].iloc[0]), "x0_pcc50_best": best,
                     "x0_pcc50_best_step": int(step_df.loc[step_df["x0_pcc50"].idxmax(), "step"]),
                     "x0_pcc50_final": float(step_df["x0_pcc50"].iloc[-1]),
                     "x0_pcc50_drop_from_best": best - float(step_df["x0_pcc50"].iloc[-1]),
                     "final": {m: float(step_df[f"state_{m}"].iloc[-1]) for m in _present(step_df, "state_")}},
        "budget": budget_df.to_dict(orient="records"),
    }
    label = f"{Path(run_dir).name} on {section}, T={schedule.T}, {samples} samples"
    with atomic_dir(out_dir) as tmp:
        step_df.to_csv(tmp / "stepwise.csv", index=False)
        budget_df.to_csv(tmp / "budget.csv", index=False)
        plot_stepwise(step_df, tmp / "stepwise_vs_step.png", x="step", title=f"step-wise metrics ({label})")
        plot_stepwise(step_df, tmp / "stepwise_vs_revealed.png", x="frac_revealed",
                      title=f"step-wise metrics vs fraction revealed ({label})")
        plot_budget(budget_df, tmp / "budget.png", title=f"quality vs budget K ({label}; dashed: spots/s)")
        (tmp / "summary.md").write_text(_summary_markdown(info, step_df, budget_df))
        write_json(tmp / "summary.json", info)
    return info


def run_horizon_analysis(
    data_dir: str | os.PathLike | None,
    section: str,
    out_dir: str | os.PathLike,
    Ts: Sequence[int] = (10, 25, 50, 100),
    *,
    cfg: Any = None,
    steps: int | None = 5,
    samples: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Masking-horizon sweep (Fig. S8) on one held-out section: one HINGE fit per ``T``.

    Every ``T`` is trained with :func:`stgen.workflows.fit.fit` on the other imaged
    sections with ``cfg.hinge.T = T`` and otherwise the same configuration
    (``cfg``; default: defaults), into ``OUT/runs/T<T>``; a run whose
    configuration hash matches is re-used, so an interrupted sweep resumes and a
    default-``T`` run can be copied in. The masking schedule (``cfg.hinge.schedule``
    and ``zeta``; default ``zeta = log_T G``) is fixed as a rule, so with the
    default schedule the exponent changes with ``T``, as in the paper's sweep
    ("we fix the masking schedule and vary T").

    ``steps``: inference budget ``K = min(steps, T)`` for every ``T`` (default 5,
    the default budget, so the sweep isolates the training horizon); ``None``
    runs the full ``K = T`` reverse process.

    Writes ``horizon.csv``, ``horizon.png`` and ``horizon.md`` into ``out_dir``
    (each atomically) and returns the table of :func:`horizon_sweep`.
    Raises InputError for an unknown section or ``T < 1``.
    """
    import copy

    from stgen.workflows.benchmark import _fit_or_reuse
    from stgen.workflows.config import StgenConfig
    from stgen.data.her2st import read_section
    from stgen.utils.io import atomic_path
    from stgen.workflows.paths import default_cache_dir, default_data_dir
    from stgen.workflows.rundir import load_run
    from stgen.workflows.inputs import section_features

    Ts = [int(t) for t in Ts]
    if not Ts or min(Ts) < 1:
        raise InputError(f"masking horizons T must be >= 1, got {Ts}")
    base = cfg or StgenConfig()
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    cache = Path(cache_dir or default_cache_dir())
    out = Path(out_dir)
    adata = read_section(data_dir, section, require_image=True)
    feats = section_features(adata, base.for_model("hinge"), cache, progress=progress)

    runs: dict[int, Any] = {}
    for T in tqdm(Ts, desc="horizon fits", unit="T", disable=not progress):  # fit (or re-use) every T first
        c = copy.deepcopy(base)
        c.hinge.T = T
        _fit_or_reuse(data_dir, section, "hinge", out / "runs" / f"T{T}", c, cache, progress)
        runs[T] = load_run(out / "runs" / f"T{T}")
    panel = list(runs[Ts[0]].panel)  # same training sections and panel rule for every T
    y, _ = section_truth(adata, panel, runs[Ts[0]].meta.get("units", "log2"))
    df = horizon_sweep(runs.__getitem__, feats, pd.DataFrame(y, columns=panel), Ts=Ts, steps=steps,
                       samples=samples, seed=seed, coords=_section_coords(adata))
    df["fit_s"] = [runs[T].meta.get("timings", {}).get("fit_total_s", float("nan")) for T in df["T"]]
    df.insert(0, "section", section)
    df["zeta"] = [float(runs[T].meta["hinge"]["zeta"]) for T in df["T"]]
    df["best_val_mse"] = [runs[T].meta.get("training", {}).get("best_val_mse") for T in df["T"]]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "horizon.csv") as tmp:
        df.to_csv(tmp, index=False)
    k_txt = "K = T (full run)" if steps is None else f"K = min({steps}, T)"
    plot_horizon(df, out / "horizon.png", title=f"metrics vs masking horizon T ({section}, {k_txt})")
    lines = [f"# Masking horizon sweep (HINGE Fig. S8) on section {section}", "",
             f"One fit per T (runs in `runs/T<T>`), fixed schedule {base.hinge.schedule!r} "
             f"(zeta {'log_T G' if base.hinge.zeta is None else base.hinge.zeta}); inference budget {k_txt}, "
             f"{int(df['samples'].iloc[0])} samples, seed {seed}.", "",
             _md_table(df, ["T", "K", "zeta", *_present(df), "best_val_mse", "fit_s", "time_s"]), ""]
    with atomic_path(out / "horizon.md") as tmp:
        tmp.write_text("\n".join(lines))
    return df
