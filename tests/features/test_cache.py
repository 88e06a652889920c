"""The backbone cache: keyed by content (corpus, config), checked by SHA-256, rebuilt when corrupted."""

from __future__ import annotations

import json

import numpy as np
import torch

from stgen.workflows.config import StgenConfig
from stgen.data.panel import load_vocabulary
from stgen.backbones.pretrain import get_backbone
from model_fixtures import synthetic_her2st as _synthetic_her2st

SMALL = {"pretrain": {"dim": 16, "n_layers": 2, "n_heads": 2, "value_bins": 8, "epochs": 1, "genes_per_step": 30}}


def test_corrupted_backbone_cache_is_rebuilt_not_trusted(tmp_path, one_thread, caplog):
    _synthetic_her2st(tmp_path / "d", load_vocabulary()[100:130], np.random.default_rng(0))
    cfg = StgenConfig.from_dict(SMALL)
    torch.manual_seed(0)
    bb, meta = get_backbone(tmp_path / "d", cfg, tmp_path / "cache", progress=False)
    (bdir,) = list((tmp_path / "cache" / "backbones").iterdir())
    weights = bdir / "backbone.safetensors"
    assert json.loads((bdir / "backbone.json").read_text())["safetensors_sha256"] == meta["safetensors_sha256"]
    stamp = weights.stat().st_mtime_ns
    again, _ = get_backbone(tmp_path / "d", cfg, tmp_path / "cache", progress=False)  # a cache hit
    assert weights.stat().st_mtime_ns == stamp
    # flip one byte in the tensor data (past the safetensors header): it still loads, only the hash knows
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF
    weights.write_bytes(bytes(raw))
    torch.manual_seed(0)
    rebuilt, _ = get_backbone(tmp_path / "d", cfg, tmp_path / "cache", progress=False)
    assert "corrupted" in caplog.text
    assert weights.stat().st_mtime_ns != stamp
    for (k, v), (_, w) in zip(bb.state_dict().items(), rebuilt.state_dict().items()):
        torch.testing.assert_close(v, w, msg=k)  # pre-training is seeded: the same backbone again
    # a truncated file is rebuilt too
    weights.write_bytes(weights.read_bytes()[:100])
    get_backbone(tmp_path / "d", cfg, tmp_path / "cache", progress=False)
    assert weights.stat().st_size > 100
