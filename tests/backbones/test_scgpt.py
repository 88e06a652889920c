"""scGPT backbone: model-directory loading, faithful forward, strict key checks, HINGE on top.

The checkpoint below is written by hand under the real scGPT ``state_dict``
names and shapes (``bowang-lab/scGPT`` ``scgpt/model/model.py``: ``encoder.*``,
``value_encoder.*``, ``transformer_encoder.layers.{i}.*``, ``decoder.fc.*``,
plus the ``flag_encoder``/``mvc_decoder`` heads of the whole-human checkpoint),
with ``args.json``/``vocab.json`` in the released layout. The forward pass is
checked against an independent implementation built from
``torch.nn.TransformerEncoderLayer`` and ``torch.nn.functional`` primitives, and
binning against numpy's ``quantile``/``digitize``.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stgen.errors import InputError
from stgen.models.hinge.network import HINGE
from stgen.backbones.scgpt_load import IGNORED_PREFIXES, load_scgpt, to_scgpt_state_dict
from stgen.backbones.scgpt import ScGPTBackbone, ScGPTConfig, map_panel

D, H, D_HID, L = 32, 4, 64, 2
GENES = [f"GENE{i}" for i in range(40)]
VOCAB = {**{g: i for i, g in enumerate(GENES)}, "<pad>": 40, "<cls>": 41, "<eoc>": 42}  # specials last, as scGPT_human
NTOKEN = len(VOCAB)
ARGS = {  # the fields of the released scGPT_human args.json, at a tiny size
    "pad_token": "<pad>", "input_style": "binned", "input_emb_style": "continuous", "n_bins": 51,
    "max_seq_len": 1200, "training_tasks": "both", "mask_ratio": [0.25, 0.5, 0.75], "fast_transformer": True,
    "nlayers": L, "nheads": H, "embsize": D, "d_hid": D_HID, "dropout": 0.2, "n_layers_cls": 3,
    "mask_value": -1, "pad_value": -2, "USE_CLS": False, "USE_CCE": False, "MVC": True,
    "USE_GENERATIVE_TRAINING": True,
}


# ----------------------------------------------------------------------------- fixtures
def scgpt_state_dict(layout: str = "flash", seed: int = 0, heads: bool = True) -> dict[str, torch.Tensor]:
    """Random weights under scGPT's exact names; ``layout`` picks the attention naming."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, s=None):
        s = s if s is not None else 1.0 / shape[-1] ** 0.5
        return torch.randn(*shape, generator=g) * s

    def ln(prefix):
        return {f"{prefix}.weight": 1 + 0.2 * w(D, s=1.0), f"{prefix}.bias": 0.1 * w(D, s=1.0)}

    sd = {"encoder.embedding.weight": w(NTOKEN, D, s=0.5), **ln("encoder.enc_norm"),
          "value_encoder.linear1.weight": w(D, 1, s=1.0), "value_encoder.linear1.bias": w(D, s=0.5),
          "value_encoder.linear2.weight": w(D, D), "value_encoder.linear2.bias": w(D, s=0.1),
          **ln("value_encoder.norm")}
    for i in range(L):
        p = f"transformer_encoder.layers.{i}."
        qkv, qkv_b, out, out_b = w(3 * D, D), w(3 * D, s=0.1), w(D, D), w(D, s=0.1)
        if layout == "flash":
            sd |= {p + "self_attn.Wqkv.weight": qkv, p + "self_attn.Wqkv.bias": qkv_b,
                   p + "self_attn.out_proj.weight": out, p + "self_attn.out_proj.bias": out_b}
        elif layout == "flash_wrapped":
            sd |= {p + "self_attn._impl.Wqkv.weight": qkv, p + "self_attn._impl.Wqkv.bias": qkv_b,
                   p + "self_attn._impl.out_proj.weight": out, p + "self_attn._impl.out_proj.bias": out_b}
        else:
            sd |= {p + "self_attn.in_proj_weight": qkv, p + "self_attn.in_proj_bias": qkv_b,
                   p + "self_attn.out_proj.weight": out, p + "self_attn.out_proj.bias": out_b}
        sd |= {p + "linear1.weight": w(D_HID, D), p + "linear1.bias": w(D_HID, s=0.1),
               p + "linear2.weight": w(D, D_HID), p + "linear2.bias": w(D, s=0.1),
               **ln(p + "norm1"), **ln(p + "norm2")}
    sd |= {"decoder.fc.0.weight": w(D, D), "decoder.fc.0.bias": w(D, s=0.1),
           "decoder.fc.2.weight": w(D, D), "decoder.fc.2.bias": w(D, s=0.1),
           "decoder.fc.4.weight": w(1, D), "decoder.fc.4.bias": w(1, s=0.1)}
    if heads:  # present in scGPT_human, not used by HINGE
        sd |= {"flag_encoder.weight": w(2, D), "mvc_decoder.gene2query.weight": w(D, D),
               "mvc_decoder.gene2query.bias": w(D), "mvc_decoder.W.weight": w(D, D)}
    return sd


def write_model_dir(path, sd=None, args=None, vocab=None):
    path.mkdir(parents=True, exist_ok=True)
    torch.save(scgpt_state_dict() if sd is None else sd, path / "best_model.pt")
    (path / "args.json").write_text(json.dumps(ARGS if args is None else args, indent=2))
    (path / "vocab.json").write_text(json.dumps(VOCAB if vocab is None else vocab, indent=2))
    return path


@pytest.fixture
def model_dir(tmp_path):
    return write_model_dir(tmp_path / "scGPT_tiny")


def _inputs(B=5, G=12, F_=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, G, generator=g) * 5
    x[torch.rand(B, G, generator=g) < 0.25] = 0.0  # real zeros, as in expression data
    x[0, :3] = x[0, 3]  # ties
    vis = torch.rand(B, G, generator=g) < 0.6
    t = torch.randint(1, 51, (B,), generator=g)
    f = torch.randn(B, F_, generator=g)
    return x, vis, t, f


# ----------------------------------------------------------------------------- independent reference
def np_binning(values: np.ndarray, visible: np.ndarray, n_bins: int = 51) -> np.ndarray:
    """scGPT ``binning`` (one-sided digitize) on each row's visible non-zero values."""
    out = np.zeros_like(values, dtype=np.float64)
    for r in range(values.shape[0]):
        idx = np.nonzero(visible[r] & (values[r] != 0))[0]
        if len(idx) == 0:
            continue
        v = values[r, idx].astype(np.float64)
        bins = np.quantile(v, np.linspace(0, 1, n_bins - 1))
        out[r, idx] = np.digitize(v, bins)
    return out


def reference_forward(sd, gene_ids, in_values, cls=True, bn=False, pre_norm=False):
    """scGPT's perceptual forward from torch.nn primitives; ``in_values`` are final encoder inputs."""
    ids = torch.as_tensor(gene_ids)
    vals = in_values.float()
    if cls:
        ids = torch.cat([torch.tensor([VOCAB["<cls>"]]), ids])
        vals = torch.cat([torch.zeros(vals.shape[0], 1), vals], dim=1)
    emb = F.embedding(ids, sd["encoder.embedding.weight"])
    tok = F.layer_norm(emb, (D,), sd["encoder.enc_norm.weight"], sd["encoder.enc_norm.bias"])
    h = F.relu(F.linear(vals.clamp(max=512).unsqueeze(-1), sd["value_encoder.linear1.weight"],
                        sd["value_encoder.linear1.bias"]))
    h = F.linear(h, sd["value_encoder.linear2.weight"], sd["value_encoder.linear2.bias"])
    val = F.layer_norm(h, (D,), sd["value_encoder.norm.weight"], sd["value_encoder.norm.bias"])
    x = tok.unsqueeze(0) + val
    if bn:
        m = nn.BatchNorm1d(D, eps=6.1e-5)
        m.load_state_dict({k[3:]: v for k, v in sd.items() if k.startswith("bn.")})
        x = m.eval()(x.transpose(1, 2)).transpose(1, 2)
    for i in range(L):
        p = f"transformer_encoder.layers.{i}."
        wqkv = sd.get(p + "self_attn.Wqkv.weight", sd.get(p + "self_attn.in_proj_weight"))
        bqkv = sd.get(p + "self_attn.Wqkv.bias", sd.get(p + "self_attn.in_proj_bias"))
        layer = nn.TransformerEncoderLayer(D, H, D_HID, dropout=0.0, batch_first=True)
        layer.load_state_dict({
            "self_attn.in_proj_weight": wqkv, "self_attn.in_proj_bias": bqkv,
            "self_attn.out_proj.weight": sd[p + "self_attn.out_proj.weight"],
            "self_attn.out_proj.bias": sd[p + "self_attn.out_proj.bias"],
            **{k: sd[p + k] for k in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
                                      "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")}})
        layer.eval()
        if pre_norm:  # scGPT FlashTransformerEncoderLayer norm_scheme="pre"
            x = layer.norm1(x)
            x = x + layer.self_attn(x, x, x, need_weights=False)[0]
            x = layer.norm2(x)
            x = x + layer.linear2(F.relu(layer.linear1(x)))
        else:
            x = layer(x)
    dec = nn.Sequential(nn.Linear(D, D), nn.LeakyReLU(), nn.Linear(D, D), nn.LeakyReLU(), nn.Linear(D, 1))
    dec.load_state_dict({k[len("decoder.fc."):]: v for k, v in sd.items() if k.startswith("decoder.fc.")})
    return dec(x).squeeze(-1)[:, 1 if cls else 0:]


# ----------------------------------------------------------------------------- loading + forward
@torch.no_grad()
def test_forward_matches_independent_reference_binned(model_dir):
    bb = load_scgpt(model_dir)
    assert bb.config.bin_inputs and bb.config.dim == D and bb.config.n_prefix == 1
    panel = GENES[5:17]
    x, vis, _, _ = _inputs()
    idx = bb.gene_index(panel)
    assert idx.tolist() == [VOCAB[g] for g in panel]
    binned = np_binning(x.numpy().astype(np.float64), vis.numpy())
    assert np.array_equal(bb.bin_values(x, vis).numpy(), binned)
    ref_in = torch.where(vis, torch.as_tensor(binned, dtype=torch.float32), torch.tensor(-1.0))
    ref = reference_forward(scgpt_state_dict(), idx, ref_in)
    out = bb(x, idx, vis)
    assert out.shape == (5, 12)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert bb.encode(x, idx, vis).shape == (5, 12, D)
    assert bb.cell_embedding(x, idx, vis).shape == (5, D)


@torch.no_grad()
@pytest.mark.parametrize("layout", ["flash", "flash_wrapped", "torch"])
def test_all_attention_layouts_match_reference_unbinned(tmp_path, layout):
    sd = scgpt_state_dict(layout)
    bb = load_scgpt(write_model_dir(tmp_path / layout, sd=sd), bin_inputs=False, prepend_cls=False)
    assert bb.load_report["attention_layout"] == layout
    x, vis, _, _ = _inputs(seed=1)
    idx = bb.gene_index(GENES[:12])
    ref = reference_forward(scgpt_state_dict("flash"), idx, torch.where(vis, x, torch.tensor(-1.0)), cls=False)
    torch.testing.assert_close(bb(x, idx, vis), ref, atol=1e-5, rtol=1e-5)


def test_layout_round_trip(model_dir, tmp_path):
    bb = load_scgpt(model_dir)
    x, vis, _, _ = _inputs(seed=2)
    idx = bb.gene_index(GENES[10:22])
    for layout in ("flash", "torch", "flash_wrapped"):
        sd = to_scgpt_state_dict(bb, layout)
        assert any(("Wqkv" in k) == layout.startswith("flash") for k in sd if "self_attn" in k)
        bb2 = load_scgpt(write_model_dir(tmp_path / f"rt_{layout}", sd=sd))
        assert torch.equal(bb2(x, idx, vis), bb(x, idx, vis))


@torch.no_grad()
def test_input_batchnorm_and_pre_norm_match_reference(tmp_path):
    sd = scgpt_state_dict()
    g = torch.Generator().manual_seed(5)
    sd |= {"bn.weight": 1 + 0.1 * torch.randn(D, generator=g), "bn.bias": 0.1 * torch.randn(D, generator=g),
           "bn.running_mean": 0.2 * torch.randn(D, generator=g), "bn.running_var": 0.5 + torch.rand(D, generator=g),
           "bn.num_batches_tracked": torch.tensor(100)}
    bb = load_scgpt(write_model_dir(tmp_path / "bn", sd=sd, args={**ARGS, "pre_norm": True}), bin_inputs=False)
    assert bb.config.input_batchnorm and bb.config.pre_norm
    x, vis, _, _ = _inputs(seed=3)
    idx = bb.gene_index(GENES[:12])
    ref = reference_forward(sd, idx, torch.where(vis, x, torch.tensor(-1.0)), bn=True, pre_norm=True)
    bb.train()  # the batch norm stays on its running statistics and its buffers do not move
    torch.testing.assert_close(bb(x, idx, vis), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(bb.bn.running_mean, sd["bn.running_mean"])


def test_explicit_zero_prob_branch_is_loaded(tmp_path):
    sd = scgpt_state_dict()
    g = torch.Generator().manual_seed(6)
    for j, shape in ((0, (D, D)), (2, (D, D)), (4, (1, D))):
        sd[f"decoder.zero_logit.{j}.weight"] = torch.randn(*shape, generator=g) * 0.1
        sd[f"decoder.zero_logit.{j}.bias"] = torch.zeros(shape[0])
    bb = load_scgpt(write_model_dir(tmp_path / "zp", sd=sd))
    assert bb.config.explicit_zero_prob
    x, vis, _, _ = _inputs()
    p = bb.decoder.nonzero_prob(bb.tokens(x, bb.gene_index(GENES[:12]), vis))
    assert p.shape == (5, 12) and torch.all((p > 0) & (p < 1))


def test_vocab_genes_and_ignored_heads_reported(model_dir):
    bb = load_scgpt(model_dir)
    assert bb.genes == GENES and bb.ntoken == NTOKEN
    assert bb.gene_to_idx["GENE7"] == 7 and "<pad>" not in bb.gene_to_idx
    rep = bb.load_report
    assert rep["ignored_groups"] == ["flag_encoder.", "mvc_decoder."]
    assert "flag_encoder.weight" in rep["ignored"] and "mvc_decoder.W.weight" in rep["ignored"]
    assert set(rep["ignored_groups"]) <= set(IGNORED_PREFIXES)
    kept, dropped = map_panel(["GENE1", "NOT_A_GENE", "GENE3", "<cls>"], bb)
    assert kept == ["GENE1", "GENE3"] and dropped == ["NOT_A_GENE", "<cls>"]
    with pytest.raises(InputError, match="NOT_A_GENE"):
        bb.gene_index(["GENE1", "NOT_A_GENE"])


def test_missing_specials_are_appended_like_scgpt(tmp_path):
    vocab = {**{g: i for i, g in enumerate(GENES)}, "<pad>": 40}  # no <cls>/<eoc>: scGPT appends them
    bb = load_scgpt(write_model_dir(tmp_path / "v", vocab=vocab))
    assert bb.cls_id == 41 and bb.ntoken == NTOKEN


@torch.no_grad()
def test_masked_genes_do_not_leak_their_values(model_dir):
    bb = load_scgpt(model_dir)
    x, vis, _, _ = _inputs()
    idx = bb.gene_index(GENES[:12])
    y = x.clone()
    y[~vis] += 100.0
    assert torch.equal(bb(x, idx, vis), bb(y, idx, vis))
    assert torch.all(bb.input_values(x, vis)[~vis] == -1)


# ----------------------------------------------------------------------------- errors
def _err(tmp_path, name, match, **kw):
    d = write_model_dir(tmp_path / name, **kw)
    with pytest.raises(InputError, match=match) as e:
        load_scgpt(d)
    return str(e.value)


def test_missing_key_is_named(tmp_path):
    sd = scgpt_state_dict()
    del sd["transformer_encoder.layers.1.linear2.bias"]
    msg = _err(tmp_path, "miss", "missing key", sd=sd)
    assert "transformer_encoder.layers.1.linear2.bias" in msg and "best_model.pt" in msg


def test_missing_attention_key_is_named_in_checkpoint_layout(tmp_path):
    sd = scgpt_state_dict("torch")
    del sd["transformer_encoder.layers.0.self_attn.in_proj_bias"]
    msg = _err(tmp_path, "miss2", "missing key", sd=sd)
    assert "transformer_encoder.layers.0.self_attn.in_proj_bias" in msg


def test_unexpected_key_is_named(tmp_path):
    sd = scgpt_state_dict()
    sd["pert_encoder.weight"] = torch.zeros(3, D)
    msg = _err(tmp_path, "unexp", "unexpected key", sd=sd)
    assert "pert_encoder.weight" in msg and "best_model.pt" in msg


def test_wrong_shape_is_named(tmp_path):
    sd = scgpt_state_dict()
    sd["transformer_encoder.layers.0.linear1.weight"] = torch.zeros(D_HID + 1, D)
    msg = _err(tmp_path, "shape", "wrong shape", sd=sd)
    assert "transformer_encoder.layers.0.linear1.weight" in msg and "(65, 32)" in msg


def test_batch_label_decoder_is_rejected_with_hint(tmp_path):
    sd = scgpt_state_dict()
    sd["decoder.fc.0.weight"] = torch.zeros(D, 2 * D)
    _err(tmp_path, "batch", "batch labels", sd=sd)


def test_mixed_layouts_are_rejected(tmp_path):
    sd = scgpt_state_dict()
    p = "transformer_encoder.layers.1.self_attn."
    sd[p + "in_proj_weight"] = sd.pop(p + "Wqkv.weight")
    sd[p + "in_proj_bias"] = sd.pop(p + "Wqkv.bias")
    _err(tmp_path, "mixed", "mixes attention layouts", sd=sd)


class Evil:  # a custom class: unpickling it needs code execution
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_needing_code_execution_is_refused(tmp_path):
    d = write_model_dir(tmp_path / "evil")
    with open(d / "best_model.pt", "wb") as f:
        pickle.dump({"encoder.embedding.weight": torch.zeros(2), "x": Evil()}, f, protocol=2)
    with pytest.raises(InputError, match="best_model.pt.*code execution.*Unsupported global"):
        load_scgpt(d)
    torch.save({"state": Evil()}, d / "best_model.pt")  # torch's zip format, same refusal
    with pytest.raises(InputError, match="best_model.pt.*code execution"):
        load_scgpt(d)


def test_vocab_without_pad_token(tmp_path):
    vocab = {g: i for i, g in enumerate(GENES)}
    msg = _err(tmp_path, "nopad", "pad token", vocab=vocab)
    assert "vocab.json" in msg
    with pytest.raises(InputError, match="my_vocab.json.*pad token"):
        ScGPTBackbone(vocab, ScGPTConfig(dim=D, n_heads=H, d_hid=D_HID, n_layers=L), source="my_vocab.json")
    _err(tmp_path, "gap", "ids must be 0", vocab={**VOCAB, "<eoc>": 99})


def test_dsbn_is_skipped_with_a_warning(tmp_path):
    sd = scgpt_state_dict()
    sd |= {f"dsbn.bns.0.{k}": torch.ones(D) for k in ("running_mean", "running_var")}
    d = write_model_dir(tmp_path / "dsbn", sd=sd)
    with pytest.warns(UserWarning, match="dsbn"):
        bb = load_scgpt(d)
    assert "dsbn." in bb.load_report["ignored_groups"]


def test_missing_files_and_bad_json(tmp_path):
    for name in ("best_model.pt", "args.json", "vocab.json"):
        d = write_model_dir(tmp_path / f"no_{name}")
        (d / name).unlink()
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            load_scgpt(d)
    d = write_model_dir(tmp_path / "badjson")
    (d / "args.json").write_text("{not json")
    with pytest.raises(InputError, match=r"args\.json.*not valid JSON"):
        load_scgpt(d)
    (d / "best_model.pt").write_bytes(b"garbage")
    (d / "args.json").write_text(json.dumps(ARGS))
    with pytest.raises(InputError, match=r"best_model\.pt"):
        load_scgpt(d)
    with pytest.raises(InputError, match="not found"):
        load_scgpt(tmp_path / "nowhere")


@pytest.mark.parametrize("change, match", [
    ({"input_emb_style": "category"}, "category.*not supported"),
    ({"input_emb_style": "scaling"}, "scaling.*not supported"),
    ({"embsize": 30}, "divisible"),
    ({"nlayers": "2"}, "n_layers"),
    ({"pre_norm": "yes"}, "pre_norm"),
])
def test_invalid_args_json(tmp_path, change, match):
    msg = _err(tmp_path, "args", match, args={**ARGS, **change})
    assert "args.json" in msg


def test_args_json_missing_required_field(tmp_path):
    args = dict(ARGS)
    del args["embsize"]
    _err(tmp_path, "req", "embsize", args=args)


def test_config_defaults_follow_input_style():
    assert ScGPTConfig.from_args({**ARGS, "input_style": "log1p"}).bin_inputs is False
    assert ScGPTConfig.from_args(ARGS).mask_value == -1


# ----------------------------------------------------------------------------- HINGE on scGPT
def test_hinge_equals_frozen_scgpt_backbone_at_init(model_dir):
    torch.manual_seed(0)
    bb = load_scgpt(model_dir)
    panel = GENES[3:15]
    model = HINGE(bb, panel, feat_dim=10, T=50)
    x, vis, t, f = _inputs()
    out = model(x * vis, vis, t, f)
    ref = bb(x * vis, bb.gene_index(panel), vis)
    assert out.shape == (5, 12)
    assert torch.equal(out, ref)  # exactly, not approximately


def test_hinge_on_scgpt_trains_only_adapters_and_conditions(model_dir):
    torch.manual_seed(0)
    bb = load_scgpt(model_dir)
    model = HINGE(bb, GENES[:12], feat_dim=10, T=50)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("backbone.") for n in trainable)
    assert len(model.mod_attn) == len(model.mod_ffn) == L
    with torch.no_grad():
        model.mod_attn[0].head.weight.normal_(std=0.1)
    x, vis, t, f = _inputs()
    a = model(x * vis, vis, t, f)
    b = model(x * vis, vis, t, f + 1.0)
    assert not torch.allclose(a, b)
    a.pow(2).mean().backward()
    assert model.mod_attn[0].head.weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())


def test_kv_mask_is_accepted_and_removes_keys(model_dir):
    bb = load_scgpt(model_dir, prepend_cls=False)
    x, vis, _, _ = _inputs()
    idx = bb.gene_index(GENES[:12])
    h = bb.embed(x, idx, vis)
    blk = bb.blocks[0]
    assert torch.equal(blk(h, None), blk(h, torch.ones_like(vis)))
    h2 = h.clone()
    h2[~vis] += 10.0  # changing tokens that are not keys changes only their own rows
    a, b = blk(h, vis), blk(h2, vis)
    assert torch.allclose(a[vis], b[vis], atol=1e-6) and not torch.allclose(a, b)
