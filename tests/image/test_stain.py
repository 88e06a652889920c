"""Macenko stain normalisation (stgen.image.stain) and ``features.stain``: synthetic H&E rendered from known
stain vectors and concentrations (Beer-Lambert, ``I = Io exp(-HE C)``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stgen.errors import InputError
from stgen.features.cache import feature_cache_path
from stgen.features.extract import extract_features
from stgen.image.stain import IO, StainMatrix, estimate_stains, normalise_stains, reference_stains

#: a bluish haematoxylin and a pink eosin unlike the reference (unit OD vectors, RGB rows)
HE_SRC = np.array([[0.70, 0.30], [0.65, 0.85], [0.30, 0.43]])
HE_SRC = HE_SRC / np.linalg.norm(HE_SRC, axis=0)


def _concentrations(shape=(80, 80), seed=0) -> np.ndarray:
    """(2, H*W) haematoxylin and eosin concentrations: independent uniforms, a fifth of the pixels blank."""
    rng = np.random.default_rng(seed)
    n = shape[0] * shape[1]
    c = np.stack([rng.uniform(0, 1.6, n), rng.uniform(0, 1.0, n)])
    c[:, rng.random(n) < 0.2] = 0.0
    return c


def _render(he: np.ndarray, conc: np.ndarray, shape=(80, 80)) -> np.ndarray:
    return np.clip(IO * np.exp(-he @ conc), 0, 255).T.reshape(*shape, 3).astype(np.uint8)


def test_estimate_recovers_the_stain_vectors_haematoxylin_first():
    est = estimate_stains(_render(HE_SRC, _concentrations()))
    cos = np.sum(est.he * HE_SRC, axis=0) / np.linalg.norm(est.he, axis=0)
    assert (cos > 0.995).all(), cos
    assert est.max_c.shape == (2,) and (est.max_c > 0).all()


def test_normalise_maps_one_stain_to_another_and_is_the_identity_on_its_own_stains():
    conc = _concentrations(seed=1)
    src = StainMatrix(HE_SRC, np.percentile(conc, 99, axis=1))
    ref = reference_stains()
    img = _render(HE_SRC, conc)
    expected = _render(ref.he, conc * (ref.max_c / src.max_c)[:, None])
    out = normalise_stains(img, src, ref)
    assert out.shape == img.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - expected.astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4  # uint8 rounding of the input only
    same = np.abs(normalise_stains(img, src, src).astype(int) - img.astype(int))
    assert np.percentile(same, 99) <= 2
    assert np.abs(out.astype(int) - img.astype(int)).mean() > 5  # the stains did change
    # the optical-density lookup and 3 x 3 map give Macenko's per-pixel least squares exactly (uint8 out)
    od = -np.log((img.reshape(-1, 3).astype(np.float64) + 1) / IO)
    conc_ls = np.linalg.lstsq(src.he, od.T, rcond=None)[0] * (ref.max_c / src.max_c)[:, None]
    direct = np.clip(IO * np.exp(-ref.he @ conc_ls), 0, 255).T.reshape(img.shape).astype(np.uint8)
    np.testing.assert_array_equal(out, direct)
    with pytest.raises(InputError, match="uint8 RGB"):
        normalise_stains(img.astype(np.float32), src, ref)


def test_a_blank_image_has_no_stain_to_estimate():
    with pytest.raises(InputError, match="stained pixels"):
        estimate_stains(np.full((50, 50, 3), 250, dtype=np.uint8), where="blank.png")
    with pytest.raises(InputError, match="RGB"):
        estimate_stains(np.zeros((5, 5), dtype=np.uint8))


def test_features_with_stain_normalisation_have_their_own_cache_key_and_bad_methods_are_refused(tmp_path: Path):
    """``stain="macenko"`` changes the encoded patches (rgb-stats features: mean RGB), is cached under a key of
    its own, and leaves the key of unnormalised features as it was; the config refuses unknown methods and
    only a non-default ``features.stain`` enters the config hash."""
    from stgen.workflows.config import StgenConfig
    from stgen.workflows.rundir import config_hash

    path = tmp_path / "S1" / "he.png"
    path.parent.mkdir()
    Image.fromarray(_render(HE_SRC, _concentrations((80, 80), seed=2))).save(path)
    centres = np.array([[20.0, 30.0], [50.0, 50.0]])
    kw = dict(patch_px=16, encoder="rgb-stats", show_progress=False, cache_dir=tmp_path / "cache")
    plain = extract_features(path, centres, **kw)
    norm = extract_features(path, centres, stain="macenko", **kw)
    assert not np.allclose(plain[:, :3], norm[:, :3], atol=1e-3)
    key = dict(cache_dir=tmp_path, image_path=path, centers_xy=centres, patch_px=16, encoder="rgb-stats", tta=False)
    assert feature_cache_path(**key) == feature_cache_path(**key, stain="none") != feature_cache_path(**key,
                                                                                                     stain="macenko")
    np.testing.assert_array_equal(extract_features(path, centres, stain="macenko", **kw), norm)  # from the cache
    with pytest.raises(InputError, match="features.stain"):
        extract_features(path, centres, stain="reinhard", **kw)
    with pytest.raises(InputError, match="features.stain"):
        StgenConfig.from_dict({"features": {"stain": "reinhard"}})
    mac = StgenConfig.from_dict({"features": {"stain": "macenko"}})
    none = StgenConfig.from_dict({"features": {"stain": "none"}})
    assert mac.features.stain == "macenko"
    assert config_hash(mac, "flag", "X") != config_hash(none, "flag", "X")
    with pytest.raises(InputError, match="features.stain"):  # 'auto' is the config's, resolved per model
        extract_features(path, centres, stain="auto", **kw)


def test_auto_stain_is_each_models_own_default_and_older_runs_load_unnormalised(tmp_path: Path):
    """``features.stain: auto`` (the default) resolves to ``macenko`` for hinge and ridge (chosen on nested folds)
    and ``none`` for the paper preset and the models not measured, in the config hash as in the fit; a run whose
    ``config.yaml`` predates ``features.stain`` loads with ``none``, the features it was trained on."""
    import yaml

    from stgen.workflows.config import StgenConfig
    from stgen.workflows.rundir import config_hash, read_run_config

    auto = StgenConfig()
    assert auto.features.stain == "auto"
    expected = {"hinge": "macenko", "ridge": "macenko", "hinge-paper": "none", "flag": "none", "stflow": "none"}
    for model, stain in expected.items():
        assert auto.for_model(model).features.stain == stain, model
        explicit = StgenConfig.from_dict({"features": {"stain": stain}})
        assert config_hash(auto, model, "X") == config_hash(explicit, model, "X"), model
    from stgen.workflows.inputs import feature_settings

    assert feature_settings(auto.for_model("hinge"), None).stain == "macenko"  # what the fit encodes with
    none = StgenConfig.from_dict({"features": {"stain": "none"}})
    assert none.for_model("hinge") is none  # an explicit choice is kept for every model
    with pytest.raises(InputError, match="unknown model"):
        auto.for_model("nope")

    saved = auto.for_model("flag").to_dict()
    del saved["features"]["stain"]  # a run written before features.stain existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert read_run_config(tmp_path).features.stain == "none"
    assert StgenConfig.from_dict(saved).features.stain == "auto"  # what a bare read would wrongly give
    for name in ("ensemble", "sd_scale"):  # nor had its FLAG section the fields added later
        del saved["flag"][name]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    flag = read_run_config(tmp_path).flag
    assert (flag.ensemble, flag.sd_scale) == (1, 1.0) != (StgenConfig().flag.ensemble, StgenConfig().flag.sd_scale)
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(InputError, match="mapping"):
        read_run_config(tmp_path)
    (tmp_path / "config.yaml").write_text("features: [\n")
    with pytest.raises(InputError, match="cannot be read as YAML"):
        read_run_config(tmp_path)
