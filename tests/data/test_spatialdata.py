"""SpatialData in and out: stores built with spatialdata's own API are read as sections (coordinates through
the elements' transformations), fitted and predicted on; ``predict --spatialdata`` writes a store that
spatialdata reads back; bad stores get one clear error and failed writes leave nothing."""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from reader_fixtures import he_image, synthetic_section

from stgen.errors import InputError

sd = pytest.importorskip("spatialdata")
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import (
    Identity,
    Scale,
    Sequence,
    Translation,
    get_transformation,
)

MPP = 2.0
OFFSET_UM = (30.0, -12.5)  # the image's origin in the microns coordinate system


def make_store(path, seed=0, image=True, lowres=False, visium=True, n_spots=40, shift_px=0.0, twins=False):
    """A Visium-like store in microns: image px -> um by Scale(mpp) then Translation(OFFSET_UM); spot circles
    (55 um) in um, listed in another order than the table; the table annotates them by ``spot_id``.
    ``twins``: a second image of the same resolution and a second table annotating the same circles."""
    truth = synthetic_section(n_spots=n_spots, mpp=MPP, grid="hex", seed=seed)
    ex = truth.expected()
    n = len(ex.spots)
    rng = np.random.default_rng(seed)
    img_to_um = Sequence([Scale([MPP, MPP], axes=("x", "y")), Translation(list(OFFSET_UM), axes=("x", "y"))])
    rgb = np.moveaxis(he_image(truth), -1, 0)
    images = {}
    if image:
        images["he"] = Image2DModel.parse(rgb, dims=("c", "y", "x"), c_coords=["r", "g", "b"], scale_factors=[2],
                                          chunks=(3, 64, 64), transformations={"global": img_to_um})
    if lowres:  # a 4x coarser copy: the reader takes the finest image
        low = Sequence([Scale([4 * MPP, 4 * MPP], axes=("x", "y")), Translation(list(OFFSET_UM), axes=("x", "y"))])
        images["he_lowres"] = Image2DModel.parse(np.ascontiguousarray(rgb[:, ::4, ::4]), dims=("c", "y", "x"),
                                                 c_coords=["r", "g", "b"], transformations={"global": low})
    ids = np.arange(n) * 3 + 7
    perm = rng.permutation(n)
    centres_um = (ex.xy + shift_px) * MPP + np.asarray(OFFSET_UM)
    shapes = ShapesModel.parse(centres_um[perm], geometry=0, radius=np.full(n, 27.5), index=ids[perm],
                               transformations={"global": Identity()})
    obs = {"region": ["spots"] * n, "spot_id": ids}
    if visium:
        obs.update(array_col=ex.array_xy[:, 0], array_row=ex.array_xy[:, 1])
    obs = pd.DataFrame(obs, index=pd.Index(ex.spots))
    obs["region"] = obs["region"].astype("category")
    table = ad.AnnData(X=ex.X.astype(np.int64), obs=obs, var=pd.DataFrame(index=pd.Index(ex.genes)))
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    tables = {"table": table}
    if twins:
        images["he2"] = Image2DModel.parse(rgb, dims=("c", "y", "x"), transformations={"global": img_to_um})
        tables["table2"] = TableModel.parse(table.copy())
    with _quiet():
        sd.SpatialData(images=images, shapes={"spots": shapes}, tables=tables).write(path)
    return truth, ex


@contextlib.contextmanager
def _quiet():
    """Without zarr's notes on sharding defaults."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _finest(image):
    """The full-resolution array of an image element (a multiscale one's ``scale0``)."""
    return image["scale0"]["image"] if "scale0" in getattr(image, "children", {}) else image


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_read_store_maps_spots_into_image_pixels(tmp_path, cache):
    from stgen.data.common import section_image
    from stgen.data.dataset import open_dataset
    from stgen.data.spatialdata import read_spatialdata_section
    from stgen.image.scaled import open_ref

    store = tmp_path / "sec.zarr"
    truth, ex = make_store(store, lowres=True)
    a = read_spatialdata_section(store)
    assert list(a.obs_names) == ex.spots and list(a.var_names) == ex.genes
    assert np.array_equal(a.X.toarray(), ex.X) and a.X.dtype == np.float32
    np.testing.assert_allclose(a.obsm["spatial"], ex.xy, atol=1e-6)  # um -> px through both transformations
    np.testing.assert_allclose(a.obs[["pixel_x", "pixel_y"]].to_numpy(), ex.xy, atol=1e-6)
    assert np.array_equal(a.obs[["array_x", "array_y"]].to_numpy(), ex.array_xy)
    info = a.uns["stgen"]
    assert info["mpp"] == pytest.approx(MPP) and info["grid"] == "hex" and info["section"] == "sec"
    assert info["source"] == "spatialdata" and "radius" in info["mpp_source"]
    assert info["spatialdata"] == {"store": str(store), "table": "table", "shapes": "spots", "image": "he",
                                   "coordinate_system": "global"}
    img = section_image(a)
    assert img.scale == 1.0 and img.path.parent == cache / "images" and img.path.suffix == ".tif"
    with open_ref(img) as s:
        assert (s.width, s.height) == (truth.width, truth.height) and s.mpp == pytest.approx(MPP)
        assert np.array_equal(s.read_region(0, 0, s.width, s.height), he_image(truth))
    stamp = img.path.stat().st_mtime_ns
    again = read_spatialdata_section(store)
    assert again.uns["stgen"]["image_path"] == str(img.path) and img.path.stat().st_mtime_ns == stamp  # reused

    # explicit choices, a coarser image, and the Dataset around it
    low = read_spatialdata_section(store, image="he_lowres", mpp=4 * MPP, grid="hex")
    np.testing.assert_allclose(low.obsm["spatial"], ex.xy / 4, atol=1e-6)
    assert low.uns["stgen"]["mpp_source"] == "argument"
    ds = open_dataset(tmp_path)
    assert ds.format == "spatialdata" and ds.sections(imaged_only=True) == ["sec"]
    assert np.array_equal(ds.counts("sec").X.toarray(), ex.X) and ds.image("sec") == img.path
    assert open_dataset(store).sections() == ["sec"]


def test_bad_stores_get_one_clear_error(tmp_path, cache):
    from stgen.data.spatialdata import read_spatialdata_section

    bare = tmp_path / "bare.zarr"
    _, ex = make_store(bare, image=False)
    with pytest.raises(InputError, match=r"bare\.zarr.*'images' field is empty"):
        read_spatialdata_section(bare, require_image=True)
    a = read_spatialdata_section(bare)  # expression-only use: coordinates stay in the store's units (um)
    assert a.uns["stgen"]["image_path"] is None
    np.testing.assert_allclose(a.obsm["spatial"], ex.xy * MPP + np.asarray(OFFSET_UM), atol=1e-6)
    assert a.uns["stgen"]["mpp"] == pytest.approx(1.0)  # the 55 um circles are 55 units across
    assert not (cache / "images").exists() or not any((cache / "images").iterdir())

    plain = tmp_path / "plain.zarr"
    make_store(plain, visium=False)
    with pytest.raises(InputError, match=r"plain\.zarr: tables\['table'\]: unknown spot grid"):
        read_spatialdata_section(plain)
    assert read_spatialdata_section(plain, grid="hex").uns["stgen"]["mpp"] == pytest.approx(MPP)
    with pytest.raises(InputError, match=r"no image 'nope' \(images: he\)"):
        read_spatialdata_section(plain, image="nope", grid="hex")
    with pytest.raises(InputError, match=r"no table 'x' \(tables: table\)"):
        read_spatialdata_section(plain, table="x", grid="hex")

    twins = tmp_path / "twins.zarr"
    make_store(twins, twins=True)
    with pytest.raises(InputError, match=r"twins\.zarr: several tables annotate spot circles \(table, table2\); "
                                         "pass table="):
        read_spatialdata_section(twins)
    with pytest.raises(InputError, match=r"twins\.zarr: several RGB images \(he, he2\) .*pass image="):
        read_spatialdata_section(twins, table="table2")
    assert read_spatialdata_section(twins, table="table2", image="he2").uns["stgen"]["spatialdata"]["image"] == "he2"
    with pytest.raises(InputError, match=r"no transformation to coordinate system 'um'.*shared: global"):
        read_spatialdata_section(twins, table="table", image="he", coordinate_system="um")

    outside = tmp_path / "outside.zarr"
    make_store(outside, shift_px=400.0)
    cached = sorted((cache / "images").iterdir())
    with pytest.raises(InputError, match=r"outside\.zarr.*outside the image.*images\['he'\]"):
        read_spatialdata_section(outside)
    assert sorted((cache / "images").iterdir()) == cached  # refused before the image is written
    with pytest.raises(InputError, match="SpatialData store not found"):
        read_spatialdata_section(tmp_path / "missing.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(InputError, match=r"empty\.zarr: not a SpatialData store"):
        read_spatialdata_section(tmp_path / "empty.zarr")


def test_fit_on_stores_predict_and_write_spatialdata(tmp_path, cache, one_thread):
    from typer.testing import CliRunner

    from stgen.cli import app
    from stgen.data.dataset import open_dataset
    from stgen.workflows.config import StgenConfig
    from stgen.workflows.fit import fit

    data = tmp_path / "stores"
    data.mkdir()
    for i in range(3):
        make_store(data / f"S{i}.zarr", seed=i)
    cfg = StgenConfig.from_dict({"features": {"encoder": "rgb-stats", "patch_um": 110.0}, "data": {"n_top": 50}})
    run = tmp_path / "run"
    meta = fit(data, "S2", run, model="ridge", cfg=cfg, cache_dir=cache, progress=False)
    assert meta["train_sections"] == ["S0", "S1"] and meta["spots"]["grid"] == "hex"

    s2 = open_dataset(data).read("S2", require_image=True)
    spots = tmp_path / "S2_spots.h5ad"
    s2.write_h5ad(spots)
    out, store = tmp_path / "pred.h5ad", tmp_path / "pred.zarr"
    r = CliRunner().invoke(app, ["predict", "--model", str(run), "--image", s2.uns["stgen"]["image_path"], "--spots",
                                 str(spots), "--out", str(out), "--spatialdata", str(store), "--cache", str(cache),
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    assert "SpatialData -> " in r.output
    pred = ad.read_h5ad(out)
    with _quiet():
        back = sd.read_zarr(store)
    table = back.tables["table"]
    assert table.uns["spatialdata_attrs"] == {"region": "spots", "region_key": "region", "instance_key": "spot_id"}
    assert list(table.obs_names) == list(pred.obs_names) and list(table.var_names) == list(pred.var_names)
    np.testing.assert_array_equal(table.X, pred.X)
    np.testing.assert_array_equal(table.layers["std"], pred.layers["std"])
    circles = back.shapes["spots"].loc[table.obs["spot_id"].to_numpy()]
    xy = np.column_stack([circles.geometry.x, circles.geometry.y])
    np.testing.assert_allclose(xy, pred.obsm["spatial"])
    lib = pred.uns["stgen"]["library_id"]
    diameter = pred.uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"]
    np.testing.assert_allclose(circles["radius"], diameter / 2)
    from stgen.image.slide import open_slide

    with open_slide(s2.uns["stgen"]["image_path"]) as s:  # a small slide goes in whole, in full-resolution px
        assert _finest(back.images["slide"]).shape == (3, s.height, s.width)
    assert get_transformation(back.images["slide"], "global").to_affine_matrix(("x", "y"), ("x", "y")).tolist() \
        == np.eye(3).tolist()
    assert table.uns["stgen"]["model"] == "ridge"
    # the Python API passes it through too; a bad store name is refused before any work
    import stgen

    with pytest.raises(InputError, match=r"--spatialdata .*pred\.txt: .*\.zarr"):
        stgen.predict(run, image=s2.uns["stgen"]["image_path"], spots=spots, out=tmp_path / "p2.h5ad",
                      spatialdata_out=tmp_path / "pred.txt", progress=False)
    assert not (tmp_path / "p2.h5ad").exists()

    # the docs' example (docs/own-data.md, "SpatialData") runs as written
    text = (Path(__file__).resolve().parents[2] / "docs" / "own-data.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text[text.index("## SpatialData"):].split("\n## ")[0], flags=re.DOTALL)
    assert len(blocks) == 1
    (tmp_path / "docs").mkdir()
    with _quiet():
        exec(compile(blocks[0], "own-data.md[SpatialData]", "exec"),  # noqa: S102 - the docs' own code
             {"STORES": data, "RUN": run, "OUT": tmp_path / "docs"})
    assert (tmp_path / "docs" / "pred.zarr").is_dir()


def _prediction(n=5, scale=0.25):
    """A prediction as stgen.predict writes it: 400 x 200 px slide, thumbnail at ``scale``."""
    rng = np.random.default_rng(0)
    xy = np.column_stack([rng.uniform(0, 400, n), rng.uniform(0, 200, n)])
    thumb = rng.integers(0, 255, (int(200 * scale), int(400 * scale), 3), dtype=np.uint8)
    pred = ad.AnnData(X=rng.normal(size=(n, 3)).astype(np.float32),
                      obs={"pixel_x": xy[:, 0], "pixel_y": xy[:, 1]}, obsm={"spatial": xy},
                      layers={"std": rng.uniform(size=(n, 3)).astype(np.float32)})
    pred.obs_names = [f"s{i}" for i in range(n)]
    pred.var_names = ["A", "B", "C"]
    pred.uns["spatial"] = {"slide": {"images": {"hires": thumb},
                                     "scalefactors": {"tissue_hires_scalef": scale, "spot_diameter_fullres": 30.0}}}
    pred.uns["stgen"] = {"model": "ridge", "library_id": "slide"}
    return pred


def test_writer_scales_the_thumbnail_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    from stgen.workflows.spatialdata_out import write_spatialdata

    out = tmp_path / "p.zarr"
    assert write_spatialdata(_prediction(), None, out) == out
    with _quiet():
        back = sd.read_zarr(out)
    t = get_transformation(back.images["slide"], "global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(t, np.diag([4.0, 4.0, 1.0]))  # thumbnail px -> full-resolution px
    assert _finest(back.images["slide"]).shape == (3, 50, 100)
    assert get_transformation(back.shapes["spots"], "global").to_affine_matrix(("x", "y"), ("x", "y")).tolist() \
        == np.eye(3).tolist()
    before = sorted(p.name for p in tmp_path.iterdir())

    real = sd.SpatialData.write

    def fail_after_writing(self, path, *a, **k):
        real(self, path, *a, **k)
        raise OSError("simulated failure after the store was written")

    monkeypatch.setattr(sd.SpatialData, "write", fail_after_writing)
    with pytest.raises(OSError, match="simulated"):
        write_spatialdata(_prediction(n=7), None, tmp_path / "new.zarr")
    with pytest.raises(OSError, match="simulated"):
        write_spatialdata(_prediction(n=7), None, out)  # an existing store stays as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with _quiet():
        assert sd.read_zarr(out).tables["table"].n_obs == 5
    with pytest.raises(InputError, match=r"\.zarr"):
        write_spatialdata(_prediction(), None, tmp_path / "p.h5ad")


def test_store_image_becomes_a_pyramid_block_by_block(tmp_path, monkeypatch):
    import stgen.data.spatialdata as sdm
    from stgen.image.slide import open_slide

    monkeypatch.setattr(sdm, "_BLOCK_PX", 96)  # several blocks per tile, edge blocks included
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (1, 1100, 1500), dtype=np.uint8)
    element = Image2DModel.parse(grey, dims=("c", "y", "x"), chunks=(1, 256, 256))
    out, wh = sdm.materialise_store_image(tmp_path / "s.zarr", "grey", element, mpp=0.5, cache_dir=tmp_path)
    assert wh == (1500, 1100) and out.parent == tmp_path / "images"
    with open_slide(out) as s:
        assert s.level_dims == [(1500, 1100), (750, 550)] and s.mpp == pytest.approx(0.5)
        full = s.read_region(0, 0, 1500, 1100)
        assert np.array_equal(full, np.repeat(np.moveaxis(grey, 0, -1), 3, axis=2))
        half = s.read_region(0, 0, 750, 550, level=1)
    expect = np.round(grey[0].reshape(550, 2, 750, 2).mean(axis=(1, 3), dtype=np.float32)).astype(np.uint8)
    assert np.array_equal(half[:, :, 0], expect)
    with pytest.raises(InputError, match=r"s\.zarr: images\['f'\]: pixel type float32"):
        sdm.materialise_store_image(tmp_path / "s.zarr", "f", Image2DModel.parse(grey.astype(np.float32),
                                                                                 dims=("c", "y", "x")), None, tmp_path)


def test_spatialdata_io_visium_store_reads_as_space_ranger(tmp_path, cache):
    """A store that spatialdata-io's Visium reader writes (coordinate systems per image) gives the Space Ranger
    reader's section: with the full-resolution image in its pixels, without it in the hires image's."""
    sdio = pytest.importorskip("spatialdata_io")
    from reader_fixtures import make_spaceranger_outs

    from stgen.data.spatialdata import read_spatialdata_section
    from stgen.data.visium import read_spaceranger

    s = make_spaceranger_outs(tmp_path / "sr", "S1", n_spots=40, image="tif")
    want = read_spaceranger(s.outs, image=s.image)
    for full in (True, False):
        store = tmp_path / f"S1_{full}.zarr"
        with _quiet():
            sdio.visium(s.outs, dataset_id="S1", fullres_image_file=s.image if full else None).write(store)
        a = read_spatialdata_section(store)
        b = want[a.obs_names]
        assert a.n_obs == want.n_obs and np.array_equal(a.X.toarray(), b[:, a.var_names].X.toarray())
        scale = 1.0 if full else 0.25  # tissue_hires_scalef
        assert a.uns["stgen"]["spatialdata"]["image"] == ("S1_full_image" if full else "S1_hires_image")
        np.testing.assert_allclose(a.obsm["spatial"], b.obsm["spatial"] * scale, rtol=1e-9, atol=1e-9)
        assert a.uns["stgen"]["mpp"] == pytest.approx(want.uns["stgen"]["mpp"] / scale)
