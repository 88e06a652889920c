"""HINGE's point estimate against its sampler budget: the mixture mean and the mean of the revealed draws
(``hinge.estimate``) over a grid of K steps x samples, on fitted runs of nested inner folds (issue 15).

    .venv/bin/python benchmarks/hinge_estimates.py --runs reports/issue15c/nested/runs/ctxdrop \\
        [--grid 3x2,3x4,3x10] [--out reports/issue15c/estimates.csv] [--data DIR]

``--runs`` holds one HINGE run per held-out inner section (``<runs>/<section>``, as
``benchmarks/nested_variants.py`` writes them); each predicts its own held-out section, which its fit never
read. Per section, setting and estimate it prints PCC-50, PCC-200, MSE, GSC, SSC, coverage-90 (the run's sd
scale; :func:`stgen.evaluation.metrics.evaluate`, log2(count+1)) and the spots/s of the predict call, then the
means over sections. Both estimates of a setting come from one seeded sampler pass each, so they share
reveal orders and draws.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from nested import print_row, write_rows

METRICS = ("pcc50", "pcc200", "mse", "gsc", "ssc", "coverage_90")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, required=True, help="folder of HINGE runs, one per held-out section")
    ap.add_argument("--grid", default="3x2,3x4,3x10", help="comma-separated KxSAMPLES settings")
    ap.add_argument("--out", type=Path, default=None, help="CSV of the per-section rows")
    ap.add_argument("--data", type=Path, default=None, help="Her2ST folder (default: ../shared/data/her2st)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from stgen.data.her2st import read_section
    from stgen.evaluation.metrics import evaluate
    from stgen.models.base import SectionInput
    from stgen.workflows.analysis import section_truth
    from stgen.workflows.inputs import section_features
    from stgen.workflows.paths import default_cache_dir, default_data_dir
    from stgen.workflows.rundir import load_run

    torch.set_num_threads(args.threads)
    grid = [tuple(int(v) for v in item.split("x")) for item in args.grid.split(",")]
    data, cache = args.data or default_data_dir(), default_cache_dir()
    rows = []
    for run_dir in sorted(p for p in args.runs.iterdir() if (p / "run.json").is_file()):
        section = run_dir.name
        run = load_run(run_dir)
        adata = read_section(data, section, require_image=True)
        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        feats = section_features(adata, run.cfg, cache, progress=False)
        truth, _ = section_truth(adata, list(run.panel), run.meta.get("units", "log2"))
        for steps, samples in grid:
            for estimate in ("mixture", "draws"):
                t0 = time.perf_counter()
                mean, sd = run.model.predict(SectionInput(section, xy, feats, None), run.features(False),
                                             samples=samples, steps=steps, seed=0, estimate=estimate)
                dt = time.perf_counter() - t0
                m = evaluate(mean, truth, list(run.panel), coords=xy, sd=sd)
                row = {"section": section, "steps": steps, "samples": samples, "estimate": estimate,
                       **{k: float(m[k]) for k in METRICS}, "spots_per_s": len(xy) / dt}
                rows.append(row)
                print_row(row)
    df = write_rows(rows, args.out)
    means = df.groupby(["steps", "samples", "estimate"], sort=False)[[*METRICS, "spots_per_s"]].mean()
    print(f"\nmean over {df['section'].nunique()} held-out sections")
    print(means.round(4).to_string())
    return df


if __name__ == "__main__":
    main()
