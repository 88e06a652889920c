"""benchmarks/whole_slide.py: a bare synthetic slide from tissue detection to .h5ad, stage by stage."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import anndata as ad
import pytest
from model_fixtures import hest_ridge_run


ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("whole_slide", ROOT / "benchmarks" / "whole_slide.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def tiny_ridge(tmp_path, one_thread):
    """A Visium (100 um hex grid) ridge run on rgb-stats features of a synthetic HEST folder."""
    return hest_ridge_run(tmp_path, n_sections=2, n_top=30)[1]


def test_whole_slide_benchmark_stages_and_h5ad(tiny_ridge, tmp_path, capsys, monkeypatch):
    mod = _module()
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where the fresh feature caches go
    # 2 um/px keeps the thumbnail at full resolution and lay_spot_grid's disc small: a quick test
    res = mod.main(["--run", str(tiny_ridge), "--ridge", str(tiny_ridge), "--spots", "60", "--mpp", "2.0",
                    "--threads", "1", "--matmul-n", "128", "--out", str(out), "--json", str(tmp_path / "ws.json")])
    text = capsys.readouterr().out
    assert "GFLOP/s" in text and "end-to-end predict()" in text and "nothing cached" in text
    assert res["matmul_fp32_gflops"] > 0 and res["slide"]["grid"] == "hex" and res["slide"]["spacing_um"] == 100
    assert [r["label"] for r in res["runs"]] == ["run", "ridge"]
    for r in res["runs"]:
        assert [s["stage"] for s in r["stages"]] == list(mod.STAGES)
        assert all(s["s"] >= 0 and s["peak_rss_mb"] > 0 for s in r["stages"])
        assert 45 <= r["n_spots"] <= 75 and r["n_spots_e2e"] == r["n_spots"]  # about --spots on the tissue
        assert r["end_to_end"]["s"] > 0 and r["end_to_end"]["spots_per_s"] > 0
        pred = ad.read_h5ad(r["h5ad"])
        assert pred.n_obs == r["n_spots"] and pred.uns["stgen"]["bare_slide"]
        staged = ad.read_h5ad(out / f"{r['label']}_staged.h5ad")
        assert list(staged.obs_names) == list(pred.obs_names)
        assert abs(staged.X - pred.X).max() < 1e-5  # the stages are predict's own
    saved = json.loads((tmp_path / "ws.json").read_text())
    assert saved["runs"][0]["n_spots"] == res["runs"][0]["n_spots"]
    assert not list(tmp.iterdir())  # the fresh feature caches are removed
    # the slide kept in --out is reused by a second run
    again = mod.main(["--run", str(tiny_ridge), "--spots", "60", "--mpp", "2.0", "--threads", "1",
                      "--matmul-n", "128", "--out", str(out)])
    assert again["slide"]["write_s"] is None and again["runs"][0]["n_spots"] == res["runs"][0]["n_spots"]


def test_scaling_children_get_their_own_size_and_no_ridge():
    argv = ["--run", "R", "--ridge=Q", "--spots", "9", "--scaling", "100,200", "--threads", "2", "--json", "x.json"]
    assert _module().child_argv(argv) == ["--run", "R", "--threads", "2"]
