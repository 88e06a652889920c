"""Whole-slide prediction of a bare slide, from tissue detection to ``.h5ad``, stage by stage, with measured numbers.

    .venv/bin/python benchmarks/whole_slide.py --run RUN_DIR_OR_NAME [--ridge RUN] [--spots 5000] [--mpp 0.5]
        [--samples N] [--steps K] [--out DIR] [--threads 2] [--json OUT.json] [--scaling 1000,5000]

``--run`` (and ``--ridge``) is a RUN_DIR written by ``stgen fit`` or a built-in model's name (``her2st-hinge``,
``her2st-ridge``; :func:`stgen.workflows.rundir.load_run` resolves it).

It first writes a synthetic bare slide: a pyramidal tiled TIFF (:func:`stgen.image.slide.write_pyramidal_tiff`,
tile by tile, JPEG tiles by default, ``--mpp`` microns per pixel in the resolution tags): white glass with one
H&E-coloured tissue ellipse (pink stroma of varying density, purple nuclei, fine noise; a periodic procedural
texture) of the area that the run's spot grid (``run.json['spots']``: ``grid``, ``spacing_um``; runs without it
are legacy ST, 200 um square; Visium runs are 100 um hex) covers with about ``--spots`` spots, plus a margin of
glass. Writing it is setup and is not part of any time below.

Then, for the run (and the ridge run with ``--ridge``, on the same slide), it makes one end-to-end call of
``predict(run, slide, None, out)`` (:func:`stgen.workflows.predict.predict`: the bare-slide prediction as
``stgen predict --image SLIDE`` runs it; encoder built cold, only Python's imports are warm) and then runs its
stages one by one. For the call and for each stage it prints the wall time (s), spots/s (spots on the slide /
time), the peak resident memory of the process (Linux ``VmHWM`` from /proc/self/status, reset before each via
/proc/self/clear_refs; where that reset is not allowed, ``ru_maxrss`` since the process started, and it says so)
and the RSS at its start. The end-to-end call comes first so that memory freed by the stages does not raise its
peak. The stages:

* ``load run`` (:func:`~stgen.workflows.rundir.load_run`: config, weights);
* ``open + thumbnail`` (open the slide, the 2000 px thumbnail from the smallest pyramid level big enough);
* ``tissue detection`` (:func:`stgen.data.tissue.detect_tissue`, Otsu on the thumbnail's saturation);
* ``grid layout`` (:func:`stgen.data.tissue.lay_spot_grid` at the run's spot spacing);
* ``encoder build`` (the patch encoder, built cold: the per-process encoder cache is emptied first; for
  EfficientNet-Lite0 on the CPU this is the ONNX Runtime session. The one-time ONNX export, when its file is
  not yet in ``$STGEN_CACHE/onnx``, falls in the end-to-end call: the output says whether it happened);
* ``features`` (``run.features().encode`` on the open slide: tiles decoded, patches cut, encoded);
* ``sampling`` (``run.predict``: ``--samples`` x ``--steps`` for HINGE, one matrix product for ridge);
* ``write .h5ad`` (the AnnData that ``predict`` writes: mean, sd layer, coordinates, thumbnail);

and their sum. Features are never cached: every pass gets a fresh, empty temporary feature cache
(deleted afterwards). The machine's dense fp32 matmul rate (best of 5 ``2048 x 2048`` ``torch.matmul``, on the
device the sampler uses, at ``--threads``; as ``benchmarks/inference_speed.py`` measures it) is printed so
that the times can be read against the machine. Every number is measured in this run.

The memory that grows with the number of spots N is estimated from the array shapes and printed next to the
measured peaks: features ``N x F`` float32, the outputs ``N x G`` (mean and sd, and their float32 copies in the
AnnData) and, for HINGE, the neighbour-mean features of its spatial context (``N x F`` per radius), the first
reverse step's outputs and the sampler's sample-major order noise and results (``samples x N x G`` each).
``--scaling 1000,5000`` runs the whole benchmark (``--run`` only) once per size, each in a fresh Python
process, and prints spots, end-to-end time, its peak RSS and RSS at its start per size, and the measured growth of the end-to-end peak per 1000 spots
next to the estimate, so that a reader sees whether memory is flat in the number of spots.

Threads: ``--threads`` sets torch's, BLAS's (threadpoolctl) and ONNX Runtime's intra-op threads. On a machine
that other jobs keep busy, two threads on two cores stall on the sampler's many small operations (tens of times
slower than one thread); compare with ``--threads 1`` before reading a slow sampler as the model's cost.

``--out DIR`` keeps the slide and the predictions there (default: a temporary folder, deleted); a slide of the
same size, grid, mpp and compression already in ``--out`` is reused instead of written again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_speed import (
    _peak_rss_mb,
    _peak_rss_reset,
    _status_mb,
    dense_matmul_gflops,
)

#: Period (level-0 px) of the procedural tissue texture; a power of two, so that every pyramid level's texture
#: is the exact 2 x 2 box average of the level above.
TEXTURE_PX = 1024
GLASS_RGB = (242, 240, 244)
STAGES = ("load run", "open + thumbnail", "tissue detection", "grid layout", "encoder build", "features",
          "sampling", "write .h5ad")


# ------------------------------------------------------------------ synthetic slide
def _texture(mpp: float, seed: int = 0) -> list[np.ndarray]:
    """Periodic H&E-like RGB texture, ``TEXTURE_PX`` square at level 0, and its 2x2 box reductions."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    p = TEXTURE_PX
    low = ndimage.gaussian_filter(rng.standard_normal((p, p)), sigma=p / 24, mode="wrap")
    low = (low - low.mean()) / (low.std() + 1e-9)
    fine = ndimage.gaussian_filter(rng.standard_normal((p, p)), sigma=1.5, mode="wrap")
    fine = fine / (fine.std() + 1e-9)
    nuc = np.zeros((p, p), np.float32)
    r = max(1.5, 3.5 / mpp)  # nuclei about 7 um across
    n_nuc = int(2500e-6 * (p * mpp) ** 2) + 1  # about 2500 nuclei per mm^2
    k = math.ceil(1.3 * r)  # the largest nucleus
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    for cx, cy, s in zip(rng.integers(0, p, n_nuc), rng.integers(0, p, n_nuc), rng.uniform(0.7, 1.3, n_nuc)):
        disc = (xx**2 + yy**2 <= (r * s) ** 2).astype(np.float32)
        rows, cols = (np.arange(cy - k, cy + k + 1) % p), (np.arange(cx - k, cx + k + 1) % p)
        nuc[np.ix_(rows, cols)] = np.maximum(nuc[np.ix_(rows, cols)], disc)
    nuc = ndimage.gaussian_filter(nuc, sigma=0.8, mode="wrap")[..., None]
    stroma = np.array([232.0, 150.0, 192.0]) * (1.0 + 0.06 * low[..., None]) + 6.0 * fine[..., None]
    nuclei = np.array([105.0, 62.0, 150.0]) + 10.0 * fine[..., None]
    tex = np.clip((1.0 - nuc) * stroma + nuc * nuclei, 0, 255).astype(np.uint8)
    levels = [tex]
    while levels[-1].shape[0] > 1:
        t = levels[-1].astype(np.float32)
        h = t.shape[0] // 2
        levels.append(np.round(t.reshape(h, 2, h, 2, 3).mean((1, 3))).astype(np.uint8))
    return levels


def slide_geometry(n_spots: int, grid: str, spacing_um: float, mpp: float) -> dict:
    """Size (px) of a slide whose tissue ellipse holds about ``n_spots`` grid points, and the ellipse (um)."""
    cell_um2 = spacing_um**2 * (math.sqrt(3.0) / 2.0 if grid == "hex" else 1.0)
    area = n_spots * cell_um2
    b = math.sqrt(area / (math.pi * 1.3))  # semi-axes a = 1.3 b
    a = 1.3 * b
    margin = max(500.0, 0.15 * a, 2.0 * spacing_um)
    w, h = math.ceil((2 * a + 2 * margin) / mpp), math.ceil((2 * b + 2 * margin) / mpp)
    return {"width": w, "height": h, "mpp": mpp, "a_um": a, "b_um": b, "tissue_mm2": area / 1e6,
            "grid": grid, "spacing_um": spacing_um, "target_spots": n_spots}


def write_slide(path: Path, geom: dict, compression: str = "jpeg", seed: int = 0) -> Path:
    """The synthetic bare slide of :func:`slide_geometry`, written tile by tile (memory bounded by a tile)."""
    from stgen.image.slide import write_pyramidal_tiff

    tex = _texture(geom["mpp"], seed)
    w, h, mpp = geom["width"], geom["height"], geom["mpp"]
    cx, cy = w / 2.0, h / 2.0
    ia2, ib2 = (mpp / geom["a_um"]) ** 2, (mpp / geom["b_um"]) ** 2  # per level-0 px^2

    def tile_fn(x0: int, y0: int, tw: int, th: int, ds: float) -> np.ndarray:
        # level pixel (x, y) covers level-0 [x * ds, (x + 1) * ds): test its centre against the ellipse
        u = ((np.arange(x0, x0 + tw) + 0.5) * ds - cx) ** 2 * ia2
        v = ((np.arange(y0, y0 + th) + 0.5) * ds - cy) ** 2 * ib2
        inside = v[:, None] + u[None, :] <= 1.0
        glass = np.empty((th, tw, 3), np.uint8)
        glass[:] = GLASS_RGB
        if not inside.any():
            return glass
        t = tex[min(round(math.log2(ds)), len(tex) - 1)]
        p = t.shape[0]
        block = t[np.ix_(np.arange(y0, y0 + th) % p, np.arange(x0, x0 + tw) % p)]
        if inside.all():
            return block
        return np.where(inside[..., None], block, glass)

    return write_pyramidal_tiff(path, w, h, tile_fn, mpp=mpp, tile=512, compression=compression)


# ------------------------------------------------------------------ one run's pass
class _Stages:
    """Wall time and peak RSS of named stages (peak reset before each)."""

    def __init__(self, resettable: bool) -> None:
        self.resettable, self.rows = resettable, []

    def __call__(self, name: str):
        return _Stage(self, name)


class _Stage:
    def __init__(self, owner: _Stages, name: str) -> None:
        self.owner, self.name = owner, name

    def __enter__(self):
        _peak_rss_reset()
        self.rss0 = _status_mb("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        dt = time.perf_counter() - self.t0
        peak, how = _peak_rss_mb(self.owner.resettable)
        self.owner.rows.append({"stage": self.name, "s": dt, "peak_rss_mb": peak, "rss_before_mb": self.rss0,
                                "peak_rss_measure": how})


def _clear_encoders() -> None:
    from stgen.features import registry

    registry._BUILT.clear()  # build the encoder cold, as a fresh `stgen predict` process does


def _onnx_files() -> set[str]:
    from stgen.utils.io import default_cache_dir

    d = Path(os.environ.get("STGEN_ONNX_DIR") or default_cache_dir() / "onnx")
    return {p.name for p in d.glob("*.onnx")} if d.is_dir() else set()


def n_proportional_mb(model: str, n: int, f: int, g: int, samples: int, n_context: int = 0,
                      head: bool = False) -> dict:
    """Estimated MB of the arrays that grow with the spots N during an end-to-end predict (float32).

    HINGE: its condition inputs ``N x F(1 + n_context)`` (the spot feature and one neighbour mean per context
    radius; the sampler gathers each batch's rows, nothing is repeated per sample), the first reverse step's
    ``N x G`` outputs (mean, and sd with the predictive head ``head``), and the sample-major order noise and
    results, ``samples x N x G`` each (sd too with the head)."""
    mb = 4.0 / 2**20
    est = {"features N x F": n * f * mb, "outputs N x G (mean, sd + AnnData copies)": 4 * n * g * mb}
    if model == "hinge":
        if n_context:
            est[f"HINGE neighbour-mean features {n_context} x N x F"] = n_context * n * f * mb
        if samples > 1:
            est["HINGE first-step outputs N x G"] = (2 if head else 1) * n * g * mb
        est["HINGE order noise + samples"] = (3 if head else 2) * samples * n * g * mb
    return est


def bench_run(label: str, run_ref: str, image: Path, out_dir: Path, args) -> dict:
    """One end-to-end bare-slide predict of ``image`` by ``run_ref`` (first, so that its peak RSS is not raised by
    memory the stages freed), then every stage of it on its own."""
    import anndata as ad
    import pandas as pd

    from stgen.data.common import GRIDS
    from stgen.data.hest import hest_slide_mpp
    from stgen.data.tissue import detect_tissue, lay_spot_grid
    from stgen.features.registry import build_encoder, encoder_dim
    from stgen.image.scaled import as_slide_ref, open_ref
    from stgen.workflows.inputs import THUMBNAIL_PX, _slide_mpp
    from stgen.workflows.predict import predict, sampler_defaults
    from stgen.workflows.rundir import load_run

    resettable = _peak_rss_reset()
    ref = as_slide_ref(image)
    onnx_before = _onnx_files()

    # one end-to-end call, as `stgen predict --image SLIDE` runs it (fresh feature cache, encoder built cold)
    e2e, e2e_out = _Stages(resettable), out_dir / f"{label}.h5ad"
    with tempfile.TemporaryDirectory(prefix=f"stgen-bench-cache-{label}-e2e-") as e2e_cache:
        _clear_encoders()
        with e2e("end-to-end predict()"):
            pred = predict(run_ref, image, None, e2e_out, samples=args.samples, steps=args.steps,
                           cache_dir=e2e_cache, seed=args.seed, progress=False)
        n_e2e = pred.n_obs
        del pred
    onnx = "exported in the end-to-end predict (its time includes the export)" if _onnx_files() - onnx_before \
        else "reused from disk"

    # the same, stage by stage
    st = _Stages(resettable)
    with tempfile.TemporaryDirectory(prefix=f"stgen-bench-cache-{label}-") as cache:
        _clear_encoders()
        with st("load run"):
            run = load_run(run_ref)
        run.cache_dir = Path(cache)
        model = run.meta["model"]
        layout = run.meta.get("spots") or {"grid": "square", "spacing_um": GRIDS["square"][0],
                                           "diameter_um": GRIDS["square"][1], "mpp": None, "patch_um": None}
        with st("open + thumbnail"):
            mpp = hest_slide_mpp(ref.path)
            slide = open_ref(ref, mpp=mpp)
            thumb, scale = slide.thumbnail(THUMBNAIL_PX)
        with slide:
            slide_mpp = _slide_mpp(slide, image, "a bare-slide prediction")
            with st("tissue detection"):
                tissue = detect_tissue(thumb, scale, mpp=slide_mpp, source=str(image))
            with st("grid layout"):
                spots_df = lay_spot_grid(tissue, slide.width, slide.height, slide_mpp, kind=layout["grid"],
                                         spacing_um=layout["spacing_um"], diameter_um=layout["diameter_um"])
                xy = spots_df[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
            patch_px = int(run.cfg.features.patch_px)
            if layout.get("patch_um"):
                patch_px = max(1, round(layout["patch_um"] / slide_mpp))
            run.patch_px = patch_px
            with st("encoder build"):
                enc = build_encoder(run.cfg.features.encoder)
            with st("features"):
                feats = run.features().encode(ref, xy, slide=slide)
        with st("sampling"):
            mean, std = run.predict(feats, samples=args.samples, steps=args.steps, seed=args.seed, xy=xy,
                                    image=ref)
        with st("write .h5ad"):
            adata = ad.AnnData(X=mean.astype(np.float32), obs=spots_df.copy(),
                               var=pd.DataFrame(index=pd.Index(run.panel, name="gene")), obsm={"spatial": xy},
                               layers={"std": std.astype(np.float32)})
            adata.uns["spatial"] = {image.stem: {"images": {"hires": thumb}, "scalefactors": {
                "tissue_hires_scalef": float(scale), "spot_diameter_fullres": layout["diameter_um"] / slide_mpp}}}
            adata.write_h5ad(out_dir / f"{label}_staged.h5ad")
    backend = getattr(enc, "backend", "torch")
    n, n_genes = len(xy), len(run.panel)
    hs = sampler_defaults(run.meta)
    samples = int(args.samples or hs.get("samples", 1)) if hs else 1
    steps = int(args.steps or hs.get("steps", 0)) if hs else 0
    for r in st.rows + e2e.rows:
        r["spots_per_s"] = n / r["s"] if r["s"] > 0 else float("inf")
    staged_s = sum(r["s"] for r in st.rows)
    f_dim = encoder_dim(run.cfg.features.encoder)
    net = getattr(run.model, "net", None)  # HINGE's network: its spatial context and predictive head
    radii, head = getattr(getattr(net, "config", None), "context_radii", ()), bool(getattr(net, "has_sd", False))
    return {"label": label, "run": str(run_ref), "model": model, "n_spots": n, "n_spots_e2e": n_e2e,
            "n_genes": n_genes, "feature_dim": f_dim, "encoder": run.cfg.features.encoder,
            "encoder_backend": backend, "onnx_export": onnx if backend == "onnxruntime" else "n/a",
            "samples": samples, "steps": steps, "grid": layout["grid"], "spacing_um": layout["spacing_um"],
            "patch_px": patch_px, "tissue_fraction": tissue.fraction, "otsu_threshold": tissue.threshold,
            "stages": st.rows, "staged_total_s": staged_s, "staged_spots_per_s": n / staged_s,
            "staged_peak_rss_mb": max(r["peak_rss_mb"] for r in st.rows),
            "end_to_end": e2e.rows[0], "h5ad": str(e2e_out),
            "n_proportional_mb_estimate": n_proportional_mb(model, n, f_dim, n_genes, samples, n_context=len(radii),
                                                            head=head)}


# ------------------------------------------------------------------ main
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="RUN_DIR or built-in model name (e.g. her2st-hinge)")
    ap.add_argument("--ridge", default=None, help="optional ridge RUN_DIR or name, run on the same slide")
    ap.add_argument("--spots", type=int, default=5000, help="spots on the synthetic slide's tissue (about)")
    ap.add_argument("--mpp", type=float, default=0.5, help="microns per pixel of the synthetic slide (0.5: 20x)")
    ap.add_argument("--samples", type=int, default=None, help="HINGE samples per spot (default: the run's)")
    ap.add_argument("--steps", type=int, default=None, help="HINGE sampler steps K (default: the run's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="keep the slide and predictions here (default: temp)")
    ap.add_argument("--threads", type=int, default=2, help="torch / BLAS / ONNX Runtime intra-op threads")
    ap.add_argument("--compression", default="jpeg", help="TIFF tile compression (jpeg | zlib | none)")
    ap.add_argument("--matmul-n", type=int, default=2048, help="size of the reference fp32 matmul")
    ap.add_argument("--matmul-repeats", type=int, default=5)
    ap.add_argument("--scaling", default=None,
                    help="comma-separated spot counts, e.g. 1000,5000: one fresh process per size (--run only)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # each table row as it is measured, also when stdout is a file
        sys.stdout.reconfigure(line_buffering=True)
    if args.scaling:
        return _scaling(args, argv if argv is not None else sys.argv[1:])
    if args.spots < 1 or not args.mpp > 0:
        sys.exit("--spots must be >= 1 and --mpp > 0")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # BLAS threads then follow OMP_NUM_THREADS
        threadpool_limits = None
    from stgen.errors import InputError

    torch.set_num_threads(args.threads)
    try:
        with threadpool_limits(args.threads) if threadpool_limits else nullcontext():
            res = _bench(args)
    except InputError as e:  # e.g. an unknown run name, or a run whose model does not load
        sys.exit(f"error: {e}")
    _print(res)
    if args.json is not None:
        from stgen.utils.io import write_json

        write_json(args.json, res)
    return res


def _bench(args) -> dict:
    from stgen.data.common import GRIDS
    from stgen.workflows.rundir import load_run

    run = load_run(args.run)  # only to size the slide by its spot grid
    if args.ridge is not None and (model := load_run(args.ridge).meta["model"]) != "ridge":
        sys.exit(f"--ridge {args.ridge} is a {model} run, not a ridge run")
    layout = run.meta.get("spots") or {"grid": "square", "spacing_um": GRIDS["square"][0]}
    del run
    keep = args.out is not None
    out_dir = Path(args.out) if keep else Path(tempfile.mkdtemp(prefix="stgen-whole-slide-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        geom = slide_geometry(args.spots, layout["grid"], float(layout["spacing_um"]), args.mpp)
        image = out_dir / (f"synthetic_{args.spots}spots_{geom['grid']}{geom['spacing_um']:g}um_{args.mpp:g}mpp_"
                           f"{args.compression}.tif")
        write_s = None  # a slide kept in --out by an earlier run is reused (the slide is deterministic)
        if not image.is_file():
            t0 = time.perf_counter()
            write_slide(image, geom, None if args.compression == "none" else args.compression)
            write_s = time.perf_counter() - t0
        slide = {**geom, "path": str(image), "write_s": write_s, "file_mb": image.stat().st_size / 2**20,
                 "compression": args.compression}
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        res: dict = {"slide": slide, "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "device": str(dev), "matmul_n": args.matmul_n,
                     "matmul_fp32_gflops": dense_matmul_gflops(dev, args.matmul_n, args.matmul_repeats),
                     "feature_cache": "fresh empty temporary folder per pass (nothing cached)", "runs": []}
        res["runs"].append(bench_run("run", args.run, image, out_dir, args))
        if args.ridge is not None:
            res["runs"].append(bench_run("ridge", args.ridge, image, out_dir, args))
        res["kept"] = str(out_dir) if keep else None
        return res
    finally:
        if not keep:
            shutil.rmtree(out_dir, ignore_errors=True)


def _print(res: dict) -> None:
    s = res["slide"]
    how = "reused from --out" if s["write_s"] is None else f"written in {s['write_s']:.1f} s"
    print(f"synthetic bare slide: {s['width']} x {s['height']} px at {s['mpp']:g} um/px, {s['compression']} tiles, "
          f"{s['file_mb']:.0f} MB; tissue ellipse {2 * s['a_um'] / 1000:.1f} x {2 * s['b_um'] / 1000:.1f} mm "
          f"({s['tissue_mm2']:.1f} mm^2) for ~{s['target_spots']} spots on a {s['spacing_um']:g} um {s['grid']} grid; "
          f"{how} (setup, not timed below)")
    print(f"machine: dense fp32 matmul {res['matmul_n']}^2 on {res['device']}: {res['matmul_fp32_gflops']:.1f} "
          f"GFLOP/s | {res['threads']} threads, torch {res['torch']}")
    print(f"feature cache: {res['feature_cache']}")
    for r in res["runs"]:
        sampler = f", samples {r['samples']}, steps K={r['steps']}" if r["model"] == "hinge" else ""
        print(f"\n[{r['label']}] {r['model']} run {r['run']}: {r['n_spots']} spots x {r['n_genes']} genes "
              f"({r['grid']} grid {r['spacing_um']:g} um); encoder {r['encoder']} ({r['feature_dim']}-d, "
              f"{r['encoder_backend']}, ONNX export: {r['onnx_export']}), patch {r['patch_px']} px{sampler}")
        print(f"  {'stage':<22} {'s':>8} {'spots/s':>10} {'peak RSS MB':>12} {'RSS before':>11}")
        for row in r["stages"]:
            print(f"  {row['stage']:<22} {row['s']:>8.3f} {row['spots_per_s']:>10.1f} {row['peak_rss_mb']:>12.0f} "
                  f"{row['rss_before_mb'] or float('nan'):>11.0f}")
        print(f"  {'sum of stages':<22} {r['staged_total_s']:>8.3f} {r['staged_spots_per_s']:>10.1f} "
              f"{r['staged_peak_rss_mb']:>12.0f}")
        e = r["end_to_end"]
        print(f"  {'end-to-end predict()':<22} {e['s']:>8.3f} {e['spots_per_s']:>10.1f} {e['peak_rss_mb']:>12.0f} "
              f"{e['rss_before_mb'] or float('nan'):>11.0f}   ({r['n_spots_e2e']} spots in the .h5ad)")
        est = r["n_proportional_mb_estimate"]
        top = max(est, key=est.get)
        print(f"  arrays growing with N (estimate): {sum(est.values()):.1f} MB, largest: {top} {est[top]:.1f} MB")
    print(f"\n(peak RSS = {res['runs'][0]['end_to_end']['peak_rss_measure']}, whole process; RSS before = at the "
          f"stage's start, memory a previous pass freed may still be held: --scaling measures fresh processes)")


def child_argv(argv: list[str]) -> list[str]:
    """``argv`` without the options that ``--scaling`` sets per size or leaves out (``--scaling``, ``--spots``,
    ``--json``, ``--ridge``, ``--out``; as ``--opt VALUE`` or ``--opt=VALUE``)."""
    drop = {"--scaling", "--spots", "--json", "--ridge", "--out"}
    base, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.split("=", 1)[0] in drop:
            skip = "=" not in a
            continue
        base.append(a)
    return base


def _scaling(args, argv: list[str]) -> dict:
    """The benchmark once per ``--scaling`` size, each in a fresh process; peak RSS against spots."""
    sizes = [int(s) for s in args.scaling.split(",") if s.strip()]
    if len(sizes) < 2 or min(sizes) < 1:
        sys.exit("--scaling needs two or more spot counts >= 1, e.g. 1000,5000")
    base = child_argv(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="stgen-whole-slide-scaling-") as tmp:
        for n in sorted(sizes):
            js = Path(tmp) / f"{n}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--spots", str(n), "--json", str(js)]
            if args.out is not None:
                cmd += ["--out", str(Path(args.out) / f"{n}spots")]
            print(f"--- {n} spots: {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.run(cmd, check=False, text=True)
            if proc.returncode != 0:
                sys.exit(f"the {n}-spot benchmark failed (exit {proc.returncode})")
            rows.append(json.loads(js.read_text()))
    table = []
    for res in rows:
        r = res["runs"][0]
        table.append({"target_spots": res["slide"]["target_spots"], "n_spots": r["n_spots"],
                      "e2e_s": r["end_to_end"]["s"], "e2e_spots_per_s": r["end_to_end"]["spots_per_s"],
                      "e2e_peak_rss_mb": r["end_to_end"]["peak_rss_mb"],
                      "e2e_rss_before_mb": r["end_to_end"]["rss_before_mb"], "staged_peak_rss_mb": r["staged_peak_rss_mb"],
                      "n_proportional_mb_estimate": sum(r["n_proportional_mb_estimate"].values())})
    lo, hi = table[0], table[-1]
    dn = (hi["n_spots"] - lo["n_spots"]) / 1000.0
    growth = {"measured_e2e_mb_per_1000_spots": (hi["e2e_peak_rss_mb"] - lo["e2e_peak_rss_mb"]) / dn if dn else None,
              "estimated_mb_per_1000_spots": (hi["n_proportional_mb_estimate"] - lo["n_proportional_mb_estimate"]) / dn
              if dn else None}
    out = {"scaling": table, "growth": growth, "runs": rows}
    print(f"\nscaling ({rows[0]['runs'][0]['model']} run {args.run}, one fresh process per size)")
    print(f"  {'spots':>7} {'e2e s':>8} {'spots/s':>9} {'e2e peak MB':>12} {'RSS before':>11} {'stage peak MB':>14} "
          f"{'N-arrays MB':>12}")
    for t in table:
        print(f"  {t['n_spots']:>7} {t['e2e_s']:>8.2f} {t['e2e_spots_per_s']:>9.1f} {t['e2e_peak_rss_mb']:>12.0f} "
              f"{t['e2e_rss_before_mb'] or float('nan'):>11.0f} {t['staged_peak_rss_mb']:>14.0f} "
              f"{t['n_proportional_mb_estimate']:>12.1f}")
    if dn:
        est = rows[-1]["runs"][0]["n_proportional_mb_estimate"]
        top = max(est, key=est.get)
        print(f"  peak RSS grows {growth['measured_e2e_mb_per_1000_spots']:.1f} MB per 1000 spots (estimate from the "
              f"array shapes: {growth['estimated_mb_per_1000_spots']:.1f}; largest: {top})")
    if args.json is not None:
        from stgen.utils.io import write_json

        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
