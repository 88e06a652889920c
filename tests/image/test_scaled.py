"""Downsampled images read in full-resolution pixels (stgen.image.scaled)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stgen.errors import InputError
from stgen.image.scaled import ScaledSlide, SlideRef, as_slide_ref, open_ref
from stgen.image.slide import open_slide


def _smooth_image(w: int = 800, h: int = 600) -> np.ndarray:
    """A smooth RGB image (low frequencies survive a 4x downsampling)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(xx / 60.0)
    g = 128 + 100 * np.cos(yy / 45.0)
    b = 128 + 80 * np.sin((xx + yy) / 80.0)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


@pytest.fixture
def full_and_hires(tmp_path):
    full = _smooth_image()
    scale = 0.25
    small = Image.fromarray(full).resize((200, 150), Image.Resampling.LANCZOS)
    fp, sp = tmp_path / "full.png", tmp_path / "hires.png"
    Image.fromarray(full).save(fp)
    small.save(sp)
    return full, fp, sp, scale


def test_scaled_slide_has_full_resolution_geometry(full_and_hires):
    full, fp, sp, scale = full_and_hires
    with open_ref(SlideRef(sp, scale), mpp=0.5) as s:
        assert isinstance(s, ScaledSlide)
        assert (s.width, s.height) == (800, 600)
        assert s.mpp == 0.5
        thumb, ts = s.thumbnail(100)
        assert max(thumb.shape[:2]) == 100 and ts == pytest.approx(100 / 800)


def test_scaled_patches_match_full_resolution_patches(full_and_hires):
    """A patch cut from the 4x-downsampled image covers the same tissue as the full-resolution one: after
    upsampling it agrees with it far better than a patch of the wrong place or size does."""
    full, fp, sp, scale = full_and_hires
    centres = np.array([[200.0, 150.0], [400.5, 300.0], [640.0, 480.0]])
    with open_slide(fp) as f, open_ref(SlideRef(sp, scale)) as s:
        ref = f.read_patches(centres, 96).astype(np.float64)
        got = s.read_patches(centres, 96).astype(np.float64)
        shifted = s.read_patches(centres + 40, 96).astype(np.float64)
        region = s.read_region(152, 102, 96, 96).astype(np.float64)
    assert got.shape == (3, 96, 96, 3)
    err = np.abs(got - ref).mean()
    assert err < 4.0, err
    assert np.abs(shifted - ref).mean() > 4 * err
    assert np.abs(region - ref[0]).mean() < 5.0


def test_full_resolution_ref_is_the_plain_slide(full_and_hires):
    full, fp, _, _ = full_and_hires
    with open_ref(fp) as a, open_slide(fp) as b:
        assert not isinstance(a, ScaledSlide)
        c = np.array([[10.0, 20.0], [799.0, 599.0]])
        np.testing.assert_array_equal(a.read_patches(c, 33), b.read_patches(c, 33))
    assert as_slide_ref(fp) == SlideRef(fp, 1.0)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "x"])
def test_bad_scale_is_refused(tmp_path, bad):
    with pytest.raises(InputError, match="image scale"):
        SlideRef(tmp_path / "x.png", bad)


def test_a_ref_is_not_path_like(tmp_path):
    """Path(ref) must fail rather than drop the scale silently."""
    from pathlib import Path

    with pytest.raises(TypeError):
        Path(SlideRef(tmp_path / "x.png", 0.5))
