"""The Python API (``stgen.read/fit/predict/evaluate``) gives what the CLI gives, and refuses what it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from model_fixtures import TINY, synthetic_her2st

import stgen
from stgen.errors import InputError


@pytest.fixture
def her2st(tmp_path, monkeypatch):
    from stgen.data.panel import default_vocab_path, load_vocabulary

    if default_vocab_path() is None:
        pytest.skip("CellFM vocabulary not available")
    synthetic_her2st(tmp_path / "her2st", load_vocabulary()[100:130], np.random.default_rng(0))
    monkeypatch.setenv("STGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "her2st"


def test_api_read_fit_predict_evaluate_equals_the_cli(her2st, tmp_path, one_thread):
    from typer.testing import CliRunner

    from stgen.cli import app

    sections = stgen.read(her2st)
    assert [a.uns["stgen"]["section"] for a in sections] == ["A1", "A2", "A3", "B1", "B2"]
    a1 = stgen.read(her2st, sections=["A1"])[0]
    assert a1.obsm["spatial"].shape == (a1.n_obs, 2) and a1.n_vars == 30

    cfg = {k: TINY[k] for k in ("data", "features")}
    run = stgen.fit(her2st, test_section="A1", model="ridge", out=tmp_path / "run", config=cfg, progress=False)
    assert run.meta["model"] == "ridge" and run.run_dir == tmp_path / "run" and len(run.panel) == 30
    image = next((her2st / "ST-imgs" / "A" / "A1").glob("*.jpg"))
    spots = her2st / "ST-spotfiles" / "A1_selection.tsv"
    pred = stgen.predict(run, image=image, spots=spots, progress=False)
    m = stgen.evaluate(pred, a1)

    # the same through the CLI
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / "run"), "--image", str(image), "--spots",
                                 str(spots), "--out", str(tmp_path / "p.h5ad"), "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["evaluate", "--pred", str(tmp_path / "p.h5ad"), "--counts",
                                 str(her2st / "ST-cnts" / "A1.tsv.gz"), "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    cli = json.loads((tmp_path / "m.json").read_text())
    for k in ("pcc50", "pcc200", "mse", "mae", "gsc"):
        assert m[k] == pytest.approx(cli[k], abs=1e-9), k
    assert stgen.evaluate(tmp_path / "p.h5ad", her2st / "ST-cnts" / "A1.tsv.gz")["mse"] == pytest.approx(m["mse"])
    assert np.array_equal(pred.X, stgen.predict(tmp_path / "run", image=image, spots=spots, progress=False).X)


def test_api_errors_name_the_bad_input(her2st, tmp_path):
    with pytest.raises(InputError, match="Z9"):
        stgen.fit(her2st, test_section="Z9", model="ridge", out=tmp_path / "x", progress=False)
    with pytest.raises(InputError, match="nope"):
        stgen.fit(her2st, test_section="A1", model="nope", out=tmp_path / "x", progress=False)
    with pytest.raises(InputError, match="no run.json"):
        stgen.predict(tmp_path, image=tmp_path / "x.jpg")
    assert not (tmp_path / "x").exists()
    with pytest.raises(AttributeError):
        stgen.not_an_api_function  # noqa: B018
