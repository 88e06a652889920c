"""Tests of the HEST-1k, Space Ranger and generic h5ad readers and the Dataset abstraction."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from reader_fixtures import (
    make_h5ad_section,
    make_her2st_root,
    make_hest_sample,
    make_spaceranger_outs,
    write_image,
)
from stgen.data import her2st
from stgen.data.common import check_spot_scale
from stgen.data.dataset import Dataset, detect_format, open_dataset
from stgen.data.h5ad import read_h5ad_section
from stgen.data.hest import read_hest_sample
from stgen.data.visium import read_10x_counts, read_spaceranger, read_tissue_positions
from stgen.errors import InputError, LowResolutionImageWarning

OBS_COLUMNS = ["array_x", "array_y", "pixel_x", "pixel_y", "section"]
# the fixtures, like many real files, carry a duplicated gene symbol
pytestmark = pytest.mark.filterwarnings("ignore:Variable names are not unique")

UNS_KEYS = {"section", "image_path", "mpp", "spot_diameter_um", "spot_spacing_um", "source", "grid", "mpp_source"}


def assert_layout(a: ad.AnnData, section: str) -> None:
    assert isinstance(a.X, (sp.csr_matrix, sp.csr_array)) and a.X.dtype == np.float32
    assert list(a.obs.columns) == OBS_COLUMNS
    assert a.obs["array_x"].dtype == np.int64 and a.obs["array_y"].dtype == np.int64
    assert a.obs["pixel_x"].dtype == np.float64 and (a.obs["section"] == section).all()
    assert a.obsm["spatial"].dtype == np.float64 and a.obsm["spatial"].shape == (a.n_obs, 2)
    np.testing.assert_array_equal(a.obsm["spatial"], a.obs[["pixel_x", "pixel_y"]].to_numpy())
    assert set(a.uns["stgen"]) == UNS_KEYS and a.uns["stgen"]["section"] == section
    assert a.var_names.is_unique and a.obs_names.is_unique


def assert_matches(a: ad.AnnData, truth, array: bool = True) -> None:
    e = truth.expected()
    assert list(a.obs_names) == e.spots
    assert list(a.var_names) == e.genes
    np.testing.assert_array_equal(a.X.toarray(), e.X)
    np.testing.assert_array_equal(a.obsm["spatial"], e.xy)
    if array:
        np.testing.assert_array_equal(a.obs[["array_x", "array_y"]].to_numpy(), e.array_xy)


# --------------------------------------------------------------------------- same data, every format


def test_same_section_identical_across_formats(tmp_path: Path) -> None:
    hest = make_hest_sample(tmp_path / "hest", "TENX99")
    sr_h5 = make_spaceranger_outs(tmp_path / "vis", "S1", matrix="h5", positions="csv", filtered=False)
    sr_mtx = make_spaceranger_outs(tmp_path / "vis", "S2", matrix="mtx", positions="list", image="jpg")
    h5 = make_h5ad_section(tmp_path / "h5", "S3")

    out = {
        "hest": read_hest_sample(hest.root, "TENX99"),
        "h5": read_spaceranger(sr_h5.outs, image=sr_h5.image),
        "mtx": read_spaceranger(sr_mtx.sample_dir, image=sr_mtx.image, section="S2"),
        "h5ad": read_h5ad_section(h5.path, image=h5.image),
    }
    names = {"hest": "TENX99", "h5": "S1", "mtx": "S2", "h5ad": "S3"}
    for k, a in out.items():
        assert_layout(a, names[k])
        assert_matches(a, hest.truth)
        m = a.uns["stgen"]
        assert m["grid"] == "hex" and m["spot_spacing_um"] == 100.0 and m["spot_diameter_um"] == 55.0
        assert m["mpp"] == pytest.approx(2.0)
    assert out["hest"].uns["stgen"]["image_path"] == str(hest.wsi)
    assert out["h5"].uns["stgen"]["image_path"] == str(sr_h5.image)
    assert out["hest"].uns["stgen"]["source"] == "hest:Visium"
    assert out["h5"].uns["stgen"]["source"] == "spaceranger"
    # 40 lattice spots, 6 outside the tissue; GAPDH (two feature ids) summed; antibody feature dropped
    a = out["h5"]
    assert a.n_obs == int(hest.truth.in_tissue.sum()) == 34
    assert list(a.var_names) == ["ACTB", "GAPDH", "ERBB2", "KRT19", "MT-CO1"]
    t = hest.truth
    i = t.barcodes.index(a.obs_names[0])
    assert a.X[0, 1] == t.counts[i, 1] + t.counts[i, 3]
    assert not set(a.obs_names) & {b for b, k in zip(t.barcodes, t.in_tissue) if not k}


def test_10x_counts_h5_and_mtx_agree(tmp_path: Path) -> None:
    a = make_spaceranger_outs(tmp_path, "A", matrix="h5", image=None, filtered=False)
    b = make_spaceranger_outs(tmp_path, "B", matrix="mtx", image=None, filtered=False)
    ca, cb = read_10x_counts(a.matrix), read_10x_counts(b.matrix)
    assert ca.n_obs == 40 and list(ca.obs_names) == list(cb.obs_names)
    assert list(ca.var_names) == list(cb.var_names) == ["ACTB", "GAPDH", "ERBB2", "KRT19", "MT-CO1"]
    np.testing.assert_array_equal(ca.X.toarray(), cb.X.toarray())
    # scanpy's own 10x reader agrees on the gene-expression counts (before symbol merging)
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy warns about the duplicated symbol
        ref = sc.read_10x_h5(a.matrix)
    assert list(ref.obs_names) == list(ca.obs_names)
    np.testing.assert_array_equal(ref[:, "ACTB"].X.toarray().ravel(), ca[:, "ACTB"].X.toarray().ravel())


def test_tissue_positions_variants(tmp_path: Path) -> None:
    a = make_spaceranger_outs(tmp_path, "A", positions="csv", image=None)
    b = make_spaceranger_outs(tmp_path, "B", positions="list", image=None)
    pa, pb = read_tissue_positions(a.outs / "spatial"), read_tissue_positions(b.outs / "spatial")
    assert list(pa.columns) == ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    assert pa.equals(pb) and len(pa) == 40 and pa["in_tissue"].sum() == 34
    t = a.truth
    np.testing.assert_array_equal(pa["pxl_col_in_fullres"].to_numpy(), t.pixel_x)  # column = x
    np.testing.assert_array_equal(pa["pxl_row_in_fullres"].to_numpy(), t.pixel_y)
    # header with a missing column / non-finite pixel / wrong column count
    p = a.positions
    lines = p.read_text().splitlines()
    p.write_text("\n".join([lines[0].replace("pxl_col_in_fullres", "x")] + lines[1:]))
    with pytest.raises(InputError, match="missing column.*pxl_col_in_fullres"):
        read_tissue_positions(p.parent)
    p.write_text("\n".join([lines[0], lines[1].rsplit(",", 1)[0] + ",nan"] + lines[2:]))
    with pytest.raises(InputError, match="non-finite.*pxl_col_in_fullres") as ei:
        read_spaceranger(a.outs)
    assert str(p) in str(ei.value)
    q = b.positions
    q.write_text("\n".join(x.rsplit(",", 1)[0] for x in q.read_text().splitlines()))
    with pytest.raises(InputError, match="expected 6 columns"):
        read_tissue_positions(q.parent)


# --------------------------------------------------------------------------- HEST-1k


def test_hest_mpp_sources_and_override(tmp_path: Path) -> None:
    def mpp_of(name, **kw):
        make_hest_sample(tmp_path / name, "S", **kw)
        m = read_hest_sample(tmp_path / name, "S").uns["stgen"]
        return m["mpp"], m["mpp_source"]

    assert mpp_of("a", meta_estimated=2.0, meta_embedded=2.2, tiff_mpp=1.9) == (2.0, "metadata pixel_size_um_estimated")
    assert mpp_of("b", meta_estimated=None, meta_embedded=2.2, tiff_mpp=None) == (2.2, "metadata pixel_size_um_embedded")
    m, src = mpp_of("c", meta_estimated=None, meta_embedded=None, tiff_mpp=1.9)
    assert m == pytest.approx(1.9) and src == "image resolution tags"
    make_hest_sample(tmp_path / "d", "S", meta_estimated=None, meta_embedded=None, tiff_mpp=None)
    with pytest.raises(InputError, match=r"S\.json.*pass mpp="):
        read_hest_sample(tmp_path / "d", "S")
    a = read_hest_sample(tmp_path / "d", "S", mpp=2.1)
    assert a.uns["stgen"]["mpp"] == 2.1 and a.uns["stgen"]["mpp_source"] == "argument"
    # an mpp 3x off is caught by the spot-spacing check
    with pytest.raises(InputError, match="300 um.*100 um is expected.*3x too large"):
        read_hest_sample(tmp_path / "d", "S", mpp=6.0)


def test_hest_coordinates_from_obs_and_without_wsi(tmp_path: Path) -> None:
    h = make_hest_sample(tmp_path, "NCBI1", coords="obs", wsi=False)
    a = read_hest_sample(tmp_path, "NCBI1")
    assert_matches(a, h.truth)
    assert a.uns["stgen"]["image_path"] is None
    with pytest.raises(InputError, match="NCBI1.*no image"):
        read_hest_sample(tmp_path, "NCBI1", require_image=True)
    # without the WSI the metadata's fullres_px_width/height still bound the spots
    meta = json.loads(h.metadata.read_text())
    meta["fullres_px_width"] = 100
    h.metadata.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"outside the image \(100 x \d+ px of fullres_px_width/height"):
        read_hest_sample(tmp_path, "NCBI1")


def test_hest_spatial_transcriptomics_square_grid(tmp_path: Path) -> None:
    h = make_hest_sample(tmp_path, "SPA1", technology="Spatial Transcriptomics", n_spots=25)
    a = read_hest_sample(tmp_path, "SPA1")
    assert_layout(a, "SPA1")
    assert_matches(a, h.truth)
    m = a.uns["stgen"]
    assert m["grid"] == "square" and m["spot_spacing_um"] == 200.0 and m["spot_diameter_um"] == 100.0
    # ids "<x>x<y>": array_x / array_y come from HEST's array_row / array_col
    x, y = (int(v) for v in a.obs_names[0].split("x"))
    assert (a.obs["array_x"].iloc[0], a.obs["array_y"].iloc[0]) == (x, y)


def test_hest_in_tissue_filter_before_checks(tmp_path: Path) -> None:
    h = make_hest_sample(tmp_path, "T1", wsi=False)
    a = ad.read_h5ad(h.st)
    out = np.flatnonzero(a.obs["in_tissue"].to_numpy() == 0)
    a.obsm["spatial"][out[0]] = np.nan  # an out-of-tissue spot with no position is fine
    a.write_h5ad(h.st)
    r = read_hest_sample(tmp_path, "T1")
    assert r.n_obs == 34
    assert_matches(r, h.truth)
    inside = np.flatnonzero(a.obs["in_tissue"].to_numpy() == 1)[2]
    a.obsm["spatial"][inside, 1] = np.inf
    a.write_h5ad(h.st)
    with pytest.raises(InputError, match=rf"T1\.h5ad: 1 missing or non-finite .*obsm\['spatial'\]\[:, 1\].*{a.obs_names[inside]}"):
        read_hest_sample(tmp_path, "T1")


@pytest.mark.parametrize("tech", ["Xenium", "Visium HD"])
def test_hest_unsupported_technology(tmp_path: Path, tech: str) -> None:
    h = make_hest_sample(tmp_path, "X1", wsi=False)
    meta = json.loads(h.metadata.read_text())
    meta["st_technology"] = tech
    h.metadata.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=f"'{tech}' is not supported for spot-level training") as ei:
        read_hest_sample(tmp_path, "X1")
    assert "X1.json" in str(ei.value)
    # expression-only use is still possible
    assert open_dataset(tmp_path).counts("X1").n_obs == 34


def test_hest_missing_and_corrupt_files(tmp_path: Path) -> None:
    h = make_hest_sample(tmp_path, "T1", wsi=False)
    with pytest.raises(InputError, match=r"T2\.h5ad.*not found"):
        read_hest_sample(tmp_path, "T2")
    h.metadata.write_text("{not json")
    with pytest.raises(InputError, match=r"T1\.json: unreadable HEST metadata"):
        read_hest_sample(tmp_path, "T1")
    h.metadata.unlink()
    with pytest.raises(InputError, match=r"T1\.json: HEST metadata not found"):
        read_hest_sample(tmp_path, "T1")
    make_hest_sample(tmp_path, "T3", wsi=False)
    data = h.st.read_bytes()
    (tmp_path / "st" / "T3.h5ad").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match=r"T3\.h5ad: not a readable h5ad file"):
        read_hest_sample(tmp_path, "T3")
    bad = tmp_path / "wsis" / "T4.tif"
    make_hest_sample(tmp_path, "T4", wsi=False)
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(InputError, match=r"T4\.tif"):
        read_hest_sample(tmp_path, "T4")


# --------------------------------------------------------------------------- Space Ranger


def test_spaceranger_mpp_sources(tmp_path: Path) -> None:
    s = make_spaceranger_outs(tmp_path, "S1", tiff_mpp=1.9)
    a = read_spaceranger(s.outs, image=s.image)
    assert a.uns["stgen"]["mpp"] == pytest.approx(55.0 / 27.5)
    assert a.uns["stgen"]["mpp_source"] == "scalefactors spot_diameter_fullres"
    assert read_spaceranger(s.outs, image=s.image, mpp=2.05).uns["stgen"]["mpp"] == 2.05
    s.scalefactors.unlink()
    b = read_spaceranger(s.outs, image=s.image)
    assert b.uns["stgen"]["mpp"] == pytest.approx(1.9) and b.uns["stgen"]["mpp_source"] == "image resolution tags"
    # no image: the hires PNG cannot be placed without its scale factor
    with pytest.raises(InputError, match=r"scalefactors_json\.json \(file not found\): scale factor "
                                         r"tissue_hires_scalef is missing"):
        read_spaceranger(s.outs)
    with pytest.raises(InputError, match=r"scalefactors_json\.json: not found.*pass mpp="):
        read_spaceranger(s.outs, downsampled=False)  # expression only, no scale factors
    assert read_spaceranger(s.outs, mpp=2.0, downsampled=False).uns["stgen"]["image_path"] is None
    with pytest.raises(InputError, match="has no H&E image"):
        read_spaceranger(s.outs, mpp=2.0, require_image=True, downsampled=False)


def test_hires_coordinates_are_rejected(tmp_path: Path) -> None:
    s = make_spaceranger_outs(tmp_path, "S1", coord_scale=0.25, image=None)
    with pytest.raises(InputError, match=r"25 um.*100 um is expected.*0\.25x too small.*hires") as ei:
        read_spaceranger(s.outs)
    assert "tissue_positions.csv" in str(ei.value)
    h = make_h5ad_section(tmp_path / "h5", "S2", uns="visium", coord_scale=0.25, image=None)
    with pytest.raises(InputError, match=r"0\.25x too small.*full-resolution") as ei:
        read_h5ad_section(h.path)
    assert "S2.h5ad" in str(ei.value)


def test_spaceranger_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="outs folder not found"):
        read_spaceranger(tmp_path / "nope")
    s = make_spaceranger_outs(tmp_path, "S1", image=None)
    s.positions.unlink()
    with pytest.raises(InputError, match="no tissue_positions.csv or tissue_positions_list.csv"):
        read_spaceranger(s.outs)
    s = make_spaceranger_outs(tmp_path, "S2", image=None)
    s.matrix.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(InputError, match=r"filtered_feature_bc_matrix\.h5: not a readable HDF5"):
        read_spaceranger(s.outs)
    with h5py.File(s.matrix, "w") as f:
        f.create_group("GRCh38")  # pre-v3 layout
    with pytest.raises(InputError, match="no 'matrix' group"):
        read_spaceranger(s.outs)
    s = make_spaceranger_outs(tmp_path, "S3", image=None)
    with h5py.File(s.matrix, "a") as f:
        del f["matrix/indptr"]
    with pytest.raises(InputError, match="lacks matrix/indptr"):
        read_10x_counts(s.matrix)
    s = make_spaceranger_outs(tmp_path, "S4", image=None)
    with h5py.File(s.matrix, "a") as f:
        f["matrix/shape"][0] = 3
    with pytest.raises(InputError, match="does not match 7 features x 34 barcodes"):
        read_10x_counts(s.matrix)
    s = make_spaceranger_outs(tmp_path, "S5", matrix="mtx", image=None)
    (s.matrix / "barcodes.tsv.gz").unlink()
    with pytest.raises(InputError, match="missing barcodes.tsv.gz"):
        read_spaceranger(s.outs)
    s = make_spaceranger_outs(tmp_path, "S6", matrix="mtx", image=None)
    (s.matrix / "matrix.mtx.gz").write_bytes((s.matrix / "matrix.mtx.gz").read_bytes()[:40])
    with pytest.raises(InputError, match=r"matrix\.mtx\.gz"):
        read_spaceranger(s.outs)
    shutil.rmtree(s.matrix)
    with pytest.raises(InputError, match="not a Space Ranger outs folder"):
        read_spaceranger(s.outs)


def test_spots_outside_image(tmp_path: Path) -> None:
    s = make_spaceranger_outs(tmp_path, "S1")
    write_image(s.image, s.truth.__class__(**{**s.truth.__dict__, "width": 150}))
    with pytest.raises(InputError, match=r"spot\(s\) lie outside the image \(150 x \d+ px of image\.tif\)"):
        read_spaceranger(s.outs, image=s.image)


# --------------------------------------------------------------------------- generic h5ad


def test_h5ad_mpp_and_grid_sources(tmp_path: Path) -> None:
    a = make_h5ad_section(tmp_path, "V", uns="visium", image=None)
    r = read_h5ad_section(a.path)
    assert r.uns["stgen"]["grid"] == "hex" and r.uns["stgen"]["mpp"] == pytest.approx(2.0)
    assert r.uns["stgen"]["mpp_source"] == "uns['spatial'] spot_diameter_fullres"
    assert_matches(r, a.truth)

    b = make_h5ad_section(tmp_path, "N", uns=None, tiff_mpp=1.9)
    with pytest.raises(InputError, match=r"N\.h5ad: unknown spot grid.*grid='hex'"):
        read_h5ad_section(b.path, image=b.image)
    r = read_h5ad_section(b.path, image=b.image, grid="hex")
    assert r.uns["stgen"]["mpp"] == pytest.approx(1.9) and r.uns["stgen"]["mpp_source"] == "image resolution tags"
    with pytest.raises(InputError, match=r"N\.h5ad: no microns-per-pixel.*pass mpp="):
        read_h5ad_section(b.path, grid="hex")
    r = read_h5ad_section(b.path, grid="hex", mpp=2.0, section="other")
    assert r.uns["stgen"]["section"] == "other" and r.uns["stgen"]["image_path"] is None
    with pytest.raises(InputError, match="unknown spot grid 'hexagonal'"):
        read_h5ad_section(b.path, grid="hexagonal", mpp=2.0)

    sq = make_h5ad_section(tmp_path, "Q", grid="square", n_spots=25, image="png")
    r = read_h5ad_section(sq.path, image=sq.image)
    assert r.uns["stgen"]["grid"] == "square" and r.uns["stgen"]["spot_spacing_um"] == 200.0
    assert_matches(r, sq.truth)
    with pytest.raises(InputError, match=r"100 um .* 200 um is expected.*0\.5x too small"):  # half the true mpp
        read_h5ad_section(sq.path, image=sq.image, mpp=1.0)


def test_h5ad_counts_checks(tmp_path: Path) -> None:
    h = make_h5ad_section(tmp_path, "C", image=None)
    a = ad.read_h5ad(h.path)
    # raw X without counts layer: normalised X is rejected naming .X
    del a.layers["counts"]
    a.write_h5ad(h.path)
    with pytest.raises(InputError, match=r"C\.h5ad: \.X: non-integer count .*layers\['counts'\]"):
        read_h5ad_section(h.path)
    cases = {"negative": -1.0, "NaN": np.nan, "non-integer": 0.5}
    for what, v in cases.items():
        b = ad.read_h5ad(h.path)
        c = np.rint(np.expm1(b.X.toarray()))
        c[0, 0] = v
        b.layers["counts"] = sp.csr_matrix(c)
        b.write_h5ad(h.path)
        with pytest.raises(InputError, match=rf"layers\['counts'\]: .*{what}"):
            read_h5ad_section(h.path)
    b = ad.read_h5ad(h.path)
    del b.obsm["spatial"]
    b.write_h5ad(h.path)
    with pytest.raises(InputError, match=r"no obsm\['spatial'\]"):
        read_h5ad_section(h.path, mpp=2, grid="hex")
    b.obsm["spatial"] = np.full((b.n_obs, 2), 5.0)
    b.obsm["spatial"][3, 1] = np.inf
    b.write_h5ad(h.path)
    with pytest.raises(InputError, match=r"non-finite value\(s\) in obsm\['spatial'\]\[:, 1\]"):
        read_h5ad_section(h.path, mpp=2, grid="hex")
    h.path.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(InputError, match=r"C\.h5ad: not a readable h5ad"):
        read_h5ad_section(h.path)
    with pytest.raises(InputError, match="h5ad file not found"):
        read_h5ad_section(tmp_path / "missing.h5ad")


# --------------------------------------------------------------------------- scale check


def test_check_spot_scale() -> None:
    xy = np.array([[0, 0], [50, 0], [100, 0], [25, 43.3], [75, 43.3]], dtype=float)
    assert check_spot_scale(xy, 2.0, 100.0, "x") == pytest.approx(100.0, rel=1e-3)
    assert check_spot_scale(xy, 2.2, 100.0, "x") == pytest.approx(110.0, rel=1e-3)  # within 25 %
    with pytest.raises(InputError, match=r"src: median spot spacing is 17 um .* 100 um is expected; .*0\.17x too small"):
        check_spot_scale(xy * 0.17, 2.0, 100.0, "src")
    with pytest.raises(InputError, match=r"200 um .*2x too large"):
        check_spot_scale(xy, 4.0, 100.0, "src")
    assert np.isnan(check_spot_scale(xy[:1], 2.0, 100.0, "x"))


def test_scale_check_uses_the_array_lattice_for_a_subset() -> None:
    """A QC-filtered or cropped Visium section (sparse spots) passes when the array coordinates give the pitch;
    a wrong scale still fails with the same message; pixels that do not follow the array are refused."""
    rows, cols = np.meshgrid(np.arange(30), np.arange(60), indexing="ij")
    keep = (rows + cols) % 2 == 0  # Visium: columns alternate between rows
    a = np.column_stack([cols[keep], rows[keep]])
    xy = np.column_stack([a[:, 0] * 50.0, a[:, 1] * 86.6]) + 1000.0  # 100 um pitch at 1 um/px
    sub = np.random.default_rng(0).choice(len(a), 60, replace=False)  # 60 of 900 spots
    with pytest.raises(InputError, match="median spot spacing.*too large"):  # nearest neighbours are far apart
        check_spot_scale(xy[sub], 1.0, 100.0, "s")
    assert check_spot_scale(xy[sub], 1.0, 100.0, "s", array_xy=a[sub], grid="hex") == pytest.approx(100.0, rel=1e-6)
    with pytest.raises(InputError, match=r"s: spot pitch from the array coordinates is 200 um .*2x too large"):
        check_spot_scale(xy[sub] * 2, 1.0, 100.0, "s", array_xy=a[sub], grid="hex")
    shuffled = a[sub][np.random.default_rng(1).permutation(len(sub))]
    with pytest.raises(InputError, match="do not follow the array coordinates"):
        check_spot_scale(xy[sub], 1.0, 100.0, "s", array_xy=shuffled, grid="hex")
    # legacy ST square grid, one array step = one pitch; collinear spots fall back to nearest neighbours
    sq = np.column_stack([np.arange(10) % 5, np.arange(10) // 5])
    assert check_spot_scale(sq * 200.0, 1.0, 200.0, "q", array_xy=sq, grid="square") == pytest.approx(200.0)
    line = np.column_stack([np.arange(5), np.zeros(5)])
    assert check_spot_scale(line * 200.0, 1.0, 200.0, "q", array_xy=line) == pytest.approx(200.0)


def test_space_ranger_matrix_with_a_sparse_subset_of_spots_reads(tmp_path) -> None:
    """Issue 18's report: a filtered matrix holding only some in-tissue spots (QC, subsetting) read with the
    positions table of the whole array; its nearest-neighbour spacing is several pitches, the array lattice
    gives the true pitch."""
    from reader_fixtures import write_10x_h5

    s = make_spaceranger_outs(tmp_path, n_spots=300, seed=4)
    idx = s.truth.order(filtered=True)
    idx = idx[(s.truth.array_row[idx] % 3 == 0) & (s.truth.array_col[idx] % 6 < 2)]  # spots 3 pitches apart
    write_10x_h5(s.matrix, s.truth, idx)
    a = read_spaceranger(s.outs, image=s.image)
    assert a.n_obs == len(idx)
    xy = a.obsm["spatial"]
    with pytest.raises(InputError, match="median spot spacing"):  # the old nearest-neighbour check refuses it
        check_spot_scale(xy, a.uns["stgen"]["mpp"], 100.0, "subset")


# --------------------------------------------------------------------------- data sets


def test_detect_format_and_errors(tmp_path: Path) -> None:
    make_her2st_root(tmp_path / "her2st")
    make_hest_sample(tmp_path / "hest", "TENX1", wsi=False)
    make_spaceranger_outs(tmp_path / "visium", "P1", image=None)
    make_h5ad_section(tmp_path / "h5ad", "S1", image=None)
    for fmt in ("her2st", "hest", "visium", "h5ad"):
        assert detect_format(tmp_path / fmt) == fmt
        ds = open_dataset(tmp_path / fmt)
        assert ds.format == fmt and ds.root == tmp_path / fmt
    # a single outs folder (or its sample folder) is a one-section visium data set
    assert open_dataset(tmp_path / "visium/P1/outs").sections() == ["P1"]
    assert open_dataset(tmp_path / "visium/P1").sections() == ["P1"]
    # ambiguous: sample outs + loose h5ad
    shutil.copy(tmp_path / "h5ad/S1.h5ad", tmp_path / "visium/extra.h5ad")
    with pytest.raises(InputError, match="ambiguous.*visium, h5ad.*format="):
        open_dataset(tmp_path / "visium")
    assert open_dataset(tmp_path / "visium", format="h5ad").sections() == ["extra"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="unrecognised.*ST-cnts.*st/\\*\\.h5ad.*outs.*\\*\\.h5ad"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(InputError, match="not a hest data set"):
        open_dataset(tmp_path / "h5ad", format="hest")
    with pytest.raises(InputError, match="unknown data-set format 'zarr'"):
        open_dataset(tmp_path / "h5ad", format="zarr")
    with pytest.raises(InputError, match="folder not found"):
        open_dataset(tmp_path / "nowhere")


def test_visium_dataset_conventions(tmp_path: Path) -> None:
    a = make_spaceranger_outs(tmp_path, "P2", image="tif")
    make_spaceranger_outs(tmp_path, "P1", image=None, matrix="mtx")
    ds = open_dataset(tmp_path)
    # P1 has only Space Ranger's hires/lowres PNGs: imaged through the hires one, at its scale factor
    assert ds.sections() == ["P1", "P2"] and ds.sections(imaged_only=True) == ["P1", "P2"]
    assert ds.image("P2") == a.image and ds.image("P1") is None
    r = ds.read("P2", require_image=True)
    assert_layout(r, "P2")
    assert r.uns["stgen"]["image_path"] == str(a.image) and "image_scale" not in r.uns["stgen"]
    with pytest.warns(LowResolutionImageWarning, match=r"P1: no full-resolution image; using tissue_hires_image"):
        h = ds.read("P1", require_image=True)
    assert h.uns["stgen"]["image_path"] == str(tmp_path / "P1/outs/spatial/tissue_hires_image.png")
    assert h.uns["stgen"]["image_scale"] == 0.25
    for kind in ("hires", "lowres"):
        (tmp_path / f"P1/outs/spatial/tissue_{kind}_image.png").unlink()
    assert ds.sections(imaged_only=True) == ["P2"]
    with pytest.raises(InputError, match="'P1' has no H&E image"):
        ds.read("P1", require_image=True)
    assert ds.read("P1").uns["stgen"]["image_path"] is None
    c = ds.counts("P2")
    assert list(c.obs_names) == list(r.obs_names) and list(c.var_names) == list(r.var_names)
    np.testing.assert_array_equal(c.X.toarray(), r.X.toarray())
    assert (c.obs["section"] == "P2").all()
    # full-resolution image inside outs/spatial/ (name contains "fullres")
    write_image(tmp_path / "P1/outs/spatial/P1_fullres.tif", a.truth)
    assert ds.image("P1") == tmp_path / "P1/outs/spatial/P1_fullres.tif"
    # several images in a sample folder: image.<ext> wins, otherwise an error
    shutil.copy(a.image, tmp_path / "P2/thumb.tif")
    assert ds.image("P2") == a.image
    a.image.rename(tmp_path / "P2/scan.tif")
    with pytest.raises(InputError, match="several images.*scan.tif.*thumb.tif"):
        ds.image("P2")
    with pytest.raises(InputError, match=r"unknown section 'P9'.*available: P1, P2"):
        ds.read("P9")


def test_hest_and_h5ad_datasets(tmp_path: Path) -> None:
    h = make_hest_sample(tmp_path / "hest", "TENX2")
    make_hest_sample(tmp_path / "hest", "TENX1", wsi=False, seed=1)
    ds = open_dataset(tmp_path / "hest", mpp=2.0)
    assert ds.sections() == ["TENX1", "TENX2"] and ds.sections(imaged_only=True) == ["TENX2"]
    assert ds.image("TENX2") == h.wsi and ds.technology("TENX2") == "Visium"
    r = ds.read("TENX2")
    assert r.uns["stgen"]["mpp_source"] == "argument"
    c = ds.counts("TENX2")
    assert list(c.obs_names) == list(r.obs_names)
    np.testing.assert_array_equal(c.X.toarray(), r.X.toarray())
    with pytest.raises(InputError, match="has no image"):
        ds.read("TENX1", require_image=True)

    s1 = make_h5ad_section(tmp_path / "h5", "S1")
    make_h5ad_section(tmp_path / "h5", "S0", uns=None, image=None, counts_layer=False)
    ds = open_dataset(tmp_path / "h5", grid="hex", mpp=2.0)
    assert ds.sections() == ["S0", "S1"] and ds.sections(imaged_only=True) == ["S1"]
    assert ds.image("S1") == s1.image
    r = ds.read("S1", require_image=True)
    assert_layout(r, "S1")
    assert_matches(r, s1.truth)
    np.testing.assert_array_equal(ds.counts("S0").X.toarray(), r.X.toarray())  # same seed, raw .X
    write_image(tmp_path / "h5/S1.png", s1.truth)
    with pytest.raises(InputError, match="several images for section 'S1'"):
        ds.image("S1")


def test_her2st_dataset_adapter(tmp_path: Path) -> None:
    h = make_her2st_root(tmp_path)
    ds = open_dataset(tmp_path)
    assert isinstance(ds, Dataset) and ds.format == "her2st"
    assert ds.sections() == her2st.list_sections(tmp_path) == ["A1", "B1"]
    assert ds.sections(imaged_only=True) == ["A1"] and ds.image("A1") == her2st.find_image(tmp_path, "A1")
    for sec in ("A1", "B1"):
        a, ref = ds.read(sec), her2st.read_section(tmp_path, sec)
        assert_layout(a, sec)
        assert list(a.obs_names) == list(ref.obs_names) and list(a.var_names) == list(ref.var_names)
        np.testing.assert_array_equal(a.X.toarray(), ref.X.toarray())
        assert a.obs.equals(ref.obs)
        np.testing.assert_array_equal(a.obsm["spatial"], ref.obsm["spatial"])
        extra = {"grid": "square", "mpp_source": "spot lattice"}
        assert a.uns["stgen"] == {**ref.uns["stgen"], **extra}
        assert a.uns["stgen"]["mpp"] == pytest.approx(2.0)
        # the synthetic section in Her2ST form has the same counts as its HEST form
        np.testing.assert_array_equal(a.obsm["spatial"], np.column_stack([h.truths[sec].pixel_x, h.truths[sec].pixel_y]))
        c = ds.counts(sec)
        assert list(c.obs_names) == list(ref.obs_names)  # '99x99' (no position) dropped
        np.testing.assert_array_equal(c.X.toarray(), ref.X.toarray())
    with pytest.raises(InputError, match="B1"):
        ds.read("B1", require_image=True)
    with pytest.raises(InputError, match="mpp/grid overrides"):
        open_dataset(tmp_path, mpp=1.0)
