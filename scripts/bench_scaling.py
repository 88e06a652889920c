"""Benchmark: how the time and peak memory of ``fit`` and ``predict`` grow with spots and with panel size.

This is a benchmark script, not a test: it prints a table, writes ``results.csv``/``results.json``
(every measurement) and ``exponents.csv`` to ``--out`` (default ``/tmp/stgen_bench_scaling``), and
states the growth exponents.

What is measured
----------------
Every measurement runs in a FRESH child process (this script with ``--child JSON``), so the peak
resident set size of the child belongs to that one measurement. The child reports, as one JSON
line: ``import_s`` (importing stgen, torch, ...), ``data_s`` (reading the cached synthetic inputs),
``load_s`` (``stgen.workflows.rundir.load_run``, or building the model) and ``work_s``, the time of the
measured call alone (``TrainedRun.predict``, a fit, or the training epochs): *time excluding model
loading*, with ``work_cpu_s`` its CPU time (user + system over all threads; OpenMP spin-waiting
counts, so it too rises when other jobs share the cores). A predict or ridge-fit call runs once on
64 spots first (warm-up), then is repeated (at most 5 runs) while its runs stay under
``--repeat-budget`` seconds in all; the fastest run is reported (``repeats``).

``peak_rss_mib`` is the child's ``VmHWM`` (``/proc/self/status``), with
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` beside it (``ru_maxrss_mib``). Linux carries
``ru_maxrss`` across ``execve`` and Python starts children with ``vfork``, so ``ru_maxrss`` is
floored at the parent's own peak; the parent therefore never holds the synthetic data (a child
writes them). ``delta_rss_mib`` is ``peak_rss_mib`` minus that of an *idle* child that imported the
same modules and did nothing (``baseline``). Timings are wall-clock seconds on whatever machine runs
this (the reference run shared 2 CPU cores with other jobs; use ``nice`` and ``OMP_NUM_THREADS``).

1. **Spots** (``--spots``, default 1k, 10k, 100k): synthetic sections with *precomputed* features
   (what the feature cache gives ``predict``): random float32 (N, 1280) features like
   EfficientNet-Lite0's (non-negative, from a 16-d latent factor), spots on a square lattice 290 px
   apart, and targets (N, G) from a random low-rank model of the same latent factor. They are written
   once to ``OUT/synthetic/`` as ``.npy`` and loaded by each child (``data_s``).

   * ``predict/hinge``: the trained HINGE run ``--hinge-run`` (250 genes, pre-trained embedded
     backbone), ``TrainedRun.predict(feats, xy=xy, samples=S, steps=K)`` on the CPU. The run's
     defaults (10 samples x K = 5) do one first pass plus 10 x 4 sampler passes per spot, i.e.
     ~41 denoiser passes; on a 2-core CPU that is a few spots/s, so 100k spots is out of reach at the
     defaults. The spot sweep therefore uses ``--hinge-samples``/``--hinge-steps`` (default 1 x 1:
     one denoiser pass per spot) and, at ``--hinge-default-spots`` (default 200, ~1 min), also the
     run's defaults (``hinge-defaults``), so the per-spot cost of the defaults is known
     (the real sections of part 3 also run at the defaults; the work per spot does not depend
     on N: every spot is sampled independently in batches of ``hinge.sample_batch_size``).
   * ``predict/ridge``: the ridge run ``--ridge-run`` (``TrainedRun.predict(feats)``).
   * ``predict/flag`` (optional, ``--flag-spots``, default 1k and 10k): the FLAG run ``--flag-run``;
     FLAG predicts a whole section at once from its kNN spot graph. Graph building holds
     ``4096 x N`` float64 distance and similarity blocks (3.3 GB each at N = 100k), so 100k spots is
     not run by default; ``--flag-samples``/``--flag-steps``/``--flag-chunk`` reduce the work.
     ``graph_s`` is the time of building that graph alone (measured once more, before the predict).
   * ``fit/ridge`` (``--ridge-fit-spots``): ``RidgeBaseline(256).fit(feats, targets)`` (250 genes).
   * ``fit-epoch/hinge`` (``--fit-spots``, default 1k and 10k): ``stgen.models.hinge.training.train_hinge`` of a
     fresh HINGE adapter on the run's pre-trained backbone and 250-gene panel, ``--fit-epochs``
     epochs (default 1, no early stopping), production ``HingeConfig`` otherwise (batch 32, 10%
     validation by sampling with K = 5), after a warm-up forward/backward pass on one batch.
     Reported: the time of the last epoch (training steps plus its validation; ``work_s``), its
     training part, and optimizer steps/s. Epoch times come from
     timestamps taken in Lightning's epoch hooks (the child wraps ``HingeModule``'s hooks in memory;
     no file is changed).

2. **Panel** (``--genes``, default 100, 250, 500, 1000 genes; ``--panel-spots`` spots, default 1000):
   a HINGE on a *randomly initialised* default backbone (``BackboneConfig`` with the dims of
   ``PretrainConfig``: 128 wide, 4 layers, 8 heads, 64 value bins; a vocabulary of 17,315 genes like
   the pre-trained one), wrapped in a ``TrainedRun`` so that the production ``predict`` path runs
   (``predict/hinge-panel``, ``--panel-samples``/``--panel-steps``, default 1 x K = 3), and
   ``--panel-fit-epochs`` training epochs (default 1; the last one is reported) on ``--panel-fit-spots``
   spots (default 500) (``fit-epoch/hinge-panel``).

3. **Real Her2ST** (``--sections``, default B4, C2, C3, C4, C5): the actual CLI
   ``stgen predict --model RUN --image JPG --spots TSV --out OUT --cache CACHE --quiet`` in a child
   process for the HINGE and ridge runs ``RUNS/{hinge,ridge}/<section>`` (run defaults: HINGE 10
   samples x K = 5). Features come from the feature cache (``--cache``), so this is the prediction
   cost, plus reading the JPEG's thumbnail. ``work_s`` is the prediction's own
   ``uns['stgen']['predict_s']`` (the wall time inside ``stgen.workflows.predict.predict``, load included)
   and ``wall_s`` the whole child (interpreter start and imports too). Fit time on real data is NOT
   re-measured: it is read from each run's ``run.json`` ``timings`` (``fit_total_s``, ``train_s``),
   as the output says.

4. **Growth exponents**: the least-squares slope of ``log(work_s)`` against ``log(N)`` (or
   ``log(G)``) per model and task, the same for ``work_cpu_s``, and of ``log(delta_rss_mib)``
   (peak RSS above the idle child) against the same, over all points and over the two largest
   sizes (the asymptotic slope: fixed costs make small sizes look sub-linear). An exponent of ~1 is linear growth.

Usage::

    nice env OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_scaling.py [--out DIR]
        [--spots 1000,10000,100000] [--hinge-samples 1 --hinge-steps 1] [--hinge-default-spots 200]
        [--fit-spots 1000,10000] [--fit-epochs 1] [--genes 100,250,500,1000] [--panel-spots 1000]
        [--panel-fit-spots 500]
        [--sections B4,C2,C3,C4,C5] [--only spots,fit,panel,real]

Each list option takes ``none`` (or an empty string) to skip that part.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FEAT_DIM = 1280
LATENT = 16
PITCH_PX = 290.0
REF_GENES = 250
RESULT_TAG = "BENCH_RESULT"


# ---------------------------------------------------------------- synthetic inputs
def lattice_xy(n: int) -> np.ndarray:
    """(n, 2) float64 spot centres on a square lattice ``PITCH_PX`` apart (row-major, 1000 px margin)."""
    side = int(math.ceil(math.sqrt(n)))
    i = np.arange(n)
    return np.stack([i % side, i // side], axis=1).astype(np.float64) * PITCH_PX + 1000.0


def synthetic_paths(out: Path, n: int, genes: int) -> dict:
    d = out / "synthetic"
    return {"feats": d / f"feats_{n}.npy", "xy": d / f"xy_{n}.npy", "targets": d / f"targets_{n}_{genes}.npy"}


def make_synthetic(out: Path, n: int, genes: int, seed: int = 0) -> dict:
    """Write (once) the cached features (n, 1280) float32, lattice positions (n, 2) and targets (n, genes).

    Features: ``relu(z @ A + 0.5 eps)`` with a 16-d latent ``z`` per spot (non-negative like pooled
    EfficientNet activations); targets: ``softplus(z @ B + 0.3 eps) * 1.5`` (log2-count-like, 0-6).
    The latent factor of spot ``i`` depends only on ``(seed, i)`` blocks, so the sections are nested.
    Written in blocks of 10k spots to memory-mapped ``.npy`` files (bounded memory here).
    """
    p = synthetic_paths(out, n, genes)
    p["feats"].parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(LATENT, FEAT_DIM)).astype(np.float32) / math.sqrt(LATENT)
    b = np.random.default_rng(seed + 1).normal(size=(LATENT, genes)).astype(np.float32) / math.sqrt(LATENT)
    need_f, need_t = not p["feats"].is_file(), not p["targets"].is_file()
    if not p["xy"].is_file():
        np.save(p["xy"], lattice_xy(n))
    if not (need_f or need_t):
        return p
    f = np.lib.format.open_memmap(str(p["feats"]) + ".tmp", "w+", np.float32, (n, FEAT_DIM)) if need_f else None
    t = np.lib.format.open_memmap(str(p["targets"]) + ".tmp", "w+", np.float32, (n, genes)) if need_t else None
    block = 10_000
    for s in range(0, n, block):
        r = np.random.default_rng([seed, s // block])
        m = min(block, n - s)
        z = r.normal(size=(m, LATENT)).astype(np.float32)
        if f is not None:
            f[s : s + m] = np.maximum(z @ a + 0.5 * r.normal(size=(m, FEAT_DIM)).astype(np.float32), 0.0)
        if t is not None:
            noise = np.random.default_rng([seed, s // block, genes]).normal(size=(m, genes)).astype(np.float32)
            eta = z @ b + 0.3 * noise
            t[s : s + m] = 1.5 * np.logaddexp(0.0, eta)
    for arr, key in ((f, "feats"), (t, "targets")):
        if arr is not None:
            arr.flush()
            del arr
            os.replace(str(p[key]) + ".tmp", p[key])
    return p


# ---------------------------------------------------------------- child side
def _peak_rss_mib() -> dict:
    """This process's peak RSS in MiB: ``VmHWM`` of ``/proc/self/status`` (the high-water mark of this
    process's own address space since its ``exec``) and ``getrusage(RUSAGE_SELF).ru_maxrss``.

    Linux keeps ``ru_maxrss`` across ``execve``, and Python starts children with ``vfork``, so a
    child's ``ru_maxrss`` can never be below the parent's own peak at the time: the parent therefore
    stays small (the synthetic inputs are written by a child too) and ``VmHWM`` is used where present.
    """
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    hwm = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return {"peak_rss_mib": hwm if hwm is not None else ru, "ru_maxrss_mib": ru}


def _hinge_epoch_timer():
    """Wrap HingeModule's epoch hooks (in this process only) to timestamp every epoch's phases."""
    from stgen.models.hinge.training import HingeModule

    marks: list[tuple[str, float, int]] = []

    def wrap(name):
        orig = getattr(HingeModule, name)

        def hook(self, *a, **k):
            marks.append((name, time.perf_counter(), time.process_time(), int(self.global_step)))
            return orig(self, *a, **k)

        setattr(HingeModule, name, hook)

    for name in ("on_train_epoch_start", "on_validation_epoch_start", "on_validation_epoch_end"):
        wrap(name)
    return marks


def _epochs_from_marks(marks) -> list[dict]:
    """Per epoch: ``total_s`` (train start to end of validation), ``train_s``, ``val_s``, ``steps``."""
    epochs, cur = [], None
    for name, t, c, step in marks:
        if name == "on_train_epoch_start":
            cur = {"t0": t, "c0": c, "step0": step}
        elif name == "on_validation_epoch_start" and cur is not None:
            cur["tv"], cur["step1"] = t, step
        elif name == "on_validation_epoch_end" and cur is not None and "tv" in cur:
            epochs.append({"total_s": t - cur["t0"], "cpu_s": c - cur["c0"], "train_s": cur["tv"] - cur["t0"],
                           "val_s": t - cur["tv"], "steps": cur["step1"] - cur["step0"]})
            cur = None
    return epochs


def _train_hinge_epochs(net, feats, targets, epochs: int) -> dict:
    """Train ``net`` for ``epochs`` epochs (no early stopping) and time them."""
    from stgen.models.hinge.config import HingeConfig
    from stgen.sampling.masking import MaskSchedule
    from stgen.models.hinge.training import train_hinge

    import torch

    h = HingeConfig(max_epochs=epochs, es_warmup=epochs + 1, patience=epochs + 1)
    schedule = MaskSchedule(len(net.panel), h.T, h.schedule, h.zeta)
    # warm-up: one forward + backward pass on one batch (thread pools, allocator, autograd kernels), so that
    # a single measured epoch is not dominated by one-time costs; no optimizer step, gradients dropped
    b = min(h.batch_size, len(feats))
    x0 = torch.as_tensor(targets[:b], dtype=torch.float32)
    vis = torch.rand(x0.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    t = torch.full((b,), h.T // 2, dtype=torch.long)
    net(x0 * vis, vis, t, torch.as_tensor(feats[:b], dtype=torch.float32)).square().mean().backward()
    for p in net.parameters():
        p.grad = None
    marks = _hinge_epoch_timer()
    t0 = time.perf_counter()
    hist = train_hinge(net, feats, targets, h, schedule, progress=False)
    total = time.perf_counter() - t0
    ep = _epochs_from_marks(marks)
    last = ep[-1] if ep else {"total_s": total / max(epochs, 1), "cpu_s": None, "train_s": float("nan"),
                              "val_s": float("nan"), "steps": 0}
    return {"work_s": last["total_s"], "work_cpu_s": last["cpu_s"], "epoch_train_s": last["train_s"],
            "epoch_val_s": last["val_s"], "steps_per_epoch": last["steps"],
            "steps_per_s": last["steps"] / last["train_s"] if last["train_s"] else None,
            "fit_call_s": total, "epochs": epochs, "epoch_s_all": [round(e["total_s"], 3) for e in ep],
            "n_train": hist["n_train"], "n_val": hist["n_val"]}


def _hinge_panel_model(genes: int, n_vocab: int = 17315):
    """A HINGE on a randomly initialised default-size backbone over a synthetic vocabulary; panel = first G."""
    from stgen.models.hinge.config import HingeConfig
    import torch
    from stgen.backbones.pretrain import PretrainConfig
    from stgen.backbones.embedded import BackboneConfig, ExpressionBackbone
    from stgen.models.hinge.network import HINGE

    p = PretrainConfig()
    vocab = [f"GENE{i:05d}" for i in range(max(n_vocab, genes))]
    torch.manual_seed(0)
    bb = ExpressionBackbone(vocab, BackboneConfig(dim=p.dim, n_layers=p.n_layers, n_heads=p.n_heads,
                                                  value_bins=p.value_bins)).eval()
    h = HingeConfig()
    return HINGE(bb, vocab[:genes], FEAT_DIM, h.T, h), h


def child_main(spec: dict) -> dict:
    t0 = time.perf_counter()
    import torch  # noqa: F401  (import cost is reported apart)
    import stgen.models.hinge.training  # noqa: F401
    import stgen.workflows.predict as predict_mod
    import stgen.workflows.rundir as rundir
    from stgen.models.flag.model import graph_builder

    res: dict = {"import_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    task = spec["task"]
    if task == "baseline":
        res["work_s"] = 0.0
        return res
    if task == "cli_predict":
        from stgen.cli import app

        t = time.perf_counter()
        try:
            app(spec["argv"], standalone_mode=False)
        except SystemExit as e:  # typer exits with the command's code
            if e.code not in (0, None):
                raise
        res["cli_s"] = time.perf_counter() - t
        import anndata as ad

        a = ad.read_h5ad(spec["out_h5ad"], backed="r")
        res["work_s"] = float(a.uns["stgen"]["predict_s"])
        res["n_spots"], res["n_genes"] = int(a.n_obs), int(a.n_vars)
        if a.uns["stgen"]["model"] != "ridge":
            res["samples"], res["steps"] = int(a.uns["stgen"]["samples"]), int(a.uns["stgen"]["steps"])
        return res

    t = time.perf_counter()
    feats = np.load(spec["feats"])
    xy = np.load(spec["xy"])
    targets = np.load(spec["targets"]) if spec.get("targets") else None
    res["data_s"] = time.perf_counter() - t

    budget = float(spec.get("repeat_budget", 0.0))

    def timed(fn, warmup=None):
        """After ``warmup()`` (the same call on 64 spots: thread pools, allocator, lazy imports), run ``fn``
        once, then again while the time spent stays under ``repeat_budget`` (at most 5 runs);
        record the fastest run's wall and CPU (user + system, all threads) seconds and the run count."""
        walls, cpus, out = [], [], None
        if warmup is not None:
            warmup()
        while True:
            w0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
            if len(walls) >= 5 or sum(walls) + walls[-1] > budget:
                break
        i = int(np.argmin(walls))
        res.update(work_s=walls[i], work_cpu_s=cpus[i], repeats=len(walls))
        return out

    t = time.perf_counter()
    if task == "predict":
        run = rundir.load_run(spec["run"])
        res["load_s"] = time.perf_counter() - t
        res["n_genes"] = len(run.panel)
        def call(k=None):
            return run.predict(feats[:k], samples=spec.get("samples"), steps=spec.get("steps"), xy=xy[:k],
                               device="cpu", batch_size=spec.get("batch_size"), progress=False)

        if run.meta["model"] == "flag":  # FLAG builds its kNN spot graph inside predict: time that part alone
            t = time.perf_counter()
            graph_builder(run.meta["flag"])(xy, feats)
            res["graph_s"] = time.perf_counter() - t
        mean, _ = timed(call, warmup=lambda: call(64))
        assert mean.shape == (len(feats), len(run.panel)) and np.isfinite(mean).all()
        if run.meta["model"] != "ridge":
            h = predict_mod.sampler_defaults(run.meta)
            res["samples"] = spec.get("samples") or h.get("samples")
            res["steps"] = spec.get("steps") or h.get("steps")
    elif task == "fit_ridge":
        from stgen.models.ridge.model import RidgeBaseline

        res["load_s"] = time.perf_counter() - t
        timed(lambda: RidgeBaseline(n_components=256, seed=42).fit(feats, targets),
              warmup=lambda: RidgeBaseline(n_components=32, seed=42).fit(feats[:64], targets[:64]))
        res["n_genes"] = int(targets.shape[1])
    elif task == "fit_hinge":
        from stgen.models.hinge.network import HINGE
        from stgen.models.hinge.config import HingeConfig

        run = rundir.load_run(spec["run"])
        m = run.meta["hinge"]
        import torch

        torch.manual_seed(42)
        net = HINGE(run.model.net.backbone, run.panel, FEAT_DIM, m["T"], HingeConfig.from_architecture(m["config"]))
        res["load_s"] = time.perf_counter() - t
        res["n_genes"] = len(run.panel)
        res.update(_train_hinge_epochs(net, feats, targets[:, : len(run.panel)], spec["epochs"]))
    elif task in ("predict_panel", "fit_panel"):
        net, h = _hinge_panel_model(spec["genes"])
        res["load_s"] = time.perf_counter() - t
        res["n_genes"] = spec["genes"]
        if task == "fit_panel":
            res.update(_train_hinge_epochs(net, feats, targets, spec["epochs"]))
        else:
            import torch
            from stgen.workflows.config import StgenConfig

            f = torch.as_tensor(feats)
            net.set_feature_stats(f.mean(0), f.std(0))
            meta = {"model": "hinge", "panel": net.panel,
                    "hinge": {"T": h.T, "schedule": h.schedule, "zeta": h.zeta, "steps": h.steps,
                              "samples": h.samples}}
            from stgen.models.hinge.model import HingeModel

            cfg = StgenConfig()
            run = rundir.TrainedRun(meta, cfg, HingeModel(net.eval(), meta["hinge"], {"kind": "default"}, cfg.hinge))
            def call(k=None):
                return run.predict(feats[:k], samples=spec["samples"], steps=spec["steps"], xy=xy[:k], device="cpu")

            mean, _ = timed(call, warmup=lambda: call(64))
            res["samples"], res["steps"] = spec["samples"], spec["steps"]
            assert mean.shape == (len(feats), spec["genes"]) and np.isfinite(mean).all()
    else:
        raise SystemExit(f"unknown child task {task!r}")
    return res


# ---------------------------------------------------------------- parent side
def run_child(spec: dict, timeout: float | None = None) -> dict:
    """Run one measurement in a fresh process; returns the child's JSON plus ``wall_s`` and ``peak_rss_mib``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith(RESULT_TAG)), None)
    if p.returncode != 0 or line is None:
        tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
        return {"error": f"exit {p.returncode}: " + " | ".join(tail), "wall_s": wall}
    out = json.loads(line[len(RESULT_TAG):])
    out["wall_s"] = wall
    return out


def fit_slope(x, y) -> float | None:
    """Least-squares slope of log(y) on log(x) over the points with x, y > 0 (None for < 2 points)."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(x, y) if a and b and a > 0 and b > 0
           and math.isfinite(a) and math.isfinite(b)]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    lx, ly = np.array(pts).T
    return float(np.polyfit(lx, ly, 1)[0])


def parse_list(s: str | None) -> list[int]:
    if s is None or s.strip().lower() in ("", "none", "0"):
        return []
    return [int(float(v)) for v in s.split(",") if v.strip()]


def fmt(v, nd=2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("/tmp/stgen_bench_scaling"))
    runs = ROOT / "reports/her2st/runs"
    ap.add_argument("--runs", type=Path, default=runs, help="folder of RUN_DIRs MODEL/SECTION (real Her2ST part)")
    ap.add_argument("--hinge-run", type=Path, default=runs / "hinge/C2")
    ap.add_argument("--ridge-run", type=Path, default=runs / "ridge/C2")
    ap.add_argument("--flag-run", type=Path, default=runs / "flag/C2")
    ap.add_argument("--spots", default="1000,10000,100000", help="N of the spot sweep (HINGE, ridge predict)")
    ap.add_argument("--hinge-spots", default=None, help="N for HINGE predict (default: --spots)")
    ap.add_argument("--hinge-samples", type=int, default=1, help="HINGE samples in the spot sweep (default 1)")
    ap.add_argument("--hinge-steps", type=int, default=1, help="HINGE unmasking steps K in the sweep (default 1)")
    ap.add_argument("--hinge-default-spots", default="200",
                    help="N at which HINGE predict also runs at the run's defaults (10 samples x K=5)")
    ap.add_argument("--flag-spots", default="1000,10000", help="N for FLAG predict ('none' to skip)")
    ap.add_argument("--flag-samples", type=int, default=1)
    ap.add_argument("--flag-steps", type=int, default=2, help="FLAG Heun steps in the sweep (run default 10)")
    ap.add_argument("--flag-chunk", type=int, default=1024, help="FLAG spots per DiT chunk (memory)")
    ap.add_argument("--ridge-fit-spots", default=None, help="N for ridge fit (default: --spots)")
    ap.add_argument("--fit-spots", default="1000,10000", help="N for HINGE training epochs")
    ap.add_argument("--fit-epochs", type=int, default=1, help="HINGE epochs per fit measurement (last one reported)")
    ap.add_argument("--genes", default="100,250,500,1000", help="panel sizes G of the panel sweep")
    ap.add_argument("--panel-spots", type=int, default=1000)
    ap.add_argument("--panel-samples", type=int, default=1)
    ap.add_argument("--panel-steps", type=int, default=3)
    ap.add_argument("--panel-fit-epochs", type=int, default=1, help="HINGE epochs per panel fit (last one reported)")
    ap.add_argument("--panel-fit-spots", type=int, default=500, help="spots of the panel fit measurements")
    ap.add_argument("--panel-fit-genes", default=None, help="G of the panel fit measurements (default: --genes)")
    ap.add_argument("--sections", default="B4,C2,C3,C4,C5", help="real Her2ST sections ('none' to skip)")
    ap.add_argument("--real-models", default="hinge,ridge")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/her2st")
    ap.add_argument("--cache", type=Path, default=ROOT / ".stgen_cache", help="feature cache of the real sections")
    ap.add_argument("--only", default="spots,fit,panel,real", help="parts to run: spots,fit,panel,real")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per-child time limit (s)")
    ap.add_argument("--repeat-budget", type=float, default=15.0,
                    help="repeat a measured predict / ridge fit call (<= 5 runs) while its runs take under this many "
                         "seconds in all; the fastest is reported (0: one run)")
    args = ap.parse_args()

    if args.child:
        spec = json.loads(args.child)
        if spec["task"] == "synth":
            res = {k: str(v) for k, v in make_synthetic(Path(spec["out"]), spec["n"], spec["genes"]).items()}
        else:
            res = child_main(spec)
        res.update(_peak_rss_mib())
        print(RESULT_TAG + json.dumps(res), flush=True)
        return

    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    spots = parse_list(args.spots)
    hinge_spots = parse_list(args.hinge_spots) if args.hinge_spots is not None else spots
    ridge_fit_spots = parse_list(args.ridge_fit_spots) if args.ridge_fit_spots is not None else spots
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t_start = time.perf_counter()

    def measure(part: str, task: str, model: str, n: int | None, g: int | None, spec: dict, note: str = "") -> dict:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {part}: {task}/{model} N={n} G={g} {note}".rstrip(),
              flush=True)
        r = run_child({"repeat_budget": args.repeat_budget, **spec}, timeout=args.timeout)
        row = {"part": part, "task": task, "model": model, "n_spots": n, "n_genes": g, "note": note, **r}
        if r.get("n_genes") is not None:
            row["n_genes"] = r["n_genes"]
        if r.get("n_spots") is not None:
            row["n_spots"] = r["n_spots"]
        if "error" in r:
            print(f"    FAILED: {r['error']}", flush=True)
        else:
            print(f"    work {fmt(r.get('work_s'))} s, load {fmt(r.get('load_s'))} s, peak RSS "
                  f"{fmt(r.get('peak_rss_mib'), 0)} MiB, child wall {fmt(r.get('wall_s'), 1)} s"
                  + (f", of which spot graph {fmt(r['graph_s'])} s" if r.get("graph_s") is not None else ""),
                  flush=True)
        rows.append(row)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
        return row

    base = measure("baseline", "idle", "-", None, None, {"task": "baseline"},
                   "idle child: imports stgen.workflows, the HINGE training, torch")
    base_rss = base.get("peak_rss_mib", 0.0)

    def synth(n: int, genes: int = REF_GENES) -> dict:
        """Paths of the synthetic inputs, written by a child process the first time (the parent stays small:
        see :func:`_peak_rss_mib`)."""
        p = synthetic_paths(args.out, n, genes)
        if not all(v.is_file() for v in p.values()):
            r = run_child({"task": "synth", "out": str(args.out), "n": n, "genes": genes})
            if "error" in r:
                sys.exit(f"writing the synthetic inputs ({n} spots, {genes} genes) failed: {r['error']}")
        return {k: str(v) for k, v in p.items()}

    if "spots" in parts:
        for n in sorted(set(spots) | set(hinge_spots) | set(parse_list(args.flag_spots)) | set(ridge_fit_spots)
                        | set(parse_list(args.hinge_default_spots))):
            synth(n)
        for n in spots:
            measure("spots", "predict", "ridge", n, None, {"task": "predict", "run": str(args.ridge_run), **synth(n)})
        for n in ridge_fit_spots:
            measure("spots", "fit", "ridge", n, REF_GENES, {"task": "fit_ridge", **synth(n)})
        for n in hinge_spots:
            measure("spots", "predict", "hinge", n, None,
                    {"task": "predict", "run": str(args.hinge_run), "samples": args.hinge_samples,
                     "steps": args.hinge_steps, **synth(n)}, f"samples={args.hinge_samples} K={args.hinge_steps}")
        for n in parse_list(args.hinge_default_spots):
            measure("spots", "predict", "hinge-defaults", n, None,
                    {"task": "predict", "run": str(args.hinge_run), **synth(n)}, "run defaults (10 samples, K=5)")
        for n in parse_list(args.flag_spots):
            measure("spots", "predict", "flag", n, None,
                    {"task": "predict", "run": str(args.flag_run), "samples": args.flag_samples,
                     "steps": args.flag_steps, "batch_size": args.flag_chunk, **synth(n)},
                    f"samples={args.flag_samples} Heun steps={args.flag_steps} chunk={args.flag_chunk}")
    if "fit" in parts:
        for n in parse_list(args.fit_spots):
            measure("spots", "fit-epoch", "hinge", n, None,
                    {"task": "fit_hinge", "run": str(args.hinge_run), "epochs": args.fit_epochs, **synth(n)},
                    f"last of {args.fit_epochs} epochs, incl. validation")
    if "panel" in parts:
        n = args.panel_spots
        for g in parse_list(args.genes):
            measure("panel", "predict", "hinge-panel", n, g,
                    {"task": "predict_panel", "genes": g, "samples": args.panel_samples, "steps": args.panel_steps,
                     **synth(n, g)}, f"random-init backbone, samples={args.panel_samples} K={args.panel_steps}")
        fit_genes = parse_list(args.panel_fit_genes) if args.panel_fit_genes is not None else parse_list(args.genes)
        for g in fit_genes:
            n = args.panel_fit_spots
            measure("panel", "fit-epoch", "hinge-panel", n, g,
                    {"task": "fit_panel", "genes": g, "epochs": args.panel_fit_epochs, **synth(n, g)},
                    f"random-init backbone, last of {args.panel_fit_epochs} epoch(s), incl. validation")
    real_fit = []
    if "real" in parts:
        from glob import glob

        for sec in [s for s in args.sections.split(",") if s.strip() and s.strip().lower() != "none"]:
            imgs = sorted(glob(str(args.data / "ST-imgs" / sec[0] / sec / "*.jpg")))
            spot_file = args.data / "ST-spotfiles" / f"{sec}_selection.tsv"
            if not imgs or not spot_file.is_file():
                print(f"skip {sec}: no image or spot file under {args.data}")
                continue
            for model in [m.strip() for m in args.real_models.split(",") if m.strip()]:
                run = args.runs / model / sec
                if not (run / "run.json").is_file():
                    print(f"skip {model}/{sec}: no run at {run}")
                    continue
                meta = json.loads((run / "run.json").read_text())
                real_fit.append({"model": model, "section": sec, **meta.get("timings", {}),
                                 "n_train_spots": meta.get("n_train_spots"),
                                 "epochs_run": (meta.get("training") or {}).get("epochs_run")})
                out_h5 = args.out / "real" / f"{model}_{sec}.h5ad"
                out_h5.parent.mkdir(parents=True, exist_ok=True)
                argv = ["predict", "--model", str(run), "--image", imgs[0], "--spots", str(spot_file),
                        "--out", str(out_h5), "--cache", str(args.cache), "--quiet"]
                measure("real", "cli-predict", model, None, None, {"task": "cli_predict", "argv": argv,
                                                                   "out_h5ad": str(out_h5)}, sec)

    # ---------------------------------------------------------------- table, exponents, files
    for r in rows:
        if "error" in r:
            continue
        r["delta_rss_mib"] = r.get("peak_rss_mib", 0.0) - base_rss if r["task"] != "idle" else 0.0
        n, w = r.get("n_spots"), r.get("work_s")
        r["spots_per_s"] = n / w if n and w else None
    print(f"\n=== measurements (baseline idle child peak RSS {base_rss:.0f} MiB; times in s, RSS in MiB) ===")
    hdr = ["part", "task", "model", "N", "G", "samp", "K", "load_s", "work_s", "cpu_s", "spots/s", "peak_RSS",
           "dRSS", "wall_s", "note"]
    table = [hdr]
    for r in rows:
        if r["task"] == "idle":
            continue
        table.append([r["part"], r["task"], r["model"], fmt(r.get("n_spots")), fmt(r.get("n_genes")),
                      fmt(r.get("samples")), fmt(r.get("steps")), fmt(r.get("load_s")),
                      fmt(r.get("work_s")) if "error" not in r else "FAILED", fmt(r.get("work_cpu_s")),
                      fmt(r.get("spots_per_s"), 1),
                      fmt(r.get("peak_rss_mib"), 0), fmt(r.get("delta_rss_mib"), 0), fmt(r.get("wall_s"), 1),
                      r.get("note", "")])
    widths = [max(len(str(row[i])) for row in table) for i in range(len(hdr) - 1)]
    for row in table:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)) + "  " + str(row[-1]))
    extra = [r for r in rows if r["task"] == "fit-epoch" and "error" not in r]
    if extra:
        print("\nHINGE training epochs (last epoch): train part / validation part / optimizer steps per s")
        for r in extra:
            print(f"  {r['model']:12s} N={r['n_spots']:>7} G={r['n_genes']:>5}: epoch {fmt(r['work_s'])} s = train "
                  f"{fmt(r.get('epoch_train_s'))} s ({r.get('steps_per_epoch')} steps, {fmt(r.get('steps_per_s'))} "
                  f"steps/s) + val {fmt(r.get('epoch_val_s'))} s; all epochs {r.get('epoch_s_all')}")

    exps = []
    for (part, task, model), grp in _groups(rows).items():
        if part == "real":
            continue
        x_key = "n_genes" if part == "panel" else "n_spots"
        grp = sorted(grp, key=lambda r: r[x_key])
        if len(grp) < 2:
            continue
        xs = [r[x_key] for r in grp]
        t = [r.get("work_s") for r in grp]
        c = [r.get("work_cpu_s") for r in grp]
        m = [r.get("delta_rss_mib") for r in grp]
        exps.append({"part": part, "task": task, "model": model, "vs": "G" if part == "panel" else "N",
                     "range": f"{xs[0]}-{xs[-1]}", "points": len(xs),
                     "time_exp": fit_slope(xs, t), "time_exp_top2": fit_slope(xs[-2:], t[-2:]),
                     "cpu_exp": fit_slope(xs, c), "cpu_exp_top2": fit_slope(xs[-2:], c[-2:]),
                     "rss_exp": fit_slope(xs, m), "rss_exp_top2": fit_slope(xs[-2:], m[-2:])})
    print("\n=== growth exponents: slope of log(wall work_s), log(CPU work s) and log(peak RSS - idle RSS) "
          "vs log(N) or log(G) ===")
    print("    (all points / the two largest sizes only ('top2'). ~1 = linear)")
    for e in exps:
        print(f"  {e['part']:5s} {e['task']:9s} {e['model']:15s} vs {e['vs']} {e['range']:>12s}: wall "
              f"{fmt(e['time_exp'])} / {fmt(e['time_exp_top2'])}, CPU {fmt(e['cpu_exp'])} / "
              f"{fmt(e['cpu_exp_top2'])}, memory {fmt(e['rss_exp'])} / {fmt(e['rss_exp_top2'])}")
    pred = [e for e in exps if e["part"] == "spots" and e["task"] == "predict" and e["time_exp"] is not None]
    if pred:
        worst = max(max(e["time_exp"], e["time_exp_top2"] or 0) for e in pred)
        print(f"  predict time vs spots: largest exponent {worst:.2f} -> "
              f"{'at most linear (<= 1.15)' if worst <= 1.15 else 'SUPER-LINEAR'}")

    if real_fit:
        print("\n=== real Her2ST fit times: read from each run's run.json 'timings' (NOT re-measured here) ===")
        for f in real_fit:
            print(f"  {f['model']:6s} {f['section']}: fit_total_s {f.get('fit_total_s')}, train_s {f.get('train_s')}, "
                  f"{f.get('n_train_spots')} training spots"
                  + (f", {f['epochs_run']} epochs" if f.get("epochs_run") else ""))
    with open(args.out / "results.csv", "w", newline="") as fh:
        keys = ["part", "task", "model", "n_spots", "n_genes", "samples", "steps", "import_s", "data_s", "load_s",
                "work_s", "work_cpu_s", "repeats", "spots_per_s", "peak_rss_mib", "ru_maxrss_mib", "delta_rss_mib",
                "wall_s", "graph_s", "epoch_train_s", "epoch_val_s",
                "steps_per_epoch", "steps_per_s", "threads", "note", "error"]
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(args.out / "exponents.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(exps[0]) if exps else ["part"])
        w.writeheader()
        w.writerows(exps)
    (args.out / "results.json").write_text(json.dumps({"baseline_rss_mib": base_rss, "rows": rows,
                                                       "exponents": exps, "real_fit_from_run_json": real_fit,
                                                       "argv": sys.argv, "total_s": time.perf_counter() - t_start},
                                                      indent=1))
    print(f"\nwrote {args.out / 'results.csv'}, {args.out / 'exponents.csv'}, {args.out / 'results.json'} "
          f"({time.perf_counter() - t_start:.0f} s in all)")


def _groups(rows):
    g: dict = {}
    for r in rows:
        if "error" in r or r["task"] == "idle":
            continue
        g.setdefault((r["part"], r["task"], r["model"]), []).append(r)
    return g


if __name__ == "__main__":
    main()
