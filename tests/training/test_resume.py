"""Checkpoints and resuming: an interrupted fit (SIGKILL, SIGTERM) resumed with --resume ends with the
weights of an uninterrupted fit; the rules of RUN_DIR.partial (stgen.workflows.fit.fit, stgen.training.trainer)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import stgen.models.flag.training as FT
import stgen.models.hinge.training as HT
import stgen.training.state as TS
import stgen.training.trainer as TR
from stgen.models.flag.config import FlagConfig
from stgen.models.hinge.config import HingeConfig
from stgen.nn.graph import build_spot_graph
from stgen.sampling.masking import MaskSchedule
from stgen.backbones.embedded import BackboneConfig, ExpressionBackbone
from stgen.models.flag.network import flag_network
from stgen.models.hinge.network import HINGE
from model_fixtures import synthetic_her2st as _synthetic_her2st  # imaged A1-A3, expression-only B1, B2
from model_fixtures import flag_toy_sections

pytestmark = pytest.mark.usefixtures("one_thread")

GENES = [f"G{i}" for i in range(12)]


class _Kill(Exception):
    """Stands for SIGKILL in the in-process tests: the fit dies, its last end-of-epoch checkpoint stays."""


def _stop_at(monkeypatch, module_cls, epoch: int, batch: int, how: str) -> None:
    """Interrupt a fit after training batch ``batch`` of ``epoch``: ``kill`` raises, ``term`` sends SIGTERM
    (after the module's own ``on_train_batch_end``, e.g. FLAG's weight EMA update)."""
    own = module_cls.on_train_batch_end

    def hook(self, outputs, batch_, batch_idx):
        own(self, outputs, batch_, batch_idx)
        if (self.current_epoch, batch_idx) == (epoch, batch):
            if how == "term":
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: stop after this step
            else:
                raise _Kill()

    monkeypatch.setattr(module_cls, "on_train_batch_end", hook)


def _same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), k


# ------------------------------------------------------------------ HINGE / FLAG in process
def _hinge_fit(ckpt_dir: Path, resume: bool = False):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(90, 6, generator=g)
    y = torch.nn.functional.softplus(feats @ torch.randn(6, 12, generator=g)) + 0.1 * torch.rand(90, 12, generator=g)
    torch.manual_seed(0)
    model = HINGE(ExpressionBackbone(GENES, BackboneConfig(dim=16, n_layers=1, n_heads=2, value_bins=8)), GENES, 6, 10)
    # lr high enough that early stopping (patience 1 after a 2-epoch warm-up) ends the fit before max_epochs
    cfg = HingeConfig(T=10, lr=2e-2, batch_size=16, max_epochs=30, es_warmup=2, patience=1, curriculum_epochs=2,
                           milestones=[3], val_fraction=0.2, val_steps=2, cond_dim=16, time_dim=8)
    last = ckpt_dir / "last.ckpt"
    with TR.training_context(ckpt_dir=ckpt_dir, resume_from=last if resume else None):
        hist = HT.train_hinge(model, feats.numpy(), y.numpy(), cfg, MaskSchedule(12, T=10), progress=False)
    return model.state_dict(), hist


def test_hinge_resume_is_identical_to_an_uninterrupted_fit(tmp_path, monkeypatch):
    ref, ref_hist = _hinge_fit(tmp_path / "ref")
    assert ref_hist["epochs_run"] < 30, "early stopping must end the reference fit"
    info = json.loads((tmp_path / "ref" / "last.json").read_text())
    assert info == {**info, "epoch": ref_hist["epochs_run"], "mid_epoch": False}
    # the checkpoint is read with weights_only=True: tensors and primitive containers only
    ck = torch.load(tmp_path / "ref" / "last.ckpt", weights_only=True)
    assert {"best_state", "history", "rng", "data"} <= set(ck["stgen"])
    assert not any(k.startswith("model.backbone.") for k in ck["state_dict"])  # the frozen backbone is left out
    cases = [(1, 1, "kill"),  # during the curriculum: resumes from the end of epoch 0
             (2, 2, "term"),  # SIGTERM mid-epoch: a checkpoint of that step, the epoch's later batches follow
             "end"]  # killed after the checkpoint of the epoch early stopping stopped at
    for case in cases:
        run = tmp_path / str(case)
        with monkeypatch.context() as m:
            if case == "end":
                m.setattr(HT.HingeModule, "on_train_end", lambda self: (_ for _ in ()).throw(_Kill()), raising=False)
            else:
                _stop_at(m, HT.HingeModule, *case)
            with pytest.raises((_Kill, TR.TrainingInterrupted)) as e:
                _hinge_fit(run)
        if case != "end" and case[2] == "term":
            assert e.type is TR.TrainingInterrupted and "mid-epoch" in str(e.value)
            assert json.loads((run / "last.json").read_text())["mid_epoch"]
        state, hist = _hinge_fit(run, resume=True)
        _same_weights(state, ref)
        assert hist["history"] == ref_hist["history"], case
        assert (hist["epochs_run"], hist["best_epoch"]) == (ref_hist["epochs_run"], ref_hist["best_epoch"]), case


def _flag_fit(ckpt_dir: Path, resume: bool = False, ema: float | None = None, ensemble: int = 1):
    sections = flag_toy_sections()
    tiny = dict(dim=16, graph_layers=1, graph_heads=2, dit_layers=2, dit_heads=2, mlp_ratio=2.0, align_layer=1,
                dropout=0.1)  # dropout: the global RNG is reseeded per step, so it resumes exactly too
    torch.manual_seed(0)
    cfg = FlagConfig(**tiny, max_steps=40, val_every=10, crop_spots=20, val_steps=2, lr=5e-3, knn=8, ema=ema,
                     ensemble=ensemble)
    model = flag_network(cfg, 10, 6, torch.randn(10, 8))
    last = ckpt_dir / "last.ckpt"
    with TR.training_context(ckpt_dir=ckpt_dir, resume_from=last if resume else None):
        hist = FT.train_flag(model, sections, cfg, lambda xy, f: build_spot_graph(xy, f, k=8), progress=False)
    return model.state_dict(), hist


# with EMA the averaged weights resume too; an ensemble resumes every member
@pytest.mark.parametrize("ema, ensemble", [(None, 1), (0.9, 1), (None, 2)])
def test_flag_resume_is_identical_to_an_uninterrupted_fit(tmp_path, monkeypatch, ema, ensemble):
    ref, ref_hist = _flag_fit(tmp_path / "ref", ema=ema, ensemble=ensemble)
    assert ref_hist["steps_run"] == 40 and len(ref_hist["history"]) == 4
    for case in [(2, 0, "kill"), (1, 4, "term")]:
        run = tmp_path / "-".join(map(str, case))
        with monkeypatch.context() as m:
            _stop_at(m, FT.FlagModule, *case)
            with pytest.raises((_Kill, TR.TrainingInterrupted)):
                _flag_fit(run, ema=ema, ensemble=ensemble)
        info = json.loads((run / "last.json").read_text())
        assert info["global_step"] == (20 if case[2] == "kill" else 15)
        state, hist = _flag_fit(run, resume=True, ema=ema, ensemble=ensemble)
        _same_weights(state, ref)
        assert hist["history"] == ref_hist["history"] and hist["best_step"] == ref_hist["best_step"]


def test_epoch_sampler_depends_on_seed_and_epoch_only_and_skips_on_resume():
    s = TS.EpochSampler(10, seed=3, batch_size=4)
    s.set_epoch(2)
    batches = list(s)
    assert len(s) == len(batches) == 3 and sorted(sum(batches, [])) == list(range(10))
    assert list(s) == batches and list(TS.EpochSampler(10, seed=3, batch_size=4).order(2)) == sum(batches, [])
    s.set_epoch(3)
    assert sum(list(s), []) != sum(batches, [])
    s.resume_at(2, 1)  # epoch 2 was interrupted after 1 batch
    s.set_epoch(2)
    assert list(s) == batches[1:] and list(s) == batches  # the skip applies once
    k = TS.EpochSampler(3, seed=0, keyed=True)
    k.set_rank(1, 2)
    k.set_epoch(1)
    assert list(k) == [7, 9, 11]  # (epoch * n + i) * world + rank


# ------------------------------------------------------------------ stgen fit: SIGKILL / SIGTERM and --resume
# runs `stgen fit` with every training epoch slowed down by DELAY seconds (to interrupt it reliably mid-way);
# the delay changes nothing that is computed
DRIVER = """
import sys, time
import stgen.models.hinge.training as HT
delay = float(sys.argv[1])
start = HT.HingeModule.on_train_epoch_start
def slow(self):
    time.sleep(delay)
    start(self)
HT.HingeModule.on_train_epoch_start = slow
from stgen.cli import app
app(sys.argv[2:], prog_name="stgen")
"""


def _wait_for_epoch(proc, info: Path, epochs: int, timeout: float = 90.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the fit ended (rc {proc.returncode}) before it was interrupted: "
                                 f"{proc.stderr.read().decode()[-2000:]}")
        try:
            if json.loads(info.read_text())["epoch"] >= epochs:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def test_stgen_fit_killed_or_terminated_resumes_to_the_uninterrupted_weights(tmp_path):
    from stgen.cli import app
    from stgen.data.panel import default_vocab_path, load_vocabulary

    if default_vocab_path() is None:
        pytest.skip("CellFM vocabulary not available")
    _synthetic_her2st(tmp_path / "her2st", load_vocabulary()[100:130], np.random.default_rng(0))
    cfg = {"data": {"n_top": 20}, "features": {"encoder": "rgb-stats", "patch_px": 16},
           "pretrain": {"dim": 16, "n_layers": 1, "n_heads": 2, "value_bins": 8, "epochs": 1, "genes_per_step": 30},
           "hinge": {"T": 5, "cond_dim": 16, "time_dim": 8, "max_epochs": 8, "es_warmup": 3, "patience": 2,
                     "curriculum_epochs": 2, "milestones": [3], "batch_size": 8, "val_steps": 2, "lr": 5e-3}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "STGEN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    runs = tmp_path / "runs"
    base = ["fit", "--data", str(tmp_path / "her2st"), "--test-section", "A1", "--cache", str(tmp_path / "cache"),
            "--quiet"]
    args = [*base, "--config", str(tmp_path / "cfg.yaml")]
    cli = CliRunner()
    r = cli.invoke(app, [*args, "--out", str(runs / "ref")])  # uninterrupted (fills the backbone/feature cache)
    assert r.exit_code == 0, r.output
    ref = load_file(runs / "ref" / "model.safetensors")
    (tmp_path / "driver.py").write_text(DRIVER)

    def start(out: str, delay: float = 0.4) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(delay), *args, "--out", out],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # SIGKILL after 2 epochs: the end-of-epoch checkpoint stays in runs/a.partial, no RUN_DIR, no stray folder
    out, part = runs / "a", runs / "a.partial"
    proc = start(str(out))
    _wait_for_epoch(proc, part / "checkpoints" / "last.json", 2)
    proc.kill()
    proc.wait()
    assert not out.exists() and (part / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((part / "resume.json").read_text())["model"] == "hinge"
    r = cli.invoke(app, [*args, "--out", str(out)])  # without --resume: refused, nothing lost
    assert r.exit_code == 2 and "--resume" in r.output and (part / "checkpoints" / "last.ckpt").is_file()
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**cfg, "hinge": {**cfg["hinge"], "lr": 1e-3}}))
    r = cli.invoke(app, [*base, "--config", str(other), "--out", str(out), "--resume"])
    assert r.exit_code == 2 and "another configuration" in r.output
    r = cli.invoke(app, [*args, "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    _same_weights(load_file(out / "model.safetensors"), ref)
    assert not part.exists()
    assert json.loads((out / "run.json").read_text())["training"]["history"] == \
        json.loads((runs / "ref" / "run.json").read_text())["training"]["history"]

    # SIGTERM mid-way: the fit stops after its current step with a checkpoint (exit 143); --resume completes it
    out, part = runs / "b", runs / "b.partial"
    proc = start(str(out))
    _wait_for_epoch(proc, part / "checkpoints" / "last.json", 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()[-2000:]
    assert "interrupted" in err.decode() and "--resume" in err.decode()
    assert not out.exists() and (part / "checkpoints" / "last.ckpt").is_file()
    r = cli.invoke(app, [*args, "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    _same_weights(load_file(out / "model.safetensors"), ref)
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b", "ref"]  # no .partial, no temporary folders left
    # --resume of a finished run of the same configuration: nothing to do, the run is left as it is
    stamp = (out / "run.json").stat().st_mtime_ns
    r = cli.invoke(app, [*args, "--out", str(out), "--resume"])
    assert r.exit_code == 0 and (out / "run.json").stat().st_mtime_ns == stamp
