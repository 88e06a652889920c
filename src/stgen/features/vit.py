"""Vision transformers in plain torch: UNI, CONCH's visual tower and timm ViTs (no timm/torchvision needed)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
import torch
import torch.nn as nn
import torch.nn.functional as F
from stgen.errors import InputError
from stgen.features.weights import _fmt_keys
from stgen.features.weights import _load_strict
from stgen.features.weights import load_state_dict


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


def _timm_arch(arch: str, spec: str) -> str:
    base = arch.split(".", 1)[0]  # timm pretrained tags: vit_base_patch16_224.augreg_in21k
    if base not in TIMM_ARCHS:
        raise InputError(f"encoder {spec!r}: unsupported timm architecture {arch!r}; supported: "
                         f"{', '.join(TIMM_ARCHS)}")
    return base


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
