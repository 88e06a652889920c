"""HEST-1k as users download it: 10x-off TIFF resolution tags, NaN metadata, zero-padded ST ids, folders
that mix technologies (Visium, ST, Xenium, Visium HD) and what fit / pre-training take from them."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from reader_fixtures import make_h5ad_section, make_hest_sample

from stgen.data.dataset import HestDataset, open_dataset
from stgen.data.hest import hest_slide_mpp, read_hest_sample
from stgen.errors import InputError


def _meta(h, **fields) -> None:
    meta = json.loads(h.metadata.read_text())
    meta.update(fields)
    h.metadata.write_text(json.dumps(meta))


def assert_matches(a: ad.AnnData, truth) -> None:
    e = truth.expected()
    assert list(a.obs_names) == e.spots and list(a.var_names) == e.genes
    np.testing.assert_array_equal(a.X.toarray(), e.X)
    np.testing.assert_array_equal(a.obsm["spatial"], e.xy)
    np.testing.assert_array_equal(a.obs[["array_x", "array_y"]].to_numpy(), e.array_xy)


def _src(a: ad.AnnData) -> tuple[float, str]:
    return a.uns["stgen"]["mpp"], a.uns["stgen"]["mpp_source"]


# --------------------------------------------------------------------------- pixel size


def test_estimated_mpp_wins_over_a_10x_off_tiff_tag(tmp_path: Path) -> None:
    h = make_hest_sample(tmp_path, "TENX1", tiff_tag_factor=0.1)
    with pytest.warns(UserWarning, match=r"TENX1\.tif says 0\.2 um/px but TENX1\.json has pixel_size_um_estimated "
                      r"2 um/px \(about 10x too small.*HEST issue #106\); using pixel_size_um_estimated"):
        a = read_hest_sample(tmp_path, "TENX1")
    assert _src(a) == (2.0, "metadata pixel_size_um_estimated")
    assert_matches(a, h.truth)
    # a tag that agrees says nothing; the argument overrides everything, silently
    make_hest_sample(tmp_path, "TENX2", tiff_mpp=2.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _src(read_hest_sample(tmp_path, "TENX2")) == (2.0, "metadata pixel_size_um_estimated")
        assert _src(read_hest_sample(tmp_path, "TENX1", mpp=2.05)) == (2.05, "argument")
    # predict on a bare HEST slide takes the metadata's mpp; a slide outside wsis/ has none
    assert hest_slide_mpp(h.wsi) == 2.0
    shutil.copy(h.wsi, tmp_path / "TENX1.tif")
    assert hest_slide_mpp(tmp_path / "TENX1.tif") is None


def test_without_estimated_mpp_the_tag_must_fit_the_spot_lattice(tmp_path: Path) -> None:
    # a tag that fits the spot pitch is used, before pixel_size_um_embedded (HEST's least reliable field)
    make_hest_sample(tmp_path, "OK", meta_estimated=None, meta_embedded=31.75, tiff_mpp=1.9)
    m, src = _src(read_hest_sample(tmp_path, "OK"))
    assert m == pytest.approx(1.9) and src == "image resolution tags"
    # a 10x-off tag and nothing else: an error naming the field to set and the lattice's value
    make_hest_sample(tmp_path, "BAD", meta_estimated=None, meta_embedded=None, tiff_tag_factor=0.1)
    with pytest.raises(InputError) as ei:
        read_hest_sample(tmp_path, "BAD")
    msg = str(ei.value)
    assert "BAD.json" in msg and "set pixel_size_um_estimated in BAD.json" in msg and "pass mpp=" in msg
    assert "spot pitch 10 um instead of 100 um" in msg and "10x too small" in msg
    assert "implies about 2 um/px" in msg
    # an implausible tag (below 0.05 um/px: the reader ignores it) is flagged, not trusted
    make_hest_sample(tmp_path, "TINY", meta_estimated=None, meta_embedded=None, tiff_mpp=0.02)
    with pytest.raises(InputError, match=r"0\.02 um/px \(outside the plausible.*set pixel_size_um_estimated"):
        read_hest_sample(tmp_path, "TINY")
    # pixel_size_um_embedded: a last resort, only when it makes the spacing plausible
    make_hest_sample(tmp_path, "EMB", meta_estimated=None, meta_embedded=2.0, tiff_tag_factor=0.1)
    with pytest.warns(UserWarning, match=r"10x too small.*using pixel_size_um_embedded 2 um/px"):
        assert _src(read_hest_sample(tmp_path, "EMB")) == (2.0, "metadata pixel_size_um_embedded")
    for bad in (1.0, 2540.0):  # values of HEST's table
        make_hest_sample(tmp_path, "E2", meta_estimated=None, meta_embedded=bad, wsi=False)
        with pytest.raises(InputError, match=rf"no WSI; pixel_size_um_embedded {bad:g} um/px makes the spot "
                           r"pitch .* instead of 100 um; set pixel_size_um_estimated"):
            read_hest_sample(tmp_path, "E2")


def test_nan_metadata_tokens(tmp_path: Path) -> None:
    h = make_hest_sample(tmp_path, "N1", meta_nan=True, meta_estimated=None, meta_embedded=None)
    text = h.metadata.read_text()
    assert '"pixel_size_um_estimated": NaN' in text and '"patient": null' in text and '"nan"' in text
    assert _src(read_hest_sample(tmp_path, "N1"))[1] == "image resolution tags"
    make_hest_sample(tmp_path, "N2", meta_nan=True, tiff_tag_factor=0.1)  # estimated present, NaN elsewhere
    with pytest.warns(UserWarning, match="10x too small"):
        assert _src(read_hest_sample(tmp_path, "N2")) == (2.0, "metadata pixel_size_um_estimated")
    # "nan" strings, nulls and NaN in the spot geometry count as missing (defaults 100 / 55 um)
    h3 = make_hest_sample(tmp_path, "N3", wsi=False)
    _meta(h3, pixel_size_um_estimated="nan", pixel_size_um_embedded=None, inter_spot_dist=float("nan"),
          spot_diameter="NaN", fullres_px_width=float("nan"))
    with pytest.raises(InputError, match=r"N3\.json: no usable pixel size.*no pixel_size_um_estimated; no WSI"):
        read_hest_sample(tmp_path, "N3")
    u = read_hest_sample(tmp_path, "N3", mpp=2.0).uns["stgen"]
    assert (u["spot_spacing_um"], u["spot_diameter_um"]) == (100.0, 55.0)
    _meta(h3, st_technology=float("nan"))
    with pytest.raises(InputError, match=r"N3\.json: no 'st_technology' field"):
        read_hest_sample(tmp_path, "N3", mpp=2.0)


def test_zero_padded_st_ids(tmp_path: Path) -> None:
    h = make_hest_sample(tmp_path, "SPA1", technology="Spatial Transcriptomics", n_spots=25, zero_pad_ids=True)
    a = read_hest_sample(tmp_path, "SPA1")
    assert_matches(a, h.truth)
    assert all(len(s) == 7 for s in a.obs_names)  # "002x011"
    x, y = (int(v) for v in a.obs_names[3].split("x"))
    assert (a.obs["array_x"].iloc[3], a.obs["array_y"].iloc[3]) == (x, y)
    # without array_row / array_col the padded ids are parsed alike
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicated var names, as in HEST files
        b = ad.read_h5ad(h.st)
    b.obs = b.obs.drop(columns=["array_row", "array_col"])
    b.write_h5ad(h.st)
    r = read_hest_sample(tmp_path, "SPA1")
    np.testing.assert_array_equal(r.obs[["array_x", "array_y"]].to_numpy(), a.obs[["array_x", "array_y"]].to_numpy())


# --------------------------------------------------------------------------- technologies


def _mixed(root: Path) -> Path:
    """2 Visium and 1 ST imaged samples, 1 Visium without image, 1 Xenium, 1 Visium HD, 1 without metadata."""
    for i, s in enumerate(("V1", "V2")):
        make_hest_sample(root, s, seed=i)
    make_hest_sample(root, "V3", wsi=False, seed=3)
    make_hest_sample(root, "S1", technology="Spatial Transcriptomics", n_spots=25, seed=4)
    make_hest_sample(root, "X1", technology="Xenium", wsi=False, meta_nan=True, seed=5)
    _meta(make_hest_sample(root, "H1", wsi=False, seed=6), st_technology="Visium HD")
    make_hest_sample(root, "M1", wsi=False, seed=7).metadata.unlink()
    return root


def test_mixed_folder_default_picks_the_largest_group(tmp_path: Path) -> None:
    root = _mixed(tmp_path)
    ds = open_dataset(root)
    with pytest.warns(UserWarning) as rec:
        assert ds.sections() == ["V1", "V2", "V3"]
    msg = str(rec[0].message)
    assert "using its 3 Visium sample(s), the largest group" in msg
    for part in ("1 Spatial Transcriptomics", "1 Visium HD (not supported", "1 Xenium (not supported",
                 "1 without a readable st_technology (e.g. 'M1')", "technology='Spatial Transcriptomics'"):
        assert part in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per data set
        assert ds.sections(imaged_only=True) == ["V1", "V2"]
    # any sample can still be named: counts with a warning, read refusing Xenium with the way out
    assert "X1" in ds and ds.technology("X1") == "Xenium"
    with pytest.warns(UserWarning, match=r"counts of HEST sample 'X1' \(Xenium\), which lies outside"):
        assert ds.counts("X1").n_obs > 0
    with pytest.raises(InputError) as ei:
        ds.read("X1")
    msg = str(ei.value)
    assert "X1.json" in msg and "'X1'" in msg and "st_technology 'Xenium' is not supported" in msg
    assert "100 um square pseudo-spots" in msg and "technology='Visium'" in msg and "--technology" in msg
    with pytest.raises(InputError, match=r"M1\.json: HEST metadata not found"):
        ds.read("M1")
    with pytest.raises(InputError, match=r"unknown section 'Z9'.*no st/Z9\.h5ad"):
        ds.read("Z9")


def test_explicit_technology(tmp_path: Path, caplog) -> None:
    root = _mixed(tmp_path)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="stgen.data.hest"):
        warnings.simplefilter("error")
        ds = open_dataset(root, technology="st")
        assert isinstance(ds, HestDataset) and ds.sections(imaged_only=True) == ["S1"]
        assert open_dataset(root, format="hest", technology="VISIUM").sections() == ["V1", "V2", "V3"]
    assert "using the 1 Spatial Transcriptomics sample(s)" in caplog.text and "1 Xenium" in caplog.text
    a = ds.read("S1")
    assert a.uns["stgen"]["grid"] == "square" and a.uns["stgen"]["source"] == "hest:Spatial Transcriptomics"
    for tech in ("Xenium", "Visium HD"):
        with pytest.raises(InputError, match=f"technology '{tech}' is not supported for spot-level training "
                           r"\(HEST pools .*\); use 'Visium' or 'Spatial Transcriptomics'"):
            open_dataset(root, technology=tech)
    # a tie goes to Visium; a folder with nothing trainable, or without the chosen group, is refused
    tie = tmp_path / "tie"
    make_hest_sample(tie, "A", wsi=False)
    make_hest_sample(tie, "B", technology="Spatial Transcriptomics", wsi=False, n_spots=25)
    with pytest.warns(UserWarning, match="using its 1 Visium"):
        assert HestDataset(tie).sections() == ["A"]
    only = tmp_path / "only"
    make_hest_sample(only, "X", technology="Xenium", wsi=False)
    with pytest.raises(InputError, match=r"no HEST sample stgen can train on .*found 1 Xenium"):
        open_dataset(only).sections()
    with pytest.raises(InputError, match=r"no Spatial Transcriptomics sample.*found 1 Xenium"):
        open_dataset(only, technology="Spatial Transcriptomics").sections()
    with pytest.warns(UserWarning, match="outside the data set's trainable samples"):
        assert open_dataset(only).counts("X").n_obs > 0  # expression by name stays possible


def test_fit_and_pretraining_never_take_xenium_or_visium_hd(tmp_path: Path) -> None:
    from stgen.backbones.pretrain import _pretrain_corpus
    from stgen.workflows.config import StgenConfig
    from stgen.workflows.inputs import _training_data

    root = _mixed(tmp_path)
    cfg = StgenConfig()
    ds = open_dataset(root)
    with pytest.warns(UserWarning, match="using its 3 Visium"):
        train, imaged = _training_data(ds, "V1", cfg)
    assert list(train) == ["V2"] and imaged == ["V1", "V2"]
    # the default pre-training corpus is the selection's expression-only samples
    assert _pretrain_corpus(ds, cfg, evaluated=["V1", "V2"]) == ["V3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _pretrain_corpus(HestDataset(root, technology="Visium"), cfg, evaluated=[]) == ["V3"]
    with pytest.raises(InputError, match="pre-training corpus is empty"):
        _pretrain_corpus(HestDataset(root, technology="Spatial Transcriptomics"), cfg, evaluated=[])


def test_cli_fit_technology_option(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stgen.cli import app

    root = _mixed(tmp_path / "hest")
    res = CliRunner().invoke(app, ["fit", "--data", str(root), "--test-section", "V1", "--out", str(tmp_path / "r"),
                                   "--technology", "Xenium"])
    assert res.exit_code == 2 and "technology 'Xenium' is not supported" in res.output
    make_h5ad_section(tmp_path / "h5", "S1", image=None)
    res = CliRunner().invoke(app, ["fit", "--data", str(tmp_path / "h5"), "--test-section", "S1",
                                   "--out", str(tmp_path / "r"), "--technology", "Visium"])
    assert res.exit_code == 2 and "selects HEST-1k samples" in res.output
