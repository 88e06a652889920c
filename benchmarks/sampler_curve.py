"""HINGE's accuracy-throughput curve on nested leave-one-section-out folds (issues 15 and 17).

    .venv/bin/python benchmarks/sampler_curve.py --outer C2 [--inner B4,C3,C4,C5] [--ks 1,2,3,5]
        [--samples 1,2,5,10] [--reveals mean,sample] [--out reports/sampler_curve] [--data DIR]

Everything here stays inside the training sections of the outer fold ``--outer`` (its test section is never
read): for each inner section ``h`` of ``--inner`` (default: every imaged section except ``--outer``), HINGE
with the default configuration is fitted on the other inner sections (``data.train_sections``) and ``h`` is
predicted with every sampler setting: inference budget K (``--ks``), averaged samples S (``--samples``) and
reveal rule (``--reveals``: ``mean`` reveals x0_hat as HINGE does, ``sample`` a draw from the predictive
head). The S samples of a setting are the first S of ``max(S)`` single-sample runs (seeds 0..), combined as
:func:`stgen.sampling.masking.mixture_moments` does inside one call. Per setting it prints and writes
(``OUT/curve.csv``, one row per inner section, and ``OUT/summary.csv``, the inner-fold mean):

* PCC-50, PCC-200, MSE, GSC, SSC (``stgen.evaluation.metrics.evaluate``, log2(count+1));
* ``coverage_90`` and ``width_90`` of the returned sd, and ``sd_scale_90``: the factor the sd would need for
  90% coverage (the 0.9 quantile of |truth - mean| / sd over Z90), the calibration a default could apply;
* ``spots_per_s``: all the section's spots predicted by one real call with S samples of K steps (first
  step shared by the samples, as ``HingeModel.predict`` does), timed once after a warm-up, on this machine.

Fitted inner runs are kept in ``OUT/runs/<h>`` and reused when the script runs again (the same config hash).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from nested import add_nested_options, inner_means, nested_setup, print_row, write_summary


def _ints(s: str) -> list[int]:
    return sorted({int(v) for v in s.split(",") if v.strip()})


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_nested_options(ap, "reports/sampler_curve")
    ap.add_argument("--ks", default="1,2,3,5")
    ap.add_argument("--samples", default="1,2,5,10")
    ap.add_argument("--reveals", default="mean,sample")
    ap.add_argument("--max-sample-draws", type=int, default=5, help="largest S for reveal 'sample' (default 5)")
    args = ap.parse_args(argv)

    from stgen.evaluation.metrics import Z90, evaluate
    from stgen.models.base import SectionInput
    from stgen.sampling.masking import mixture_moments
    from stgen.data.her2st import read_section
    from stgen.workflows.analysis import section_truth
    from stgen.workflows.config import StgenConfig
    from stgen.workflows.fit import fit
    from stgen.workflows.inputs import section_features
    from stgen.workflows.rundir import load_run
    import torch

    data, cache, inner = nested_setup(args)
    ks, s_list, reveals = _ints(args.ks), _ints(args.samples), args.reveals.split(",")
    rows = []
    for h in inner:
        cfg = StgenConfig()
        cfg.data.train_sections = [s for s in inner if s != h]
        run_dir = args.out / "runs" / h
        t0 = time.perf_counter()
        fit(data, h, run_dir, model="hinge", cfg=cfg, cache_dir=cache, progress=False)
        print(f"[{h}] fit on {cfg.data.train_sections}: {time.perf_counter() - t0:.0f} s", flush=True)
        run = load_run(run_dir)
        adata = read_section(data, h, require_image=True)
        feats = section_features(adata, run.cfg, cache, progress=False)
        truth, _ = section_truth(adata, list(run.panel), run.meta.get("units", "log2"))
        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        section = SectionInput(h, xy, feats, None)
        settings = run.features(False)

        def predict(samples, steps, seed, reveal):
            return run.model.predict(section, settings, samples=samples, steps=steps, seed=seed, reveal=reveal)

        predict(1, 1, 0, "mean")  # warm-up
        for reveal in reveals:
            s_max = max(s_list) if reveal == "mean" else min(max(s_list), args.max_sample_draws)
            for k in ks:
                runs = [predict(1, k, seed, reveal) for seed in range(s_max if k > 1 else 1)]
                for s in [v for v in s_list if v <= s_max]:
                    use = runs[: min(s, len(runs))]  # K = 1 is deterministic: one run is every sample
                    mean, sd = mixture_moments(torch.as_tensor(np.stack([u[0] for u in use])),
                                               torch.as_tensor(np.stack([u[1] for u in use])))
                    mean, sd = mean.numpy(), sd.numpy()
                    t1 = time.perf_counter()
                    predict(s, k, 0, reveal)
                    dt = time.perf_counter() - t1
                    m = evaluate(mean, truth, list(run.panel), coords=xy, sd=sd)
                    z = np.abs(truth - mean) / np.maximum(sd, 1e-6)
                    row = {"inner": h, "reveal": reveal, "K": k, "samples": s,
                           **{key: m[key] for key in ("pcc50", "pcc200", "mse", "gsc", "ssc", "coverage_90",
                                                      "width_90")},
                           "sd_scale_90": float(np.quantile(z, 0.9) / Z90), "spots_per_s": len(feats) / dt}
                    rows.append(row)
                    print_row(row)
        df = pd.DataFrame(rows)
        args.out.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out / "curve.csv", index=False)  # after every inner section: partial results survive
    summary = inner_means(df, ["reveal", "K", "samples"])
    write_summary(summary, args.out)
    return summary


if __name__ == "__main__":
    main()
