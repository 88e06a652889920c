"""End to end on the real Her2ST data through the CLI: fit -> predict -> evaluate.

Small configuration (two training sections, a tiny backbone pre-trained on two
expression-only sections, a few epochs) so it runs in about two minutes on 2
CPU cores. Skipped when ../shared/data/her2st is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from stgen.cli import app
from stgen.data.her2st import read_counts
from stgen.data.targets import transform_counts
from stgen.metrics import evaluate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (DATA / "ST-cnts").is_dir(), reason="real Her2ST data not available"),
]

SMALL = {
    "data": {"train_sections": ["C3", "C4"]},
    "pretrain": {"corpus": ["C1", "D1"], "genes_per_step": 256, "dim": 64, "n_layers": 2,
                 "n_heads": 4, "value_bins": 32, "epochs": 3, "batch_size": 64},
    "hinge": {"max_epochs": 6, "es_warmup": 6, "curriculum_epochs": 2, "milestones": [4], "lr": 1e-3,
              "samples": 3, "steps": 5},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    (d / "small.yaml").write_text(yaml.safe_dump(SMALL))
    return d


def _invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def test_fit_predict_evaluate_hinge_on_real_her2st(workdir):
    cache = workdir / "cache"
    run = workdir / "run_hinge"
    _invoke("fit", "--data", DATA, "--test-section", "C2", "--out", run, "--model", "hinge",
            "--config", workdir / "small.yaml", "--cache", cache, "--quiet")
    meta = json.loads((run / "run.json").read_text())
    assert meta["train_sections"] == ["C3", "C4"] and meta["test_section"] == "C2"
    assert len(meta["panel"]) >= 50
    assert "C2" not in meta["backbone"]["corpus"]

    img = next((DATA / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    pred_path = workdir / "C2.h5ad"
    _invoke("predict", "--model", run, "--image", img, "--spots", DATA / "ST-spotfiles" / "C2_selection.tsv",
            "--out", pred_path, "--cache", cache, "--quiet")
    pred = ad.read_h5ad(pred_path)
    assert pred.n_obs == 187 and list(pred.var_names) == meta["panel"]
    assert pred.obs_names[0] == "25x13" or "x" in pred.obs_names[0]
    assert pred.obsm["spatial"].shape == (187, 2)
    assert pred.layers["std"].shape == pred.shape and (pred.layers["std"] >= 0).all()
    assert pred.layers["std"].max() > 0  # samples differ
    assert pred.uns["stgen"]["units"] == "log2" and pred.uns["stgen"]["samples"] == 3
    assert np.isfinite(pred.X).all()

    out = workdir / "metrics.json"
    _invoke("evaluate", "--pred", pred_path, "--counts", DATA / "ST-cnts" / "C2.tsv.gz", "--out", out)
    m = json.loads(out.read_text())
    for k in ("pcc50", "pcc200", "mse", "mae", "gsc"):
        assert np.isfinite(m[k]), k

    # reference: the training-mean predictor (constant, so r is undefined) with a little
    # jitter gives the chance level of PCC-50 for this panel; the model must beat it.
    truth = read_counts(DATA / "ST-cnts" / "C2.tsv.gz")
    t = transform_counts(truth[pred.obs_names, meta["panel"]].X, "log2")
    train_mean = np.concatenate([
        transform_counts(read_counts(DATA / "ST-cnts" / f"{s}.tsv.gz")[:, meta["panel"]].X, "log2")
        for s in ("C3", "C4")]).mean(0)
    rng = np.random.default_rng(0)
    chance = evaluate(train_mean + 1e-3 * rng.standard_normal(t.shape), t, meta["panel"])
    assert m["pcc50"] > chance["pcc50"] + 0.1


def test_ridge_and_bad_inputs_through_cli(workdir):
    cache = workdir / "cache"
    run = workdir / "run_ridge"
    _invoke("fit", "--data", DATA, "--test-section", "C2", "--out", run, "--model", "ridge",
            "--config", workdir / "small.yaml", "--cache", cache, "--quiet")
    res = CliRunner().invoke(app, ["fit", "--data", str(DATA), "--test-section", "Z9", "--out", str(workdir / "bad"),
                                   "--cache", str(cache), "--quiet"])
    assert res.exit_code == 2 and "Z9" in res.output
    assert not (workdir / "bad").exists()
    empty = workdir / "empty.csv"
    empty.write_text("barcode,pixel_x,pixel_y\n")
    img = next((DATA / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    res = CliRunner().invoke(app, ["predict", "--model", str(run), "--image", str(img), "--spots", str(empty),
                                   "--out", str(workdir / "x.h5ad"), "--cache", str(cache)])
    assert res.exit_code == 2 and "empty.csv" in res.output
    assert not (workdir / "x.h5ad").exists()
    far = workdir / "far.csv"
    far.write_text("barcode,pixel_x,pixel_y\na,10,10\nb,99999,10\n")
    res = CliRunner().invoke(app, ["predict", "--model", str(run), "--image", str(img), "--spots", str(far),
                                   "--out", str(workdir / "y.h5ad"), "--cache", str(cache)])
    assert res.exit_code == 2 and "outside the image" in res.output
    assert not (workdir / "y.h5ad").exists()
