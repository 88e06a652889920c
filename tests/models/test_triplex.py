"""TRIPLEX: neighbourhood and lattice geometry, the positional-encoding generator, loss, training, determinism,
round trip, and the bad inputs of its issue (few spots, border spots, no array coordinates)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from model_fixtures import PATCH, SPACING, assert_same_state, fit_one_thread, save_and_load, synthetic_sections

from stgen.errors import InputError
from stgen.models.base import SectionInput
from stgen.models.triplex.config import TriplexConfig
from stgen.models.triplex.model import (Triplex, neighbour_centres, neighbour_features, section_pitch,
                                        spot_lattice)
from stgen.models.triplex.network import LatticePEG, TriplexNet, triplex_loss
from stgen.workflows.config import StgenConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TriplexConfig(dim=16, fusion_layers=1, global_layers=2, neighbour_layers=1, fusion_heads=2, global_heads=2,
                     neighbour_heads=2, mlp_ratio=2.0, fusion_dropout=0.0, global_dropout=0.0, neighbour_dropout=0.0,
                     lr=3e-3, batch_size=16, max_epochs=30, patience=0, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    secs, fs, panel = synthetic_sections(tmp_path_factory.mktemp("triplex"), n_sections=4, side=6, n_genes=12)
    return secs[:3], secs[3], fs, panel


@pytest.fixture(scope="module")
def fitted(data):
    train, _, fs, panel = data
    return fit_one_thread(Triplex, train, panel, TINY, fs)


# ---------------------------------------------------------------- geometry
def test_neighbourhood_is_a_grid_at_the_stride_with_the_spot_in_the_centre():
    xy = np.array([[100.0, 200.0], [400.0, 200.0]])
    c = neighbour_centres(xy, 50.0, 5)
    assert c.shape == (2, 25, 2)
    np.testing.assert_array_equal(c[:, 12], xy)  # the centre entry is the spot
    np.testing.assert_array_equal(c[0, 0], [0.0, 100.0])  # top left: (-2, -2) strides
    np.testing.assert_array_equal(c[0, 1] - c[0, 0], [50.0, 0.0])  # row-major: x first
    np.testing.assert_array_equal(c[0, 5] - c[0, 0], [0.0, 50.0])


def test_pitch_and_lattice_from_pixels_alone():
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2) * 290.0 + 1000.0
    xy = grid + rng.uniform(-17, 17, size=grid.shape)  # Her2ST-like jitter off the lattice
    assert section_pitch(xy, 224) == pytest.approx(290.0, abs=25)
    lat = spot_lattice(xy, section_pitch(xy, 224))
    assert lat.min() == 0 and len({tuple(r) for r in lat}) == len(xy)  # every spot its own cell
    np.testing.assert_array_equal(lat[1] - lat[0], [2, 0])  # one pitch = two half-pitch cells
    assert section_pitch(xy[:1], 224) == 224.0  # a single spot: the patch size


def test_lattice_peg_sees_only_lattice_neighbours():
    """A token changes the PEG output of the spots within kernel_size // 2 pitches, and of no other spot."""
    torch.manual_seed(0)
    peg = LatticePEG(4, kernel_size=3)
    lat = torch.tensor([[0, 0], [2, 0], [4, 0], [8, 0], [2, 2]])
    x = torch.randn(5, 4)
    y0 = peg(x, lat)
    x2 = x.clone()
    x2[0] += 1.0
    changed = ((peg(x2, lat) - y0).abs().sum(1) > 1e-6).tolist()
    assert changed == [True, True, False, False, True]  # itself, one pitch right, the diagonal; not 2 or 4 pitches


def test_neighbour_features_reuse_spot_features_and_pad_off_image(data):
    train, _, fs, _ = data
    s = train[0]
    cfg = TINY
    nb = neighbour_features(s, fs, cfg, section_pitch(s.xy, fs.patch_px))
    assert nb.shape == (s.n_spots, 25, s.feats.shape[1])
    np.testing.assert_array_equal(nb[:, 12], s.feats)  # the spot's own patch
    # an interior spot's right neighbour at the pitch is the next spot of the grid: its own features
    i = 6 * 2 + 2  # row 2, column 2 of the 6 x 6 grid
    np.testing.assert_array_equal(nb[i, 13], s.feats[i + 1])
    # the corner spot's top-left neighbours lie off the image: white patches, all alike
    assert np.allclose(nb[0, 0], nb[0, 1])
    white = fs.encode(s.image, np.array([[-10_000.0, -10_000.0]]))[0]
    np.testing.assert_allclose(nb[0, 0], white, rtol=0, atol=1e-6)


def test_neighbour_stride_patch_tiles_adjacent_patches(data):
    """``neighbour_stride="patch"``: adjacent tiles of the spot-patch size (24 px here, pitch 16); ``snap=0``
    encodes every position."""
    train, _, fs, _ = data
    s = train[0]
    fs24 = replace(fs, patch_px=24)
    cfg = TriplexConfig(**{**TINY.__dict__, "neighbour_stride": "patch", "snap": 0.0})
    nb = neighbour_features(s, fs24, cfg, section_pitch(s.xy, fs.patch_px))
    c = neighbour_centres(s.xy[3:4], 24.0, 5)[0]
    np.testing.assert_allclose(nb[3], fs24.encode(s.image, c), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- network and loss
def test_network_shapes_and_loss_terms():
    torch.manual_seed(0)
    net = TriplexNet(6, 5, TINY)
    out = net(torch.randn(4, 6), torch.randn(4, 25, 6), torch.randn(4, TINY.dim))
    assert set(out) == {"fused", "target", "neighbour", "global"} and all(v.shape == (4, 5) for v in out.values())
    g = net.encode_global(torch.randn(9, 6), torch.tensor([[2 * i, 0] for i in range(9)]))
    assert g.shape == (9, TINY.dim)
    y = torch.randn(4, 5)
    same = {k: y.clone() for k in out}
    assert float(triplex_loss(same, y, 0.3)) == 0.0
    one = {**same, "target": y + 1.0}  # target head off by 1 everywhere: (1 - a) * 1 + a * 1 = 1
    assert float(triplex_loss(one, y, 0.3)) == pytest.approx(1.0)


def test_training_lowers_the_loss_and_learns_the_histology(fitted, data):
    model, hist = fitted
    _, test, fs, panel = data
    losses = [h["train_loss"] for h in hist["history"] if "train_loss" in h]
    assert losses[-1] < 0.7 * losses[0]
    mean, sd = model.predict(test, fs)
    assert mean.shape == (test.n_spots, len(panel)) and not sd.any()
    base = np.mean((test.targets - np.concatenate([s.targets for s in data[0]]).mean(0)) ** 2)
    assert np.mean((mean - test.targets) ** 2) < base  # beats the training-mean predictor on a held-out section


def test_same_seed_same_weights_and_round_trip(fitted, data, tmp_path):
    model, _ = fitted
    train, test, fs, panel = data
    again, _ = fit_one_thread(Triplex, train, panel, TINY, fs)
    assert_same_state(model, again)
    loaded = save_and_load(model, TINY, tmp_path)
    np.testing.assert_array_equal(loaded.predict(test, fs)[0], model.predict(test, fs)[0])
    tensors, meta = model.state()
    tensors.pop("head.weight")
    with pytest.raises(InputError, match="saved state"):
        Triplex.from_state(tensors, {"triplex": meta}, TINY)


# ---------------------------------------------------------------- bad input
def test_few_spots_border_spots_and_no_array_coordinates(fitted, data):
    model, _ = fitted
    _, test, fs, panel = data
    # fewer spots than the 5 x 5 grid, all on the image border: defined (padded neighbours, patch-size pitch)
    for rows in ([0], [0, 5], [0, 1, 2]):
        few = SectionInput("few", test.xy[rows], test.feats[rows], test.image)
        mean, _ = model.predict(few, fs)
        assert mean.shape == (len(rows), len(panel)) and np.isfinite(mean).all()
    # a spot's prediction depends on its neighbourhood and section, not on array coordinates (there are none):
    # shifting the whole section by a non-lattice offset changes nothing but the white-padding border
    shifted = SectionInput("shift", test.xy + np.array([0.3, 0.7]) * SPACING / 10, test.feats, test.image)
    assert np.isfinite(model.predict(shifted, fs)[0]).all()


def test_bad_inputs(data, fitted):
    train, test, fs, panel = data
    model, _ = fitted
    with pytest.raises(InputError, match="image"):
        Triplex.fit([SectionInput("x", s.xy, s.feats, None, s.targets) for s in train], panel, TINY, fs)
    with pytest.raises(InputError, match="features"):
        model.predict(SectionInput("bad", test.xy, test.feats[:, :3], test.image), fs)
    with pytest.raises(InputError, match="n_neighbours"):
        TriplexConfig(n_neighbours=4)
    with pytest.raises(InputError, match="neighbour_stride"):
        TriplexConfig(neighbour_stride="nope")
    with pytest.raises(InputError, match="triplex.dim"):
        StgenConfig.from_dict({"triplex": {"dim": 30}})
    assert StgenConfig.from_dict({"triplex": {"lr": "1e-3"}}).triplex.lr == pytest.approx(1e-3)
    assert PATCH == fs.patch_px
