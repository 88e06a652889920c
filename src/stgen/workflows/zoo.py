"""Build and describe the model zoo shipped in the package (:mod:`stgen.utils.zoo`).

``bash scripts/build_zoo.sh`` (= ``python -m stgen.workflows.zoo build``) rebuilds it from scratch on Her2ST:

1. the embedded expression backbone, pre-trained on the 30 expression-only sections (the default corpus and
   config; ``--force`` re-trains even when cached);
2. HINGE, STFlow and ridge with default settings, trained on all five imaged sections (``test_section=None``);
3. each run copied into ``src/stgen/zoo/her2st-<model>/`` with its float weights stored as float16 wherever that
   moves no prediction by more than :data:`FP16_TOLERANCE` (checked on real spots of a training section,
   same seed), else as they are; the backbone likewise; ``manifest.json`` records every file's SHA-256, what
   each run was trained on, its panel size and the model's five-fold benchmark numbers.

Commit the re-exported files only when a default changes (a new zoo changes ``stgen predict --model
her2st-*`` predictions).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence
import numpy as np
from stgen.errors import InputError
from stgen.utils.io import atomic_dir, sha256_file, write_json
from stgen.utils.zoo import MANIFEST, ZOO_DIR, manifest

#: Largest change of any prediction (target units) that float16 storage may cause.
FP16_TOLERANCE = 1e-3

#: Models shipped, in ``stgen models`` order.
ZOO_MODELS = ("hinge", "stflow", "ridge")

#: Five-fold leave-one-section-out means on Her2ST with default settings (``stgen benchmark``, docs/results.md,
#: "all models" table); shown by ``stgen models`` beside each shipped run of that model.
BENCHMARK = {
    # issue 15 defaults with Macenko features (features.stain: auto): reports/issue15d/five
    "hinge": {"pcc50": 0.735, "pcc200": 0.670, "mse": 1.324, "gsc": 0.720, "ssc": 0.131},
    "stflow": {"pcc50": 0.694, "pcc200": 0.621, "mse": 1.522, "gsc": 0.749, "ssc": 0.267},
    "ridge": {"pcc50": 0.672, "pcc200": 0.605, "mse": 1.619, "gsc": 0.696, "ssc": 0.118},
}


def describe() -> list[dict]:
    """One row per built-in run: name, model, trained_on, sections, n_spots, panel_size, benchmark."""
    rows = []
    for name, e in sorted(manifest()["runs"].items(), key=lambda kv: (ZOO_MODELS.index(kv[1]["model"])
                                                                      if kv[1]["model"] in ZOO_MODELS else 99, kv[0])):
        rows.append({"name": name, **{k: e.get(k) for k in ("model", "trained_on", "sections", "n_spots",
                                                          "panel_size", "benchmark", "dtype")}})
    return rows


# ----------------------------------------------------------------------------- export


def _to_fp16(src: Path, dst: Path) -> None:
    """Copy a weights file with its float tensors/arrays as float16 (npz arrays outside float16's range, such
    as ridge's alpha grid, stay as they are)."""
    if src.suffix == ".safetensors":
        import torch
        from safetensors.torch import load_file, save_file

        t = load_file(src)
        save_file({k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in t.items()},
                  dst)
    else:
        with np.load(src, allow_pickle=False) as z:
            arrays = {k: _half_if_representable(z[k]) for k in z.files}
        np.savez(dst, **arrays)


def _half_if_representable(a: np.ndarray) -> np.ndarray:
    """``a`` as float16 when it is a float array whose values float16 can hold (|x| < 65504), else ``a``."""
    if not (np.issubdtype(a.dtype, np.floating) and a.ndim) or not np.isfinite(a).all() or np.abs(a).max() >= 65504:
        return a
    return a.astype(np.float16)


def _probe(data_dir: Path, cache_dir: Path, run_dir: Path, n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Features and spot xy of the first ``n`` spots of the run's first training section."""
    from stgen.data.dataset import as_dataset
    from stgen.workflows.rundir import read_run_config

    meta = json.loads((run_dir / "run.json").read_text())
    cfg = read_run_config(run_dir)
    from stgen.workflows.inputs import section_features

    a = as_dataset(data_dir).read(meta["train_sections"][0], require_image=True)[:n].copy()
    return section_features(a, cfg, cache_dir, progress=False), np.asarray(a.obsm["spatial"])


def _max_change(run_a: Path, run_b: Path, feats: np.ndarray, xy: np.ndarray) -> float:
    from stgen.workflows.rundir import load_run

    pa = load_run(run_a).predict(feats, xy=xy, seed=0)[0]
    try:
        pb = load_run(run_b).predict(feats, xy=xy, seed=0)[0]
    except (RuntimeError, InputError, ValueError):  # a model that does not take float16 weights: keep float32
        return float("inf")
    return float(np.abs(pa - pb).max())


def export_run(run_dir: Path, name: str, data_dir: Path, cache_dir: Path, zoo_dir: Path = ZOO_DIR) -> dict:
    """Copy RUN_DIR ``run_dir`` into ``zoo_dir/name`` (float16 weights where lossless within
    :data:`FP16_TOLERANCE`); returns its manifest entry."""
    meta = json.loads((run_dir / "run.json").read_text())
    if meta.get("test_section") is not None:
        raise InputError(f"{run_dir}: a shipped run is trained on every imaged section (fit with test_section=None); "
                         f"this one holds out {meta['test_section']}")
    weights = [p for p in run_dir.iterdir() if p.suffix in (".safetensors", ".npz")]
    feats, xy = _probe(data_dir, cache_dir, run_dir)
    with tempfile.TemporaryDirectory(prefix="stgen-zoo-") as tmp:
        half = Path(tmp) / name
        shutil.copytree(run_dir, half)
        for w in weights:
            _to_fp16(w, half / w.name)
        change = _max_change(run_dir, half, feats, xy)
        dtype = "float16" if change <= FP16_TOLERANCE else "float32"
        src = half if dtype == "float16" else run_dir
        with atomic_dir(zoo_dir / name) as out:
            for f in ("run.json", "config.yaml", *(w.name for w in weights)):
                shutil.copy2(src / f, out / f)
    _readable(zoo_dir / name)
    files = {f: sha256_file(zoo_dir / name / f) for f in sorted(p.name for p in (zoo_dir / name).iterdir())}
    return {"model": meta["model"], "dir": name, "files": files, "dtype": dtype, "fp16_max_change": change,
            "trained_on": "Her2ST (Andersson et al. 2021), all five imaged sections; HMHVG panel of the five",
            "sections": meta["train_sections"], "n_spots": meta["n_train_spots"], "panel_size": len(meta["panel"]),
            "config_hash": meta["config_hash"], "stgen_version": meta["stgen_version"],
            "benchmark": {"protocol": "five-fold leave-one-section-out on Her2ST, default settings (docs/results.md)",
                          **BENCHMARK.get(meta["model"], {})}}


def _readable(d: Path) -> None:
    """Package data is read by every user: folder 0755, files 0644 (temporary folders are created 0700)."""
    d.chmod(0o755)
    for f in d.iterdir():
        f.chmod(0o644)


def export_backbone(bdir: Path, zoo_dir: Path = ZOO_DIR) -> dict:
    """Copy a cached backbone folder (``backbone.json`` + ``backbone.safetensors``) into ``zoo_dir/backbone``
    as it is (float32: every HINGE fit trains on it, so it is not rounded); returns its manifest entry."""
    with atomic_dir(zoo_dir / "backbone") as out:
        for f in ("backbone.json", "backbone.safetensors"):
            shutil.copy2(bdir / f, out / f)
    _readable(zoo_dir / "backbone")
    files = {f: sha256_file(zoo_dir / "backbone" / f) for f in ("backbone.json", "backbone.safetensors")}
    meta = json.loads((bdir / "backbone.json").read_text())
    return {"dir": "backbone", "files": files, "corpus": meta["corpus"], "n_genes": len(meta["genes"]),
            "n_spots": meta.get("n_spots")}


def build_zoo(data_dir: Path, work: Path, cache_dir: Path, models: Sequence[str] = ZOO_MODELS,
              force_backbone: bool = False, zoo_dir: Path = ZOO_DIR, progress: bool = True) -> dict:
    """Rebuild the zoo (module docstring) into ``zoo_dir``; runs are fitted in ``work/runs/<model>`` (resumed:
    a finished run of the same configuration is reused). Shipped runs of models not in ``models`` keep their
    manifest entries (``--models hinge`` re-exports HINGE alone), as does the shipped backbone when no cached
    one was used. Returns the manifest written."""
    from stgen.backbones.pretrain import get_backbone
    from stgen.utils.io import sha256_json
    from stgen.workflows.config import StgenConfig
    from stgen.workflows.fit import fit

    cfg = StgenConfig()
    get_backbone(data_dir, cfg, cache_dir, progress=progress, force=force_backbone)
    bcache = cache_dir / "backbones"
    keys = [p for p in bcache.iterdir() if (p / "backbone.json").is_file()] if bcache.is_dir() else []
    try:  # runs of models not rebuilt now, and the backbone when none is cached, stay as shipped
        old = json.loads((zoo_dir / MANIFEST.name).read_text())
    except (OSError, ValueError):
        old = {"runs": {}, "backbones": {}}
    runs = {k: v for k, v in old.get("runs", {}).items() if v.get("model") not in models}
    backbones = {}
    for model in models:
        out = work / "runs" / model
        fit(data_dir, None, out, model=model, cfg=cfg, cache_dir=cache_dir, progress=progress, resume=True)
        runs[f"her2st-{model}"] = export_run(out, f"her2st-{model}", data_dir, cache_dir, zoo_dir)
    used = json.loads((work / "runs" / "hinge" / "run.json").read_text())["backbone"] if "hinge" in models else None
    for p in keys:  # the cached backbone the HINGE run was trained on (same corpus and config)
        m = json.loads((p / "backbone.json").read_text())
        if used is None or (m["corpus"] == used["corpus"] and m["config"] == used["config"]):
            backbones[p.name] = export_backbone(p, zoo_dir)
            break
    if not backbones:  # nothing cached (the shipped backbone was used): keep its entry
        backbones = dict(old.get("backbones", {}))
    man = {"format": 1, "runs": runs, "backbones": backbones}
    man["sha256"] = sha256_json({"runs": runs, "backbones": backbones})
    zoo_dir.mkdir(parents=True, exist_ok=True)
    write_json(zoo_dir / MANIFEST.name, man)
    return man


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stgen.workflows.zoo", description="rebuild the shipped model zoo")
    ap.add_argument("command", choices=["build"])
    ap.add_argument("--data", type=Path, default=None, help="Her2ST folder (default: ../shared/data/her2st)")
    ap.add_argument("--work", type=Path, default=Path("runs/zoo"), help="where the runs are fitted")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--models", default=",".join(ZOO_MODELS))
    ap.add_argument("--force-backbone", action="store_true", help="pre-train the backbone again")
    args = ap.parse_args(argv)
    from stgen.workflows.paths import default_cache_dir, default_data_dir

    man = build_zoo(args.data or default_data_dir(), args.work, args.cache or default_cache_dir(),
                    [m.strip() for m in args.models.split(",") if m.strip()], args.force_backbone)
    for name, e in man["runs"].items():
        print(f"{name}: {e['dtype']} (fp16 max change {e['fp16_max_change']:.2e}), panel {e['panel_size']} genes")


if __name__ == "__main__":
    main()
