"""Time one leave-one-section-out fold of the main job and print measured numbers.

    .venv/bin/python benchmarks/fold_timing.py --test-section C2 [--cache DIR] [--fresh]

Prints wall time of each stage (backbone pre-training or cache load, feature
extraction, HINGE training, sampling), spots/s of prediction for K = 5 and the
sample count, and the peak resident memory of the process. ``--fresh`` uses an
empty cache folder, so pre-training and feature extraction are timed too.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from stgen.workflows.paths import default_data_dir, image_for_section
from stgen.workflows.fit import fit
from stgen.workflows.predict import predict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test-section", default="C2")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--fresh", action="store_true", help="time with an empty cache (pre-training + features)")
    args = ap.parse_args()
    data = args.data or default_data_dir()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache" if args.fresh else args.cache
        t0 = time.time()
        meta = fit(data, args.test_section, tmp / "run", model="hinge", cache_dir=cache, progress=False)
        t_fit = time.time() - t0
        spots = data / "ST-spotfiles" / f"{args.test_section}_selection.tsv"
        t0 = time.time()
        pred = predict(tmp / "run", image_for_section(data, args.test_section), spots, tmp / "pred.h5ad",
                       cache_dir=cache, progress=False)
        t_pred = time.time() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "test_section": args.test_section, "fresh_cache": args.fresh,
        "fit_timings_s": meta["timings"], "fit_wall_s": round(t_fit, 1),
        "epochs_run": meta["training"]["epochs_run"], "best_epoch": meta["training"]["best_epoch"],
        "predict_wall_s": round(t_pred, 1), "spots": pred.n_obs, "genes": pred.n_vars,
        "steps": pred.uns["stgen"]["steps"], "samples": pred.uns["stgen"]["samples"],
        "predict_spots_per_s": round(pred.n_obs / t_pred, 2), "peak_rss_mb": round(peak_mb),
    }, indent=2))


if __name__ == "__main__":
    main()
