"""Configuration variants of one model (HINGE, FLAG, ridge or any other) on nested leave-one-section-out folds
(issues 15, 16): choose defaults without the test section.

    .venv/bin/python benchmarks/nested_variants.py --outer C2 \\
        --variant 'paper-context:{}' --variant 'context:{"context_radii": [1.5, 2.5]}' \\
        [--inner B4,C3,C4,C5] [--out reports/hinge_nested] [--data DIR]

Each ``--variant NAME:JSON`` is a set of config overrides (JSON object) of the model's section (``hinge`` for
``--model hinge``/``hinge-paper``, ``flag`` for ``--model flag``, and so on) on top of the current defaults; a
dotted key overrides another section (``{"features.tta": true}``). Everything stays inside the training sections of
the outer fold ``--outer`` (its test section is never read): for each inner section ``h`` of ``--inner`` (default: every imaged section except ``--outer``)
every variant is fitted on the other inner sections (``data.train_sections``, HMHVG panel from those) and
``h`` is predicted with the run's own sampler. Per variant and inner section it prints and writes
(``OUT/nested.csv``; ``OUT/summary.csv`` holds the inner-fold means) PCC-50, PCC-200, MSE, MAE, GSC, SSC,
``coverage_90``, ``width_90`` (:func:`stgen.evaluation.metrics.evaluate`, log2(count+1)), ``sd_factor_90`` (the
factor the returned sd would need for 90% coverage: ``hinge.sd_scale`` times it calibrates), the fit seconds
and the spots/s of the prediction. Fitted runs are kept in ``OUT/runs/<variant>/<h>`` and reused when the
script runs again with the same configuration (the same config hash); rows of variants not named in this
invocation stay in ``OUT/nested.csv``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from nested import add_nested_options, inner_means, nested_setup, print_row, write_summary

METRICS = ("pcc50", "pcc200", "mse", "mae", "gsc", "ssc", "coverage_90", "width_90")


def _variant(text: str) -> tuple[str, dict]:
    name, sep, body = text.partition(":")
    if not sep or not name:
        raise SystemExit(f"--variant must be NAME:JSON, got {text!r}")
    over = json.loads(body or "{}")
    if not isinstance(over, dict):
        raise SystemExit(f"--variant {name}: the overrides must be a JSON object, got {body!r}")
    return name, over


def _by_section(over: dict, section: str) -> dict[str, dict]:
    """``{"lr": 1e-3, "features.tta": true}`` -> ``{section: {"lr": 1e-3}, "features": {"tta": True}}``: a dotted
    key names another config section."""
    out: dict[str, dict] = {}
    for key, value in over.items():
        sec, dot, name = key.rpartition(".")
        out.setdefault(sec if dot else section, {})[name] = value
    return out


def factor_for_mean_coverage(zs: list[np.ndarray], z90: float, target: float = 0.9) -> float:
    """The factor ``f`` (0.3-4, step 0.005) on the sd at which the mean over folds of the share of
    ``|error| / sd <= f * z90`` is closest to ``target``; ``zs`` holds each fold's ``|error| / sd`` (NaN for a
    model without an sd: then NaN)."""
    if not all(np.isfinite(z).all() for z in zs):
        return float("nan")
    grid = np.linspace(0.3, 4.0, 741)
    cover = np.array([np.mean([np.mean(z <= f * z90) for z in zs]) for f in grid])
    return float(grid[np.argmin(np.abs(cover - target))])


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_nested_options(ap, "reports/hinge_nested")
    ap.add_argument("--variant", action="append", required=True, help="NAME:JSON config overrides (repeatable)")
    ap.add_argument("--hold", default=None, help="comma-separated inner sections to hold out in turn (default: all "
                    "of --inner; each fit still trains on every other inner section)")
    ap.add_argument("--model", default="hinge", help="any model of stgen.models.registry (default hinge)")
    args = ap.parse_args(argv)

    from dataclasses import asdict

    from stgen.data.common import section_image
    from stgen.data.her2st import read_section
    from stgen.evaluation.metrics import Z90, evaluate
    from stgen.models.base import SectionInput
    from stgen.workflows.analysis import section_truth
    from stgen.workflows.config import StgenConfig
    from stgen.workflows.fit import fit
    from stgen.workflows.inputs import section_features
    from stgen.workflows.rundir import load_run

    data, cache, inner = nested_setup(args)
    variants = [_variant(v) for v in args.variant]
    from stgen.models.registry import spot_model

    cls = spot_model(args.model)  # InputError listing the models for an unknown name
    section = cls.config_section or cls.name
    rows: list[dict] = []
    done = {v for v, _ in variants}
    earlier = (pd.read_csv(args.out / "nested.csv") if (args.out / "nested.csv").is_file() else pd.DataFrame())
    if len(earlier):  # rows of other variants from earlier invocations stay in nested.csv
        earlier = earlier[~earlier["variant"].isin(done)]
    hold = args.hold.split(",") if args.hold else inner
    if not set(hold) <= set(inner):
        raise SystemExit(f"--hold {hold} must be inner sections {inner}")
    for h in hold:
        adata = read_section(data, h, require_image=True)
        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        for name, over in variants:
            cfg = StgenConfig()
            for sec, fields in _by_section(over, section).items():  # "features.tta": another config section
                base = getattr(cfg, sec)
                setattr(cfg, sec, type(base)(**{**asdict(base), **fields}))
            cfg.data.train_sections = [s for s in inner if s != h]
            run_dir = args.out / "runs" / name / h
            t0 = time.perf_counter()
            meta = fit(data, h, run_dir, model=args.model, cfg=cfg, cache_dir=cache, progress=False, resume=True)
            fit_s = meta.get("timings", {}).get("fit_total_s", time.perf_counter() - t0)
            run = load_run(run_dir)
            feats = section_features(adata, run.cfg, cache, progress=False)
            truth, _ = section_truth(adata, list(run.panel), run.meta.get("units", "log2"))
            t1 = time.perf_counter()
            mean, sd = run.model.predict(SectionInput(h, xy, feats, section_image(adata)), run.features(False), seed=0)
            dt = time.perf_counter() - t1
            if not np.any(sd):  # a model without a predictive sd (ridge): no calibration columns
                sd = None
            m = evaluate(mean, truth, list(run.panel), coords=xy, sd=sd)
            z = np.abs(truth - mean) / np.maximum(sd if sd is not None else np.nan, 1e-6)  # the factor the returned sd needs for 90% coverage
            row = {"variant": name, "inner": h, **{k: float(m.get(k, np.nan)) for k in METRICS},
                   "sd_factor_90": float(np.quantile(z, 0.9) / Z90), "fit_s": float(fit_s),
                   "best_epoch": run.meta.get("training", {}).get("best_epoch"), "spots_per_s": len(feats) / dt}
            rows.append(row)
            (args.out / "z").mkdir(parents=True, exist_ok=True)  # |error| / sd per value: calibration post hoc
            np.save(args.out / "z" / f"{name}_{h}.npy", z.astype(np.float32))
            print_row(row)
            args.out.mkdir(parents=True, exist_ok=True)
            pd.concat([earlier, pd.DataFrame(rows)]).to_csv(args.out / "nested.csv", index=False)  # partial results survive
    df = pd.DataFrame(rows)
    summary = inner_means(df, ["variant"], sort=False)
    # the one factor on the returned sd that gives a 90% inner-fold mean coverage (what hinge.sd_scale x it sets)
    summary["sd_factor_for_mean_90"] = [
        factor_for_mean_coverage([np.load(args.out / "z" / f"{v}_{h}.npy") for h in df.loc[df["variant"] == v, "inner"]],
                                 Z90) for v in summary["variant"]]
    write_summary(summary, args.out)
    return summary


if __name__ == "__main__":
    main()
