"""CellFM MindSpore checkpoints -> safetensors (``stgen convert cellfm``) and strict loading of the result."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Mapping
import numpy as np
import torch
from stgen.errors import InputError
from stgen.utils.io import atomic_path, write_json
from stgen.backbones.mindspore import index_mindspore_ckpt, read_mindspore_ckpt
from stgen.backbones.cellfm import CellFMBackbone
from stgen.backbones.cellfm import CellFMConfig
from stgen.backbones.cellfm import ST_KEYS
from stgen.backbones.cellfm import _resolve_config
from stgen.backbones.cellfm import default_vocab_dir
from stgen.backbones.cellfm import expected_shapes
from stgen.backbones.cellfm import read_aliases
from stgen.backbones.cellfm import read_vocab

log = logging.getLogger(__name__)


SIDECAR_FORMAT = "stgen-cellfm"
SIDECAR_VERSION = 1

#: Non-model entries that MindSpore training saves next to the weights (Adam state,
#: step counters, loss scale, ModelCheckpoint ``append_info``).
TRAINING_STATE_PREFIXES = ("moment1.", "moment2.", "adam_m.", "adam_v.")
TRAINING_STATE_NAMES = frozenset({
    "global_step", "learning_rate", "beta1_power", "beta2_power", "current_iterator_step",
    "last_overflow_iterator_step", "scale_sense", "loss_scale", "epoch_num", "step_num",
})


def is_training_state(name: str) -> bool:
    """True for optimiser/training bookkeeping entries of a MindSpore checkpoint."""
    return name in TRAINING_STATE_NAMES or name.startswith(TRAINING_STATE_PREFIXES)


def mindspore_to_torch_key(name: str) -> str:
    """PyTorch ``state_dict`` key of a MindSpore parameter name (the rule is the identity)."""
    return name


def torch_to_mindspore_key(name: str) -> str:
    """Inverse of :func:`mindspore_to_torch_key`."""
    return name


# =========================================================================== conversion
_ST_DTYPES = {
    np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
    np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16", np.dtype("int8"): "I8",
    np.dtype("uint8"): "U8", np.dtype("uint16"): "U16", np.dtype("uint32"): "U32", np.dtype("uint64"): "U64",
    np.dtype("bool"): "BOOL",
}


def _write_safetensors(path: Path, items: list[tuple[str, np.ndarray, np.dtype]], metadata: Mapping[str, str]) -> None:
    """Stream ``(name, array, output dtype)`` items into a safetensors file.

    Each array is cast and copied only while it is written, so at most one
    tensor is materialised at a time (the inputs are memory-map views).
    """
    header: dict = {"__metadata__": dict(metadata)}
    off = 0
    for name, arr, dt in items:
        dt = np.dtype(dt).newbyteorder("=")
        if dt not in _ST_DTYPES:
            raise InputError(f"cannot store {name!r} of dtype {dt} in safetensors")
        n = int(arr.size) * dt.itemsize
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(arr.shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, arr, dt in items:
            f.write(np.ascontiguousarray(arr, dtype=np.dtype(dt).newbyteorder("<")).tobytes())


def _key_report(path: Path, what: str, missing, extra, shapes) -> str:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if extra:
        parts.append(f"unexpected {len(extra)} key(s): {', '.join(extra[:20])}{' ...' if len(extra) > 20 else ''}")
    if shapes:
        parts.append("wrong shape: " + "; ".join(f"{k} has {list(a)}, expected {list(b)}" for k, a, b in shapes[:20]))
    return f"{path}: {what} does not match the CellFM model: " + " | ".join(parts)


def _check_keys(path: Path, what: str, found: Mapping[str, tuple], expected: Mapping[str, tuple],
                config: CellFMConfig) -> None:
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes = [(k, tuple(found[k]), expected[k]) for k in expected if k in found and tuple(found[k]) != expected[k]]
    if missing or extra or shapes:
        msg = _key_report(path, what, missing, extra, shapes)
        ge = found.get("gene_emb")
        if ge is not None and len(ge) == 2 and tuple(ge) != expected["gene_emb"]:
            msg += (f" (gene_emb has {ge[0]} rows x {ge[1]}; config {config.name!r} expects {config.n_rows} x "
                    f"{config.dim}, i.e. a {config.n_genes}-gene vocabulary)")
        raise InputError(msg)


def convert_cellfm(
    ckpt_path: str | os.PathLike,
    out_path: str | os.PathLike,
    config: "str | CellFMConfig",
    vocab_csv: str | os.PathLike | None = None,
    genemap_csv: str | os.PathLike | None | bool = True,
    dtype: str | None = "float32",
    key_prefix: str = "",
) -> Path:
    """Convert a MindSpore CellFM checkpoint to ``<out>.safetensors`` + ``<out>.json``.

    Parameters
    ----------
    ckpt_path : MindSpore ``.ckpt`` (read with :func:`stgen.backbones.mindspore.read_mindspore_ckpt`).
    out_path : output path; ``.safetensors`` is appended/replaced, the JSON
        sidecar sits next to it with suffix ``.json``.
    config : :class:`CellFMConfig` or preset name (``"CellFM-800M"``, ``"CellFM-80M"``).
        If the checkpoint holds the complete ``ST_emb``/``ST_enc`` group the config
        gets ``st_tokens=True`` (recorded in the sidecar under ``detected``).
    vocab_csv : gene table whose row order defines the gene ids
        (default ``expand_gene_info.csv`` in :func:`default_vocab_dir`).
    genemap_csv : ``genemap.csv`` for aliases (True = next to ``vocab_csv`` if present,
        None/False = no aliases).
    dtype : floating tensors are cast to this numpy dtype (None keeps the stored type).
    key_prefix : a prefix (e.g. ``"network."``) stripped from checkpoint names first.

    Checkpoint names map to PyTorch keys by :func:`mindspore_to_torch_key` (identity).
    Training-state entries are dropped and listed in the sidecar; any other
    missing, unexpected or wrongly shaped key raises :class:`InputError` naming
    the keys and the file, before anything is written. Returns the safetensors path.
    """
    ckpt_path = Path(ckpt_path)
    cfg = _resolve_config(config)
    vocab_csv = Path(vocab_csv) if vocab_csv is not None else default_vocab_dir() / "expand_gene_info.csv"
    if genemap_csv is True:
        cand = vocab_csv.parent / "genemap.csv"
        genemap_csv = cand if cand.is_file() else None
    elif genemap_csv is False:
        genemap_csv = None

    genes = read_vocab(vocab_csv)
    entries = index_mindspore_ckpt(ckpt_path)  # headers only: validate before touching data
    found: dict[str, tuple[int, ...]] = {}
    source: dict[str, str] = {}
    dropped: list[str] = []
    for e in entries:
        name = e.name[len(key_prefix):] if key_prefix and e.name.startswith(key_prefix) else e.name
        if is_training_state(name):
            dropped.append(e.name)
            continue
        key = mindspore_to_torch_key(name)
        found[key], source[key] = e.shape, e.name
    detected = []
    if not cfg.st_tokens and all(k in found for k in ST_KEYS):
        cfg = replace(cfg, st_tokens=True)
        detected.append("st_tokens")
    expected = expected_shapes(cfg)
    _check_keys(ckpt_path, "checkpoint", found, expected, cfg)
    if len(genes) != cfg.n_genes:
        raise InputError(f"{vocab_csv}: vocabulary has {len(genes)} genes but {ckpt_path} / config {cfg.name!r} "
                         f"has {cfg.n_genes} (gene_emb rows {cfg.n_rows})")
    aliases = read_aliases(genemap_csv, genes) if genemap_csv else {}

    tensors = read_mindspore_ckpt(ckpt_path)
    items = []
    for key in expected:
        arr = tensors[source[key]]
        items.append((key, arr, np.dtype(dtype) if dtype is not None and arr.dtype.kind == "f" else arr.dtype))

    out = Path(out_path)
    st_path = out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors")
    meta = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "config": cfg.to_dict(),
        "detected": detected,
        "genes": genes,
        "aliases": aliases,
        "key_rule": "identity (MindSpore parameter name == PyTorch state_dict key)",
        "source": {"checkpoint": str(ckpt_path), "checkpoint_bytes": ckpt_path.stat().st_size,
                   "key_prefix": key_prefix, "vocab_csv": str(vocab_csv),
                   "genemap_csv": str(genemap_csv) if genemap_csv else None,
                   "dtypes": sorted({e.tensor_type for e in entries})},
        "dropped_training_state": dropped,
        "n_parameters": int(sum(int(np.prod(s)) for s in expected.values())),
    }
    with atomic_path(st_path) as tmp:
        _write_safetensors(tmp, items, {"format": "pt", "producer": "stgen.convert_cellfm"})
    del tensors, items
    write_json(st_path.with_suffix(".json"), meta)
    log.info("converted %s -> %s (%d tensors, %d training-state entries dropped)",
             ckpt_path, st_path, len(expected), len(dropped))
    return st_path


def load_cellfm(path: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> CellFMBackbone:
    """Load a converted CellFM (``.safetensors`` + ``.json`` sidecar) with ``strict=True``.

    Missing, unexpected or wrongly shaped keys raise :class:`InputError` naming
    the keys and the file (checked from the safetensors header before loading).
    The model is built on the meta device and its parameters are assigned from
    the file, so the weights are held in memory once. Returned in eval mode.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    st_path = p if p.suffix == ".safetensors" else p.with_name(p.name + ".safetensors")
    if not st_path.is_file() and p.with_suffix(".safetensors").is_file():
        st_path = p.with_suffix(".safetensors")
    side = st_path.with_suffix(".json")
    for f in (st_path, side):
        if not f.is_file():
            raise InputError(f"{f}: converted CellFM file not found (run convert_cellfm first)")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{side}: cannot read CellFM sidecar JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise InputError(f"{side}: not a {SIDECAR_FORMAT} sidecar")
    if int(meta.get("version", 0)) > SIDECAR_VERSION:
        raise InputError(f"{side}: sidecar version {meta.get('version')} is newer than supported ({SIDECAR_VERSION})")
    try:
        cfg = CellFMConfig.from_dict(meta["config"])
        genes, aliases = meta["genes"], meta.get("aliases", {})
    except (KeyError, TypeError) as e:
        raise InputError(f"{side}: sidecar lacks {e}") from e

    with torch.device("meta"):
        model = CellFMBackbone(cfg, genes, aliases)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(st_path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise InputError(f"{st_path}: not a readable safetensors file ({e})") from e
    _check_keys(st_path, "safetensors weights", found, expected, cfg)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(st_path)).items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise InputError(f"{st_path}: {e}") from e
    return model.to(device).eval()
