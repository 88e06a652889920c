"""Benchmark: peak memory and time of bare-slide prediction on a synthetic 40,000 x 40,000 px pyramidal TIFF.

Writes (once, then re-uses) a tiled, zlib-compressed pyramidal TIFF at 0.5 um/px (a 20x scan) with a
pink, textured tissue ellipse over a fifth of the slide, then runs

    stgen predict --model RUN --image slide.tif --out pred.h5ad --maps maps

in a child process (no --spots: Otsu tissue detection, spot grid at the run's spacing, lazy tile reads)
and prints the child's peak resident set size (getrusage), the wall time and spots/s. The slide's
level 0 alone is 4.8 GB of RGB pixels; the bar is a peak RSS under 2 GiB.

Usage::

    .venv/bin/python scripts/bench_wsi.py [--model RUN_DIR] [--size 40000] [--out DIR]

Without ``--model`` a ridge run is fitted on Her2ST (held-out C2, default features) into ``OUT/run``,
re-using the feature cache (``$STGEN_CACHE`` or ``./.stgen_cache``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STGEN = [sys.executable, "-m", "stgen.cli"]


def tissue_tile(size: int):
    """``tile_fn`` of :func:`stgen.image.slide.write_pyramidal_tiff`: white glass with a textured pink ellipse
    (centre of the slide, semi-axes 0.35 and 0.25 of its side) - the same picture at every level."""
    cx = cy = size / 2.0
    ax, ay = 0.35 * size, 0.25 * size

    def fn(x0: int, y0: int, w: int, h: int, ds: float) -> np.ndarray:
        xs = (np.arange(x0, x0 + w) + 0.5) * ds
        ys = (np.arange(y0, y0 + h) + 0.5) * ds
        inside = ((xs[None, :] - cx) / ax) ** 2 + ((ys[:, None] - cy) / ay) ** 2 <= 1.0
        out = np.full((h, w, 3), 240, np.uint8)
        if inside.any():
            tex = (18 * np.sin(xs[None, :] / 23.0) * np.cos(ys[:, None] / 17.0)).astype(np.int16)
            for c, base in enumerate((205, 120, 185)):  # eosin pink; nuclei-like texture
                out[..., c] = np.where(inside, np.clip(base + tex, 0, 255), 240).astype(np.uint8)
        return out

    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="RUN_DIR (default: fit ridge on Her2ST into OUT/run)")
    ap.add_argument("--size", type=int, default=40_000, help="slide side in px (default 40000)")
    ap.add_argument("--mpp", type=float, default=0.5, help="microns per pixel of the synthetic slide")
    ap.add_argument("--out", type=Path, default=Path("/tmp/stgen_bench_wsi"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from stgen.image.slide import open_slide, write_pyramidal_tiff

    args.out.mkdir(parents=True, exist_ok=True)
    slide = args.out / f"synthetic_{args.size}.tif"
    if not slide.is_file():
        t0 = time.perf_counter()
        write_pyramidal_tiff(slide, args.size, args.size, tissue_tile(args.size), mpp=args.mpp)
        print(f"wrote {slide} ({slide.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    with open_slide(slide) as s:
        print(f"slide: {s.width} x {s.height} px, {len(s.level_dims)} levels, mpp {s.mpp}, "
              f"level 0 = {s.width * s.height * 3 / 2**30:.1f} GiB of RGB")

    run = args.model
    if run is None:
        run = args.out / "run"
        if not (run / "run.json").is_file():
            subprocess.run([*STGEN, "fit", "--test-section", "C2", "--model", "ridge", "--out", str(run), "--quiet"],
                           check=True, cwd=ROOT)
    pred = args.out / "pred.h5ad"
    argv = ["predict", "--model", str(run), "--image", str(slide), "--out", str(pred),
            "--maps", str(args.out / "maps"), "--quiet"]
    # the child reports its own peak RSS (getrusage of itself: nothing else is counted)
    child = ("import resource, sys\nfrom stgen.cli import app\ntry:\n    app(sys.argv[1:])\n"
             "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
             "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)\n")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", child, *argv], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"predict failed:\n{res.stdout}\n{res.stderr}")
    import anndata as ad

    peak_gib = int(res.stdout.split("PEAK_RSS_KIB")[1].split()[0]) / 2**20
    a = ad.read_h5ad(pred)
    print(res.stdout.split("PEAK_RSS_KIB")[0].strip())
    print(f"bare-slide predict: {a.n_obs} spots x {a.n_vars} genes, patch {a.uns['stgen']['patch_px']} px, "
          f"tissue {a.uns['stgen']['grid']['tissue_fraction']:.1%} of the thumbnail; {wall:.1f} s wall "
          f"({a.n_obs / wall:.1f} spots/s)")
    print(f"peak RSS of the predict process: {peak_gib:.2f} GiB ({'under' if peak_gib < 2 else 'OVER'} the 2 GiB bar)")


if __name__ == "__main__":
    main()
