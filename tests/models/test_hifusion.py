"""HiFusion (stgen.models.hifusion.model) on the tiny synthetic sections (rgb-stats features, 16-px patches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import assert_same_state, save_and_load, synthetic_sections
from PIL import Image

from stgen.errors import InputError
from stgen.features.simple import RGBStatsEncoder
from stgen.models.base import FeatureSettings, SectionInput
from stgen.models.hifusion.model import HiFusion, HiFusionConfig, multiscale_features, subpatch_centres
from stgen.image.patches import extract_patches


def _cfg(**kw) -> HiFusionConfig:
    base = dict(grids=[2, 4], region_scale=3.0, d_model=16, n_heads=2, n_layers=1, ff_mult=2, batch_size=32,
                max_epochs=4, val_fraction=0.2, predict_batch_size=50)
    return HiFusionConfig(**{**base, **kw})


def _rgb_stats(patches: np.ndarray, size: int | None = None) -> np.ndarray:
    """The rgb-stats features of uint8 patches (M, s, s, 3), straight from the encoder (resized to ``size``)."""
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float().div(255.0)
    return RGBStatsEncoder()(x, size=size).numpy()


def test_subpatch_centres_tile_the_spot_patch_in_row_major_order():
    c, side = subpatch_centres(np.array([[100.0, 200.0]]), 224, 2)
    assert side == 112 and c.shape == (1, 4, 2)
    np.testing.assert_array_equal(c[0], [[44, 144], [156, 144], [44, 256], [156, 256]])  # (x, y): TL, TR, BL, BR
    c4, side4 = subpatch_centres(np.array([[0.0, 0.0]]), 224, 4)
    assert side4 == 56
    np.testing.assert_array_equal(np.unique(c4[0, :, 0]), [-84, -28, 28, 84])
    np.testing.assert_array_equal(c4[0, :4, 1], [-84] * 4)  # first row is the top row


def test_multiscale_features_match_tiles_of_the_spot_patch(tmp_path, one_thread):
    # an image of 4x4-px blocks of random colours: every 4x4 sub-patch of a block-aligned spot patch is one colour
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    img = np.kron(blocks, np.ones((4, 4, 1), dtype=np.uint8))
    path = tmp_path / "blocks.png"
    Image.fromarray(img).save(path)
    xy = np.array([[24.0, 24.0], [36.0, 20.0], [40.4, 27.8], [8.0, 56.0]])  # the last one half outside
    fs = FeatureSettings(encoder="rgb-stats", patch_px=16, cache_dir=None)
    section = SectionInput("Q", xy, fs.encode(path, xy), path)
    ms = multiscale_features(section, fs, _cfg(grids=[2, 4], region_scale=3.0))
    assert set(ms) == {"spot", "grid2", "grid4", "region"}
    assert ms["grid2"].shape == (4, 4, 6) and ms["grid4"].shape == (4, 16, 6) and ms["region"].shape == (4, 6)
    np.testing.assert_array_equal(ms["spot"], section.feats)

    spot = extract_patches(img, xy, 16)  # (4, 16, 16, 3)
    for k in (2, 4):
        s = 16 // k
        tiles = np.stack([spot[:, i * s:(i + 1) * s, j * s:(j + 1) * s] for i in range(k) for j in range(k)], 1)
        want = _rgb_stats(tiles.reshape(-1, s, s, 3), size=s).reshape(4, k * k, 6)  # native resolution
        np.testing.assert_allclose(ms[f"grid{k}"], want, atol=1e-6)
    # resized to the encoder input instead (native_subpatches=False): the tiles' features at 32 px
    zoomed = multiscale_features(section, fs, _cfg(grids=[2], region_scale=3.0, native_subpatches=False))
    tiles = np.stack([spot[:, i * 8:(i + 1) * 8, j * 8:(j + 1) * 8] for i in range(2) for j in range(2)], 1)
    np.testing.assert_allclose(zoomed["grid2"], _rgb_stats(tiles.reshape(-1, 8, 8, 3)).reshape(4, 4, 6), atol=1e-6)
    assert not np.allclose(zoomed["grid2"][..., 3:], ms["grid2"][..., 3:], atol=1e-4)  # resizing changes the std
    # readable check on one spot: 4x4 token t = row * 4 + col is the colour of that block, std 0
    r0, c0 = (24 - 8) // 4, (24 - 8) // 4
    for i in range(4):
        for j in range(4):
            np.testing.assert_allclose(ms["grid4"][0, i * 4 + j, :3], blocks[r0 + i, c0 + j] / 255.0, atol=1e-6)
    np.testing.assert_allclose(ms["grid4"][0, :, 3:], 0.0, atol=1e-6)
    assert np.abs(ms["grid2"][0, :, :3] - ms["grid2"][0, :1, :3]).max() > 0.05  # the quadrants differ
    np.testing.assert_allclose(ms["region"], _rgb_stats(extract_patches(img, xy, 48)), atol=1e-6)


def test_fit_predict_shapes_dtypes_finite(tmp_path, one_thread):
    sections, fs, panel = synthetic_sections(tmp_path, n_sections=3)
    model, hist = HiFusion.fit(sections[:2], panel, _cfg(), fs, progress=False)
    assert HiFusion.name == "hifusion" and not HiFusion.generative and HiFusion.config_cls is HiFusionConfig
    mean, sd = model.predict(sections[2], fs)
    assert mean.shape == sd.shape == (sections[2].n_spots, len(panel))
    assert mean.dtype == sd.dtype == np.float32 and np.isfinite(mean).all()
    assert (sd == 0).all()
    assert hist["epochs_run"] == 4 and hist["n_train"] + hist["n_val"] == 72 and hist["n_val"] > 0
    assert len(hist["history"]) == 4 and {"val_mse", "train_loss", "train_align"} <= set(hist["history"][-1])
    assert 0 <= hist["best_epoch"] < 4
    # predictions are in target units: near the targets' scale, not z-scores around 0
    assert abs(mean.mean() - sections[2].targets.mean()) < 1.0 + abs(sections[2].targets.mean()) * 0.5


@pytest.mark.parametrize("kw", [dict(key_tokens="all", grids=[3]), dict(shared_scale_head=False, n_layers=2,
                                                                         align_metric="cosine", val_fraction=0.0)])
def test_variants_run(tmp_path, one_thread, kw):
    sections, fs, panel = synthetic_sections(tmp_path, n_sections=2, side=4)
    model, hist = HiFusion.fit(sections[:1], panel, _cfg(max_epochs=2, **kw), fs, progress=False)
    mean, _ = model.predict(sections[1], fs)
    assert mean.shape == (16, len(panel)) and np.isfinite(mean).all()
    if kw.get("val_fraction") == 0.0:
        assert hist["n_val"] == 0 and hist["best_val_mse"] is None


def test_training_lowers_the_objective(tmp_path, one_thread):
    sections, fs, panel = synthetic_sections(tmp_path, n_sections=2)
    untrained, _ = HiFusion.fit(sections, panel, _cfg(max_epochs=0), fs, progress=False)
    trained, _ = HiFusion.fit(sections, panel, _cfg(max_epochs=25, val_fraction=0.0), fs, progress=False)
    before, after = untrained.objective(sections, fs), trained.objective(sections, fs)
    assert after["loss"] < 0.7 * before["loss"]
    assert after["fused_mse"] < 0.7 * before["fused_mse"] and after["scale_mse"] < before["scale_mse"]


def test_alignment_loss_pulls_the_scales_together(tmp_path, one_thread):
    sections, fs, panel = synthetic_sections(tmp_path, n_sections=2)
    kw = dict(max_epochs=30, batch_size=16, val_fraction=0.0)
    free, _ = HiFusion.fit(sections, panel, _cfg(align_weight=0.0, **kw), fs, progress=False)
    tied, _ = HiFusion.fit(sections, panel, _cfg(align_weight=5.0, **kw), fs, progress=False)
    assert tied.objective(sections, fs)["align"] < 0.5 * free.objective(sections, fs)["align"]


def test_determinism(tmp_path, one_thread):
    sections, fs, panel = synthetic_sections(tmp_path, n_sections=3)
    a, _ = HiFusion.fit(sections[:2], panel, _cfg(), fs, progress=False)
    b, _ = HiFusion.fit(sections[:2], panel, _cfg(), fs, progress=False)
    c, _ = HiFusion.fit(sections[:2], panel, _cfg(seed=7), fs, progress=False)
    ta, tc = assert_same_state(a, b), c.state()[0]
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)
    p1, _ = a.predict(sections[2], fs, seed=0)
    p2, _ = a.predict(sections[2], fs, seed=5)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(p1, b.predict(sections[2], fs)[0])


def test_safetensors_round_trip(tmp_path, one_thread):
    sections, fs, panel = synthetic_sections(tmp_path, n_sections=3)
    model, _ = HiFusion.fit(sections[:2], panel, _cfg(max_epochs=3, d_model=24, key_tokens="all"), fs, progress=False)
    # the architecture comes from meta, even if the config passed in differs
    loaded = save_and_load(model, HiFusionConfig(), tmp_path)
    assert loaded.cfg.d_model == 24 and loaded.panel == panel
    np.testing.assert_array_equal(loaded.predict(sections[2], fs)[0], model.predict(sections[2], fs)[0])
    tensors, meta = model.state()
    tensors.pop("head.1.weight")
    with pytest.raises(InputError, match="saved state"):
        HiFusion.from_state(tensors, {"hifusion": meta}, HiFusionConfig())


def test_bad_inputs(tmp_path, one_thread):
    sections, fs, panel = synthetic_sections(tmp_path, n_sections=2, side=4)
    with pytest.raises(InputError, match="targets"):
        HiFusion.fit(sections, panel[:-1], _cfg(), fs, progress=False)
    s = sections[0]
    no_image = SectionInput(s.name, s.xy, s.feats, None, s.targets)
    with pytest.raises(InputError, match="no image"):
        HiFusion.fit([no_image], panel, _cfg(), fs, progress=False)
    wrong_feats = SectionInput(s.name, s.xy, s.feats[:, :4], s.image, s.targets)
    with pytest.raises(InputError, match="columns"):
        HiFusion.fit([wrong_feats], panel, _cfg(), fs, progress=False)
    for bad in (dict(grids=[1]), dict(key_tokens="queries"), dict(d_model=15, n_heads=2), dict(align_metric="mse")):
        with pytest.raises(InputError, match="hifusion"):
            _cfg(**bad)
    model, _ = HiFusion.fit(sections[:1], panel, _cfg(max_epochs=1), fs, progress=False)
    other = FeatureSettings(encoder="rgb-stats", patch_px=24, cache_dir=None)
    with pytest.raises(InputError, match="16-px"):
        model.predict(sections[1], other)
    with pytest.raises(InputError, match="no image"):
        model.predict(SectionInput("T", s.xy, s.feats, None), fs)
