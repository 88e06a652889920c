"""Tests of patch extraction, encoders and the feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stgen.features import registry as features
from stgen.features.simple import RGBStatsEncoder
from stgen.errors import InputError
from stgen.features.registry import build_encoder
from stgen.features.extract import dihedral_views, extract_features
from stgen.features.cache import feature_cache_path
from stgen.image.patches import extract_patches, open_image


@pytest.fixture()
def img() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, size=(50, 60, 3), dtype=np.uint8)


@pytest.fixture()
def img_path(tmp_path: Path, img: np.ndarray) -> Path:
    p = tmp_path / "S1" / "he.png"  # lossless so pixels can be compared
    p.parent.mkdir()
    Image.fromarray(img).save(p)
    return p


@pytest.mark.parametrize("size", [8, 7])
def test_patch_centre_and_window(img: np.ndarray, size: int) -> None:
    centres = np.array([[20, 30], [10, 5], [55, 44]])
    p = extract_patches(img, centres, size_px=size)
    assert p.shape == (3, size, size, 3) and p.dtype == np.uint8
    for (x, y), patch in zip(centres, p):
        np.testing.assert_array_equal(patch[size // 2, size // 2], img[y, x])
    h = size // 2
    np.testing.assert_array_equal(p[0], img[30 - h : 30 - h + size, 20 - h : 20 - h + size])
    # PIL input gives the same patches
    np.testing.assert_array_equal(extract_patches(Image.fromarray(img), centres, size), p)


def test_patch_padding_is_white(img: np.ndarray) -> None:
    p = extract_patches(img, np.array([[0, 0], [59, 49], [500, 500]]), size_px=8)
    np.testing.assert_array_equal(p[0, :4], 255)
    np.testing.assert_array_equal(p[0, :, :4], 255)
    np.testing.assert_array_equal(p[0, 4:, 4:], img[0:4, 0:4])
    np.testing.assert_array_equal(p[1, :4, :4], img[45:49, 55:59])
    np.testing.assert_array_equal(p[1, 5:], 255)  # rows 50.. are outside
    np.testing.assert_array_equal(p[1, :, 5:], 255)
    assert (p[2] == 255).all()
    with pytest.raises(InputError):
        extract_patches(img, np.array([[np.nan, 1.0]]))
    with pytest.raises(InputError):
        extract_patches(img[..., 0], np.array([[1, 1]]))


def test_open_image_errors(tmp_path: Path, img: np.ndarray) -> None:
    with pytest.raises(InputError, match="missing.jpg"):
        open_image(tmp_path / "missing.jpg")
    txt = tmp_path / "notimage.jpg"
    txt.write_text("hello")
    with pytest.raises(InputError, match="notimage.jpg"):
        open_image(txt)
    good = tmp_path / "good.jpg"
    Image.fromarray(np.tile(img, (4, 4, 1))).save(good, quality=95)
    assert open_image(good).size == (240, 200) and open_image(good).mode == "RGB"
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="trunc.jpg"):
        open_image(trunc)


class _Counting:
    """rgb-stats encoder that counts the patches it encodes."""

    name, dim, input_size = "counting", 6, 32
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    calls = 0

    def __init__(self, device="cpu") -> None:
        self.inner = RGBStatsEncoder(device)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        type(self).calls += len(batch)
        return self.inner(batch)


@pytest.fixture()
def counting(monkeypatch: pytest.MonkeyPatch) -> type[_Counting]:
    _Counting.calls = 0
    monkeypatch.setitem(features._REGISTRY, "counting", features._EncoderSpec(_Counting, 6))
    monkeypatch.setattr(features, "_BUILT", {})
    return _Counting


def test_rgb_stats_values(img_path: Path, img: np.ndarray) -> None:
    f = extract_features(img_path, np.array([[20.0, 30.0]]), patch_px=32, encoder="rgb-stats",
                         show_progress=False)
    patch = img[14:46, 4:36].astype(np.float64) / 255
    np.testing.assert_allclose(f[0, :3], patch.mean(axis=(0, 1)), atol=1e-5)
    assert f.dtype == np.float32 and f.shape == (1, 6)


def test_cache_hit_and_corruption(tmp_path: Path, img_path: Path, counting) -> None:
    centres = np.array([[20.0, 30.0], [5.0, 5.0], [40.0, 12.5]])
    kw = dict(patch_px=16, encoder="counting", cache_dir=tmp_path / "cache", show_progress=False,
              batch_size=2)
    a = extract_features(img_path, centres, **kw)
    assert counting.calls == 3 and a.shape == (3, 6)
    cache = feature_cache_path(tmp_path / "cache", img_path, centres, 16, "counting", False)
    assert cache.is_file() and cache.parent.name == "features"
    np.testing.assert_array_equal(np.load(cache, allow_pickle=False), a)
    b = extract_features(img_path, centres, **kw)
    assert counting.calls == 3  # served from cache
    np.testing.assert_array_equal(a, b)
    # different centres or TTA -> different key -> recomputed
    extract_features(img_path, centres[:2], **kw)
    assert counting.calls == 5
    extract_features(img_path, centres, tta=True, **kw)
    assert counting.calls == 5 + 3 * 8
    # corrupted cache files are rebuilt
    for junk in (b"garbage", None):
        if junk is None:
            np.save(cache, np.full((3, 6), np.nan, np.float32), allow_pickle=False)
        else:
            cache.write_bytes(junk)
        before = counting.calls
        c = extract_features(img_path, centres, **kw)
        assert counting.calls == before + 3
        np.testing.assert_array_equal(c, a)
        np.testing.assert_array_equal(np.load(cache, allow_pickle=False), a)


def test_tta_shape_and_views(img_path: Path) -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = dihedral_views(x)
    assert len(views) == 8
    assert len({tuple(v[0, 0].flatten().tolist()) for v in views}) == 8
    centres = np.array([[20.0, 30.0], [10.0, 10.0]])
    plain = extract_features(img_path, centres, patch_px=32, encoder="rgb-stats", show_progress=False)
    tta = extract_features(img_path, centres, patch_px=32, encoder="rgb-stats", tta=True,
                           show_progress=False)
    assert tta.shape == (2, 6)
    # channel mean/std are invariant under flips and rotations
    np.testing.assert_allclose(tta, plain, atol=1e-5)


def test_efficientnet_real_weights(img_path: Path) -> None:
    enc = build_encoder("efficientnet-lite0", device="cpu")
    assert enc.dim == 1280 and enc.input_size == 224
    assert not enc.model.training
    f = extract_features(img_path, np.array([[20.0, 30.0], [40.0, 10.0]]), patch_px=16,
                         show_progress=False)
    assert f.shape == (2, 1280) and f.dtype == np.float32 and np.isfinite(f).all()
    assert not np.allclose(f[0], f[1]) and np.abs(f).sum() > 0


def test_unknown_encoder(img_path: Path) -> None:
    with pytest.raises(InputError, match="efficientnet-lite0"):
        build_encoder("resnet-9000")
    with pytest.raises(InputError, match="resnet-9000"):
        extract_features(img_path, np.zeros((1, 2)), encoder="resnet-9000")


def test_input_px_encodes_at_native_size_only_for_any_size_encoders(tmp_path):
    """``input_px`` resizes to that side instead of the encoder input (own cache key; old keys unchanged);
    an encoder of fixed input size refuses it with an InputError naming it."""
    from stgen.features.registry import register_encoder

    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    xy = np.array([[20.0, 20.0], [40.0, 30.0]])
    native = extract_features(path, xy, patch_px=8, encoder="rgb-stats", input_px=8, show_progress=False)
    resized = extract_features(path, xy, patch_px=8, encoder="rgb-stats", show_progress=False)
    patches = torch.from_numpy(extract_patches(np.asarray(Image.open(path)), xy, 8)).permute(0, 3, 1, 2) / 255.0
    np.testing.assert_allclose(native[:, 3:], patches.std(dim=(2, 3)).numpy(), atol=1e-6)  # no resampling
    assert not np.allclose(native[:, 3:], resized[:, 3:], atol=1e-4)
    keys = {feature_cache_path(tmp_path, path, xy, 8, "rgb-stats", False, p) for p in (None, 8, 16)}
    assert len(keys) == 3
    assert feature_cache_path(tmp_path, path, xy, 8, "rgb-stats", False) == \
        feature_cache_path(tmp_path, path, xy, 8, "rgb-stats", False, None)

    class FixedSize(RGBStatsEncoder):
        any_size = False

    register_encoder("fixed-size-test", FixedSize, 6)
    with pytest.raises(InputError, match="fixed-size-test"):
        extract_features(path, xy, patch_px=8, encoder="fixed-size-test", input_px=8, show_progress=False)


def test_cache_checksum_catches_silent_corruption_and_pickles_are_never_loaded(tmp_path: Path, img_path: Path,
                                                                               counting) -> None:
    """A cache file whose values changed but whose shape did not (a flipped bit) fails its SHA-256 and is
    rebuilt; a pickled object array planted under the cache key is refused without running its payload."""
    centres = np.array([[20.0, 30.0], [5.0, 5.0], [40.0, 12.5]])
    kw = dict(patch_px=16, encoder="counting", cache_dir=tmp_path / "cache", show_progress=False)
    a = extract_features(img_path, centres, **kw)
    cache = feature_cache_path(tmp_path / "cache", img_path, centres, 16, "counting", False)
    assert cache.with_name(cache.name + ".sha256").is_file()
    np.save(cache, a + 1.0, allow_pickle=False)  # plausible, finite, right shape: only the checksum knows
    before = counting.calls
    np.testing.assert_array_equal(extract_features(img_path, centres, **kw), a)
    assert counting.calls == before + 3

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(cache, "wb") as fh:  # an object array: np.load would unpickle it with allow_pickle=True
        np.save(fh, np.array([Payload()], dtype=object), allow_pickle=True)
    cache.with_name(cache.name + ".sha256").unlink()  # as if written before checksums existed
    before = counting.calls
    np.testing.assert_array_equal(extract_features(img_path, centres, **kw), a)
    assert counting.calls == before + 3 and not marker.exists()


def test_efficientnet_onnx_runtime_matches_torch(tmp_path, monkeypatch) -> None:
    """The ONNX Runtime path (CPU default) gives the torch path's features within 1e-4, at the spot size and at
    a sub-patch size (HiFusion's any-size inputs), and the exported graph is cached and reused."""
    import sys

    import torch

    from stgen.features.efficientnet import EfficientNetLite0Encoder

    monkeypatch.setenv("STGEN_ONNX_DIR", str(tmp_path / "onnx"))
    monkeypatch.setenv("STGEN_ONNX", "0")
    ref = EfficientNetLite0Encoder()
    monkeypatch.setenv("STGEN_ONNX", "1")
    fast = EfficientNetLite0Encoder()
    assert ref.backend == "torch" and fast.backend == "onnxruntime"
    assert len(list((tmp_path / "onnx").glob("efficientnet-lite0-*.onnx"))) == 1
    g = torch.Generator().manual_seed(0)
    for b, side, size in ((3, 224, None), (1, 100, 64)):
        x = torch.rand(b, 3, side, side, generator=g)
        a, f = ref(x, size=size), fast(x, size=size)
        assert f.shape == a.shape == (b, 1280)
        assert float((a - f).abs().max()) < 1e-4
    # no onnxruntime: the exact torch path, with a log line instead of an error
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert EfficientNetLite0Encoder().backend == "torch"


def test_tta_view_counts_views_cache_keys_and_bad_values(tmp_path: Path, img_path: Path, counting) -> None:
    """``tta`` = 2 averages the patch and its 180-degree rotation, 4 the rotations, True/8 every dihedral view;
    True and 8 (and False and 1) share one cache key, so caches written before view counts stay valid."""
    from stgen.features.cache import tta_views

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    two, four, eight = dihedral_views(x, 2), dihedral_views(x, 4), dihedral_views(x, 8)
    torch.testing.assert_close(two[1], torch.rot90(x, 2, dims=(2, 3)))
    torch.testing.assert_close(two[0], x)
    for k, v in enumerate(four):
        torch.testing.assert_close(v, torch.rot90(x, k, dims=(2, 3)))
    for v, w in zip(eight[:4], four):
        torch.testing.assert_close(v, w)
    assert [tta_views(t) for t in (False, 0, 1, 2, 4, 8, True)] == [1, 1, 1, 2, 4, 8, 8]
    for bad in (3, 16, -1, "2", 2.0):
        with pytest.raises(InputError, match="features.tta"):
            tta_views(bad)
    centres = np.array([[20.0, 30.0], [5.0, 5.0], [40.0, 12.5]])
    def key(t):
        return feature_cache_path(tmp_path, img_path, centres, 16, "counting", t)

    assert key(True) == key(8) and key(False) == key(1) == key(0)  # (True == 1 in Python: no dict of these)
    assert len({key(1), key(2), key(4), key(8)}) == 4
    kw = dict(patch_px=16, encoder="counting", cache_dir=tmp_path / "cache", show_progress=False, batch_size=2)
    extract_features(img_path, centres, tta=2, **kw)
    assert counting.calls == 3 * 2  # two encoder passes per patch
    extract_features(img_path, centres, tta=2, **kw)
    assert counting.calls == 3 * 2  # cached under its own key
    with pytest.raises(InputError, match="features.tta"):
        extract_features(img_path, centres, tta=3, **kw)
    from stgen.workflows.config import StgenConfig

    assert StgenConfig.from_dict({"features": {"tta": 2}}).features.tta == 2
    with pytest.raises(InputError, match="features.tta"):
        StgenConfig.from_dict({"features": {"tta": 5}})
