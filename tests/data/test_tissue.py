"""Tissue detection (Otsu on saturation) and the virtual spot grids of bare-slide prediction."""

from __future__ import annotations

import numpy as np
import pytest

from stgen.errors import InputError
from stgen.data.common import GRIDS
from stgen.data.tissue import detect_tissue, lay_spot_grid


def _slide(h=400, w=600, seed=0):
    """White background, a pink 'tissue' ellipse with texture, a few grey specks of dust."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 242, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    tissue = ((xx - 250) / 180.0) ** 2 + ((yy - 200) / 120.0) ** 2 <= 1.0
    pink = np.stack([rng.integers(180, 230, (h, w)), rng.integers(90, 140, (h, w)),
                     rng.integers(160, 210, (h, w))], -1).astype(np.uint8)
    img[tissue] = pink[tissue]
    img[20:23, 550:553] = (120, 60, 120)  # a speck: smaller than the minimum tissue area
    return img, tissue


def test_otsu_finds_the_tissue_and_drops_specks():
    img, truth = _slide()
    t = detect_tissue(img, scale=0.1, mpp=1.0)  # 1 px thumbnail = 10 um; min area 0.25 mm^2 = 2500 px
    assert t.mask.shape == truth.shape
    iou = (t.mask & truth).sum() / (t.mask | truth).sum()
    assert iou > 0.95
    assert not t.mask[15:28, 545:558].any()  # the speck is gone
    assert 0.2 < t.fraction < 0.4 and 0 < t.threshold < 255


def test_blank_slide_has_no_tissue():
    with pytest.raises(InputError, match="no tissue"):
        detect_tissue(np.full((50, 60, 3), 240, np.uint8), scale=1.0, source="blank.tif")
    with pytest.raises(InputError, match="uint8"):
        detect_tissue(np.zeros((50, 60), np.float32), scale=1.0)


@pytest.mark.parametrize("kind", ["square", "hex"])
def test_grid_spacing_and_tissue_coverage(kind):
    img, truth = _slide()
    scale, mpp = 0.1, 1.0  # the slide is 6000 x 4000 full-res px at 1 um/px
    t = detect_tissue(img, scale=scale, mpp=mpp)
    g = lay_spot_grid(t, 6000, 4000, mpp, kind=kind)
    xy = g[["pixel_x", "pixel_y"]].to_numpy()
    spacing = GRIDS[kind][0] / mpp
    # nearest neighbours are exactly one spacing apart (hex: all six neighbours)
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(d.min(1), spacing, rtol=1e-9)
    if kind == "hex":
        rows = np.unique(np.round(xy[:, 1], 3))
        np.testing.assert_allclose(np.diff(rows), spacing * np.sqrt(3) / 2, atol=2e-3)
    # every spot centre is on tissue, and the grid covers the tissue area
    ti = np.floor(xy * scale).astype(int)
    assert truth[ti[:, 1], ti[:, 0]].all()
    area_um2 = truth.sum() * (mpp / scale) ** 2
    cell_um2 = GRIDS[kind][0] ** 2 * (np.sqrt(3) / 2 if kind == "hex" else 1.0)
    assert abs(len(g) / (area_um2 / cell_um2) - 1) < 0.15
    assert g.index.is_unique and {"array_col", "array_row"} <= set(g.columns)


def test_grid_origin_is_a_lattice_point_and_bad_arguments():
    img, _ = _slide()
    t = detect_tissue(img, scale=0.1, mpp=1.0)
    origin = (2503.3, 1999.6)
    g = lay_spot_grid(t, 6000, 4000, 1.0, kind="square", origin=origin)
    xy = g[["pixel_x", "pixel_y"]].to_numpy()
    assert np.isclose(xy - np.array(origin), 0).all(1).any()
    off = (xy - np.array(origin)) / 200.0
    np.testing.assert_allclose(off, np.round(off), atol=1e-9)
    with pytest.raises(InputError, match="unknown spot grid"):
        lay_spot_grid(t, 6000, 4000, 1.0, kind="triangle")
    with pytest.raises(InputError, match="microns per pixel"):
        lay_spot_grid(t, 6000, 4000, float("nan"))
    with pytest.raises(InputError, match="no square grid spot"):
        lay_spot_grid(t, 6000, 4000, 1.0, spacing_um=1e6, origin=(0.0, 0.0))


def test_background_at_the_slide_edge_is_never_filled_as_a_hole():
    """A small slide whose glass corners are each smaller than the minimum hole area: they stay background."""
    h, w = 380, 440
    img = np.full((h, w, 3), 242, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    blob = ((xx - w / 2) / (0.48 * w)) ** 2 + ((yy - h / 2) / (0.48 * h)) ** 2 <= 1.0
    img[blob] = (214, 140, 190)
    img[190:200, 200:210] = 242  # a real hole inside the tissue, 100 px: filled
    t = detect_tissue(img, scale=1.0, mpp=2.0)  # min area 62,500 px > each corner
    assert not t.mask[0, 0] and not t.mask[-1, -1]
    assert t.mask[195, 205]
    assert abs(t.fraction - blob.mean()) < 0.02
