"""Inference efficiency of a trained HINGE run (HINGE Supp. Table S5), with measured numbers.

    .venv/bin/python benchmarks/inference_speed.py --run RUN_DIR [--ridge RIDGE_RUN_DIR]
        [--section C2] [--data DIR] [--ks 5,50] [--samples 10] [--repeats 3] [--json OUT.json]

For every inference budget K it prints, on the run's held-out section (or
``--section``):

* time per slide (s; median and best of ``--repeats`` timed predictions of all
  spots x ``--samples`` samples, after one untimed warm-up) and spots/s;
* peak resident memory of the process during that K (Linux ``VmHWM`` from
  /proc/self/status, reset before each K via /proc/self/clear_refs; where that
  reset is not allowed, ``resource.getrusage().ru_maxrss``, the peak since the
  process started, is reported instead and says so). It is *host* memory of the
  whole process (Python, torch, the model, features); with CUDA, peak GPU memory
  allocated by torch is reported as well;
* FLOPs of the sampler counted with ``torch.utils.flop_counter.FlopCounterMode``
  over one sampler run (one chunk of ``batch_size`` spot x sample rows, K model
  calls), scaled to the slide (FLOPs are linear in the rows); only matmul-type
  ops (mm/addmm/bmm, einsum via bmm) are counted, elementwise work is not. GFLOP
  per slide and achieved GFLOP/s = GFLOP per slide / median time per slide;
* PCC-50 (and PCC-200, MSE) of the mean prediction against log2(count+1);

then the ridge baseline's time/slide and spots/s (``--ridge``), the machine's
own dense fp32 matmul rate (best of N ``2048 x 2048`` ``torch.matmul`` on the
same device and thread count) so that the sampler's GFLOP/s can be read
against it, and the throughput ratio and PCC-50 difference between the
smallest and the largest K (K=5 vs K=50 by default).

``--feats F.npy --truth Y.npy`` (N x F features, N x G truth in panel order and
the run's units) replace reading the section, e.g. for a synthetic check.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _peak_rss_reset() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def _peak_rss_mb(resettable: bool) -> tuple[float, str]:
    hwm = _status_mb("VmHWM") if resettable else None
    if hwm is not None:
        return hwm, "VmHWM since reset"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "ru_maxrss since process start"


def dense_matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 ``n x n`` matmul rate on ``device`` (GFLOP/s, 2 n^3 FLOPs each)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def sampler_flops(run, feats: np.ndarray, k: int, batch_size: int, device: str) -> tuple[float, int]:
    """FLOPs of one sampler run (one chunk of ``rows`` spot x sample rows, ``k`` steps) and ``rows``."""
    from torch.utils.flop_counter import FlopCounterMode

    rows = min(batch_size, len(feats))
    with FlopCounterMode(display=False) as fc:
        run.predict(feats[:rows], samples=1, steps=k, seed=0, batch_size=batch_size, device=device)
    return float(fc.get_total_flops()), rows


def _scores(pred: np.ndarray, truth: np.ndarray, genes) -> dict:
    from stgen.evaluation.metrics import evaluate

    m = evaluate(pred, truth, genes)
    return {"pcc50": m["pcc50"], "pcc200": m["pcc200"], "mse": m["mse"]}


def _timed(fn, repeats: int) -> tuple[object, list[float]]:
    times, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def _section_inputs(run, args) -> tuple[np.ndarray, np.ndarray, str]:
    if args.feats is not None or args.truth is not None:
        if args.feats is None or args.truth is None:
            sys.exit("--feats and --truth go together")
        return np.load(args.feats).astype(np.float32), np.load(args.truth).astype(np.float64), "(--feats/--truth)"
    from stgen.workflows.analysis import section_truth
    from stgen.data.her2st import read_section
    from stgen.workflows.paths import default_cache_dir, default_data_dir
    from stgen.workflows.inputs import section_features

    data = args.data or default_data_dir()
    section = args.section or run.meta.get("test_section")
    adata = read_section(data, section, require_image=True)
    feats = section_features(adata, run.cfg, Path(args.cache or default_cache_dir()), progress=False)
    truth, _ = section_truth(adata, list(run.panel), run.meta.get("units", "log2"))
    return feats, truth, section


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="HINGE RUN_DIR (stgen fit --model hinge)")
    ap.add_argument("--ridge", type=Path, default=None, help="optional ridge RUN_DIR for the regression baseline")
    ap.add_argument("--section", default=None, help="section to predict (default: the run's held-out section)")
    ap.add_argument("--data", type=Path, default=None, help="Her2ST root (default: $STGEN_DATA or ./data/her2st)")
    ap.add_argument("--cache", type=Path, default=None, help="feature cache (default: $STGEN_CACHE)")
    ap.add_argument("--ks", default="5,50", help="comma-separated inference budgets K (default 5,50)")
    ap.add_argument("--samples", type=int, default=10, help="averaged samples per spot (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="timed predictions per K (median and best reported)")
    ap.add_argument("--batch-size", type=int, default=None, help="spot x sample rows per sampler batch (run default)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--precision", default=None, help="e.g. bf16-mixed (default: the run's)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--matmul-n", type=int, default=2048, help="size of the reference fp32 matmul")
    ap.add_argument("--matmul-repeats", type=int, default=5)
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    ap.add_argument("--feats", type=Path, default=None, help="N x F features .npy instead of reading --section")
    ap.add_argument("--truth", type=Path, default=None, help="N x G truth .npy (run's units, panel order)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    from stgen.utils.io import write_json
    from stgen.workflows.rundir import load_run

    if args.threads:
        torch.set_num_threads(args.threads)
    ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    run = load_run(args.run)
    if run.meta["model"] != "hinge":
        sys.exit(f"--run {args.run} is a {run.meta['model']} run; pass a HINGE run (and the ridge one as --ridge)")
    T = run.meta["hinge"]["T"]
    bad = [k for k in ks if not 1 <= k <= T]
    if bad:
        sys.exit(f"--ks {bad} outside 1..T={T}")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = args.batch_size or run.cfg.hinge.sample_batch_size
    feats, truth, section = _section_inputs(run, args)
    n = len(feats)
    kw = dict(samples=args.samples, seed=args.seed, batch_size=batch_size, device=str(dev), precision=args.precision)
    resettable = _peak_rss_reset()

    res: dict = {"run": str(args.run), "section": section, "n_spots": n, "n_genes": len(run.panel), "T": T,
                 "samples": args.samples, "batch_size": batch_size, "device": str(dev),
                 "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                 "precision": args.precision or run.cfg.hinge.precision}
    peak = dense_matmul_gflops(dev, args.matmul_n, args.matmul_repeats)
    res["matmul_fp32_gflops"] = peak
    run.predict(feats[: min(4, n)], samples=1, steps=1, seed=0, batch_size=batch_size, device=str(dev))  # warm-up

    rows = []
    for k in ks:
        _peak_rss_reset()
        rss0 = _status_mb("VmRSS")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        (mean, _), times = _timed(lambda: run.predict(feats, steps=k, **kw), args.repeats)
        t_med, t_min = float(np.median(times)), float(min(times))
        peak_mb, how = _peak_rss_mb(resettable)
        row = {"K": k, "time_per_slide_s": t_med, "time_best_s": t_min, "spots_per_s": n / t_med,
               "peak_rss_mb": peak_mb, "peak_rss_measure": how, "rss_before_mb": rss0, **_scores(mean, truth, run.panel)}
        if dev.type == "cuda":
            row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        if not args.no_flops:
            fl, chunk = sampler_flops(run, feats, k, batch_size, str(dev))
            slide = fl * (n * args.samples) / chunk
            row.update(sampler_run_gflop=fl / 1e9, sampler_run_rows=chunk, gflop_per_slide=slide / 1e9,
                       achieved_gflops=slide / 1e9 / t_med, fraction_of_matmul_peak=slide / 1e9 / t_med / peak)
        rows.append(row)
    res["hinge"] = rows

    if args.ridge is not None:
        ridge = load_run(args.ridge)
        if ridge.meta["model"] != "ridge":
            sys.exit(f"--ridge {args.ridge} is not a ridge run")
        rfeats = feats
        if args.feats is None and ridge.cfg.features != run.cfg.features:
            from stgen.data.her2st import read_section
            from stgen.workflows.paths import default_cache_dir, default_data_dir
            from stgen.workflows.inputs import section_features

            adata = read_section(args.data or default_data_dir(), section, require_image=True)
            rfeats = section_features(adata, ridge.cfg, Path(args.cache or default_cache_dir()), progress=False)
        if list(ridge.panel) != list(run.panel):
            print("note: the ridge panel differs from the HINGE panel; its PCC-50 is on its own panel", file=sys.stderr)
            rtruth = None
        else:
            rtruth = truth
        (rmean, _), times = _timed(lambda: ridge.predict(rfeats), args.repeats)
        t_med = float(np.median(times))
        res["ridge"] = {"time_per_slide_s": t_med, "time_best_s": float(min(times)), "spots_per_s": n / t_med,
                        **(_scores(rmean, rtruth, ridge.panel) if rtruth is not None else {})}

    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        res["k_comparison"] = {"K_small": lo["K"], "K_large": hi["K"],
                               "throughput_ratio": lo["spots_per_s"] / hi["spots_per_s"],
                               "pcc50_difference": lo["pcc50"] - hi["pcc50"]}
    _print(res)
    if args.json is not None:
        write_json(args.json, res)
    else:
        print(json.dumps(res, indent=2, default=float))
    return res


def _print(res: dict) -> None:
    print(f"run {res['run']} | section {res['section']}: {res['n_spots']} spots x {res['n_genes']} genes | "
          f"T={res['T']} samples={res['samples']} batch={res['batch_size']} | {res['device']}, "
          f"{res['torch_threads']} threads, torch {res['torch']}")
    print(f"machine dense fp32 matmul: {res['matmul_fp32_gflops']:.1f} GFLOP/s")
    head = f"{'K':>4} {'s/slide':>9} {'best s':>8} {'spots/s':>9} {'peakRSS MB':>10} {'GFLOP':>9} {'GFLOP/s':>8} " \
           f"{'%peak':>6} {'PCC-50':>7}"
    print(head)
    for r in res["hinge"]:
        print(f"{r['K']:>4} {r['time_per_slide_s']:>9.3f} {r['time_best_s']:>8.3f} {r['spots_per_s']:>9.2f} "
              f"{r['peak_rss_mb']:>10.0f} {r.get('gflop_per_slide', float('nan')):>9.1f} "
              f"{r.get('achieved_gflops', float('nan')):>8.2f} {100 * r.get('fraction_of_matmul_peak', float('nan')):>5.1f}% "
              f"{r['pcc50']:>7.4f}")
    print(f"(peak RSS = {res['hinge'][0]['peak_rss_measure']}; GFLOP = matmul-type FLOPs per slide, "
          f"counted over one sampler run and scaled)")
    if "peak_gpu_mb" in res["hinge"][0]:
        print("peak GPU MB: " + ", ".join(f"K={r['K']}: {r['peak_gpu_mb']:.0f}" for r in res["hinge"]))
    if "ridge" in res:
        r = res["ridge"]
        pcc = f", PCC-50 {r['pcc50']:.4f}" if "pcc50" in r else ""
        print(f"ridge: {r['time_per_slide_s']:.4f} s/slide, {r['spots_per_s']:.1f} spots/s{pcc}")
    if "k_comparison" in res:
        c = res["k_comparison"]
        print(f"K={c['K_small']} vs K={c['K_large']}: throughput x{c['throughput_ratio']:.2f}, "
              f"PCC-50 difference {c['pcc50_difference']:+.4f}")


if __name__ == "__main__":
    main()
