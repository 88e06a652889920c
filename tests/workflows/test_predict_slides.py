"""Multi-slide prediction: a folder or list of slides, resumable (current outputs skipped), sharded."""

from __future__ import annotations

import shutil

import anndata as ad
from typer.testing import CliRunner

from model_fixtures import hest_ridge_run
from stgen.cli import app


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_folder_of_slides_sharded_resumable_and_one_bad_slide(tmp_path, one_thread):
    hest, run, _ = hest_ridge_run(tmp_path, test_section="S2")
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(3):
        shutil.copy(hest / "wsis" / f"S{i}.tif", slides / f"S{i}.tif")
    out = tmp_path / "preds"
    common = ("--model", run, "--image", slides, "--out", out, "--cache", tmp_path / "cache", "--quiet")
    # two shards of a job array cover the three slides once
    r0, r1 = _invoke("predict", *common, "--shard", "0/2"), _invoke("predict", *common, "--shard", "1/2")
    assert r0.exit_code == 0 and r1.exit_code == 0, r0.output + r1.output
    assert "2 slide(s) predicted" in r0.output and "1 slide(s) predicted" in r1.output
    assert sorted(p.name for p in out.glob("*.h5ad")) == ["S0.h5ad", "S1.h5ad", "S2.h5ad"]
    assert ad.read_h5ad(out / "S1.h5ad").uns["stgen"]["bare_slide"]
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5ad")}
    # re-run: nothing to do; a damaged output is predicted again
    (out / "S0.h5ad").write_bytes(b"truncated")
    res = _invoke("predict", *common)
    assert res.exit_code == 0 and "1 slide(s) predicted, 2 already current" in res.output, res.output
    assert all((out / n).stat().st_mtime_ns == t for n, t in stamp.items() if n != "S0.h5ad")
    # a slide that is not an image fails alone, named, exit 2; a list file works too
    (slides / "bad.tif").write_bytes(b"not a tiff at all")
    lst = tmp_path / "slides.txt"
    lst.write_text("# slides to predict\nslides/S1.tif\nslides/bad.tif\n")
    res = _invoke("predict", "--model", run, "--image", lst, "--out", out, "--cache", tmp_path / "cache", "--quiet")
    assert res.exit_code == 2 and "bad.tif" in res.output and "1 already current, 1 failed" in res.output
    assert not (out / "bad.h5ad").exists()
    res = _invoke("predict", *common, "--shard", "2/2")
    assert res.exit_code == 2 and "--shard" in res.output
