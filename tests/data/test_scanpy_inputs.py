"""AnnData as scanpy's read_visium writes it (counts, full-resolution obsm['spatial'], only the hires/lowres image
in uns['spatial']) in fit, predict --spots and evaluate; and the same sample read from its Space Ranger folder."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
from typer.testing import CliRunner

from reader_fixtures import make_spaceranger_outs
from stgen.cli import app
from stgen.data.dataset import open_dataset
from stgen.data.h5ad import read_h5ad_section
from stgen.data.visium import read_spaceranger
from stgen.errors import InputError, LowResolutionImageWarning
from stgen.workflows.config import StgenConfig
from stgen.workflows.fit import fit

sc = pytest.importorskip("scanpy")


def _read_visium(outs, library_id):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy 1.11 deprecates read_visium in favour of squidpy.read.visium
        a = sc.read_visium(outs, library_id=library_id)
    a.var_names_make_unique()  # what every scanpy tutorial does next (GAPDH, GAPDH-1)
    return a


@pytest.fixture
def scanpy_sections(tmp_path):
    """Two Space Ranger samples without full-resolution images, and the .h5ad scanpy makes of each."""
    h5 = tmp_path / "h5ad"
    h5.mkdir()
    samples = {}
    for i, name in enumerate(("P1", "P2")):
        s = make_spaceranger_outs(tmp_path / "sr", name, n_spots=48, seed=i, image=None)
        a = _read_visium(s.outs, name)
        a.write_h5ad(h5 / f"{name}.h5ad")
        samples[name] = s
    return h5, samples


def test_scanpy_anndata_and_space_ranger_folder_agree(scanpy_sections):
    h5, samples = scanpy_sections
    raw = ad.read_h5ad(h5 / "P1.h5ad")
    assert "GAPDH-1" in raw.var_names and set(raw.uns["spatial"]["P1"]["images"]) == {"hires", "lowres"}
    with pytest.warns(LowResolutionImageWarning, match=r"P1: no full-resolution image; using uns\['spatial'\]"
                                                       r"\['P1'\]\['images'\]\['hires'\] \(\d+ x \d+ px, x0\.25"):
        a = read_h5ad_section(h5 / "P1.h5ad")
    with pytest.warns(LowResolutionImageWarning, match="tissue_hires_image.png"):
        b = read_spaceranger(samples["P1"].outs)
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    assert "GAPDH" in a.var_names and "GAPDH-1" not in a.var_names
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    np.testing.assert_allclose(a.obsm["spatial"], b.obsm["spatial"])
    assert a.uns["stgen"]["mpp"] == pytest.approx(b.uns["stgen"]["mpp"])
    assert a.uns["stgen"]["image_scale"] == b.uns["stgen"]["image_scale"] == 0.25
    # the image scanpy held in memory is the hires PNG, pixel for pixel
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(a.uns["stgen"]["image_path"]).convert("RGB")),
                                  np.asarray(Image.open(b.uns["stgen"]["image_path"]).convert("RGB")))


def test_fit_predict_evaluate_on_scanpy_anndata(scanpy_sections, tmp_path, one_thread):
    h5, _ = scanpy_sections
    ds = open_dataset(h5)
    assert ds.format == "h5ad" and ds.sections(imaged_only=True) == ["P1", "P2"]
    cfg = StgenConfig.from_dict({"features": {"encoder": "rgb-stats", "patch_um": 110.0}, "data": {"n_top": 50}})
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LowResolutionImageWarning)
        fit(h5, "P2", run, model="ridge", cfg=cfg, cache_dir=tmp_path / "cache", progress=False)
    out = tmp_path / "P2_pred.h5ad"
    r = CliRunner().invoke(app, ["predict", "--model", str(run), "--spots", str(h5 / "P2.h5ad"), "--out", str(out),
                                 "--cache", str(tmp_path / "cache"), "--quiet"])
    assert r.exit_code == 0, r.output
    pred = ad.read_h5ad(out)
    assert pred.n_obs == ad.read_h5ad(h5 / "P2.h5ad").n_obs and np.isfinite(pred.X).all()
    assert "x0.25 of full resolution" in pred.uns["stgen"]["image"]
    r = CliRunner().invoke(app, ["evaluate", "--pred", str(out), "--counts", str(h5 / "P2.h5ad"),
                                 "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    import stgen

    m = stgen.evaluate(pred, ad.read_h5ad(h5 / "P2.h5ad"))
    assert m["n_genes"] == pred.n_vars and np.isfinite(m["mse"])


def test_predict_without_image_needs_an_anndata_with_one(scanpy_sections, tmp_path):
    from stgen.workflows.inputs import spots_image

    h5, _ = scanpy_sections
    a = ad.read_h5ad(h5 / "P1.h5ad")
    del a.uns["spatial"]["P1"]["images"]
    a.write_h5ad(tmp_path / "bare.h5ad")
    with pytest.raises(InputError, match=r"bare\.h5ad: no --image given and the AnnData holds no image"):
        spots_image(tmp_path / "bare.h5ad", tmp_path)
    with pytest.raises(InputError, match="--image is needed"):
        spots_image(tmp_path / "spots.csv", tmp_path)
    b = ad.read_h5ad(h5 / "P1.h5ad")
    b.uns["spatial"]["P1"]["scalefactors"]["tissue_hires_scalef"] = 0
    b.write_h5ad(tmp_path / "zero.h5ad")
    with pytest.raises(InputError, match=r"zero\.h5ad: uns\['spatial'\]\['P1'\]\['scalefactors'\]: scale factor "
                                         r"tissue_hires_scalef is 0"):
        read_h5ad_section(tmp_path / "zero.h5ad")


def test_own_data_docs_example_runs(tmp_path, one_thread):
    """docs/own-data.md, section "Space Ranger folders and scanpy/squidpy AnnData": its code runs as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "own-data.md").read_text()
    section = text.split("## Space Ranger folders and scanpy/squidpy AnnData", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    sr = tmp_path / "sr"
    for i, name in enumerate(("P1", "P2", "P3")):
        make_spaceranger_outs(sr, name, n_spots=48, seed=i, image=None)
    (tmp_path / "h5").mkdir()
    (tmp_path / "work").mkdir()
    ns = {"SR_DIR": sr, "H5AD_DIR": tmp_path / "h5", "WORK": tmp_path / "work", "ENCODER": "rgb-stats"}
    exec(compile(block, "own-data.md[scanpy]", "exec"), ns)  # noqa: S102 - the docs' own code
    assert ns["pred"].n_obs > 0 and ns["sections"][0].uns["stgen"]["image_scale"] == 0.25


def test_space_ranger_hires_with_a_zero_scale_factor_is_refused(tmp_path):
    import json

    s = make_spaceranger_outs(tmp_path, "P1", image=None)
    sf = json.loads(s.scalefactors.read_text())
    sf["tissue_hires_scalef"] = 0
    s.scalefactors.write_text(json.dumps(sf))
    with pytest.raises(InputError, match=r"scalefactors_json\.json: scale factor tissue_hires_scalef is 0"):
        read_spaceranger(s.outs)
    assert read_spaceranger(s.outs, downsampled=False).uns["stgen"]["image_path"] is None
