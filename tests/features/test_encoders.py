"""Foundation-model encoders (stgen.features.spec) and their spec/registry integration (stgen.features.extract).

Checkpoints are tiny but in the exact upstream key layout and file format (``torch.save``'d
state dicts / safetensors); the forward passes are checked against a straightforward reference
written here from the raw state dict (unfold + matmul patch embedding, explicit softmax per head,
hand-written LayerNorm and erf-GELU), and CONCH's pooler also against ``torch.nn.MultiheadAttention``
driven exactly as CONCH's ``AttentionalPooler.forward`` drives it.
"""

from __future__ import annotations

import math
import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from stgen.features import cache as features_cache
from stgen.features import registry as features
from stgen.features.vit import ConchVisual, ViTConfig, VisionTransformer, timm_config
from stgen.features.weights import load_state_dict
from stgen.features.spec import parse_encoder_spec
from stgen.errors import InputError
from stgen.features.registry import build_encoder, encoder_dim
from stgen.features.extract import extract_features
from stgen.features.cache import feature_cache_path
from stgen.utils.io import sha256_json

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, one_thread):
    monkeypatch.setattr(features, "_BUILT", {})


# ----------------------------------------------------------------------------- checkpoints


def vit_state(gen, dim, depth, patch, grid, hidden, layer_scale, prefix=""):
    """A timm VisionTransformer state dict (num_classes=0) written out key by key."""
    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=gen) * scale

    sd = {
        "cls_token": r(1, 1, dim, scale=0.5),
        "pos_embed": r(1, 1 + grid * grid, dim, scale=0.5),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
            b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
            b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
            b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
            b + "mlp.fc1.weight": r(hidden, dim), b + "mlp.fc1.bias": r(hidden),
            b + "mlp.fc2.weight": r(dim, hidden), b + "mlp.fc2.bias": r(dim),
        })
        if layer_scale:
            sd[b + "ls1.gamma"] = r(dim, scale=0.5)
            sd[b + "ls2.gamma"] = r(dim, scale=0.5)
    sd["norm.weight"] = 1 + r(dim)
    sd["norm.bias"] = r(dim)
    return {prefix + k: v for k, v in sd.items()}


def conch_state(gen, trunk_dim=128, depth=2, patch=8, grid=4, d=32, text=True):
    """The CoCa state dict layout of CONCH's pytorch_model.bin (visual + ignored text/caption parts)."""
    sd = vit_state(gen, trunk_dim, depth, patch, grid, 4 * trunk_dim, False, prefix="visual.trunk.")

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=gen) * scale

    ap = "visual.attn_pool_contrast."
    sd.update({
        ap + "query": r(1, d, scale=1.0),
        ap + "attn.q_proj_weight": r(d, d, scale=0.3), ap + "attn.k_proj_weight": r(d, trunk_dim, scale=0.3),
        ap + "attn.v_proj_weight": r(d, trunk_dim, scale=0.3), ap + "attn.in_proj_bias": r(3 * d),
        ap + "attn.out_proj.weight": r(d, d, scale=0.3), ap + "attn.out_proj.bias": r(d),
        ap + "ln_q.weight": 1 + r(d), ap + "ln_q.bias": r(d),
        ap + "ln_k.weight": 1 + r(trunk_dim), ap + "ln_k.bias": r(trunk_dim),
        "visual.ln_contrast.weight": 1 + r(d), "visual.ln_contrast.bias": r(d),
        "visual.proj_contrast": r(d, d),
    })
    if text:  # ignored: captioning pooler, text tower, decoder, temperature
        sd.update({
            "visual.attn_pool_caption.query": r(6, 24), "visual.ln_caption.weight": r(24),
            "text.token_embedding.weight": r(50, 24), "text.ln_final.weight": r(24),
            "text_decoder.resblocks.0.ln_1.weight": r(24), "logit_scale": torch.tensor(2.0),
        })
    return sd


# ----------------------------------------------------------------------------- reference


def ln_ref(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu_ref(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


def mha_ref(q_in, kv_in, wq, bq, wk, bk, wv, bv, wo, bo, heads):
    q, k, v = q_in @ wq.T + bq, kv_in @ wk.T + bk, kv_in @ wv.T + bv
    hd = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        logits = q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(hd)
        a = torch.exp(logits - logits.amax(-1, keepdim=True))
        outs.append((a / a.sum(-1, keepdim=True)) @ v[..., s])
    return torch.cat(outs, -1) @ wo.T + bo


def pos_ref(pos, grid, gh, gw):
    """timm resample_abs_pos_embed, written out: class entry kept, grid resampled bicubically."""
    if (gh, gw) == (grid, grid):
        return pos
    d = pos.shape[-1]
    g = pos[0, 1:].reshape(grid, grid, d).permute(2, 0, 1)[None]
    g = F.interpolate(g, size=(gh, gw), mode="bicubic", antialias=True)
    return torch.cat([pos[:, :1], g[0].permute(1, 2, 0).reshape(1, gh * gw, d)], dim=1)


def vit_ref(sd, x, heads, prefix="", eps=1e-6):
    """All tokens after the final norm, computed from the raw state dict."""
    def g(k):
        return sd[prefix + k]

    w = g("patch_embed.proj.weight")
    dim, p = w.shape[0], w.shape[-1]
    b, gh, gw = x.shape[0], x.shape[2] // p, x.shape[3] // p
    patches = x[:, :, : gh * p, : gw * p].reshape(b, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
    t = patches.reshape(b, gh * gw, 3 * p * p) @ w.reshape(dim, -1).T + g("patch_embed.proj.bias")
    grid = math.isqrt(g("pos_embed").shape[1] - 1)
    t = torch.cat([g("cls_token").expand(b, -1, -1), t], 1) + pos_ref(g("pos_embed"), grid, gh, gw)
    depth = len({k[len(prefix):].split(".")[1] for k in sd if k.startswith(prefix + "blocks.")})
    for i in range(depth):
        pre = f"blocks.{i}."
        h = ln_ref(t, g(pre + "norm1.weight"), g(pre + "norm1.bias"), eps)
        wq, wk, wv = g(pre + "attn.qkv.weight").chunk(3)
        bq, bk, bv = g(pre + "attn.qkv.bias").chunk(3)
        a = mha_ref(h, h, wq, bq, wk, bk, wv, bv, g(pre + "attn.proj.weight"), g(pre + "attn.proj.bias"), heads)
        if prefix + pre + "ls1.gamma" in sd:
            a = a * g(pre + "ls1.gamma")
        t = t + a
        h = ln_ref(t, g(pre + "norm2.weight"), g(pre + "norm2.bias"), eps)
        m = gelu_ref(h @ g(pre + "mlp.fc1.weight").T + g(pre + "mlp.fc1.bias"))
        m = m @ g(pre + "mlp.fc2.weight").T + g(pre + "mlp.fc2.bias")
        if prefix + pre + "ls2.gamma" in sd:
            m = m * g(pre + "ls2.gamma")
        t = t + m
    return ln_ref(t, g("norm.weight"), g("norm.bias"), eps)


def conch_ref(sd, x, trunk_heads=2, pool_heads=8):
    tokens = vit_ref(sd, x, trunk_heads, prefix="visual.trunk.")
    ap = "visual.attn_pool_contrast."
    q = ln_ref(sd[ap + "query"], sd[ap + "ln_q.weight"], sd[ap + "ln_q.bias"], 1e-5).expand(x.shape[0], -1, -1)
    kv = ln_ref(tokens, sd[ap + "ln_k.weight"], sd[ap + "ln_k.bias"], 1e-5)
    bq, bk, bv = sd[ap + "attn.in_proj_bias"].chunk(3)
    pooled = mha_ref(q, kv, sd[ap + "attn.q_proj_weight"], bq, sd[ap + "attn.k_proj_weight"], bk,
                     sd[ap + "attn.v_proj_weight"], bv, sd[ap + "attn.out_proj.weight"],
                     sd[ap + "attn.out_proj.bias"], pool_heads)[:, 0]
    return ln_ref(pooled, sd["visual.ln_contrast.weight"], sd["visual.ln_contrast.bias"], 1e-5)


def normalise(x, mean_std):
    m, s = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std)
    return (x - m) / s


# ----------------------------------------------------------------------------- fixtures

UNI_KW = dict(dim=128, depth=2, patch=8, grid=3, hidden=96, layer_scale=True)  # 2 heads, 24 px input


@pytest.fixture()
def uni(tmp_path):
    sd = vit_state(torch.Generator().manual_seed(0), **UNI_KW)
    path = tmp_path / "uni" / "pytorch_model.bin"
    path.parent.mkdir()
    torch.save(sd, path)
    return path, sd


@pytest.fixture()
def conch(tmp_path):
    sd = conch_state(torch.Generator().manual_seed(1))
    path = tmp_path / "conch" / "pytorch_model.bin"
    path.parent.mkdir()
    torch.save(sd, path)
    return path, sd


def _batch(n, size, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- UNI / ViT


def test_uni_forward_matches_reference(uni):
    path, sd = uni
    spec = f"uni:{path}"
    assert encoder_dim(spec) == 128 and not features._BUILT  # dim read off the file, nothing built
    enc = build_encoder(spec, device="cpu")
    assert build_encoder(spec, device="cpu") is enc
    assert (enc.dim, enc.input_size, enc.any_size) == (128, 24, False)
    assert (enc.mean, enc.std) == IMAGENET and enc.name == spec
    assert enc.model.cfg == ViTConfig(embed_dim=128, depth=2, num_heads=2, patch_size=8, grid=3,
                                      mlp_hidden=96, layer_scale=True)
    lns = [m for m in enc.model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(lns) == 2 * 2 + 1 and {m.eps for m in lns} == {1e-6}  # timm ViT: LayerNorm eps 1e-6
    x = _batch(3, 24)
    out = enc(x)
    ref = vit_ref(sd, normalise(x, IMAGENET), heads=2)[:, 0]
    assert out.shape == (3, 128) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # every block matters (LayerScale is applied, not dropped)
    no_ls = {k: (torch.ones_like(v) if k.endswith("gamma") else v) for k, v in sd.items()}
    assert not torch.allclose(vit_ref(no_ls, normalise(x, IMAGENET), 2)[:, 0], ref, atol=1e-3)


def test_pos_embed_interpolation_other_size(uni):
    path, sd = uni
    enc = build_encoder(f"uni:{path}", device="cpu")
    x = _batch(2, 40, seed=3)  # 5x5 grid instead of the 3x3 pretraining grid
    out = enc(x, size=40)
    ref = vit_ref(sd, normalise(x, IMAGENET), heads=2)[:, 0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    vit = enc.model
    assert vit.pos_embed_for(3, 3) is vit.pos_embed
    pos = vit.pos_embed_for(5, 4)
    assert pos.shape == (1, 1 + 20, 128)
    torch.testing.assert_close(pos[:, :1], vit.pos_embed[:, :1])  # class-token entry kept
    # a constant grid stays constant under resampling (independent of the interpolation code)
    with torch.no_grad():
        vit.pos_embed[:, 1:] = vit.pos_embed[:, 1:2].clone()
    torch.testing.assert_close(vit.pos_embed_for(7, 2)[:, 1:], vit.pos_embed[:, 1:2].expand(1, 14, 128))
    with pytest.raises(InputError, match="at least 8 px"):
        enc(x, size=4)


def test_uni_safetensors_legacy_and_wrapped_files_load_identically(uni, tmp_path):
    from safetensors.torch import save_file

    path, sd = uni
    x = _batch(2, 24)
    ref = build_encoder(f"uni:{path}", device="cpu")(x)
    st = tmp_path / "uni.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    legacy = tmp_path / "legacy.bin"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, wrapped)
    for p in (st, legacy, wrapped):
        assert encoder_dim(f"uni:{p}") == 128
        torch.testing.assert_close(build_encoder(f"uni:{p}", device="cpu")(x), ref, atol=0, rtol=0)


def test_strict_key_and_shape_validation(uni, conch, tmp_path):
    path, sd = uni

    def bad(name, state, spec_kind="uni"):
        p = tmp_path / name
        torch.save(state, p)
        with pytest.raises(InputError) as ei:
            build_encoder(f"{spec_kind}:{p}", device="cpu")
        assert str(p) in str(ei.value)
        return str(ei.value)

    msg = bad("missing.bin", {k: v for k, v in sd.items() if k != "blocks.1.ls2.gamma"})
    assert "missing keys: blocks.1.ls2.gamma" in msg
    msg = bad("extra.bin", {**sd, "head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)})
    assert "unexpected keys: head.bias, head.weight" in msg
    msg = bad("shape.bin", {**sd, "norm.bias": torch.zeros(64), "blocks.0.attn.proj.weight": torch.zeros(128, 64)})
    assert "misshapen" in msg and "norm.bias (64,) != (128,)" in msg and "blocks.0.attn.proj.weight" in msg
    no_ls = {k: v for k, v in sd.items() if "ls" not in k}  # a ViT without LayerScale is not UNI
    assert "ls1.gamma" in bad("nols.bin", no_ls)
    msg = bad("conch_as_uni.bin", torch.load(conch[0], weights_only=True))
    assert "missing keys: patch_embed.proj.weight" in msg
    many = {k: v for k, v in sd.items() if not k.startswith("blocks.0.")}
    assert "(+" in bad("many.bin", {**many, "blocks.0.mlp.fc1.weight": sd["blocks.0.mlp.fc1.weight"]})
    odd = vit_state(torch.Generator().manual_seed(0), dim=40, depth=1, patch=8, grid=2, hidden=8, layer_scale=True)
    assert "multiple of 64" in bad("odd.bin", odd)
    # CONCH: its own layout rules
    csd = conch[1]
    assert "missing keys: visual.proj_contrast" in bad(
        "c1.bin", {k: v for k, v in csd.items() if k != "visual.proj_contrast"}, "conch")
    assert "no visual.* keys" in bad("c2.bin", sd, "conch")
    assert "unexpected keys: visual.trunk.blocks.0.ls1.gamma" in bad(
        "c3.bin", {**csd, "visual.trunk.blocks.0.ls1.gamma": torch.ones(128)}, "conch")
    assert "unexpected keys: visual.head.weight" in bad("c4.bin", {**csd, "visual.head.weight": torch.ones(2)}, "conch")
    # not a state dict at all
    assert "not a tensor state dict" in bad("notsd.bin", {"a": 1, "b": "x"})
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01garbage")
    with pytest.raises(InputError, match="junk.safetensors"):
        build_encoder(f"uni:{junk}", device="cpu")


class _Payload:
    """Unpickling this would run a shell command creating ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class _Custom:
    def __init__(self) -> None:
        self.w = torch.zeros(2)


def test_malicious_pickles_are_refused_not_executed(tmp_path):
    marker = tmp_path / "PWNED"
    files = {}
    raw = tmp_path / "raw_pickle.bin"
    raw.write_bytes(pickle.dumps({"w": 1.0, "x": _Payload(marker)}, protocol=2))
    files["raw"] = raw
    raw5 = tmp_path / "raw_pickle5.bin"
    raw5.write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=5))
    files["raw5"] = raw5
    zipped = tmp_path / "torch_zip.bin"
    torch.save({"cls_token": torch.zeros(1, 1, 64), "evil": _Payload(marker)}, zipped)
    files["zip"] = zipped
    custom = tmp_path / "custom.pth"
    torch.save({"model": _Custom()}, custom)
    files["custom"] = custom
    for name, p in files.items():
        for spec in (f"uni:{p}", f"conch:{p}", f"timm:vit_small_patch16_224:{p}"):
            with pytest.raises(InputError, match="refusing to unpickle arbitrary objects") as ei:
                build_encoder(spec, device="cpu")
            assert str(p) in str(ei.value)
        with pytest.raises(InputError, match="refusing to unpickle"):
            load_state_dict(p)
        with pytest.raises(InputError, match="refusing to unpickle"):
            encoder_dim(f"uni:{p}")
    assert not marker.exists()
    for p in (raw, zipped):
        with pytest.raises(InputError, match=r"GLOBAL (posix|nt|os)\.system"):  # names what was refused
            load_state_dict(p)


def test_real_size_layouts_on_meta_device():
    """Full-size UNI and CONCH modules have exactly the released key layouts and shapes."""
    uni_cfg = ViTConfig(embed_dim=1024, depth=24, num_heads=16, patch_size=16, grid=14, mlp_hidden=4096,
                        layer_scale=True)
    with torch.device("meta"):
        uni_m = VisionTransformer(uni_cfg)
        conch_m = ConchVisual(ViTConfig(embed_dim=768, depth=12, num_heads=12, patch_size=16, grid=28,
                                        mlp_hidden=3072), d_model=512)
    u = {k: tuple(v.shape) for k, v in uni_m.state_dict().items()}
    assert len(u) == 6 + 24 * 14
    assert u["pos_embed"] == (1, 197, 1024) and u["cls_token"] == (1, 1, 1024)
    assert u["patch_embed.proj.weight"] == (1024, 3, 16, 16)
    assert u["blocks.23.attn.qkv.weight"] == (3072, 1024) and u["blocks.23.ls2.gamma"] == (1024,)
    assert u["blocks.0.mlp.fc1.weight"] == (4096, 1024) and "head.weight" not in u
    assert uni_cfg.img_size == 224
    assert timm_config("vit_large_patch16_224") == ViTConfig(1024, 24, 16, 16, 14, 4096)
    c = {k: tuple(v.shape) for k, v in conch_m.state_dict().items()}
    assert c["trunk.pos_embed"] == (1, 785, 768)  # 448 px / 16 = 28 x 28 grid
    assert "trunk.blocks.0.ls1.gamma" not in c and c["trunk.blocks.11.mlp.fc2.weight"] == (768, 3072)
    assert c["attn_pool_contrast.query"] == (1, 512)
    assert c["attn_pool_contrast.attn.q_proj_weight"] == (512, 512)
    assert c["attn_pool_contrast.attn.k_proj_weight"] == (512, 768)
    assert c["attn_pool_contrast.attn.in_proj_bias"] == (1536,)
    assert c["attn_pool_contrast.ln_k.weight"] == (768,) and c["ln_contrast.weight"] == (512,)
    assert c["proj_contrast"] == (512, 512)
    # the pooler's attention has nn.MultiheadAttention(512, 8, kdim=768, vdim=768)'s parameters
    with torch.device("meta"):
        mha = nn.MultiheadAttention(512, 8, kdim=768, vdim=768)
    assert {k: tuple(v.shape) for k, v in mha.state_dict().items()} == \
        {k[len("attn_pool_contrast.attn."):]: s for k, s in c.items() if k.startswith("attn_pool_contrast.attn.")}


# ----------------------------------------------------------------------------- CONCH


def test_conch_forward_matches_reference(conch):
    path, sd = conch
    spec = f"conch:{path}"
    assert encoder_dim(spec) == 32 and not features._BUILT
    enc = build_encoder(spec, device="cpu")
    assert (enc.dim, enc.input_size, enc.resize) == (32, 32, "bicubic") and (enc.mean, enc.std) == OPENAI
    m = enc.model  # timm trunk LayerNorms eps 1e-6; open_clip pooler / ln_contrast eps 1e-5 (torch default)
    assert m.trunk.norm.eps == 1e-6 and m.ln_contrast.eps == m.attn_pool_contrast.ln_k.eps == 1e-5
    x = _batch(3, 32, seed=5)
    out = enc(x)
    assert out.shape == (3, 32)
    torch.testing.assert_close(out, conch_ref(sd, normalise(x, OPENAI)), atol=1e-5, rtol=0)
    # proj_contrast is not applied (encode_image(proj_contrast=False)): changing it changes nothing
    with torch.no_grad():
        enc.model.proj_contrast.mul_(7)
    torch.testing.assert_close(enc(x), out, atol=0, rtol=0)
    # smaller patches are upsampled bicubically (clamped to [0, 1]) to 32 px
    small = _batch(2, 20, seed=6)
    up = F.interpolate(small, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(enc(small), conch_ref(sd, normalise(up, OPENAI)), atol=1e-5, rtol=0)


def test_conch_pooler_matches_torch_multihead_attention(conch):
    """The pooler computes what CONCH's AttentionalPooler computes with nn.MultiheadAttention."""
    path, sd = conch
    model = build_encoder(f"conch:{path}", device="cpu").model
    ap = "visual.attn_pool_contrast."
    mha = nn.MultiheadAttention(32, 8, kdim=128, vdim=128)
    mha.load_state_dict({k[len(ap + "attn."):]: v for k, v in sd.items() if k.startswith(ap + "attn.")}, strict=True)
    ln_q, ln_k = nn.LayerNorm(32), nn.LayerNorm(128)
    ln_q.load_state_dict({"weight": sd[ap + "ln_q.weight"], "bias": sd[ap + "ln_q.bias"]})
    ln_k.load_state_dict({"weight": sd[ap + "ln_k.weight"], "bias": sd[ap + "ln_k.bias"]})
    tokens = torch.randn(4, 17, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        kv = ln_k(tokens).permute(1, 0, 2)  # NLD -> LND, as in CONCH
        q = ln_q(sd[ap + "query"]).unsqueeze(1).repeat(1, 4, 1)
        expect = mha(q, kv, kv, need_weights=False)[0].permute(1, 0, 2)
        got = model.attn_pool_contrast(tokens)
    assert got.shape == (4, 1, 32)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- timm / torchscript / joins


def test_timm_arch(tmp_path):
    sd = vit_state(torch.Generator().manual_seed(4), dim=192, depth=12, patch=16, grid=14, hidden=768,
                   layer_scale=False)
    path = tmp_path / "vit_tiny.safetensors"
    from safetensors.torch import save_file

    save_file({**sd, "head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)}, str(path))
    spec = f"timm:vit_tiny_patch16_224.augreg_in21k:{path}"
    assert encoder_dim(spec) == 192
    enc = build_encoder(spec, device="cpu")
    assert (enc.dim, enc.input_size) == (192, 224)
    x = _batch(1, 224, seed=8)
    torch.testing.assert_close(enc(x), vit_ref(sd, normalise(x, IMAGENET), heads=3)[:, 0], atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="vit_small_patch16_224, .*vit_base_patch16_224, .*vit_large_patch16_224"):
        build_encoder(f"timm:vit_gigantic_patch3_999:{path}", device="cpu")
    with pytest.raises(InputError, match="misshapen"):
        build_encoder(f"timm:vit_small_patch16_224:{path}", device="cpu")
    with pytest.raises(InputError, match="timm:ARCH:PATH"):
        build_encoder(f"timm:{path}", device="cpu")


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, stride=4)
        self.fc = nn.Linear(4, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_round_trip(tmp_path):
    torch.manual_seed(0)
    module = _Tiny().eval()
    path = tmp_path / "enc.pt"
    torch.jit.script(module).save(str(path))
    spec = f"torchscript:{path}"
    assert encoder_dim(spec) == 7
    enc = build_encoder(spec, device="cpu")
    assert enc.dim == 7 and enc.input_size == 224
    x = _batch(2, 50, seed=9)
    with torch.no_grad():
        up = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        ref = module(normalise(up, IMAGENET))
    torch.testing.assert_close(enc(x).cpu(), ref, atol=1e-5, rtol=0)

    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :2]

    bad = tmp_path / "bad.pt"
    torch.jit.script(Bad()).save(str(bad))
    with pytest.raises(InputError, match=r"\(B, D\)"):
        build_encoder(f"torchscript:{bad}", device="cpu")
    notzip = tmp_path / "state.pt"
    torch.save(module.state_dict(), notzip, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match="not a TorchScript archive"):
        build_encoder(f"torchscript:{notzip}", device="cpu")


def test_plus_concatenates_in_order(uni, conch, tmp_path):
    odd_dir = tmp_path / "w+x"  # a '+' inside a path does not split the spec
    odd_dir.mkdir()
    uni_path = odd_dir / "uni.bin"
    uni_path.write_bytes(uni[0].read_bytes())
    spec = f"uni:{uni_path}+rgb-stats+conch:{conch[0]}"
    parts = parse_encoder_spec(spec, features._REGISTRY)
    assert [p.kind for p in parts] == ["uni", "name", "conch"] and parts[0].path == uni_path
    assert encoder_dim(spec) == 128 + 6 + 32
    enc = build_encoder(spec, device="cpu")
    assert enc.dim == 166 and enc.any_size is False and features._spec(spec).dim == 166
    x = _batch(2, 24, seed=10)
    out = enc(x)
    expect = torch.cat([build_encoder(f"uni:{uni_path}", device="cpu")(x),
                        build_encoder("rgb-stats", device="cpu")(x),
                        build_encoder(f"conch:{conch[0]}", device="cpu")(x)], dim=1)
    torch.testing.assert_close(out, expect, atol=0, rtol=0)
    assert build_encoder(f"conch:{conch[0]}+uni:{uni_path}", device="cpu")(x).shape == (2, 160)
    # only registered any_size encoders make a joined encoder any_size
    assert build_encoder("rgb-stats+rgb-stats", device="cpu").any_size is True
    assert features._spec("rgb-stats+rgb-stats").factory.any_size is True


def test_bad_specs_name_the_problem(tmp_path, uni):
    cases = {
        "": "empty encoder spec",
        "resnet-9000": "unknown encoder 'resnet-9000'.*uni:PATH.*conch:PATH.*timm:ARCH:PATH.*torchscript:PATH",
        "uni:": "names no weights file",
        f"uni:{tmp_path / 'nope.bin'}": "nope.bin not found",
        f"rgb-stats+uni:{tmp_path / 'gone.bin'}": "gone.bin not found",
        f"uni:{uni[0]}++rgb-stats": "empty part",
        f"foo:{uni[0]}": "unknown encoder",
        "rgb-stats+resnet": "unknown encoder 'rgb-stats\\+resnet'",
    }
    for spec, pattern in cases.items():
        with pytest.raises(InputError, match=pattern):
            build_encoder(spec, device="cpu")
        with pytest.raises(InputError, match=pattern):
            encoder_dim(spec)
    with pytest.raises(InputError, match="efficientnet-lite0"):
        build_encoder("resnet-9000")
    assert {"efficientnet-lite0", "rgb-stats"} <= set(features.encoder_names())  # tests may register more
    assert encoder_dim("efficientnet-lite0") == 1280 and not features._BUILT


def test_rebuilt_when_weights_change(uni):
    path, sd = uni
    spec = f"uni:{path}"
    enc = build_encoder(spec, device="cpu")
    x = _batch(1, 24)
    before = enc(x)
    torch.save({k: v * 1.1 for k, v in sd.items()}, path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    enc2 = build_encoder(spec, device="cpu")
    assert enc2 is not enc and not torch.allclose(enc2(x), before)
    assert sum(k[0] == spec for k in features._BUILT) == 1  # stale model dropped


# ----------------------------------------------------------------------------- feature cache


def test_feature_cache_key(tmp_path, uni, conch):
    img = tmp_path / "he.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(img)
    xy = np.array([[20.0, 20.0], [30.0, 25.0]])

    # registered names: exactly the key written before path specs existed
    from stgen.utils.io import sha256_file

    old = {"image_sha256": sha256_file(img), "centers_sha256": features_cache._centers_sha256(xy), "patch_px": 16,
           "encoder": "efficientnet-lite0", "tta": False, "version": features_cache.FEATURE_CODE_VERSION}
    assert feature_cache_path(tmp_path, img, xy, 16, "efficientnet-lite0", False).stem == sha256_json(old)

    path, sd = uni
    spec = f"uni:{path}"
    k1 = feature_cache_path(tmp_path, img, xy, 16, spec, False)
    moved = tmp_path / "elsewhere.bin"
    moved.write_bytes(path.read_bytes())
    assert feature_cache_path(tmp_path, img, xy, 16, f"uni:{moved}", False) == k1  # keyed on bytes, not path
    assert feature_cache_path(tmp_path, img, xy, 16, f"uni:{path}+conch:{conch[0]}", False) != k1
    torch.save({k: v + 0.01 for k, v in sd.items()}, path)  # same path, new bytes
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    k2 = feature_cache_path(tmp_path, img, xy, 16, spec, False)
    assert k2 != k1
    assert feature_cache_path(tmp_path, img, xy, 16, "rgb-stats+rgb-stats", False) != \
        feature_cache_path(tmp_path, img, xy, 16, "rgb-stats", False)

    # end to end: extract, cache, reuse; ViT encoders refuse input_px
    f = extract_features(img, xy, patch_px=16, encoder=spec, cache_dir=tmp_path, show_progress=False)
    assert f.shape == (2, 128) and f.dtype == np.float32 and k2.is_file()
    np.testing.assert_array_equal(np.load(k2), f)
    np.testing.assert_array_equal(
        extract_features(img, xy, patch_px=16, encoder=spec, cache_dir=tmp_path, show_progress=False), f)
    with pytest.raises(InputError, match="input_px"):
        extract_features(img, xy, patch_px=16, encoder=spec, input_px=16, show_progress=False)
