"""Several processes (Lightning DDP on CPU / gloo): HINGE trained on 2 processes ends with the weights of a
1-process fit up to reduction order (the global batch is split, not multiplied); FLAG runs and agrees across ranks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Lightning's `ddp` strategy starts the other processes by re-running the launching command, so the
# distributed fit runs in a script (not inside pytest); the test imports the same file for the 1-process fit
SCRIPT = '''
import json, sys
import numpy as np
import torch
from safetensors.torch import save_file

import stgen.models.flag.training as FT
import stgen.models.hinge.training as HT
import stgen.training.state as TS
import stgen.training.trainer as TR
from stgen.backbones.embedded import BackboneConfig, ExpressionBackbone
from stgen.models.flag.config import FlagConfig
from stgen.models.flag.network import FLAG
from stgen.models.hinge.config import HingeConfig
from stgen.models.hinge.network import HINGE
from stgen.nn.graph import build_spot_graph
from stgen.sampling.masking import MaskSchedule
from model_fixtures import flag_toy_sections

GENES = [f"G{i}" for i in range(12)]


def hinge(devices, strategy):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(81, 6, generator=g)  # 65 training spots: batches 16, 16, 16, 16, 1 (fewer than processes)
    y = torch.nn.functional.softplus(feats @ torch.randn(6, 12, generator=g)) + 0.1 * torch.rand(81, 12, generator=g)
    torch.manual_seed(0)
    # SoftNorm's learned eta (a scalar starting at 0) gets a gradient that nearly cancels over the whole batch:
    # Adam's normalised update turns its rounding noise into lr-sized differences, so eta stays fixed here (its
    # ablation setting); every other parameter agrees to ~1e-6 after 5 epochs
    bb = ExpressionBackbone(GENES, BackboneConfig(dim=16, n_layers=1, n_heads=2, value_bins=8))
    model = HINGE(bb, GENES, 6, 10, HingeConfig(soft_norm=False))
    cfg = HingeConfig(T=10, lr=5e-3, batch_size=16, max_epochs=5, es_warmup=2, patience=1, curriculum_epochs=2,
                           milestones=[3], val_fraction=0.2, val_steps=2, cond_dim=16, time_dim=8)
    with TR.training_context(accelerator="cpu", devices=devices, strategy=strategy):
        hist = HT.train_hinge(model, feats.numpy(), y.numpy(), cfg, MaskSchedule(12, T=10), progress=False)
    return model, hist


def flag(devices, strategy):
    sections = flag_toy_sections()
    tiny = dict(dim=16, graph_layers=1, graph_heads=2, dit_layers=2, dit_heads=2, mlp_ratio=2.0, align_layer=1)
    torch.manual_seed(0)
    model = FLAG(FlagConfig(**tiny), 10, 6, torch.randn(10, 8))
    cfg = FlagConfig(**tiny, max_steps=12, val_every=6, crop_spots=20, val_steps=2, lr=5e-3, knn=8)
    with TR.training_context(accelerator="cpu", devices=devices, strategy=strategy):
        hist = FT.train_flag(model, sections, cfg, lambda xy, f: build_spot_graph(xy, f, k=8), progress=False)
    return model, hist


if __name__ == "__main__":
    torch.set_num_threads(1)
    which, devices, strategy, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    model, hist = (hinge if which == "hinge" else flag)(devices, strategy)
    rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
    # every rank writes its own copy here, to check that they agree (stgen itself writes on rank 0 only)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}.rank{rank}.safetensors")
    with open(f"{out}.rank{rank}.json", "w") as fh:
        json.dump({k: v for k, v in hist.items()}, fh)
'''


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location("stgen_ddp_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path: Path, which: str, devices: int, strategy: str) -> Path:
    out = tmp_path / f"{which}-{devices}-{strategy}"
    tests = str(Path(__file__).resolve().parents[1])  # the script imports model_fixtures
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)}
    env.pop("PYTEST_CURRENT_TEST", None)
    r = subprocess.run([sys.executable, str(tmp_path / "ddp_script.py"), which, str(devices), strategy, str(out)],
                       env=env, capture_output=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    return out


@pytest.fixture
def script(tmp_path):
    (tmp_path / "ddp_script.py").write_text(SCRIPT)
    return tmp_path


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_hinge_on_two_ddp_processes_matches_one_process(script, one_thread, strategy):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    model, hist = _load_script(script / "ddp_script.py").hinge(1, "auto")
    one = model.state_dict()
    out = _run(script, "hinge", 2, strategy)
    # ddp: both processes run the script to its end; ddp_spawn: the launching process gets rank 0's weights,
    # best-weights history and counters back (stgen.training.trainer._CarryStateLauncher)
    ranks = (0, 1) if strategy == "ddp" else (0,)
    weights = [load_file(f"{out}.rank{r}.safetensors") for r in ranks]
    hists = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in ranks]
    for w, h in zip(weights, hists):  # the 1-process weights up to reduction order, and the same history
        assert w.keys() == one.keys()
        for k in one:
            assert torch.allclose(w[k], one[k], atol=1e-5, rtol=0), k
        assert (h["epochs_run"], h["best_epoch"]) == (hist["epochs_run"], hist["best_epoch"])
        for a, b in zip(h["history"], hist["history"], strict=True):
            assert a["val_mse"] == pytest.approx(b["val_mse"], abs=1e-5)
            assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)  # the global batch's loss
    assert all(h == hists[0] for h in hists)


def test_flag_on_two_ddp_processes_trains_one_crop_per_process(script):
    out = _run(script, "flag", 2, "ddp")
    ranks = [load_file(f"{out}.rank{r}.safetensors") for r in (0, 1)]
    hists = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # DDP keeps the processes in step
    assert hists[0] == hists[1] and hists[0]["steps_run"] == 12 and len(hists[0]["history"]) == 2
