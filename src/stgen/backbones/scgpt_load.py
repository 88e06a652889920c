"""Loading released scGPT model folders (``best_model.pt`` with ``weights_only=True``, ``args.json``, ``vocab.json``) in either attention layout."""

from __future__ import annotations

import json
import logging
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping
import torch
from stgen.errors import InputError
from stgen.backbones.scgpt import ARGS_FILE
from stgen.backbones.scgpt import CHECKPOINT_FILE
from stgen.backbones.scgpt import ScGPTBackbone
from stgen.backbones.scgpt import ScGPTConfig
from stgen.backbones.scgpt import VOCAB_FILE
from stgen.backbones.scgpt import _LAYER_RE

log = logging.getLogger(__name__)


#: Checkpoint entries HINGE does not use; they are skipped and reported, everything else must match.
IGNORED_PREFIXES: dict[str, str] = {
    "flag_encoder.": "generative-training flag embedding of to-be-generated genes "
                     "(not used in masked value prediction)",
    "mvc_decoder.": "MVC head (cell embedding x gene query -> value)",
    "cls_decoder.": "cell-type classification head",
    "grad_reverse_discriminator.": "DAB batch discriminator head",
    "batch_encoder.": "batch-label embedding (use_batch_labels)",
    "dsbn.": "domain-specific batch norm (needs a batch label per cell)",
}

#: Prefixes whose skipping changes scGPT's forward (they act on the input path); a warning is issued.
_INPUT_PATH_PREFIXES = ("dsbn.",)


# ----------------------------------------------------------------------------- key mapping
_ATTN_RENAMES = {  # scGPT layer-relative name -> (ours, layout)
    "self_attn.Wqkv.weight": ("self_attn.in_proj_weight", "flash"),
    "self_attn.Wqkv.bias": ("self_attn.in_proj_bias", "flash"),
    "self_attn._impl.Wqkv.weight": ("self_attn.in_proj_weight", "flash_wrapped"),
    "self_attn._impl.Wqkv.bias": ("self_attn.in_proj_bias", "flash_wrapped"),
    "self_attn._impl.out_proj.weight": ("self_attn.out_proj.weight", "flash_wrapped"),
    "self_attn._impl.out_proj.bias": ("self_attn.out_proj.bias", "flash_wrapped"),
    "self_attn.in_proj_weight": ("self_attn.in_proj_weight", "torch"),
    "self_attn.in_proj_bias": ("self_attn.in_proj_bias", "torch"),
}
ATTENTION_LAYOUTS = ("flash", "flash_wrapped", "torch")


def scgpt_to_stgen_key(key: str) -> tuple[str, str | None]:
    """Map one scGPT ``state_dict`` name to this module's name; returns ``(name, layout or None)``.

    ``transformer_encoder.layers.{i}.X`` -> ``blocks.{i}.X`` (attention renamed to
    ``in_proj_*`` / ``out_proj.*``); ``bn.*`` and all other names are kept.
    """
    m = _LAYER_RE.match(key)
    if not m:
        return key, None
    i, rest = m.groups()
    new, layout = _ATTN_RENAMES.get(rest, (rest, None))
    return f"blocks.{i}.{new}", layout


def stgen_to_scgpt_key(key: str, layout: str = "flash") -> str:
    """Inverse of :func:`scgpt_to_stgen_key` for ``layout`` in :data:`ATTENTION_LAYOUTS`."""
    if layout not in ATTENTION_LAYOUTS:
        raise ValueError(f"unknown attention layout {layout!r}; expected one of {ATTENTION_LAYOUTS}")
    m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if not m:
        return key
    i, rest = m.groups()
    if layout == "flash":
        rest = rest.replace("self_attn.in_proj_", "self_attn.Wqkv.")
    elif layout == "flash_wrapped":
        rest = rest.replace("self_attn.in_proj_", "self_attn._impl.Wqkv.").replace(
            "self_attn.out_proj.", "self_attn._impl.out_proj.")
    return f"transformer_encoder.layers.{i}.{rest}"


def to_scgpt_state_dict(backbone: ScGPTBackbone, layout: str = "flash") -> dict[str, torch.Tensor]:
    """The backbone's weights under scGPT's names (``Wqkv`` for ``"flash"``, ``in_proj`` for ``"torch"``)."""
    return {stgen_to_scgpt_key(k, layout): v.detach().clone() for k, v in backbone.state_dict().items()}


def convert_scgpt_state_dict(
    state: Mapping[str, Any], source: str | Path = CHECKPOINT_FILE
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str], str | None]:
    """Rename an scGPT ``state_dict`` to this module's names.

    Returns ``(mapped, origin, ignored, layout)``: ``mapped`` ours -> tensor,
    ``origin`` ours -> scGPT name, ``ignored`` the scGPT names skipped by
    :data:`IGNORED_PREFIXES`, ``layout`` the attention layout found. InputError
    (naming ``source``) for non-tensor entries, mixed layouts or name clashes.
    """
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    ignored: list[str] = []
    layouts: set[str] = set()
    for key, val in state.items():
        if not isinstance(key, str) or not isinstance(val, torch.Tensor):
            raise InputError(f"{source}: entry {key!r} is not a tensor ({type(val).__name__})")
        if any(key.startswith(p) for p in IGNORED_PREFIXES):
            ignored.append(key)
            continue
        new, layout = scgpt_to_stgen_key(key)
        if layout is not None:
            layouts.add(layout)
        if new in mapped:
            raise InputError(f"{source}: {origin[new]!r} and {key!r} both hold {new!r}")
        mapped[new], origin[new] = val, key
    if len(layouts) > 1:
        raise InputError(f"{source}: mixes attention layouts {sorted(layouts)}")
    return mapped, origin, sorted(ignored), (layouts.pop() if layouts else None)


def _shape_hint(key: str, got: tuple, want: tuple, model: ScGPTBackbone) -> str:
    if key == "decoder.fc.0.weight" and len(got) == 2 and got[1] == 2 * want[1]:
        return " (decoder input is 2*D: the model was trained with batch labels, which is not supported)"
    if key == "encoder.embedding.weight" and got[1:] == want[1:]:
        return (f" (vocab.json gives {model.ntoken} tokens incl. appended special tokens, "
                f"the checkpoint embeds {got[0]})")
    return ""


def load_scgpt_state_dict(model: ScGPTBackbone, state: Mapping[str, Any], source: str | Path = CHECKPOINT_FILE) -> dict:
    """Strictly load an scGPT ``state_dict`` into ``model``; returns the load report.

    Missing keys, unexpected keys (outside :data:`IGNORED_PREFIXES`) and shape
    mismatches raise InputError naming the scGPT key(s) and ``source``.
    """
    mapped, origin, ignored, layout = convert_scgpt_state_dict(state, source)
    expected = model.state_dict()
    shown = layout or "flash"
    missing = sorted(stgen_to_scgpt_key(k, shown) for k in expected.keys() - mapped.keys())
    unexpected = sorted(origin[k] for k in mapped.keys() - expected.keys())
    problems = []
    if missing:
        problems.append(f"missing key(s) {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s) {_first(unexpected)}")
    bad = [
        f"{origin[k]}: checkpoint {tuple(mapped[k].shape)} vs expected {tuple(v.shape)}"
        + _shape_hint(k, tuple(mapped[k].shape), tuple(v.shape), model)
        for k, v in expected.items()
        if k in mapped and tuple(mapped[k].shape) != tuple(v.shape)
    ]
    if bad:
        more = f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""
        problems.append(f"wrong shape(s): {'; '.join(bad[:10])}{more}")
    if problems:
        raise InputError(f"{source}: does not match the scGPT architecture of args.json: " + "; ".join(problems))
    model.load_state_dict(mapped, strict=True)
    skipped_input = [k for k in ignored if k.startswith(_INPUT_PATH_PREFIXES)]
    if skipped_input:
        warnings.warn(
            f"{source}: skipped {len(skipped_input)} domain-specific batch-norm entries (dsbn.*); "
            "scGPT applies them with a per-cell batch label, so outputs differ from scGPT with that label",
            stacklevel=2,
        )
    return {
        "checkpoint": str(source),
        "attention_layout": layout,
        "loaded": len(mapped),
        "ignored": ignored,
        "ignored_groups": sorted({p for p in IGNORED_PREFIXES for k in ignored if k.startswith(p)}),
    }


def _first(keys: list[str], n: int = 20) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# ----------------------------------------------------------------------------- files
def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def read_scgpt_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(path, map_location="cpu", weights_only=True)`` -> ``state_dict``.

    A pickle that needs code execution (custom classes) is refused with an
    InputError naming the file; a ``{"model_state_dict"|"state_dict"|"model": ...}``
    wrapper and a DDP ``module.`` prefix are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln),
                      type(e).__name__)
        detail = detail.split(". Please use")[0]  # drop torch's advice to allow-list the global
        raise InputError(
            f"{path}: refused to load: the checkpoint needs arbitrary code execution to unpickle "
            f"(torch.load weights_only=True failed: {detail})"
        ) from None
    except Exception as e:  # truncated / not a torch file
        raise InputError(f"{path}: cannot read the PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, Mapping):
        for wrap in ("model_state_dict", "state_dict", "model"):
            if wrap in obj and isinstance(obj[wrap], Mapping):
                obj = obj[wrap]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise InputError(f"{path}: does not contain a state_dict (got {type(obj).__name__})")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_scgpt(
    model_dir: str | Path,
    *,
    bin_inputs: bool | None = None,
    prepend_cls: bool = True,
) -> ScGPTBackbone:
    """Load an scGPT model directory (``best_model.pt``, ``args.json``, ``vocab.json``).

    Parameters
    ----------
    model_dir : the directory (as released, e.g. ``scGPT_human``).
    bin_inputs : bin input values per spot; default ``input_style == "binned"`` in args.json.
    prepend_cls : prepend the ``<cls>`` token (as scGPT's tokenizer does).

    ``explicit_zero_prob`` is taken from args.json when present, else from the
    presence of ``decoder.zero_logit.*``; ``bn.*`` in the checkpoint switches on
    the input batch norm. The returned backbone's ``load_report`` lists the
    attention layout and the ignored entries. All failures are InputError
    naming the offending file.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise InputError(f"{d}: scGPT model directory not found")
    args_path, vocab_path, ckpt_path = d / ARGS_FILE, d / VOCAB_FILE, d / CHECKPOINT_FILE
    for p in (args_path, vocab_path, ckpt_path):
        if not p.is_file():
            raise InputError(
                f"{p}: file not found (an scGPT model directory holds {CHECKPOINT_FILE}, {ARGS_FILE}, {VOCAB_FILE})"
            )
    args = _read_json(args_path)
    vocab = _read_json(vocab_path)
    state = read_scgpt_checkpoint(ckpt_path)
    overrides: dict[str, Any] = {
        "prepend_cls": prepend_cls,
        "input_batchnorm": any(k.startswith("bn.") for k in state),
    }
    if not (isinstance(args, Mapping) and "explicit_zero_prob" in args):
        overrides["explicit_zero_prob"] = any(k.startswith("decoder.zero_logit.") for k in state)
    if bin_inputs is not None:
        overrides["bin_inputs"] = bin_inputs
    config = ScGPTConfig.from_args(args, source=args_path, **overrides)
    model = ScGPTBackbone(vocab, config, source=vocab_path)
    report = load_scgpt_state_dict(model, state, ckpt_path)
    report.update(model_dir=str(d), n_genes=len(model.genes), ntoken=model.ntoken)
    model.load_report = report
    log.info("loaded scGPT %s: %d layers, D=%d, %d genes, attention layout %s, ignored %s",
             d, config.n_layers, config.dim, len(model.genes), report["attention_layout"], report["ignored_groups"])
    return model
