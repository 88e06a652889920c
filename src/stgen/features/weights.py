"""Safe reading of encoder weight files (safetensors or ``torch.load(weights_only=True)``) and strict key checks."""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Sequence
import torch
import torch.nn as nn
from stgen.errors import InputError
from stgen.utils.io import sha256_file


_SHOW = 5  # offending keys named in an error


# =========================================================================== files

_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def weights_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file, memoised per (path, mtime, size) within the process."""
    p = Path(path)
    try:
        key = file_stamp(p)
    except OSError as e:
        raise InputError(f"{p}: cannot read weights file ({e.strerror or e})") from None
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(p)
    return _SHA_MEMO[key]


def _first_line(e: BaseException) -> str:
    text = str(e)
    for line in text.splitlines():  # torch names the refused global / opcode on its own line
        if "GLOBAL" in line or "Unsupported operand" in line:
            return line.split(". Please")[0].strip()  # not torch's advice to allow-list the global
    return (text.splitlines() or [type(e).__name__])[0].strip()[:300]


def _unwrap_state(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise InputError(f"{path}: not a state dict (a non-empty mapping of names to tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"{path}: not a tensor state dict: non-tensor entries {[str(k) for k in bad[:_SHOW]]}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a tensor state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    Zip-format ``torch.save`` files are memory-mapped, so reading is cheap until tensors are used.

    Raises
    ------
    InputError : missing/unreadable file, or a pickle holding anything but tensors and plain
        containers (refused by ``weights_only=True``; never unpickled, nothing executed).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: weights file not found")
    if p.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file

            return _unwrap_state(load_file(str(p), device="cpu"), p)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad input file
            raise InputError(f"{p}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        mmap = zipfile.is_zipfile(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{p}: cannot be read as a tensor state dict with torch.load(weights_only=True); "
                         f"refusing to unpickle arbitrary objects ({type(e).__name__}: {_first_line(e)})") from None
    return _unwrap_state(obj, p)


_SHAPES_MEMO: dict[tuple[str, int, int], dict[str, tuple[int, ...]]] = {}


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a weights file without materialising it (safetensors header / mmap)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: weights file not found")
    key = file_stamp(p)
    if key not in _SHAPES_MEMO:
        if p.suffix.lower() == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(p), framework="pt") as f:
                    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception as e:  # noqa: BLE001
                raise InputError(f"{p}: not a readable safetensors file ({_first_line(e)})") from None
        else:
            shapes = {k: tuple(v.shape) for k, v in load_state_dict(p).items()}
        _SHAPES_MEMO[key] = shapes
    return _SHAPES_MEMO[key]


def _fmt_keys(keys: Sequence[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _check_state(path: Path, what: str, state: dict[str, torch.Tensor],
                 expected: dict[str, tuple[int, ...]]) -> None:
    """Strict key/shape comparison; InputError naming the file and the first offending keys."""
    missing = [k for k in expected if k not in state]
    unexpected = sorted(k for k in state if k not in expected)
    misshapen = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items()
                 if k in state and tuple(state[k].shape) != tuple(s)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_fmt_keys(unexpected)}")
    if misshapen:
        problems.append(f"misshapen keys (file != expected): {_fmt_keys(misshapen)}")
    if problems:
        raise InputError(f"{path}: not a {what} checkpoint: " + "; ".join(problems))


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str,
                 prefix: str = "") -> None:
    expected = {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}
    _check_state(path, what, state, expected)
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)
