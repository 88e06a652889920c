"""The model zoo: shipped runs load, match their config hash and predict; names, SHA-256 checks, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from model_fixtures import hest_ridge_run
from reader_fixtures import make_hest_sample
from stgen.cli import app
from stgen.errors import InputError
from stgen.utils import zoo as zoo_utils
from stgen.workflows.config import StgenConfig
from stgen.workflows.fit import fit
from stgen.workflows.rundir import config_hash, load_run


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch, one_thread):
    """A ridge run fitted on every section of a synthetic HEST folder, exported into a zoo in tmp_path."""
    from stgen.workflows.zoo import export_run

    hest, run, _ = hest_ridge_run(tmp_path)
    meta = json.loads((run / "run.json").read_text())
    assert meta["test_section"] is None and meta["train_sections"] == ["S0", "S1", "S2"]
    zdir = tmp_path / "zoo"
    entry = export_run(run, "tiny-ridge", hest, tmp_path / "cache", zdir)
    (zdir / "manifest.json").write_text(json.dumps({"runs": {"tiny-ridge": entry}, "backbones": {}}))
    monkeypatch.setattr(zoo_utils, "ZOO_DIR", zdir)
    return hest, run, zdir, entry


def test_export_keeps_predictions_and_names_resolve(tiny_zoo, tmp_path):
    hest, run, zdir, entry = tiny_zoo
    assert entry["dtype"] in ("float16", "float32") and entry["fp16_max_change"] >= 0
    if entry["dtype"] == "float16":
        assert entry["fp16_max_change"] <= 1e-3
    shipped = load_run("tiny-ridge")
    assert shipped.run_dir == zdir / "tiny-ridge" and shipped.panel == load_run(run).panel
    out = tmp_path / "pred.h5ad"
    r = _invoke("predict", "--model", "tiny-ridge", "--image", hest / "wsis" / "S1.tif", "--out", out,
                "--cache", tmp_path / "cache", "--quiet")
    assert r.exit_code == 0, r.output
    r = _invoke("predict", "--model", "nosuch-model", "--image", hest / "wsis" / "S1.tif", "--out", out, "--quiet")
    assert r.exit_code == 2 and "built-in: tiny-ridge" in r.output
    r = _invoke("models")
    assert r.exit_code == 0 and "tiny-ridge: ridge" in r.output and "S0, S1, S2" in r.output


def test_an_edited_shipped_file_is_refused(tiny_zoo):
    _, _, zdir, _ = tiny_zoo
    p = zdir / "tiny-ridge" / "run.json"
    p.write_text(p.read_text().replace('"model"', '"model" ', 1))
    with pytest.raises(InputError, match=r"does not match its SHA-256.*reinstall stgen"):
        load_run("tiny-ridge")
    p.unlink()
    with pytest.raises(InputError, match=r"is missing; reinstall"):
        load_run("tiny-ridge")


def test_a_held_out_run_is_not_exported(tmp_path, one_thread):
    from stgen.workflows.zoo import export_run

    hest = tmp_path / "hest"
    for i in range(2):
        make_hest_sample(hest, f"S{i}", n_spots=40, seed=i)
    cfg = StgenConfig.from_dict({"features": {"encoder": "rgb-stats"}, "data": {"n_top": 50}})
    fit(hest, "S1", tmp_path / "run", model="ridge", cfg=cfg, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(InputError, match="holds out S1"):
        export_run(tmp_path / "run", "x", hest, tmp_path / "cache", tmp_path / "zoo")


SHIPPED = zoo_utils.zoo_names()


@pytest.mark.skipif(not SHIPPED, reason="this checkout ships no zoo")
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_run_loads_matches_its_config_hash_and_predicts(name, one_thread):
    run = load_run(name)
    assert config_hash(run.cfg, run.meta["model"], None) == run.meta["config_hash"]
    n = 12
    rng = np.random.default_rng(0)
    feats = rng.random((n, run.meta["feature_dim"]), dtype=np.float32)
    xy = np.stack(np.meshgrid(np.arange(4) * 300.0 + 500, np.arange(3) * 300.0 + 500), -1).reshape(-1, 2)
    mean, std = run.predict(feats, xy=xy, samples=2, steps=2, seed=0)
    assert mean.shape == std.shape == (n, len(run.panel)) and np.isfinite(mean).all()


@pytest.mark.skipif(not zoo_utils.manifest()["backbones"], reason="this checkout ships no backbone")
def test_shipped_backbone_is_found_without_pretraining(tmp_path, monkeypatch):
    from stgen.backbones import pretrain
    from stgen.workflows.paths import default_data_dir

    try:
        data = default_data_dir()
    except InputError:
        pytest.skip("Her2ST not available")
    monkeypatch.setattr(pretrain, "pretrain_backbone", lambda *a, **k: pytest.fail("pre-trained instead"))
    bb, meta = pretrain.get_backbone(data, StgenConfig(), tmp_path / "empty-cache", progress=False)
    assert len(bb.genes) == len(meta["genes"]) and meta["corpus"]
