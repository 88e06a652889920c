"""Visium HD binned outputs (Space Ranger >= 3.0): reading bins, the hires fallback, data-set detection, bad
inputs, and a ridge fit + predict on a tiny real-format outs folder."""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image
from reader_fixtures import (
    he_image,
    make_spaceranger_outs,
    write_10x_h5,
    write_pyramid_tiff,
)

from stgen.data.common import section_image
from stgen.data.dataset import VisiumHdDataset, detect_format, open_dataset
from stgen.data.visium_hd import read_visium_hd, read_visium_hd_counts
from stgen.errors import InputError, LowResolutionImageWarning

MPP = 2.0  # um per full-resolution px: 16 um bins are 8 px apart, the images stay ~100 px a side
HIRES, LOWRES = 0.25, 0.1
GENES = ["ACTB", "GAPDH", "ERBB2", "KRT19", "EPCAM", "VIM", "CD74", "COL1A1"]
OBS_COLUMNS = ["array_x", "array_y", "pixel_x", "pixel_y", "section"]
UNS_KEYS = {"section", "image_path", "mpp", "spot_diameter_um", "spot_spacing_um", "source", "grid", "mpp_source"}
OWN_DATA = Path(__file__).resolve().parents[2] / "docs" / "own-data.md"


# --------------------------------------------------------------------------- fixture


def make_visium_hd(root: Path, sample: str = "S1", bins: tuple[int, ...] = (8, 16), side_um: float = 160.0,
                   seed: int = 0, image: bool = True, angle_deg: float = 3.0) -> SimpleNamespace:
    """A Visium HD sample ``root/<sample>/outs/`` in Space Ranger's layout, for the bin sizes ``bins``.

    The finest bins tile a ``side_um`` square; coarser bins sum their ``(b / finest)^2`` children (as Space
    Ranger aggregates 2 um squares). Full-resolution pixels = the lattice in microns, x mirrored (array_col
    runs right to left, as on real slides), rotated by ``angle_deg``, / ``MPP``. A disc of bins is in tissue;
    the filtered matrix holds those (sorted barcodes ``s_016um_<row>_<col>-1``), the parquet all bins. Each
    ``square_NNNum/spatial/`` and ``outs/spatial/`` get the hires/lowres PNGs; ``image`` writes the
    full-resolution pyramidal TIFF ``<sample>/image.tif`` (resolution tags = ``MPP``).
    """
    rng = np.random.default_rng(seed)
    fine = min(bins)
    n = round(side_um / fine)
    th = math.radians(angle_deg)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])

    def to_px(u, v):  # lattice microns -> (x, y) px before the shift
        return (rot @ np.vstack([-np.asarray(u, float), np.asarray(v, float)])).T / MPP

    corners = to_px([0, side_um, 0, side_um], [0, 0, side_um, side_um])
    margin = 10.0
    shift = margin - corners.min(axis=0)
    width, height = (math.ceil(v) for v in corners.max(axis=0) + shift + margin)
    rr, cc = np.divmod(np.arange(n * n), n)
    u, v = (cc + 0.5) * fine, (rr + 0.5) * fine
    lam = 0.3 + 2.0 * np.exp(-((u[:, None] - side_um * rng.uniform(0.2, 0.8, len(GENES))) ** 2
                                + (v[:, None] - side_um * rng.uniform(0.2, 0.8, len(GENES))) ** 2) / (0.2 * side_um) ** 2)
    base = rng.poisson(lam * (fine / 8.0) ** 2)  # (n*n, genes) counts of the finest bins

    sample_dir = Path(root) / sample
    outs = sample_dir / "outs"
    he = Image.fromarray(he_image(SimpleNamespace(width=width, height=height)))
    pngs = {k: he.resize((max(1, round(width * s)), max(1, round(height * s))), Image.BOX)
            for k, s in (("hires", HIRES), ("lowres", LOWRES))}
    (outs / "spatial").mkdir(parents=True)
    for k, im in pngs.items():
        im.save(outs / "spatial" / f"tissue_{k}_image.png")
    levels = {}
    for b in bins:
        k = b // fine
        m = n // k
        r, c = np.divmod(np.arange(m * m), m)
        parent = (rr // k) * m + (cc // k)
        counts = np.zeros((m * m, len(GENES)), dtype=np.int64)
        np.add.at(counts, parent, base)
        bu, bv = (c + 0.5) * b, (r + 0.5) * b
        xy = to_px(bu, bv) + shift
        in_tissue = (bu - side_um / 2) ** 2 + (bv - side_um / 2) ** 2 <= (0.42 * side_um) ** 2
        barcodes = [f"s_{b:03d}um_{i:05d}_{j:05d}-1" for i, j in zip(r, c)]
        truth = SimpleNamespace(
            bin_um=b, barcodes=barcodes, in_tissue=in_tissue, array_row=r, array_col=c, pixel_x=xy[:, 0],
            pixel_y=xy[:, 1], counts=counts, feature_names=list(GENES), feature_types=["Gene Expression"] * len(GENES),
            feature_ids=[f"ENSG{i:011d}" for i in range(len(GENES))])
        d = outs / "binned_outputs" / f"square_{b:03d}um"
        (d / "spatial").mkdir(parents=True)
        idx = np.flatnonzero(in_tissue)  # row-major = sorted barcodes
        write_10x_h5(d / "filtered_feature_bc_matrix.h5", truth, idx)
        pd.DataFrame({
            "barcode": barcodes, "in_tissue": in_tissue.astype(np.int32), "array_row": r.astype(np.int32),
            "array_col": c.astype(np.int32), "pxl_row_in_fullres": xy[:, 1], "pxl_col_in_fullres": xy[:, 0],
        }).to_parquet(d / "spatial" / "tissue_positions.parquet", index=False)
        sf = {"spot_diameter_fullres": b / MPP, "bin_size_um": float(b), "microns_per_pixel": MPP,
              "regist_target_img_scalef": 0.3, "tissue_lowres_scalef": LOWRES,
              "fiducial_diameter_fullres": 80.0 / MPP, "tissue_hires_scalef": HIRES}
        (d / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf, indent=2))
        for kind, im in pngs.items():
            im.save(d / "spatial" / f"tissue_{kind}_image.png")
        truth.dir, truth.idx = d, idx
        truth.X = counts[idx].astype(np.float32)
        truth.xy = xy[idx]
        truth.array_xy = np.column_stack([c[idx], r[idx]])
        levels[b] = truth
    tif = write_pyramid_tiff(sample_dir / "image.tif", he_image(SimpleNamespace(width=width, height=height)),
                             MPP) if image else None
    return SimpleNamespace(root=Path(root), sample_dir=sample_dir, outs=outs, image=tif, bins=levels,
                           width=width, height=height)


@pytest.fixture(scope="module")
def hd(tmp_path_factory):
    """``samples/S1`` (with the full-resolution TIFF) and ``samples/S2`` (hires PNG only); S1's namespace."""
    root = tmp_path_factory.mktemp("hd") / "samples"
    s1 = make_visium_hd(root, "S1")
    s1.s2 = make_visium_hd(root, "S2", seed=1, image=False)
    return s1


def _copy(hd, tmp_path: Path) -> SimpleNamespace:
    """A private copy of the module's sample, to damage."""
    shutil.copytree(hd.sample_dir, tmp_path / "S1")
    outs = tmp_path / "S1" / "outs"
    return SimpleNamespace(outs=outs, bin16=outs / "binned_outputs" / "square_016um",
                           image=tmp_path / "S1" / "image.tif")


def _edit_scalefactors(path: Path, **changes) -> Path:
    p = path / "spatial" / "scalefactors_json.json"
    sf = json.loads(p.read_text())
    for k, v in changes.items():
        if v is None:
            sf.pop(k)
        else:
            sf[k] = v
    p.write_text(json.dumps(sf))
    return p


def assert_bins(a, truth, section: str = "S1") -> None:
    assert isinstance(a.X, (sp.csr_matrix, sp.csr_array)) and a.X.dtype == np.float32
    assert list(a.obs.columns) == OBS_COLUMNS and (a.obs["section"] == section).all()
    assert a.obs["array_x"].dtype == np.int64 and a.obs["pixel_x"].dtype == np.float64
    assert list(a.obs_names) == [truth.barcodes[i] for i in truth.idx]
    assert list(a.var_names) == GENES
    np.testing.assert_array_equal(a.X.toarray(), truth.X)
    np.testing.assert_array_equal(a.obsm["spatial"], truth.xy)
    np.testing.assert_array_equal(a.obs[["array_x", "array_y"]].to_numpy(), truth.array_xy)
    m = a.uns["stgen"]
    assert m["grid"] == "square" and m["source"] == "visium_hd" and m["section"] == section
    assert m["spot_spacing_um"] == m["spot_diameter_um"] == float(truth.bin_um)
    assert m["mpp"] == pytest.approx(MPP)


# --------------------------------------------------------------------------- reading


def test_reads_16_and_8_um_bins_with_the_full_resolution_image(hd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full-resolution image: no low-resolution warning
        a16 = read_visium_hd(hd.outs, image=hd.image)
        a8 = read_visium_hd(hd.sample_dir, bin_um=8, image=hd.image)
    assert_bins(a16, hd.bins[16])
    assert_bins(a8, hd.bins[8])
    assert set(a16.uns["stgen"]) == UNS_KEYS and a16.uns["stgen"]["image_path"] == str(hd.image)
    assert a16.uns["stgen"]["mpp_source"] == "scalefactors microns_per_pixel"
    assert 50 <= a16.n_obs < a8.n_obs <= 300
    # the 16 um bins sum their 8 um children: same total counts over the full lattice
    assert hd.bins[16].counts.sum() == hd.bins[8].counts.sum()
    # binned_outputs/ and the square_016um/ folder itself are accepted too
    b = hd.outs / "binned_outputs"
    for p in (b, b / "square_016um"):
        np.testing.assert_array_equal(read_visium_hd(p, image=hd.image).X.toarray(), a16.X.toarray())
    counts = read_visium_hd_counts(hd.outs, bin_um=8)
    assert list(counts.obs_names) == list(a8.obs_names) and (counts.obs["section"] == "S1").all()


def test_mpp_from_the_argument_the_bin_size_or_the_image(hd, tmp_path):
    c = _copy(hd, tmp_path)
    a = read_visium_hd(c.outs, image=c.image, mpp=2.1)
    assert a.uns["stgen"]["mpp"] == 2.1 and a.uns["stgen"]["mpp_source"] == "argument"
    _edit_scalefactors(c.bin16, microns_per_pixel=None)
    a = read_visium_hd(c.outs, image=c.image)
    assert a.uns["stgen"]["mpp"] == pytest.approx(MPP)
    assert a.uns["stgen"]["mpp_source"] == "scalefactors bin_size_um / spot_diameter_fullres"
    sf = _edit_scalefactors(c.bin16, spot_diameter_fullres=None)
    a = read_visium_hd(c.outs, image=c.image)
    assert a.uns["stgen"]["mpp_source"] == "image resolution tags" and a.uns["stgen"]["mpp"] == pytest.approx(MPP)
    with pytest.raises(InputError, match=re.escape(str(sf)) + ": no microns_per_pixel or spot_diameter_fullres"):
        read_visium_hd(c.outs)  # the hires PNG has no scan resolution


def test_hires_fallback_sets_the_image_scale_and_warns(hd, tmp_path):
    with pytest.warns(LowResolutionImageWarning, match=r"tissue_hires_image\.png .*x0\.25 of full resolution"):
        a = read_visium_hd(hd.outs)
    info = a.uns["stgen"]
    png = hd.outs / "binned_outputs" / "square_016um" / "spatial" / "tissue_hires_image.png"
    assert info["image_path"] == str(png) and info["image_scale"] == HIRES
    assert Image.open(png).size[0] < hd.bins[16].xy[:, 0].max()  # spots lie beyond the PNG: checked at full res
    ref = section_image(a)
    assert ref.path == png and ref.scale == HIRES
    from stgen.image.scaled import open_ref

    with open_ref(ref) as slide:
        assert abs(slide.width - hd.width) <= 4 and abs(slide.height - hd.height) <= 4
    np.testing.assert_array_equal(a.obsm["spatial"], hd.bins[16].xy)
    # without the bin's own PNGs, those of outs/spatial/; downsampled=False: expression only, no warning
    c = _copy(hd, tmp_path)
    for p in (c.bin16 / "spatial").glob("tissue_*_image.png"):
        p.unlink()
    with pytest.warns(LowResolutionImageWarning):
        assert read_visium_hd(c.outs).uns["stgen"]["image_path"] == str(c.outs / "spatial" / "tissue_hires_image.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_visium_hd(c.outs, downsampled=False).uns["stgen"]["image_path"] is None
    with pytest.raises(InputError, match="no H&E image"):
        read_visium_hd(c.outs, downsampled=False, require_image=True)


# --------------------------------------------------------------------------- bad inputs


def test_bin_sizes_not_on_disk_or_not_a_multiple_of_2_um(hd, tmp_path):
    for bad, why in ((5, "is not a multiple of 2 um"), (24, "is not there"), (0, "is not a multiple"), ("x", "is not a")):
        with pytest.raises(InputError, match=rf"binned_outputs: bin_um={bad!r} {why}.*8, 16 um bins "
                                             r"\(square_008um, square_016um\)"):
            read_visium_hd(hd.outs, bin_um=bad, image=hd.image)
    with pytest.raises(InputError, match="holds the 8 um bins but bin_um=16"):
        read_visium_hd(hd.outs / "binned_outputs" / "square_008um", image=hd.image)
    two = make_visium_hd(tmp_path, "T", bins=(2, 16), side_um=48.0, image=False)
    with pytest.warns(UserWarning, match="2 um bins are far below a cell.*too sparse to train on"):
        a = read_visium_hd(two.outs, bin_um=2, mpp=MPP, downsampled=False)
    assert a.uns["stgen"]["spot_spacing_um"] == 2.0 and a.n_obs == len(two.bins[2].idx)
    with pytest.raises(InputError, match="not a Visium HD outs folder.*read_spaceranger"):
        read_visium_hd(make_spaceranger_outs(tmp_path / "vis", "V1", image=None).outs)


def test_bad_files_name_the_file_and_field(hd, tmp_path):
    c = _copy(hd, tmp_path)
    pq = c.bin16 / "spatial" / "tissue_positions.parquet"
    df = pd.read_parquet(pq)
    df.drop(columns=["pxl_row_in_fullres"]).to_parquet(pq, index=False)
    with pytest.raises(InputError, match=r"tissue_positions\.parquet: missing column\(s\) pxl_row_in_fullres"):
        read_visium_hd(c.outs, image=c.image)
    df.assign(pxl_row_in_fullres=df["pxl_row_in_fullres"] * HIRES,  # hires-image pixels, not full resolution
              pxl_col_in_fullres=df["pxl_col_in_fullres"] * HIRES).to_parquet(pq, index=False)
    with pytest.raises(InputError, match=r"tissue_positions\.parquet: spot pitch .* but 16 um is expected"):
        read_visium_hd(c.outs, image=c.image)
    pq.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match=r"tissue_positions\.parquet: not a readable parquet file"):
        read_visium_hd(c.outs, image=c.image)
    pq.unlink()
    with pytest.raises(InputError, match=r"square_016um/spatial/tissue_positions\.parquet: tissue positions not found"):
        read_visium_hd(c.outs, image=c.image)
    df.to_parquet(pq, index=False)
    sf = _edit_scalefactors(c.bin16, tissue_hires_scalef=0)
    for value in (0, None):
        _edit_scalefactors(c.bin16, tissue_hires_scalef=value)
        with pytest.raises(InputError, match=rf"{re.escape(str(sf))}: scale factor tissue_hires_scalef is "
                                             rf"{'0' if value == 0 else 'missing'}"):
            read_visium_hd(c.outs)
    _edit_scalefactors(c.bin16, tissue_hires_scalef=HIRES, microns_per_pixel=0)
    with pytest.raises(InputError, match=rf"{re.escape(str(sf))}: microns_per_pixel is 0"):
        read_visium_hd(c.outs, image=c.image)
    _edit_scalefactors(c.bin16, microns_per_pixel=MPP, bin_size_um=8)
    with pytest.raises(InputError, match=r"scalefactors_json\.json: bin_size_um is 8 but the folder square_016um"):
        read_visium_hd(c.outs, image=c.image)
    sf.unlink()
    with pytest.raises(InputError, match=r"scalefactors_json\.json: scale factors not found"):
        read_visium_hd(c.outs, image=c.image)


# --------------------------------------------------------------------------- data sets


def test_dataset_detection_is_unambiguous_and_bin_um_is_chosen(hd, tmp_path):
    for root in (hd.root, hd.sample_dir, hd.outs, hd.outs / "binned_outputs"):
        assert detect_format(root) == "visium_hd", root
    assert detect_format(hd.root / "S1" / "outs" / "binned_outputs") == "visium_hd"
    ds = open_dataset(hd.root)
    assert isinstance(ds, VisiumHdDataset) and ds.bin_um == 16 and ds.sections() == ["S1", "S2"]
    assert ds.sections(imaged_only=True) == ["S1", "S2"]  # S2: its hires PNG
    assert ds.image("S1") == hd.image and ds.image("S2") is None
    a = ds.read("S1")
    assert a.uns["stgen"]["spot_spacing_um"] == 16.0 and list(ds.counts("S1").obs_names) == list(a.obs_names)
    with pytest.warns(LowResolutionImageWarning):
        assert ds.read("S2", require_image=True).uns["stgen"]["image_scale"] == HIRES
    a8 = VisiumHdDataset(hd.root, bin_um=8).read("S1")
    assert a8.uns["stgen"]["spot_spacing_um"] == 8.0 and a8.n_obs == len(hd.bins[8].idx)
    assert open_dataset(hd.outs).sections() == ["S1"]
    with pytest.raises(InputError, match="not a visium data set"):
        open_dataset(hd.root, format="visium")
    with pytest.raises(InputError, match="bin_um=5"):
        VisiumHdDataset(hd.root, bin_um=5)
    with pytest.raises(InputError, match="square grid"):
        open_dataset(hd.root, grid="hex")
    # a Visium (55 um spots) sample beside a Visium HD one: both formats match, the user must choose
    mixed = tmp_path / "mixed"
    shutil.copytree(hd.sample_dir, mixed / "HD1")
    make_spaceranger_outs(mixed, "V1", image=None)
    with pytest.raises(InputError, match="ambiguous data-set layout, matches visium, visium_hd"):
        detect_format(mixed)
    assert open_dataset(mixed, format="visium_hd").sections() == ["HD1"]
    assert open_dataset(mixed, format="visium").sections() == ["V1"]
    assert detect_format(make_spaceranger_outs(tmp_path / "vis", "V2", image=None).root) == "visium"


def test_ridge_fit_and_predict_on_visium_hd_bins(tmp_path, one_thread):
    from model_fixtures import TINY

    from stgen.workflows.config import StgenConfig
    from stgen.workflows.fit import fit
    from stgen.workflows.predict import predict

    root = tmp_path / "hd"
    make_visium_hd(root, "S1", seed=0, image=False)  # trains on its hires PNG
    test = make_visium_hd(root, "S2", seed=1)
    # the fixture's hires PNG holds too few stained pixels for a stain matrix (ridge's default is macenko)
    cfg = StgenConfig.from_dict({"data": TINY["data"], "features": {**TINY["features"], "stain": "none"}})
    with pytest.warns(LowResolutionImageWarning):
        meta = fit(root, "S2", tmp_path / "run", model="ridge", cfg=cfg, cache_dir=tmp_path / "cache",
                   progress=False)
    assert meta["train_sections"] == ["S1"] and set(meta["panel"]) <= set(GENES)
    assert meta["spots"]["grid"] == "square" and meta["spots"]["spacing_um"] == 16.0
    spots = tmp_path / "S2_bins.h5ad"
    truth = read_visium_hd(test.outs, image=test.image)
    truth.write_h5ad(spots)
    pred = predict(tmp_path / "run", test.image, spots, tmp_path / "pred.h5ad", cache_dir=tmp_path / "cache",
                   progress=False)
    assert pred.n_obs == truth.n_obs and list(pred.var_names) == meta["panel"]
    assert np.isfinite(pred.X).all()
    np.testing.assert_array_equal(pred.obsm["spatial"], truth.obsm["spatial"])


def test_own_data_docs_visium_hd_block_runs(hd):
    text = OWN_DATA.read_text()
    section = text[text.index("## Visium HD bins"):]
    blocks = re.findall(r"```python\n(.*?)```", section.split("\n## ")[0], flags=re.DOTALL)
    assert blocks
    ns = {"HD_DIR": hd.root}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LowResolutionImageWarning)
        for code in blocks:
            exec(compile(code, "own-data.md[Visium HD bins]", "exec"), ns)  # noqa: S102 - the docs' own code
