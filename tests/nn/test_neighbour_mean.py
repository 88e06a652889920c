"""The regional context of a spot (stgen.nn.graph.neighbour_mean): which spots count, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from stgen.errors import InputError
from stgen.nn.graph import neighbour_mean


def _square(side: int = 5, pitch: float = 200.0) -> np.ndarray:
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    return np.stack([gx.ravel(), gy.ravel()], 1).astype(float) * pitch + 1000.0


def _hex(rows: int = 6, cols: int = 6, pitch: float = 100.0) -> np.ndarray:
    pts = [((c + 0.5 * (r % 2)) * pitch, r * pitch * np.sqrt(3) / 2) for r in range(rows) for c in range(cols)]
    return np.asarray(pts)


def test_first_ring_of_a_square_array_is_its_eight_neighbours_and_excludes_the_spot():
    xy = _square()
    v = np.arange(25, dtype=np.float32)[:, None] * np.array([[1.0, -2.0]], dtype=np.float32)
    out = neighbour_mean(v, xy, 1.5)
    centre = 12  # (2, 2): neighbours 6, 7, 8, 11, 13, 16, 17, 18
    np.testing.assert_allclose(out[centre], v[[6, 7, 8, 11, 13, 16, 17, 18]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(out[0], v[[1, 5, 6]].mean(0), rtol=1e-6)  # a corner has 3
    # two rings: 24 spots around the centre (the whole 5 x 5 grid but itself)
    np.testing.assert_allclose(neighbour_mean(v, xy, 2.9)[centre], np.delete(v, centre, 0).mean(0), rtol=1e-6)
    assert out.dtype == np.float32 and out.shape == v.shape


def test_first_ring_of_a_hexagonal_array_is_six_spots_at_any_pixel_scale():
    for scale in (1.0, 7.3):
        xy = _hex() * scale
        ones = np.zeros((len(xy), 1), dtype=np.float32)
        ones[14] = 1.0  # an interior spot
        out = neighbour_mean(ones, xy, 1.5)
        d = np.linalg.norm(xy - xy[14], axis=1)
        ring = np.flatnonzero((d > 0) & (d < 1.5 * 100 * scale))
        assert len(ring) == 6
        np.testing.assert_allclose(out[ring, 0], [1.0 / 6] * 6, rtol=1e-6, atol=0)  # interior spots: 6 neighbours each
        assert out[14, 0] == 0.0  # its own value never enters its context


def test_isolated_spots_keep_their_own_row_and_duplicates_are_neighbours():
    xy = np.vstack([_square(3), [[50_000.0, 50_000.0]]])  # one spot far from the rest
    v = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    out = neighbour_mean(v, xy, 1.5)
    np.testing.assert_array_equal(out[9], v[9])
    xy2 = np.array([[0.0, 0.0], [0.0, 0.0], [100.0, 0.0]])
    out2 = neighbour_mean(np.array([[1.0], [3.0], [5.0]], dtype=np.float32), xy2, 1.5)
    np.testing.assert_allclose(out2[:, 0], [4.0, 3.0, 2.0])  # pitch 100 from the positive distances
    one = np.ones((1, 3), dtype=np.float32)
    np.testing.assert_array_equal(neighbour_mean(one, [[5.0, 5.0]], 1.5), one)


def test_bad_input_names_what_is_wrong():
    xy = _square(3)
    with pytest.raises(InputError, match=r"values must be \(9, F\)"):
        neighbour_mean(np.zeros((8, 2)), xy)
    with pytest.raises(InputError, match="radius"):
        neighbour_mean(np.zeros((9, 2)), xy, 0.0)
    bad = xy.copy()
    bad[3, 0] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        neighbour_mean(np.zeros((9, 2)), bad)


def test_spot_spacing_is_the_pitch_that_neighbour_mean_uses():
    from stgen.nn.graph import spot_spacing

    xy = np.stack(np.meshgrid(np.arange(5), np.arange(4)), -1).reshape(-1, 2) * 180.0
    assert spot_spacing(xy) == pytest.approx(180.0)
    assert spot_spacing(np.concatenate([xy, xy[:3]])) == pytest.approx(180.0)  # duplicates are not a pitch of 0
    assert spot_spacing(xy[:1]) == 1.0 and spot_spacing(np.zeros((4, 2))) == 1.0
    v = np.arange(len(xy), dtype=np.float32)[:, None]
    # radius 1.01 pitches: the 4-neighbourhood, so the pitch neighbour_mean used is spot_spacing's
    inner = 1 * 5 + 1  # spot (1, 1)
    assert neighbour_mean(v, xy, radius=1.01)[inner, 0] == pytest.approx(np.mean([1, 5 + 0, 5 + 2, 10 + 1]))
