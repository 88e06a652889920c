"""Nested leave-one-section-out folds for the benchmark scripts that choose defaults (sampler_curve.py,
nested_variants.py): the options they share and the inner sections of an outer fold, whose test section is
never read."""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGED = ("B4", "C2", "C3", "C4", "C5")


def add_nested_options(ap: argparse.ArgumentParser, out: str) -> None:
    """``--outer``, ``--inner``, ``--data``, ``--cache`` and ``--out`` (default ``out``)."""
    ap.add_argument("--outer", default="C2", help="outer test section, never read (default C2)")
    ap.add_argument("--inner", default=None, help="comma-separated inner sections (default: the other imaged ones)")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(out))


def nested_setup(args: argparse.Namespace) -> tuple[Path, Path, list[str]]:
    """``(data folder, cache folder, inner sections)``; SystemExit if the inner sections hold the outer one."""
    from stgen.workflows.paths import default_cache_dir, default_data_dir

    inner = args.inner.split(",") if args.inner else [s for s in IMAGED if s != args.outer]
    if args.outer in inner:
        raise SystemExit(f"--inner must not contain the outer test section {args.outer}")
    return Path(args.data or default_data_dir()), Path(args.cache or default_cache_dir()), inner


def print_row(row: dict) -> None:
    """One result row as ``key=value`` pairs (floats to 4 decimals), flushed so partial runs keep it."""
    print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def write_rows(rows: list[dict], out: Path | None):
    """The rows as a DataFrame, written to the CSV ``out`` (its folder made) unless ``out`` is None."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
    return df


def inner_means(df, keys: list[str], sort: bool = True):
    """Per setting ``keys`` (sorted, or in first-seen order): the mean of every numeric column over the inner
    folds, and ``n_inner``."""
    summary = df.groupby(keys, sort=sort).mean(numeric_only=True).reset_index()
    summary["n_inner"] = df.groupby(keys, sort=sort).size().values
    return summary


def write_summary(summary, out: Path) -> None:
    """``out/summary.csv`` and the table on stdout."""
    import pandas as pd

    summary.to_csv(out / "summary.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.round(4).to_string(index=False))
