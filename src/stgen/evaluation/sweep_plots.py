"""Figures of the sampler-step, budget and masking-horizon sweeps (:mod:`stgen.workflows.analysis`)."""

from __future__ import annotations

import os
from typing import Any, Sequence
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from stgen.errors import InputError  # noqa: E402
from stgen.evaluation.plots import save_figure


METRICS = ("pcc50", "pcc200", "mse", "mae", "gsc", "rvd")  # scored on every prediction
SPATIAL_METRICS = ("ssc",)  # scored only when the spots' coordinates are given
METRIC_LABELS = {"pcc50": "PCC-50", "pcc200": "PCC-200", "mse": "MSE", "mae": "MAE", "gsc": "GSC", "ssc": "SSC",
                 "rvd": "RVD"}


def _present(df: pd.DataFrame, prefix: str = "") -> list[str]:
    """The metrics that ``df`` has as ``prefix + metric`` columns: :data:`METRICS`, then ``ssc`` when scored
    with coordinates."""
    return [m for m in (*METRICS, *SPATIAL_METRICS) if f"{prefix}{m}" in df.columns]


# ------------------------------------------------------------------ plots


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing or len(df) == 0:
        raise InputError(f"{what}: table needs rows and column(s) {list(cols)}; missing {missing}")


def _grid(n: int) -> tuple[Any, np.ndarray]:
    fig, axes = plt.subplots(1, n, figsize=(3.1 * n + 0.6, 3.2), squeeze=False)
    return fig, axes[0]


def plot_stepwise(df: pd.DataFrame, out_png: str | os.PathLike, x: str = "step",
                  metrics: Sequence[str] | None = None, title: str | None = None) -> None:
    """Metric vs reverse step (``x='step'``) or vs fraction revealed (``x='frac_revealed'``).

    One panel per metric (default: every scored metric in ``df``), with
    the intermediate prediction ``x0_hat(t)`` and the partially revealed state as
    two lines (Fig. S7a).
    """
    if x not in ("step", "frac_revealed"):
        raise InputError(f"x must be 'step' or 'frac_revealed', got {x!r}")
    metrics = metrics or _present(df, "x0_") or METRICS
    _need(df, [x, *(f"{p}_{m}" for p in ("x0", "state") for m in metrics)], "plot_stepwise")
    fig, axes = _grid(len(metrics))
    xs = df[x].to_numpy(dtype=float)
    for ax, m in zip(axes, metrics):
        ax.plot(xs, df[f"x0_{m}"], "-o", ms=2.5, lw=1.2, label=r"$\hat{x}_0(t)$")
        ax.plot(xs, df[f"state_{m}"], "-s", ms=2.0, lw=1.0, alpha=0.8, label="revealed + $\\hat{x}_0$")
        ax.set_title(METRIC_LABELS.get(m, m), fontsize=10)
        ax.set_xlabel("reverse step k (t = T ... 1)" if x == "step" else "fraction of genes revealed")
        if x == "frac_revealed":
            ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, frameon=False)
    fig.suptitle(title or "step-wise analysis of masked-diffusion sampling", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out_png)


def plot_budget(df: pd.DataFrame, out_png: str | os.PathLike, metrics: Sequence[str] | None = None,
                title: str | None = None) -> None:
    """Final metric vs inference budget ``K`` (log x axis), spots/s on a twin axis (Fig. S7b);
    ``metrics`` default: every scored metric in ``df``."""
    metrics = metrics or _present(df) or METRICS
    _need(df, ["K", "spots_per_s", *metrics], "plot_budget")
    d = df.sort_values("K")
    fig, axes = _grid(len(metrics))
    ks = d["K"].to_numpy(dtype=float)
    for ax, m in zip(axes, metrics):
        ax.plot(ks, d[m], "-o", color="C0", ms=3.5, lw=1.3)
        ax.set_ylabel(METRIC_LABELS.get(m, m), color="C0")
        ax.set_xlabel("inference budget K")
        if len(ks) > 1 and ks.min() > 0:
            ax.set_xscale("log")
            ax.set_xticks(ks)
            ax.set_xticklabels([str(int(k)) for k in ks])
            ax.minorticks_off()
        tw = ax.twinx()
        tw.plot(ks, d["spots_per_s"], "--^", color="C3", ms=3.0, lw=1.0)
        tw.set_yscale("log")
        tw.tick_params(axis="y", which="both", labelcolor="C3", labelsize=7)
        if ax is axes[-1]:
            tw.set_ylabel("spots/s", color="C3")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "quality vs inference budget K (dashed: throughput, spots/s)", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out_png)


def plot_horizon(df: pd.DataFrame, out_png: str | os.PathLike, metrics: Sequence[str] | None = None,
                 title: str | None = None) -> None:
    """Metric vs masking horizon ``T`` (Fig. S8); ``metrics`` default: every scored metric in ``df``."""
    metrics = metrics or _present(df) or METRICS
    _need(df, ["T", *metrics], "plot_horizon")
    d = df.sort_values("T")
    fig, axes = _grid(len(metrics))
    ts = d["T"].to_numpy(dtype=float)
    for ax, m in zip(axes, metrics):
        ax.plot(ts, d[m], "-o", ms=3.5, lw=1.3)
        ax.set_title(METRIC_LABELS.get(m, m), fontsize=10)
        ax.set_xlabel("masking horizon T")
        if len(ts) > 1 and ts.min() > 0:
            ax.set_xscale("log")
            ax.set_xticks(ts)
            ax.set_xticklabels([str(int(t)) for t in ts])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
    fig.suptitle(title or "metrics vs masking horizon T", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out_png)
