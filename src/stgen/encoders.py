"""Pathology foundation-model patch encoders: UNI, CONCH, timm ViTs and TorchScript modules.

Encoder *specs* (config ``features.encoder``, CLI ``--encoder``)::

    spec := part ( "+" part )*
    part := NAME                      a registered fixed encoder (efficientnet-lite0, rgb-stats, ...)
          | "uni:" PATH               UNI (MahmoodLab): released pytorch_model.bin or .safetensors, 1024-d
          | "conch:" PATH             CONCH image tower (encode_image(proj_contrast=False,
                                      normalize=False)), released pytorch_model.bin, 512-d
          | "timm:" ARCH ":" PATH     a timm ViT from :data:`TIMM_ARCHS`, class token after the final norm
          | "torchscript:" PATH       any TorchScript module (B, 3, 224, 224) -> (B, D)

Parts joined with ``+`` are concatenated in that order (``uni:A+conch:B``: 1024 + 512 =
1536-d, the UNI+CONCH features of HINGE). A ``+`` starts a new part only when the text after
it starts one (``kind:`` or a registered name), so a path may contain ``+`` elsewhere.

Every model is run by the pure-torch :class:`VisionTransformer` of this module, whose
parameter names and forward pass are those of timm's ``VisionTransformer`` (timm
``vision_transformer.py``: ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.{i}.norm1/attn.qkv/attn.proj/ls1.gamma/norm2/mlp.fc1/mlp.fc2/ls2.gamma``, ``norm``;
LayerNorm eps 1e-6, exact GELU, qkv bias, class token with its own position embedding),
so released checkpoints load as they are; timm itself is not used.

Checkpoints
-----------
* ``.safetensors`` files are read with ``safetensors``; anything else with
  ``torch.load(path, map_location="cpu", weights_only=True)``, which refuses to unpickle
  anything but tensors and plain containers (a file that needs arbitrary objects raises an
  :class:`InputError`; nothing in it is executed). A ``{"state_dict": {...}}`` wrapper and a
  ``module.`` prefix (DataParallel) are unwrapped, as CONCH's own loader does.
* Loading is strict: missing, unexpected or misshapen keys raise an :class:`InputError`
  naming the file and the first offending keys.
* UNI and CONCH sizes are read off the state dict (so test checkpoints may be tiny): width
  and patch size from ``patch_embed.proj.weight`` (D, 3, p, p), the pretraining grid from
  ``pos_embed`` (1, 1 + G*G, D), depth from the ``blocks.{i}`` indices, the MLP width from
  ``blocks.0.mlp.fc1.weight``; the number of heads follows the rule
  ``heads = width // 64`` (head dim 64: UNI 1024 -> 16, CONCH 768 -> 12), so the width
  must be a multiple of 64. CONCH's attentional pooler has 8 heads (its config
  ``attn_pooler_heads``) and its width is read off ``attn_pool_contrast.query``.
* ``torchscript:`` files are TorchScript zip archives loaded with ``torch.jit.load``: this
  does not run Python's pickle on arbitrary globals, but the module's forward is code from
  the file (TorchScript ops only), so use files you trust.

Preprocessing (a float batch in [0, 1] is resized, then normalised)
-------------------------------------------------------------------
* UNI: 224 px, ImageNet mean/std, bilinear (UNI ``get_eval_transforms``: Resize(224),
  CenterCrop(224), Normalize(ImageNet); ``uni/get_encoder/get_encoder.py``).
* CONCH: 448 px (``conch_ViT-B-16.json``: ``image_size: 448``), bicubic (clamped to [0, 1],
  as PIL's uint8 output is), OpenAI CLIP mean/std (``factory.create_model`` sets
  ``OPENAI_DATASET_MEAN/STD`` on ``model.visual``, which ``image_transform`` uses).
* ``timm:ARCH``: the ARCH's input size (224 or 384), ImageNet mean/std, bilinear. (timm's own
  ImageNet-21k "augreg" weights were trained with mean = std = 0.5; wrap such models as
  TorchScript if that matters.)
* ``torchscript:``: 224 px, ImageNet mean/std, bilinear.
Patches are square, so "resize shortest side + centre crop" equals a plain resize.
ViT encoders have ``any_size = False`` (they encode at their pretraining size), but a direct
call ``enc(batch, size=S)`` runs at S px with bicubically interpolated position embeddings.
"""

from __future__ import annotations

import math
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from stgen.errors import InputError
from stgen.io import sha256_file

__all__ = [
    "ENCODER_CODE_VERSION",
    "KINDS",
    "TIMM_ARCHS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "EncoderPart",
    "parse_encoder_spec",
    "spec_help",
    "weights_sha256",
    "file_stamp",
    "load_state_dict",
    "checkpoint_shapes",
    "ViTConfig",
    "timm_config",
    "VisionTransformer",
    "AttentionalPooler",
    "ConchVisual",
    "ViTEncoder",
    "TorchScriptEncoder",
    "ConcatEncoder",
    "load_uni",
    "load_conch",
    "load_timm_vit",
    "load_torchscript",
    "build_part",
    "part_dim",
]

#: Bump when the computation of path-based encoders changes (it enters their feature cache key).
ENCODER_CODE_VERSION = 1
KINDS = ("uni", "conch", "timm", "torchscript")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
UNI_HEAD_DIM = 64
CONCH_POOLER_HEADS = 8
CONCH_INPUT_SIZE = 448

#: timm ViT architectures of ``timm:ARCH:PATH``: (patch, width, depth, heads, input size).
#: All are timm's defaults: class token, qkv bias, MLP ratio 4, no LayerScale, LayerNorm eps 1e-6.
TIMM_ARCHS: dict[str, tuple[int, int, int, int, int]] = {
    "vit_tiny_patch16_224": (16, 192, 12, 3, 224),
    "vit_tiny_patch16_384": (16, 192, 12, 3, 384),
    "vit_small_patch32_224": (32, 384, 12, 6, 224),
    "vit_small_patch16_224": (16, 384, 12, 6, 224),
    "vit_small_patch16_384": (16, 384, 12, 6, 384),
    "vit_small_patch8_224": (8, 384, 12, 6, 224),
    "vit_base_patch32_224": (32, 768, 12, 12, 224),
    "vit_base_patch16_224": (16, 768, 12, 12, 224),
    "vit_base_patch16_384": (16, 768, 12, 12, 384),
    "vit_base_patch8_224": (8, 768, 12, 12, 224),
    "vit_large_patch32_224": (32, 1024, 24, 16, 224),
    "vit_large_patch16_224": (16, 1024, 24, 16, 224),
    "vit_large_patch16_384": (16, 1024, 24, 16, 384),
    "vit_large_patch14_224": (14, 1024, 24, 16, 224),
    "vit_huge_patch14_224": (14, 1280, 32, 16, 224),
}
#: Classifier-head keys of timm checkpoints, dropped by ``timm:`` (the output is the class token).
_TIMM_HEAD_KEYS = ("head.weight", "head.bias")
_SHOW = 5  # offending keys named in an error


# =========================================================================== spec parsing


@dataclass(frozen=True)
class EncoderPart:
    """One ``+``-separated part of an encoder spec.

    ``kind`` is ``"name"`` (a registered encoder; ``text`` is the name) or one of :data:`KINDS`.
    """

    kind: str
    text: str
    path: Path | None = None
    arch: str | None = None

    def cache_token(self) -> str:
        """The part with its path replaced by the file's SHA-256 (path-independent cache identity)."""
        if self.path is None:
            return self.text
        head = f"timm:{self.arch}" if self.kind == "timm" else self.kind
        return f"{head}:sha256={weights_sha256(self.path)}"


def spec_help(names: Collection[str] = ()) -> str:
    """One line describing the accepted encoder specs."""
    fixed = ", ".join(sorted(names)) or "(none registered)"
    return (f"use a registered name ({fixed}), uni:PATH, conch:PATH, timm:ARCH:PATH or torchscript:PATH, "
            f"or several joined with '+' (e.g. uni:/w/uni.bin+conch:/w/conch.bin)")


def _starts_part(token: str, names: Collection[str]) -> bool:
    t = token.strip()
    if t in names:
        return True
    kind, sep, _ = t.partition(":")
    return bool(sep) and kind.lower() in KINDS


def _timm_arch(arch: str, spec: str) -> str:
    base = arch.split(".", 1)[0]  # timm pretrained tags: vit_base_patch16_224.augreg_in21k
    if base not in TIMM_ARCHS:
        raise InputError(f"encoder {spec!r}: unsupported timm architecture {arch!r}; supported: "
                         f"{', '.join(TIMM_ARCHS)}")
    return base


def parse_encoder_spec(spec: str, names: Collection[str] = ()) -> tuple[EncoderPart, ...]:
    """Split an encoder spec into its parts (see the module docstring for the grammar).

    ``names`` are the registered fixed encoder names. Weight files must exist.

    Raises
    ------
    InputError : empty or unknown part (lists the accepted forms), a part without PATH,
        a PATH that is not a file, or an unsupported timm ARCH (lists the supported ones).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"empty encoder spec {spec!r}: {spec_help(names)}")
    texts: list[str] = []
    for token in spec.split("+"):
        if not token.strip():
            raise InputError(f"encoder spec {spec!r} has an empty part: {spec_help(names)}")
        if texts and not _starts_part(token, names):
            texts[-1] += "+" + token  # a '+' inside a path
        else:
            texts.append(token)
    parts = []
    for text in (t.strip() for t in texts):
        if text in names:
            parts.append(EncoderPart("name", text))
            continue
        kind, sep, rest = text.partition(":")
        kind = kind.lower()
        if not sep or kind not in KINDS:
            what = f"unknown encoder {text!r}" if text == spec.strip() else f"unknown encoder {text!r} in {spec!r}"
            raise InputError(f"{what}; {spec_help(names)}")
        arch = None
        if kind == "timm":
            arch, sep2, rest = rest.partition(":")
            if not sep2 or not arch:
                raise InputError(f"encoder {text!r}: write timm:ARCH:PATH, e.g. timm:vit_base_patch16_224:/w/model.safetensors; "
                                 f"ARCH one of {', '.join(TIMM_ARCHS)}")
            arch = _timm_arch(arch, text)
        if not rest.strip():
            raise InputError(f"encoder {text!r} names no weights file: write {kind}:{'ARCH:' if kind == 'timm' else ''}PATH")
        path = Path(rest.strip()).expanduser()
        if not path.is_file():
            raise InputError(f"encoder {text!r}: weights file {path} not found")
        canon = f"{kind}:{arch}:{rest.strip()}" if kind == "timm" else f"{kind}:{rest.strip()}"
        parts.append(EncoderPart(kind, canon, path, arch))
    return tuple(parts)


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


# =========================================================================== model


@dataclass(frozen=True)
class ViTConfig:
    """A timm-layout ViT: class token + learned position embeddings (class token included)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    grid: int  # pretraining grid side (pos_embed holds 1 + grid**2 entries)
    mlp_hidden: int
    layer_scale: bool = False
    eps: float = 1e-6

    @property
    def img_size(self) -> int:
        return self.grid * self.patch_size


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps)
        self.attn = _Attention(d, cfg.num_heads)
        self.ls1 = _LayerScale(d) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps)
        self.mlp = _Mlp(d, cfg.mlp_hidden)
        self.ls2 = _LayerScale(d) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, D, gh, gw)


class VisionTransformer(nn.Module):
    """Pure-torch ViT with timm's parameter names and forward (``num_classes=0``,
    ``dynamic_img_size=True``): position embeddings are bicubically resampled (antialiased,
    class-token entry kept) when the patch grid differs from the pretraining grid.

    ``forward_features(x)`` -> all tokens after the final norm ``(B, 1 + N, D)``;
    ``forward(x)`` -> the class token ``(B, D)``.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.embed_dim % cfg.num_heads:
            raise InputError(f"ViT width {cfg.embed_dim} is not divisible by {cfg.num_heads} heads")
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = _PatchEmbed(cfg.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid * cfg.grid, d))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.eps)

    def pos_embed_for(self, gh: int, gw: int) -> torch.Tensor:
        """Position embeddings ``(1, 1 + gh*gw, D)`` for a ``gh x gw`` patch grid."""
        g = self.cfg.grid
        if (gh, gw) == (g, g):
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = grid_pos.shape[-1]
        img = grid_pos.float().reshape(1, g, g, d).permute(0, 3, 1, 2)
        img = F.interpolate(img, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
        grid_pos = img.permute(0, 2, 3, 1).reshape(1, gh * gw, d).to(self.pos_embed.dtype)
        return torch.cat([cls_pos, grid_pos], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch_size
        if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < p:
            raise InputError(f"ViT input must be (B, 3, H, W) with H, W >= {p}, got {tuple(x.shape)}")
        x = self.patch_embed(x)
        b, d, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed_for(gh, gw)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 0]


class _CrossAttention(nn.Module):
    """``nn.MultiheadAttention(d, heads, kdim=ctx, vdim=ctx)``'s parameters (separate q/k/v
    projection weights, one packed ``in_proj_bias``, ``out_proj``), computed with SDPA."""

    def __init__(self, d: int, ctx: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj_weight = nn.Parameter(torch.zeros(d, d))
        self.k_proj_weight = nn.Parameter(torch.zeros(d, ctx))
        self.v_proj_weight = nn.Parameter(torch.zeros(d, ctx))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``q`` (B, L, d), ``kv`` (B, S, ctx) -> (B, L, d)."""
        bq, bk, bv = self.in_proj_bias.chunk(3)
        h = self.heads
        b, l_, d = q.shape
        q = F.linear(q, self.q_proj_weight, bq).reshape(b, l_, h, d // h).transpose(1, 2)
        k = F.linear(kv, self.k_proj_weight, bk).reshape(b, -1, h, d // h).transpose(1, 2)
        v = F.linear(kv, self.v_proj_weight, bv).reshape(b, -1, h, d // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(b, l_, d))


class AttentionalPooler(nn.Module):
    """CONCH's ``AttentionalPooler`` (open_clip CoCa): learned queries, LayerNorm'ed (``ln_q``),
    cross-attend to the LayerNorm'ed context (``ln_k``); LayerNorm eps 1e-5."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = CONCH_POOLER_HEADS, n_queries: int = 1) -> None:
        super().__init__()
        if d_model % n_head:
            raise InputError(f"attentional pooler width {d_model} is not divisible by {n_head} heads")
        self.query = nn.Parameter(torch.zeros(n_queries, d_model))
        self.attn = _CrossAttention(d_model, context_dim, n_head)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, S, context_dim) -> (B, n_queries, d_model)."""
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, self.ln_k(x))


class ConchVisual(nn.Module):
    """CONCH's image tower as used by ``encode_image(img, proj_contrast=False, normalize=False)``:
    ``ln_contrast(attn_pool_contrast(trunk.forward_features(img))[:, 0])``.

    ``proj_contrast`` is loaded (it is part of the released layout) but not applied.
    """

    def __init__(self, trunk_cfg: ViTConfig, d_model: int, n_queries: int = 1) -> None:
        super().__init__()
        self.trunk = VisionTransformer(trunk_cfg)
        self.attn_pool_contrast = AttentionalPooler(d_model, trunk_cfg.embed_dim, CONCH_POOLER_HEADS, n_queries)
        self.ln_contrast = nn.LayerNorm(d_model)
        self.proj_contrast = nn.Parameter(torch.zeros(d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


# =========================================================================== config inference

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def _infer_vit(shapes: dict[str, tuple[int, ...]], path: Path, what: str, layer_scale: bool) -> ViTConfig:
    """Width, patch, grid, depth and MLP width from a timm-layout state dict (keys without prefix)."""
    needed = ["patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"]
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise InputError(f"{path}: not a {what} checkpoint: missing keys: {_fmt_keys(missing)}")
    pw = shapes["patch_embed.proj.weight"]
    if len(pw) != 4 or pw[1] != 3 or pw[2] != pw[3]:
        raise InputError(f"{path}: not a {what} checkpoint: misshapen keys: patch_embed.proj.weight {pw}")
    d, p = pw[0], pw[2]
    pe = shapes["pos_embed"]
    g = math.isqrt(max(pe[1] - 1, 0)) if len(pe) == 3 else 0
    if len(pe) != 3 or g < 1 or g * g + 1 != pe[1]:
        raise InputError(f"{path}: not a {what} checkpoint: misshapen keys: pos_embed {pe} is not (1, 1 + G*G, D)")
    if d % UNI_HEAD_DIM:
        raise InputError(f"{path}: {what} width {d} is not a multiple of {UNI_HEAD_DIM} "
                         f"(heads are inferred as width // {UNI_HEAD_DIM})")
    depth = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k)))
    return ViTConfig(embed_dim=d, depth=depth, num_heads=d // UNI_HEAD_DIM, patch_size=p, grid=g,
                     mlp_hidden=shapes["blocks.0.mlp.fc1.weight"][0], layer_scale=layer_scale)


_UNI_WHAT = "UNI (timm vit_large_patch16_224, init_values=1e-5)"
_CONCH_WHAT = "CONCH (CoCa visual.trunk / attn_pool_contrast / ln_contrast / proj_contrast)"
_CONCH_IGNORED = ("visual.attn_pool_caption.", "visual.ln_caption.")  # captioning branch


def _conch_visual(shapes_or_state: dict, path: Path) -> dict:
    vis = {k: v for k, v in shapes_or_state.items()
           if k.startswith("visual.") and not k.startswith(_CONCH_IGNORED)}
    if not vis:
        raise InputError(f"{path}: not a {_CONCH_WHAT} checkpoint: it has no visual.* keys")
    return vis


def _infer_conch(shapes: dict[str, tuple[int, ...]], path: Path) -> tuple[ViTConfig, int, int]:
    trunk = {k[len("visual.trunk."):]: s for k, s in shapes.items() if k.startswith("visual.trunk.")}
    cfg = _infer_vit(trunk, path, _CONCH_WHAT, layer_scale=False)
    q = shapes.get("visual.attn_pool_contrast.query")
    if q is None or len(q) != 2:
        raise InputError(f"{path}: not a {_CONCH_WHAT} checkpoint: "
                         f"{'missing' if q is None else 'misshapen'} keys: visual.attn_pool_contrast.query")
    if q[1] % CONCH_POOLER_HEADS:
        raise InputError(f"{path}: CONCH pooler width {q[1]} is not divisible by its {CONCH_POOLER_HEADS} heads")
    return cfg, q[1], q[0]


# =========================================================================== encoders


def _prepare(batch: torch.Tensor, size: int, mean, std, mode: str) -> torch.Tensor:
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise InputError(f"encoder input must be (B, 3, H, W), got {tuple(batch.shape)}")
    x = batch.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True)
        if mode == "bicubic":
            x = x.clamp_(0.0, 1.0)  # PIL's bicubic resize of a uint8 image cannot overshoot
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class ViTEncoder:
    """A patch encoder around a ViT-based module: resize to ``input_size`` (or ``size``),
    normalise, run ``model`` -> ``(B, dim)``."""

    any_size = False

    def __init__(self, name: str, model: nn.Module, dim: int, input_size: int, mean, std,
                 resize: str = "bilinear", device: str | torch.device = "cpu", patch_size: int = 16) -> None:
        self.name, self.dim, self.input_size = name, int(dim), int(input_size)
        self.mean, self.std, self.resize, self.patch_size = tuple(mean), tuple(std), resize, int(patch_size)
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor, size: int | None = None) -> torch.Tensor:
        if size is not None and int(size) < self.patch_size:
            raise InputError(f"{self.name} needs inputs of at least {self.patch_size} px, got {size}")
        x = _prepare(batch.to(self.device), int(size or self.input_size), self.mean, self.std, self.resize)
        return self.model(x).float()


def load_uni(path: str | os.PathLike, device: str | torch.device = "cpu", name: str | None = None) -> ViTEncoder:
    """UNI: timm ``vit_large_patch16_224`` (LayerScale, class token after the final norm), 1024-d.

    Raises InputError for an unreadable/unsafe file or a key layout that is not UNI's.
    """
    p = Path(path)
    state = load_state_dict(p)
    cfg = _infer_vit({k: tuple(v.shape) for k, v in state.items()}, p, _UNI_WHAT, layer_scale=True)
    model = VisionTransformer(cfg)
    _load_strict(model, state, p, _UNI_WHAT)
    return ViTEncoder(name or f"uni:{p}", model, cfg.embed_dim, cfg.img_size, IMAGENET_MEAN, IMAGENET_STD,
                      "bilinear", device, cfg.patch_size)


def load_conch(path: str | os.PathLike, device: str | torch.device = "cpu", name: str | None = None) -> ViTEncoder:
    """CONCH image embedding ``encode_image(img, proj_contrast=False, normalize=False)`` (512-d).

    Only ``visual.*`` keys are used; text tower, decoder and captioning pooler are ignored.
    Raises InputError for an unreadable/unsafe file or a layout that is not CONCH's.
    """
    p = Path(path)
    state = _conch_visual(load_state_dict(p), p)
    cfg, d_model, n_q = _infer_conch({k: tuple(v.shape) for k, v in state.items()}, p)
    model = ConchVisual(cfg, d_model, n_q)
    _load_strict(model, state, p, _CONCH_WHAT, prefix="visual.")
    return ViTEncoder(name or f"conch:{p}", model, d_model, cfg.img_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                      "bicubic", device, cfg.patch_size)


def timm_config(arch: str) -> ViTConfig:
    """:class:`ViTConfig` of a :data:`TIMM_ARCHS` architecture."""
    base = _timm_arch(arch, f"timm:{arch}")
    patch, width, depth, heads, img = TIMM_ARCHS[base]
    return ViTConfig(embed_dim=width, depth=depth, num_heads=heads, patch_size=patch, grid=img // patch,
                     mlp_hidden=4 * width)


def load_timm_vit(arch: str, path: str | os.PathLike, device: str | torch.device = "cpu",
                  name: str | None = None) -> ViTEncoder:
    """A timm ViT of a :data:`TIMM_ARCHS` architecture; class token after the final norm.

    A classifier ``head.weight``/``head.bias`` in the file is dropped; every other key must match.
    """
    p = Path(path)
    cfg = timm_config(arch)
    state = {k: v for k, v in load_state_dict(p).items() if k not in _TIMM_HEAD_KEYS}
    model = VisionTransformer(cfg)
    _load_strict(model, state, p, f"timm {arch}")
    return ViTEncoder(name or f"timm:{arch}:{p}", model, cfg.embed_dim, cfg.img_size, IMAGENET_MEAN, IMAGENET_STD,
                      "bilinear", device, cfg.patch_size)


class TorchScriptEncoder:
    """A TorchScript module fed 224 px ImageNet-normalised batches; ``dim`` found by one dummy forward."""

    any_size = False
    input_size = 224
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, name: str, module: torch.jit.ScriptModule, path: Path,
                 device: str | torch.device = "cpu") -> None:
        self.name, self.path = name, path
        self.device = torch.device(device)
        self.model = module.eval().to(self.device)
        try:
            with torch.no_grad():
                out = self.model(torch.zeros(1, 3, self.input_size, self.input_size, device=self.device))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path}: TorchScript module fails on a (1, 3, 224, 224) batch ({_first_line(e)})") from None
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1 or out.shape[1] < 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"{path}: TorchScript module must map (B, 3, 224, 224) to (B, D), "
                             f"returned {shape} for B=1")
        self.dim = int(out.shape[1])

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = _prepare(batch.to(self.device), self.input_size, self.mean, self.std, "bilinear")
        return self.model(x).float()


def load_torchscript(path: str | os.PathLike, device: str | torch.device = "cpu",
                     name: str | None = None) -> TorchScriptEncoder:
    """Load a TorchScript archive with ``torch.jit.load`` (no Python pickle of arbitrary objects)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: TorchScript file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{p}: not a TorchScript archive ({_first_line(e)})") from None
    return TorchScriptEncoder(name or f"torchscript:{p}", module, p, device)


class ConcatEncoder:
    """Concatenation of several encoders' features, in order (``dim`` = sum).

    ``input_size``/``mean``/``std`` are the first part's (nominal: each part resizes and
    normalises its own input); ``any_size`` only if every part has it.
    """

    def __init__(self, name: str, parts: Sequence) -> None:
        if not parts:
            raise InputError(f"encoder {name!r} has no parts")
        self.name, self.parts = name, list(parts)
        self.dim = sum(int(p.dim) for p in self.parts)
        self.input_size = self.parts[0].input_size
        self.mean, self.std = self.parts[0].mean, self.parts[0].std
        self.any_size = all(getattr(p, "any_size", False) for p in self.parts)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor, size: int | None = None) -> torch.Tensor:
        kw = {} if size is None else {"size": size}
        feats = [p(batch, **kw).float() for p in self.parts]
        dev = feats[0].device
        return torch.cat([f.to(dev) for f in feats], dim=1)


def build_part(part: EncoderPart, device: str | torch.device = "cpu"):
    """Build the encoder of one path-based spec part (not a registered name)."""
    if part.kind == "uni":
        return load_uni(part.path, device, part.text)
    if part.kind == "conch":
        return load_conch(part.path, device, part.text)
    if part.kind == "timm":
        return load_timm_vit(part.arch, part.path, device, part.text)
    if part.kind == "torchscript":
        return load_torchscript(part.path, device, part.text)
    raise InputError(f"encoder part {part.text!r} is not a path-based encoder")


def part_dim(part: EncoderPart) -> int | None:
    """Output size of a ``uni``/``conch``/``timm`` part from the file's shapes (no model built);
    ``None`` for ``torchscript`` (needs a forward)."""
    if part.kind == "timm":
        return timm_config(part.arch).embed_dim
    if part.kind == "uni":
        shapes = checkpoint_shapes(part.path)
        s = shapes.get("norm.weight") or shapes.get("module.norm.weight")
        if s is None or len(s) != 1:
            raise InputError(f"{part.path}: not a {_UNI_WHAT} checkpoint: missing keys: norm.weight")
        return int(s[0])
    if part.kind == "conch":
        shapes = checkpoint_shapes(part.path)
        s = shapes.get("visual.ln_contrast.weight") or shapes.get("module.visual.ln_contrast.weight")
        if s is None or len(s) != 1:
            raise InputError(f"{part.path}: not a {_CONCH_WHAT} checkpoint: missing keys: visual.ln_contrast.weight")
        return int(s[0])
    return None
