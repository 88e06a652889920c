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

from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence
import torch
from stgen.errors import InputError
from stgen.features.vit import TIMM_ARCHS
from stgen.features.vit import _CONCH_WHAT
from stgen.features.vit import _UNI_WHAT
from stgen.features.vit import _timm_arch
from stgen.features.weights import checkpoint_shapes
from stgen.features.vit import load_conch
from stgen.features.vit import load_timm_vit
from stgen.features.torchscript import load_torchscript
from stgen.features.vit import load_uni
from stgen.features.vit import timm_config
from stgen.features.weights import weights_sha256


#: Bump when the computation of path-based encoders changes (it enters their feature cache key).
ENCODER_CODE_VERSION = 1
KINDS = ("uni", "conch", "timm", "torchscript")


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
