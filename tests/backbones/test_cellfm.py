"""CellFM backbone: MindSpore checkpoint reader/writer, conversion, faithful forward, HINGE on top.

The MindSpore parameter names and shapes below are written out by hand from
biomed-AI/CellFM ``model.py``/``retention.py`` (not taken from the model under
test), and the forward pass is checked against an independent numpy
implementation of the same formulas.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from stgen.errors import InputError
from stgen.backbones.mindspore import (
    checkpoint_message_class, index_mindspore_ckpt, read_mindspore_ckpt, write_mindspore_ckpt,
)
from stgen.backbones.cellfm import CellFMBackbone, CellFMConfig, count_parameters, map_panel
from stgen.backbones.cellfm_convert import convert_cellfm, load_cellfm
from stgen.models.hinge.network import HINGE

CFG = CellFMConfig.tiny()  # 50 genes, D=32, 3 layers, 4 heads, 16 bins
GENES = [f"G{i}" for i in range(CFG.n_genes)]


# ----------------------------------------------------------------------------- fixtures
def ms_weights(cfg: CellFMConfig = CFG, seed: int = 0) -> dict[str, np.ndarray]:
    """Random CellFM weights under the exact MindSpore parameter names and shapes."""
    rng = np.random.default_rng(seed)
    d, b = cfg.dim, cfg.value_bins
    rows = cfg.n_genes + 1 + (-cfg.n_genes - 1) % 8

    def w(*shape, s=None):
        s = s if s is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * s).astype(np.float32)

    W = {
        "gene_emb": w(rows, d, s=0.5),
        "cls_token": w(1, 1, d, s=0.5),
        "zero_emb": w(1, 1, d, s=0.5),
        "value_enc.value_enc.w1.weight": w(b, 1, s=1.0),
        "value_enc.value_enc.w3.weight": w(b, b),
        "value_enc.value_enc.table.weight": w(d, b, s=1.0),
        "value_enc.value_enc.a": np.array([[0.3]], np.float32),
        "value_enc.mask_emb": w(1, 1, d, s=0.5),
    }
    W["gene_emb"][0] = 0
    for i in range(cfg.n_layers):
        for p in ("q", "k", "v", "u", "o"):
            W[f"encoder.{i}.attn.{p}_proj.weight"] = w(d, d)
        for p in ("u", "v", "o"):
            W[f"encoder.{i}.ffn.{p}_proj.weight"] = w(d, d)
        for n in (1, 2):
            W[f"encoder.{i}.post_norm{n}.gamma"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
            W[f"encoder.{i}.post_norm{n}.beta"] = (0.1 * rng.standard_normal(d)).astype(np.float32)
    W["value_dec.w1.weight"] = w(d, d)
    W["value_dec.w2.weight"] = w(1, d)
    W["cellwise_dec.map.weight"] = w(d, d)
    return W


TRAINING_STATE = {
    "moment1.gene_emb": np.zeros((8, 4), np.float32),
    "moment2.encoder.0.attn.q_proj.weight": np.zeros((4, 4), np.float32),
    "global_step": np.array([1234], np.int32),
    "learning_rate": np.array(1e-6, np.float32),
    "beta1_power": np.array(0.9, np.float32),
}


@pytest.fixture
def vocab(tmp_path):
    """A tiny vocabulary CSV (CellFM layout) and a genemap.csv with one alias (ALIAS1 -> G7)."""
    v = tmp_path / "vocab.csv"
    v.write_text("HGNC_gene,h5_sample_frequency\n" + "".join(f"{g},{i}\n" for i, g in enumerate(GENES)))
    gm = tmp_path / "genemap.csv"
    gm.write_text(",idx\n" + "".join(f"{g},{i + 1}\n" for i, g in enumerate(GENES)) + "ALIAS1,8\n")
    return v, gm


@pytest.fixture
def converted(tmp_path, vocab):
    W = ms_weights()
    ckpt = write_mindspore_ckpt(tmp_path / "cellfm.ckpt", {**W, **TRAINING_STATE})
    out = convert_cellfm(ckpt, tmp_path / "conv", CFG, vocab_csv=vocab[0], genemap_csv=vocab[1])
    return W, ckpt, out


def _inputs(B=4, G=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, G, generator=g) * 4
    vis = torch.rand(B, G, generator=g) < 0.6
    idx = torch.randperm(CFG.n_genes, generator=g)[:G] + 1
    return x, idx, vis


# ----------------------------------------------------------------------------- numpy reference
def np_cellfm(W, cfg, values, gene_idx, visible):
    """Independent numpy (float64) CellFM forward: gene-wise predictions (B, G)."""
    W = {k: v.astype(np.float64) for k, v in W.items()}
    D, H, L = cfg.dim, cfg.n_heads, cfg.n_layers
    dh = D // H
    B, G = values.shape
    vis = visible.astype(np.float64)

    def leaky(z):
        return np.where(z > 0, z, 0.2 * z)

    def layer_norm(z, g, b):
        mu = z.mean(-1, keepdims=True)
        var = ((z - mu) ** 2).mean(-1, keepdims=True)
        return (z - mu) / np.sqrt(var + 1e-7) * g + b

    def srms(z):
        rms = np.sqrt((z**2).sum(-1, keepdims=True) / z.shape[-1])
        return z / np.maximum(rms, 1e-12)

    # value encoder (FFN with soft bins) + mask embedding
    p = "value_enc.value_enc."
    h = leaky((values * vis)[..., None] * W[p + "w1.weight"][:, 0])
    h = h @ W[p + "w3.weight"].T + W[p + "a"][0, 0] * h
    h = np.exp(h - h.max(-1, keepdims=True))
    h = h / h.sum(-1, keepdims=True)
    emb = h @ W[p + "table.weight"].T
    emb = emb * vis[..., None] + W["value_enc.mask_emb"][0] * (1 - vis[..., None])
    emb = emb + W["gene_emb"][gene_idx][None]
    x = np.concatenate([np.broadcast_to(W["cls_token"], (B, 1, D)), emb], axis=1)  # (B, 1+G, D)

    alpha = (2 * L) ** 0.25
    keymask_first = np.concatenate([np.ones((B, 1)), vis], axis=1)
    for i in range(L):
        pre = f"encoder.{i}."
        keymask = keymask_first if i < L // 2 else np.ones_like(keymask_first)
        att = np.zeros_like(x)
        for bi in range(B):
            xb = x[bi]
            out_heads = []
            for hh in range(H):
                sl = slice(hh * dh, (hh + 1) * dh)
                q = np.maximum(xb @ W[pre + "attn.q_proj.weight"][sl].T, 0) / np.sqrt(dh)
                k = np.maximum(xb @ W[pre + "attn.k_proj.weight"][sl].T, 0) * keymask[bi][:, None] / np.sqrt(dh)
                v = (xb @ W[pre + "attn.v_proj.weight"][sl].T) / np.sqrt(G)
                u = xb @ W[pre + "attn.u_proj.weight"][sl].T
                u = u / (1 + np.exp(-u))
                out_heads.append(srms(q @ (k.T @ v)) * u)
            att[bi] = np.concatenate(out_heads, axis=1) @ W[pre + "attn.o_proj.weight"].T
        x = layer_norm(alpha * x + att, W[pre + "post_norm1.gamma"], W[pre + "post_norm1.beta"])
        gate = (x @ W[pre + "ffn.u_proj.weight"].T) * (x @ W[pre + "ffn.v_proj.weight"].T)
        glu = gate @ W[pre + "ffn.o_proj.weight"].T
        x = layer_norm(alpha * x + glu, W[pre + "post_norm2.gamma"], W[pre + "post_norm2.beta"])
    genes_tok = x[:, 1:]
    return (leaky(genes_tok @ W["value_dec.w1.weight"].T) @ W["value_dec.w2.weight"].T)[..., 0]


# ----------------------------------------------------------------------------- tests
def test_state_dict_keys_are_the_mindspore_names():
    model = CellFMBackbone(CFG, GENES)
    W = ms_weights()
    assert set(model.state_dict()) == set(W)  # the rename rule is the identity
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: v.shape for k, v in W.items()}


def test_forward_matches_numpy_reference(converted):
    W, _, out = converted
    bb = load_cellfm(out)
    x, idx, vis = _inputs()
    ref = np_cellfm(W, CFG, x.numpy().astype(np.float64), idx.numpy(), vis.numpy())
    with torch.no_grad():
        got32 = bb(x, idx, vis).numpy()
        got64 = bb.double()(x.double(), idx, vis).numpy()
    assert got32.shape == ref.shape == (4, 12)
    np.testing.assert_allclose(got32, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got64, ref, rtol=1e-10, atol=1e-10)


def test_masked_values_do_not_leak_and_first_half_masks_keys(converted):
    bb = load_cellfm(converted[2])
    x, idx, vis = _inputs()
    y = x.clone()
    y[~vis] += 100.0
    with torch.no_grad():
        assert torch.equal(bb(x, idx, vis), bb(y, idx, vis))
    masks = bb.kv_masks(vis)
    assert len(masks) == CFG.n_layers and masks[0].shape == (4, 13) and masks[0][:, 0].all()
    assert torch.equal(masks[0][:, 1:], vis) and all(m is None for m in masks[CFG.n_layers // 2 :])


def test_zero_token_rule_replaces_visible_zeros(converted):
    """CellFM's pad_zero=False rule: a visible gene with value 0 is zero_emb + gene_emb."""
    bb = load_cellfm(converted[2])
    bb_z = CellFMBackbone(CellFMConfig.tiny(zero_token=True), GENES)
    bb_z.load_state_dict(bb.state_dict())
    x = torch.tensor([[0.0, 1.5, 0.0]])
    vis = torch.tensor([[True, True, False]])
    idx = torch.tensor([1, 2, 3])
    with torch.no_grad():
        e, ez = bb.embed(x, idx, vis), bb_z.embed(x, idx, vis)
        assert torch.allclose(ez[0, 1], bb.zero_emb[0, 0] + bb.gene_emb[1])
        assert torch.equal(ez[0, 2:], e[0, 2:]) and torch.equal(ez[0, 0], e[0, 0])
        assert torch.allclose(e[0, 3], bb.value_enc.mask_emb[0, 0] + bb.gene_emb[3])


def test_conversion_sidecar_records_vocab_aliases_and_dropped_state(converted):
    _, _, out = converted
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["genes"] == GENES and meta["config"]["n_genes"] == CFG.n_genes
    assert meta["aliases"] == {"ALIAS1": "G7"}
    assert sorted(meta["dropped_training_state"]) == sorted(TRAINING_STATE)
    bb = load_cellfm(out)
    assert bb.gene_to_idx["G0"] == 1 and bb.gene_to_idx["ALIAS1"] == bb.gene_to_idx["G7"] == 8
    assert all(not p.is_meta and p.dtype == torch.float32 for p in bb.parameters())


def test_spatial_token_group_is_detected(tmp_path, vocab):
    rng = np.random.default_rng(1)
    d, b = CFG.dim, CFG.value_bins
    st = {"ST_emb": rng.standard_normal((1, 2, d)).astype(np.float32),
          "ST_enc.w1.weight": rng.standard_normal((b, 1)).astype(np.float32),
          "ST_enc.w3.weight": rng.standard_normal((b, b)).astype(np.float32),
          "ST_enc.table.weight": rng.standard_normal((d, b)).astype(np.float32),
          "ST_enc.a": np.zeros((1, 1), np.float32)}
    ckpt = write_mindspore_ckpt(tmp_path / "st.ckpt", {**ms_weights(), **st})
    bb = load_cellfm(convert_cellfm(ckpt, tmp_path / "st", CFG, vocab_csv=vocab[0], genemap_csv=None))
    assert bb.config.st_tokens and torch.equal(bb.ST_emb, torch.from_numpy(st["ST_emb"]))


@pytest.mark.parametrize("ttype,np_dtype", [("Float32", np.float32), ("Float16", np.float16), ("BFloat16", None)])
def test_dtype_round_trip(tmp_path, vocab, ttype, np_dtype):
    W = ms_weights()
    if ttype == "BFloat16":  # values exactly representable in bfloat16
        W = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in W.items()}
        stored, types = W, {k: "BFloat16" for k in W}
    else:
        stored, types = {k: v.astype(np_dtype) for k, v in W.items()}, None
    ckpt = write_mindspore_ckpt(tmp_path / "w.ckpt", stored, tensor_types=types)
    back = read_mindspore_ckpt(ckpt)
    assert {e.tensor_type for e in index_mindspore_ckpt(ckpt)} == {ttype}
    for k, v in stored.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
    bb = load_cellfm(convert_cellfm(ckpt, tmp_path / "w", CFG, vocab_csv=vocab[0]))
    for k, v in bb.state_dict().items():
        assert torch.equal(v, torch.from_numpy(stored[k].astype(np.float32))), k


def test_reader_scalars_ints_and_sliced_entries(tmp_path):
    t = {"s": np.array(2.5, np.float32), "i": np.arange(6, dtype=np.int32).reshape(2, 3),
         "big": np.random.default_rng(0).standard_normal((40, 7)).astype(np.float32), "flag": np.array([True, False])}
    ckpt = write_mindspore_ckpt(tmp_path / "s.ckpt", t, chunk_bytes=100)  # "big" spans 12 entries
    idx = {e.name: e for e in index_mindspore_ckpt(ckpt)}
    assert len(idx["big"].chunks) == 12 and idx["s"].dims == (0,) and idx["s"].shape == ()
    back = read_mindspore_ckpt(ckpt)
    assert list(back) == list(t)
    assert not back["i"].flags.owndata and not back["i"].flags.writeable  # zero-copy view of the file map
    for k, v in t.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v)


def _raw_ckpt(path, entries):
    """Entries (tag, tensor_type, dims, content bytes) through the official protobuf class."""
    Checkpoint = checkpoint_message_class()
    msg = Checkpoint()
    for tag, ttype, dims, content in entries:
        v = msg.value.add()
        v.tag, v.tensor.tensor_type, v.tensor.tensor_content = tag, ttype, content
        v.tensor.dims.extend(dims)
    path.write_bytes(msg.SerializeToString())
    return path


def test_reader_errors(tmp_path):
    good = write_mindspore_ckpt(tmp_path / "g.ckpt", {"a": np.ones((3, 4), np.float32), "b": np.ones(5, np.float32)})
    data = good.read_bytes()

    with pytest.raises(InputError, match="tensor 'a' has unknown tensor_type 'Complex64'"):
        read_mindspore_ckpt(write_mindspore_ckpt(tmp_path / "u.ckpt", {"a": np.ones(2, np.float32)},
                                                 tensor_types={"a": "Complex64"}))
    for cut in (1, 7, len(data) // 2, len(data) - 1):
        p = tmp_path / f"t{cut}.ckpt"
        p.write_bytes(data[:cut])
        with pytest.raises(InputError, match=r"t%d\.ckpt: not a readable MindSpore checkpoint \(truncated" % cut):
            read_mindspore_ckpt(p)
    (tmp_path / "e.ckpt").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_mindspore_ckpt(tmp_path / "e.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"\xff" * 32)
    with pytest.raises(InputError, match="corrupt"):
        read_mindspore_ckpt(tmp_path / "junk.ckpt")
    dup = write_mindspore_ckpt(tmp_path / "d.ckpt", [("a", np.ones(2, np.float32)), ("b", np.ones(2, np.float32)),
                                                     ("a", np.ones(2, np.float32))])
    with pytest.raises(InputError, match="'a' occurs more than once"):
        read_mindspore_ckpt(dup)
    bad = _raw_ckpt(tmp_path / "sz.ckpt", [("w", "Float32", [3, 3], b"\0" * 32)])
    with pytest.raises(InputError, match=r"'w'.*36 bytes.*32"):
        read_mindspore_ckpt(bad)
    with pytest.raises(InputError, match="nope.ckpt"):
        read_mindspore_ckpt(tmp_path / "nope.ckpt")


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_convert_rejects_mismatched_checkpoints(tmp_path, vocab, case):
    W = ms_weights()
    if case == "missing":
        del W["encoder.1.ffn.o_proj.weight"]
        pat = r"missing 1 key\(s\): encoder\.1\.ffn\.o_proj\.weight"
    elif case == "extra":
        W["encoder.7.attn.q_proj.weight"] = np.zeros((CFG.dim, CFG.dim), np.float32)
        pat = r"unexpected 1 key\(s\): encoder\.7\.attn\.q_proj\.weight"
    else:
        W["gene_emb"] = np.zeros((64, CFG.dim), np.float32)
        pat = r"gene_emb has \[64, 32\], expected \[56, 32\]"
    ckpt = write_mindspore_ckpt(tmp_path / f"{case}.ckpt", W)
    with pytest.raises(InputError, match=pat) as ei:
        convert_cellfm(ckpt, tmp_path / case, CFG, vocab_csv=vocab[0])
    assert f"{case}.ckpt" in str(ei.value)
    assert not (tmp_path / f"{case}.safetensors").exists()


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_load_rejects_mismatched_weights(converted, case):
    from safetensors.torch import load_file, save_file

    out = converted[2]
    sd = load_file(str(out))
    if case == "missing":
        del sd["value_dec.w2.weight"]
        pat = r"missing 1 key\(s\): value_dec\.w2\.weight"
    elif case == "extra":
        sd["encoder.0.attn.lora_q.weight"] = torch.zeros(2, 2)
        pat = r"unexpected 1 key\(s\): encoder\.0\.attn\.lora_q\.weight"
    else:
        sd["encoder.2.post_norm1.gamma"] = torch.zeros(CFG.dim + 1)
        pat = r"encoder\.2\.post_norm1\.gamma has \[33\], expected \[32\]"
    save_file(sd, str(out))
    with pytest.raises(InputError, match=pat) as ei:
        load_cellfm(out)
    assert "conv.safetensors" in str(ei.value)


def test_hinge_on_cellfm_equals_backbone_at_init(converted):
    torch.manual_seed(0)
    bb = load_cellfm(converted[2])
    panel = GENES[3:15]
    model = HINGE(bb, panel, feat_dim=10, T=50)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, len(panel), generator=g) * 5
    vis = torch.rand(5, len(panel), generator=g) < 0.5
    t = torch.randint(1, 51, (5,), generator=g)
    f = torch.randn(5, 10, generator=g)
    out = model(x * vis, vis, t, f)
    ref = bb(x * vis, bb.gene_index(panel), vis)
    assert out.shape == (5, len(panel))
    assert torch.equal(out, ref)  # exactly: SoftAdaLN is the identity at initialisation
    with torch.no_grad():
        model.mod_attn[0].head.weight.normal_(std=0.1)
    assert not torch.allclose(model(x * vis, vis, t, f), model(x * vis, vis, t, f + 1.0))
    assert all(not p.requires_grad for p in bb.parameters())


def test_map_panel_drops_and_reports_unknown_genes(converted, caplog):
    bb = load_cellfm(converted[2])
    panel = ["G1", "NOTAGENE", "ALIAS1", "G2", "XYZ9"]
    with caplog.at_level(logging.WARNING):
        kept, dropped = map_panel(panel, bb)
    assert kept == ["G1", "ALIAS1", "G2"] and dropped == ["NOTAGENE", "XYZ9"]
    assert "NOTAGENE" in caplog.text and "2 of 5" in caplog.text
    with pytest.raises(InputError, match="NOTAGENE"):
        bb.gene_index(panel)
    assert bb.gene_index(kept).tolist() == [2, 8, 3]


def test_presets_match_upstream_configs():
    c8, c80 = CellFMConfig.cellfm_800m(), CellFMConfig.cellfm_80m()
    assert (c8.n_layers, c8.dim, c8.n_heads, c8.n_genes, c8.n_rows) == (40, 1536, 48, 27855, 27856)
    assert (c80.n_layers, c80.dim, c80.n_heads, c80.n_rows) == (2, 1536, 48, 27856)
    assert CellFMConfig.from_name("CellFM-800M") == c8 and CellFMConfig.from_name("80m") == c80
    n8, n80 = count_parameters(c8), count_parameters(c80)  # meta device: nothing allocated
    per_layer = 8 * 1536**2 + 4 * 1536
    assert n8 - n80 == 38 * per_layer
    assert 800e6 < n8 < 806e6 and 80e6 < n80 < 90e6
