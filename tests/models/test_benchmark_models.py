"""Every model through the pipeline and `stgen benchmark --models all` on a tiny synthetic Her2ST folder."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from stgen.workflows.config import StgenConfig
from stgen.errors import InputError
from stgen.models.registry import GENERATIVE, MODELS, SPOT_MODELS, expand_models, spot_model
from stgen.workflows.rundir import config_hash
from stgen.models.hinge.config import PAPER_PRESET
from model_fixtures import TINY  # noqa: E402  (tiny settings of every model)



def test_registry_names_all_and_unknown_models():
    assert expand_models("all") == list(MODELS) and len(MODELS) == 10
    assert expand_models("stem, ridge,stem") == ["stem", "ridge"]
    assert set(GENERATIVE) == {"hinge", "hinge-paper", "flag", "stem", "stflow"}
    with pytest.raises(InputError, match="available: hinge, hinge-paper, flag, ridge, hifusion, stnet, bleep, stem, stflow, triplex"):
        expand_models("hinge,nope")
    with pytest.raises(InputError, match="no model"):
        expand_models(" , ")
    for name in SPOT_MODELS:
        cls = spot_model(name)
        assert cls.name == name and (name in GENERATIVE) == cls.generative
        assert isinstance(cls.section_of(StgenConfig()), cls.config_cls)


def test_model_sections_only_enter_their_own_config_hash():
    base = StgenConfig()
    # computed before the benchmark models existed: cached hinge/ridge/flag runs stay valid
    # new HINGE defaults (issue 15: head, K=3, 2 draws; then spatial context, condition dropout), and
    # Macenko-normalised features for hinge and ridge (features.stain: auto) with HINGE's sd x1.78
    assert config_hash(base, "hinge", "C2") == "690685a639e933bf"
    assert config_hash(base, "ridge", "C2") == "016da97f38ba4fb5"
    # the paper preset hashes its own sampler and features: HINGE's defaults no longer enter its hash
    assert config_hash(base, "hinge-paper", "C2") == "cad64cdab57c723c"
    moved = StgenConfig.from_dict({"hinge": {"sd_scale": 2.5, "samples": 4, "context_radii": [1.5]}})
    assert config_hash(moved, "hinge-paper", "C2") == config_hash(base, "hinge-paper", "C2")
    assert config_hash(moved, "hinge", "C2") != config_hash(base, "hinge", "C2")
    assert config_hash(StgenConfig.from_dict({"hinge": {"lr": 1e-3}}), "hinge-paper", "C2") != \
        config_hash(base, "hinge-paper", "C2")  # a field the preset keeps still counts
    # new FLAG defaults (issue 16: contextual alignment, inference-sampler validation, Euler 5 steps; then two
    # ensemble members of 2,000 steps and sd_scale 3.24; the one-network defaults hashed b62e274ee50947c1)
    assert config_hash(base, "flag", "C2") == "494b958af6995dbf"
    one = StgenConfig.from_dict({"flag": {"ensemble": 1, "max_steps": 4000, "sd_scale": 1.0}})
    assert config_hash(one, "flag", "C2") == "b62e274ee50947c1"  # fields added at their old value: old runs stay
    other = StgenConfig.from_dict({"stem": {"samples": 7}, "bleep": {"top_k": 3}})
    for m in ("hinge", "ridge", "flag", "hifusion", "stnet", "stflow"):
        assert config_hash(other, m, "C2") == config_hash(base, m, "C2"), m
    for m in ("stem", "bleep"):
        assert config_hash(other, m, "C2") != config_hash(base, m, "C2"), m
    # YAML reads 1e-3 as a string: numbers are coerced; a bad value names its key
    assert StgenConfig.from_dict({"stnet": {"lr": "1e-3"}}).stnet.lr == pytest.approx(1e-3)
    assert StgenConfig.from_dict({"hifusion": {"lr": "1e-3"}}).hifusion.lr == pytest.approx(1e-3)
    with pytest.raises(InputError, match="stem.dim must be a number"):
        StgenConfig.from_dict({"stem": {"dim": True}})
    with pytest.raises(InputError, match="hifusion.dropout must be in"):
        StgenConfig.from_dict({"hifusion": {"dropout": 1.0}})
    with pytest.raises(InputError, match="stnet.max_epochs"):
        StgenConfig.from_dict({"stnet": {"max_epochs": "many"}})
    with pytest.raises(InputError, match="hifusion.nope"):
        StgenConfig.from_dict({"hifusion": {"nope": 1}})


def _setup(tmp_path, monkeypatch) -> tuple[list[str], str]:
    from model_fixtures import synthetic_her2st as _synthetic_her2st

    from stgen.data.panel import default_vocab_path, load_vocabulary

    if default_vocab_path() is None:
        pytest.skip("CellFM vocabulary not available")
    markers = ["ERBB2", "FASN", "GNAS"]
    genes = markers + [g for g in load_vocabulary()[100:130] if g not in markers][:27]
    _synthetic_her2st(tmp_path / "her2st", genes, np.random.default_rng(3))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(TINY))
    monkeypatch.setenv("STGEN_CACHE", str(tmp_path / "cache"))
    return ["--data", str(tmp_path / "her2st"), "--config", str(tmp_path / "cfg.yaml"), "--quiet"], str(tmp_path)


def test_fit_predict_round_trip_for_every_benchmark_model(tmp_path, monkeypatch, one_thread):
    from typer.testing import CliRunner

    from stgen.workflows.predict import sampler_defaults

    from stgen.cli import app
    from stgen.workflows.predict import predict

    common, _ = _setup(tmp_path, monkeypatch)
    image = next((tmp_path / "her2st" / "ST-imgs" / "A" / "A1").glob("*.jpg"))
    spots = tmp_path / "her2st" / "ST-spotfiles" / "A1_selection.tsv"
    for name in SPOT_MODELS:
        run = tmp_path / "runs" / name
        r = CliRunner().invoke(app, ["fit", "--model", name, "--test-section", "A1", "--out", str(run), *common])
        assert r.exit_code == 0, (name, r.output)
        meta = json.loads((run / "run.json").read_text())
        assert meta["model"] == name and (run / spot_model(name).weights_file).is_file()
        assert (name in meta) == (name != "ridge")  # ridge keeps everything in ridge.npz
        # sampler defaults: in the model's own section (hinge, flag) or in run.json['sampler']
        assert bool(sampler_defaults(meta)) == (name in GENERATIVE), name
        a = predict(run, image, spots, tmp_path / f"{name}_a.h5ad", cache_dir=tmp_path / "cache", progress=False)
        b = predict(run, image, spots, tmp_path / f"{name}_b.h5ad", cache_dir=tmp_path / "cache", progress=False)
        assert a.shape == (30, len(meta["panel"])) and np.isfinite(a.X).all(), name
        assert np.array_equal(a.X, b.X), name  # a reloaded run predicts identically with the same seed
        info = a.uns["stgen"]
        assert info["model"] == name
        if name in GENERATIVE:
            want = PAPER_PRESET if name == "hinge-paper" else TINY[name]  # hinge-paper: the paper's sampler
            assert (info["steps"], info["samples"]) == (want["steps"], want["samples"])
            assert a.layers["std"].max() > 0, name
        else:
            assert (info["steps"], info["samples"]) == (0, 1) and not a.layers["std"].any(), name


def test_benchmark_all_models_one_report_reused_and_refit_only_what_changed(tmp_path, monkeypatch, one_thread):
    from stgen.cli import app
    from typer.testing import CliRunner

    import stgen.workflows.benchmark as benchmark
    import stgen.workflows.predict as pipeline

    common, root = _setup(tmp_path, monkeypatch)
    fits, predicts = [], []
    real_fit, real_predict = benchmark.fit, pipeline.predict
    monkeypatch.setattr(benchmark, "fit", lambda *a, **kw: fits.append(kw["model"]) or real_fit(*a, **kw))
    monkeypatch.setattr(pipeline, "predict", lambda *a, **kw: predicts.append(a[3]) or real_predict(*a, **kw))
    bench = tmp_path / "bench"

    def args(models: str) -> list[str]:
        return ["benchmark", "--models", models, "--sections", "A2", "--out", str(bench), *common]

    r = CliRunner().invoke(app, args("all"))
    assert r.exit_code == 0, r.output
    assert sorted(fits) == sorted(MODELS) and len(predicts) == len(MODELS)
    df = pd.read_csv(bench / "metrics.csv").set_index("model")
    assert list(df.index) == list(MODELS)
    assert np.isfinite(df[["pcc50", "pcc200", "mse", "mae", "gsc", "fit_s", "predict_s", "spots_per_s"]]).all().all()
    report = (bench / "report.md").read_text()
    for name in MODELS:
        assert f"| {name} |" in report, name
    assert "spots/s" in report
    assert "macenko (hinge, ridge)" in report and "none (hinge-paper, flag," in report  # resolved per model
    for name in MODELS:  # what each fit encoded with (features.stain: auto), saved with the run
        saved = yaml.safe_load((bench / "runs" / name / "A2" / "config.yaml").read_text())
        assert saved["features"]["stain"] == ("macenko" if name in ("hinge", "ridge") else "none"), name
        assert json.loads((bench / "runs" / name / "A2" / "run.json").read_text())["features"]["stain"] == \
            saved["features"]["stain"], name
    assert yaml.safe_load((bench / "runs" / "hinge-paper" / "A2" / "config.yaml").read_text())["hinge"]["sd_scale"] == 1.0
    assert (bench / "maps_A2.png").stat().st_size > 1000
    # a re-run trains and predicts nothing; a changed bleep section refits bleep only
    fits.clear(), predicts.clear()
    assert CliRunner().invoke(app, args("all")).exit_code == 0
    assert fits == [] and predicts == []
    changed = {**TINY, "bleep": {**TINY["bleep"], "top_k": 3}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(changed))
    r = CliRunner().invoke(app, args("bleep,ridge"))
    assert r.exit_code == 0, r.output
    assert fits == ["bleep"] and len(predicts) == 1
    assert list(pd.read_csv(bench / "metrics.csv").model) == ["bleep", "ridge"]
    r = CliRunner().invoke(app, args("hinge,stnet2"))
    assert r.exit_code == 2 and "available: hinge, hinge-paper, flag, ridge, hifusion, stnet" in r.output
