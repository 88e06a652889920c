"""Lazy whole-slide reading (stgen.image.slide) against the in-memory reference extract_patches."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

import stgen.image.slide as slide_mod
from stgen.errors import InputError
from stgen.image.patches import extract_patches, open_image
from stgen.image.slide import open_slide, write_pyramidal_tiff

W, H = 700, 500


@pytest.fixture(scope="module")
def img() -> np.ndarray:
    """Structured + noisy RGB so misplaced pixels cannot go unnoticed."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    base = np.dstack([xx % 256, yy % 256, (xx + 3 * yy) % 256])
    return ((base + rng.integers(0, 40, base.shape)) % 256).astype(np.uint8)


def _level(img: np.ndarray, k: int) -> np.ndarray:
    """The content write_pyramidal_tiff is asked for at level k (plain subsampling)."""
    s = 2**k
    return np.ascontiguousarray(img[: (H >> k) * s : s, : (W >> k) * s : s])


def _tile_fn(img):
    def fn(x0, y0, w, h, ds):
        return _level(img, int(np.log2(ds)))[y0 : y0 + h, x0 : x0 + w]

    return fn


@pytest.fixture(scope="module")
def files(img, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("slides")
    f = {}
    f["png"] = d / "s.png"
    Image.fromarray(img).save(f["png"], dpi=(72, 72))
    f["jpg"] = d / "s.jpg"
    Image.fromarray(img).save(f["jpg"], quality=90)
    f["pyramid"] = write_pyramidal_tiff(d / "pyr.tif", W, H, _tile_fn(img), mpp=0.5, tile=128, levels=3)
    f["ome"] = write_pyramidal_tiff(d / "s.ome.tif", W, H, _tile_fn(img), mpp=0.25, tile=64, levels=2)
    # pyramid as successive reduced-resolution pages (the OpenSlide "generic tiff" layout)
    f["pages"] = d / "pages.tif"
    with tifffile.TiffWriter(f["pages"]) as tw:
        for k in range(3):
            tw.write(_level(img, k), tile=(64, 64), photometric="rgb", subfiletype=1 if k else 0,
                     metadata=None, compression="zlib")
    f["strips"] = d / "strips.tif"  # untiled
    tifffile.imwrite(f["strips"], img, photometric="rgb", rowsperstrip=37, metadata=None)
    f["planar"] = d / "planar.tif"
    tifffile.imwrite(f["planar"], np.moveaxis(img, -1, 0), photometric="rgb", planarconfig="separate",
                     tile=(64, 64), metadata=None)
    return f


def _open_openslide(path):
    try:
        return open_slide(path, backend="openslide")
    except InputError as e:
        pytest.skip(f"OpenSlide cannot read a tifffile-written tiled TIFF here: {e}")


def _reference(kind, files, img):
    return np.asarray(open_image(files["jpg"])) if kind == "jpg" else img


KINDS = ["png", "jpg", "pyramid", "ome", "pages", "strips", "planar", "openslide", "openslide-pages"]


def _open(kind, files):
    if kind == "openslide":
        return _open_openslide(files["pyramid"])
    if kind == "openslide-pages":
        return _open_openslide(files["pages"])
    return open_slide(files[kind])


# ---------------------------------------------------------------------------
# pixels


CENTRES = np.array(
    [
        [350, 250], [0, 0], [699, 499], [-0.5, 10.49], [10.5, -0.5], [698.5, 3.2],  # on/over the borders
        [3.49, 497.5], [-60, 250], [350, 570], [-1000, -1000], [1e7, 5], [-51, -51],  # fully outside
        [52, 52], [349.5, 249.5], [120.25, 480.75],
    ],
    dtype=float,
)


@pytest.mark.parametrize("kind", KINDS)
def test_region_and_patches_equal_extract_patches(kind, files, img):
    ref = _reference(kind, files, img)
    rng = np.random.default_rng(1)
    centres = np.vstack([CENTRES, rng.uniform([-120, -120], [W + 120, H + 120], (60, 2))])
    with _open(kind, files) as s:
        assert (s.width, s.height) == (W, H)
        assert s.backend == {"png": "pillow", "jpg": "pillow"}.get(kind, "openslide" if "openslide" in kind else "tifffile")
        for size in (1, 64, 101):
            got = s.read_patches(centres, size)
            assert got.dtype == np.uint8 and got.shape == (len(centres), size, size, 3)
            np.testing.assert_array_equal(got, extract_patches(ref, centres, size))
        pad = 150
        padded = np.full((H + 2 * pad, W + 2 * pad, 3), 255, np.uint8)
        padded[pad:-pad, pad:-pad] = ref
        for x0, y0, w, h in [(0, 0, W, H), (-7, -5, 30, 20), (690, 495, 40, 40), (-50, 100, W + 100, 3),
                             (123, 77, 1, 1), (800, 0, 10, 10), (0, -100, 5, 50), (5, 5, 0, 0)]:
            got = s.read_region(x0, y0, w, h)
            assert got.shape == (h, w, 3) and got.dtype == np.uint8
            np.testing.assert_array_equal(got, padded[y0 + pad : y0 + pad + h, x0 + pad : x0 + pad + w])


def test_patches_grouped_in_many_blocks(files, img, monkeypatch):
    """Small grouping blocks: patches straddle block edges and share regions."""
    monkeypatch.setattr(slide_mod, "_PATCH_BLOCK", 48)
    centres = np.random.default_rng(2).uniform(-80, 780, (300, 2))
    with open_slide(files["pyramid"]) as s:
        np.testing.assert_array_equal(s.read_patches(centres, 57), extract_patches(img, centres, 57))
        assert s.read_patches(np.zeros((0, 2)), 8).shape == (0, 8, 8, 3)
        with pytest.raises(InputError, match="patch size"):
            s.read_patches(centres, 0)
        with pytest.raises(InputError, match="non-finite"):
            s.read_patches([[np.nan, 1.0]], 8)


@pytest.mark.parametrize("kind", ["pyramid", "ome", "pages"])
def test_pyramid_levels(kind, files, img):
    with open_slide(files[kind]) as s:
        n = 2 if kind == "ome" else 3
        assert s.level_dims == [(W >> k, H >> k) for k in range(n)]
        assert s.level_downsamples == [2.0**k for k in range(n)]
        for k in range(n):
            lw, lh = s.level_dims[k]
            np.testing.assert_array_equal(s.read_region(0, 0, lw, lh, level=k), _level(img, k))
        with pytest.raises(InputError, match="level"):
            s.read_region(0, 0, 1, 1, level=n)


def test_gray_and_rgba_become_rgb(tmp_path, img):
    gray = img[:, :, 0]
    tifffile.imwrite(tmp_path / "g.tif", gray, tile=(64, 64))
    with open_slide(tmp_path / "g.tif") as s:
        np.testing.assert_array_equal(s.read_region(0, 0, W, H), np.repeat(gray[:, :, None], 3, axis=2))
    alpha = np.zeros((H, W), np.uint8)
    alpha[:, 200:400] = 255
    alpha[:, 400:] = 128
    tifffile.imwrite(tmp_path / "rgba.tif", np.dstack([img, alpha]), photometric="rgb",
                     extrasamples=["unassalpha"], tile=(64, 64))
    with open_slide(tmp_path / "rgba.tif") as s:
        out = s.read_region(0, 0, W, H)
    assert (out[:, :200] == 255).all()  # transparent -> white
    np.testing.assert_array_equal(out[:, 200:400], img[:, 200:400])  # opaque -> unchanged
    half = (img[:, 400:].astype(int) * 128 + 255 * 127 + 127) // 255
    np.testing.assert_array_equal(out[:, 400:], half)


# ---------------------------------------------------------------------------
# thumbnail


def _spy_levels(monkeypatch, s):
    calls = []
    orig = s._read_level

    def spy(level, x, y, w, h):
        calls.append((level, w, h))
        return orig(level, x, y, w, h)

    monkeypatch.setattr(s, "_read_level", spy)
    return calls


@pytest.mark.parametrize("kind", ["pyramid", "openslide-pages"])
def test_thumbnail_reads_smallest_sufficient_level(kind, files, img, monkeypatch):
    with _open(kind, files) as s:
        calls = _spy_levels(monkeypatch, s)
        thumb, scale = s.thumbnail(200)  # 200 x 143 needs level 1 (350 x 250); level 2 is 175 px wide
        assert thumb.shape == (143, 200, 3) and thumb.dtype == np.uint8
        assert scale == pytest.approx(200 / 700)
        assert s.level_for_size(200, 143) == 1
        assert {c[0] for c in calls} == {1}
        ref = Image.fromarray(_level(img, 1)).resize((200, 143), Image.Resampling.LANCZOS, reducing_gap=1.0)
        np.testing.assert_array_equal(thumb, np.asarray(ref))

        calls.clear()
        thumb, scale = s.thumbnail(100)
        assert thumb.shape == (71, 100, 3) and {c[0] for c in calls} == {2}

        calls.clear()
        thumb, scale = s.thumbnail(4096)  # already small: full resolution
        assert thumb.shape == (H, W, 3) and scale == 1.0 and {c[0] for c in calls} == {0}
        np.testing.assert_array_equal(thumb, img)


def test_thumbnail_single_level_reads_bounded_blocks(tmp_path, img, monkeypatch):
    path = write_pyramidal_tiff(tmp_path / "flat.tif", W, H, _tile_fn(img), tile=64, levels=1)
    monkeypatch.setattr(slide_mod, "_THUMB_BLOCK", 64)
    with open_slide(path) as s:
        assert len(s.level_dims) == 1
        calls = _spy_levels(monkeypatch, s)
        for m in (233, 90):
            calls.clear()
            thumb, scale = s.thumbnail(m)
            assert max(thumb.shape[:2]) == m and scale == pytest.approx(m / W)
            # many small reads, never the whole level
            assert len(calls) > 10 and max(w * h for _, w, h in calls) <= 64 * 64
            ref = Image.fromarray(img).resize(thumb.shape[1::-1], Image.Resampling.LANCZOS, reducing_gap=1.0)
            np.testing.assert_array_equal(thumb, np.asarray(ref))  # blockwise == whole-image Pillow
        with pytest.raises(InputError, match="max_side"):
            s.thumbnail(0)


# ---------------------------------------------------------------------------
# pixel size


def _tiff(path, img, **kw):
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64), **kw)
    return path


def test_mpp_sources(files, tmp_path, img):
    with open_slide(files["pyramid"]) as s:  # XResolution in pixels per centimetre
        assert s.mpp == pytest.approx(0.5)
    with open_slide(files["ome"]) as s:  # OME PhysicalSizeX
        assert s.mpp == pytest.approx(0.25)
    p = _tiff(tmp_path / "nm.ome.tif", img, metadata={"axes": "YXS", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm"})
    with open_slide(p) as s:
        assert s.mpp == pytest.approx(0.25)
    desc = ("Aperio Image Library v12.0.15\r\n700x500 [0,0 700x500] (64x64) JPEG/RGB Q=70"
            "|AppMag = 40|StripeWidth = 992|ScanScope ID = SS1234|MPP = 0.2520|Left = 25.7")
    p = _tiff(tmp_path / "aperio.tif", img, description=desc, metadata=None)
    with open_slide(p) as s:
        assert s.mpp == pytest.approx(0.252)
    p = _tiff(tmp_path / "inch.tif", img, resolution=(25400 / 0.4, 25400 / 0.4), resolutionunit="INCH", metadata=None)
    with open_slide(p) as s:
        assert s.mpp == pytest.approx(0.4)
    p = _tiff(tmp_path / "dpi72.tif", img, resolution=(72, 72), resolutionunit="INCH", metadata=None)
    with open_slide(p) as s:
        assert s.mpp is None  # 353 µm/px: a screen default, not a scan
    p = _tiff(tmp_path / "none.tif", img, resolution=(2e4, 2e4), resolutionunit="NONE", metadata=None)
    with open_slide(p) as s:
        assert s.mpp is None
    with open_slide(files["png"]) as s:  # saved with dpi=72; Pillow images never report mpp
        assert s.mpp is None
    with _open_openslide(files["pyramid"]) as s:  # openslide.mpp-x
        assert s.mpp == pytest.approx(0.5)


def test_mpp_override(files):
    for key in ("pyramid", "png", "pages"):
        with open_slide(files[key], mpp=0.3) as s:
            assert s.mpp == 0.3
    for bad in (0, -1.0, float("nan"), float("inf"), "abc"):
        with pytest.raises(InputError, match="mpp") as ei:
            open_slide(files["pyramid"], mpp=bad)
        assert "pyr.tif" in str(ei.value)


# ---------------------------------------------------------------------------
# writer


def test_write_pyramidal_tiff_default_levels_and_tile_coords(tmp_path):
    calls = []

    def fn(x0, y0, w, h, ds):
        calls.append((x0, y0, w, h, ds))
        return np.full((h, w, 3), int(ds) * 10, np.uint8)

    p = write_pyramidal_tiff(tmp_path / "wide.tif", 2100, 300, fn, tile=512)
    with open_slide(p) as s:
        assert s.level_dims == [(2100, 300), (1050, 150), (525, 75)]  # halved until <= 1024 px
        for k in range(3):
            assert (s.read_region(0, 0, *s.level_dims[k], level=k) == 10 * 2**k).all()
    assert (2048, 0, 52, 300, 1.0) in calls and (512, 0, 13, 75, 4.0) in calls
    assert len(calls) == 5 + 3 + 2
    assert [q.name for q in tmp_path.iterdir()] == ["wide.tif"]


def test_write_pyramidal_tiff_bad_tile_is_atomic(tmp_path):
    def bad(x0, y0, w, h, ds):
        return np.zeros((h, w), np.uint8)

    with pytest.raises(ValueError, match="tile_fn"):
        write_pyramidal_tiff(tmp_path / "bad.tif", 100, 100, bad, tile=64)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="multiple of 16"):
        write_pyramidal_tiff(tmp_path / "bad.tif", 100, 100, bad, tile=100)


# ---------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("name", ["nope.tif", "nope.png", "nope.svs"])
def test_missing_file(tmp_path, name):
    with pytest.raises(InputError, match="not found") as ei:
        open_slide(tmp_path / name)
    assert name in str(ei.value)


@pytest.mark.parametrize("name", ["junk.tif", "junk.jpg", "junk.svs"])
def test_not_an_image(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError) as ei:
        open_slide(p)
    assert name in str(ei.value)


def test_truncated_tiff(tmp_path, img):
    p = write_pyramidal_tiff(tmp_path / "trunc.tif", W, H, _tile_fn(img), tile=64, levels=2)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="trunc.tif") as ei:
        with open_slide(p) as s:  # may open (the first IFD is intact) ...
            s.read_region(0, 0, W, H)  # ... but the missing tiles must not decode silently
    assert "Traceback" not in str(ei.value)


def test_unsupported_dtype(tmp_path, img):
    p = tmp_path / "u16.tif"
    tifffile.imwrite(p, img.astype(np.uint16) * 257, photometric="rgb", tile=(64, 64))
    with pytest.raises(InputError, match=r"u16.tif.*uint16"):
        open_slide(p)


def test_unsupported_channels(tmp_path):
    p = tmp_path / "five.tif"
    tifffile.imwrite(p, np.zeros((5, 32, 32), np.uint8), photometric="minisblack", planarconfig="separate")
    with pytest.raises(InputError, match="five.tif"):
        open_slide(p)


def test_openslide_missing_mentions_extra(tmp_path, monkeypatch):
    p = tmp_path / "scan.svs"
    p.write_bytes(b"\0" * 100)
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    with pytest.raises(InputError, match=r'scan.svs.*pip install "stgen\[wsi\]"'):
        open_slide(p)


def test_closed_and_unknown_backend(files):
    s = open_slide(files["pyramid"])
    s.close()
    s.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        s.read_region(0, 0, 1, 1)
    with pytest.raises(InputError, match="backend"):
        open_slide(files["pyramid"], backend="bioformats")
