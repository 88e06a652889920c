"""Patch encoders and cached per-spot image features.

An encoder maps a float batch ``(B, 3, H, W)`` with values in [0, 1] to
``(B, dim)`` features; it resizes to its ``input_size`` and applies its own
``mean``/``std`` normalisation. Encoders whose ``any_size`` is True (the
convolutional ones) also take ``size=S`` to resize to ``S`` px instead, so a
small patch can be encoded at its native resolution (HiFusion's sub-patches).
The default, EfficientNet-Lite0 with ImageNet weights, yields 1280-d globally
average-pooled features.
"""

from __future__ import annotations

from contextlib import nullcontext
import os
import numpy as np
import torch
from tqdm.auto import tqdm
from stgen.errors import InputError
from stgen.utils.io import atomic_path
from stgen.image.scaled import SlideRef, as_slide_ref, open_ref
from stgen.image.slide import Slide
from stgen.image.stain import check_stain_method, estimate_stains, normalise_stains, reference_stains
from stgen.features.cache import _load_cached
from stgen.features.registry import _spec
from stgen.features.cache import _write_checksum
from stgen.features.registry import build_encoder
from stgen.features.cache import feature_cache_path, tta_views


def dihedral_views(x: torch.Tensor, n: int = 8) -> list[torch.Tensor]:
    """The first ``n`` (2, 4 or 8) dihedral transforms of a (B, C, H, W) batch: ``n`` = 8 gives the 4 rotations
    x optional horizontal flip, 4 the rotations, 2 the identity and the 180-degree rotation."""
    if n == 2:
        return [x, torch.rot90(x, 2, dims=(2, 3))]
    views = []
    for flip in (False, True)[: 2 if n == 8 else 1]:
        y = torch.flip(x, dims=(3,)) if flip else x
        for k in range(4):
            views.append(torch.rot90(y, k, dims=(2, 3)))
    return views


# --------------------------------------------------------------------------- extraction


def extract_features(
    image_path: SlideRef | str | os.PathLike,
    centers_xy: np.ndarray,
    patch_px: int = 224,
    encoder: str = "efficientnet-lite0",
    tta: bool | int = False,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    input_px: int | None = None,
    slide: Slide | None = None,
    stain: str = "none",
) -> np.ndarray:
    """Encode a square patch around each spot centre.

    Parameters
    ----------
    image_path : full-resolution H&E slide, any format :func:`stgen.image.slide.open_slide` reads
        (JPEG/PNG decoded once; pyramidal TIFF/OME-TIFF and OpenSlide formats read tile by tile), or a
        :class:`stgen.image.scaled.SlideRef` to a downsampled image (e.g. Visium's hires PNG): patches
        then cover the same tissue, cut at the coarse resolution and upsampled.
    centers_xy : (N, 2) spot centres ``(x=column, y=row)`` in full-resolution px.
    patch_px : patch side in full-resolution px (resized to the encoder input size).
    encoder : encoder spec: a registered name (see :func:`encoder_names`), ``uni:PATH``,
        ``conch:PATH``, ``timm:ARCH:PATH``, ``torchscript:PATH``, or several joined by ``+``
        (features concatenated; :mod:`stgen.features.spec`).
    tta : average features over dihedral transforms of each patch: ``True`` or 8 (all 8), 4 (the rotations),
        2 (the patch and its 180-degree rotation), ``False``/1 (none); :func:`stgen.features.cache.tta_views`.
    batch_size : patches per encoder call.
    cache_dir : if given, features are cached in ``<cache_dir>/features/<key>.npy``
        keyed by image content, centres, patch size, encoder, tta and code version;
        an unreadable, misshapen or non-finite cache file is recomputed.
    show_progress : show a tqdm bar ``features <section>/<file>``.
    input_px : encode each patch resized to this side instead of the encoder's
        ``input_size`` (``input_px = patch_px``: native resolution); only for
        encoders with ``any_size`` (EfficientNet-Lite0: >= 32 px).
    slide : ``image_path`` already opened (:func:`stgen.image.slide.open_slide`; not closed here), so a caller
        that read it (e.g. for a thumbnail) does not decode a JPEG twice; default: opened here.
    stain : ``none`` or ``macenko``: map every patch to a reference H&E with the slide's Macenko stain
        matrix, estimated once on its thumbnail (:mod:`stgen.image.stain`), before encoding.

    Returns
    -------
    float32 array (N, dim).

    Raises
    ------
    InputError : unknown encoder or stain method, bad centres/patch size/batch size, an
        unreadable image, or (``stain="macenko"``) a slide with too little stained tissue.
    """
    spec = _spec(encoder)
    ref = as_slide_ref(image_path)
    image_path = ref.path
    c = np.asarray(centers_xy, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2 or not np.isfinite(c).all():
        raise InputError(f"centres for {image_path} must be a finite (N, 2) array, got shape {c.shape}")
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size!r}")
    if int(patch_px) < 1 or int(patch_px) != patch_px:
        raise InputError(f"patch_px must be a positive integer, got {patch_px!r}")
    if not image_path.is_file():
        raise InputError(f"{image_path}: image file not found")
    if input_px is not None and not getattr(spec.factory, "any_size", False):
        raise InputError(f"encoder {encoder!r} only encodes patches at its own input size; input_px={input_px} "
                         f"needs a convolutional encoder such as efficientnet-lite0")
    check_stain_method(stain)
    n = len(c)
    views = tta_views(tta)

    cache_file = None
    if cache_dir is not None:
        cache_file = feature_cache_path(cache_dir, image_path, c, patch_px, encoder, views, input_px,
                                        image_scale=ref.scale, stain=stain)
        cached = _load_cached(cache_file, (n, spec.dim))
        if cached is not None:
            return cached

    enc = build_encoder(encoder)
    kw = {} if input_px is None else {"size": int(input_px)}
    out = np.empty((n, spec.dim), dtype=np.float32)
    desc = f"features {image_path.parent.name}/{image_path.name}"
    # a JPEG/PNG is decoded once; a tiled TIFF / WSI is read lazily, only the tiles under the patches
    with (nullcontext(slide) if slide is not None else open_ref(ref)) as slide, torch.no_grad(), \
            tqdm(total=n, desc=desc, unit="patch", disable=not show_progress) as bar:
        stains = None
        if stain == "macenko":  # one stain matrix per slide, from its thumbnail
            stains = (estimate_stains(slide.thumbnail(2048)[0], where=str(image_path)), reference_stains())
        for s in range(0, n, int(batch_size)):
            patches = slide.read_patches(c[s : s + batch_size], int(patch_px))
            if stains is not None:
                patches = normalise_stains(patches, *stains)
            x = torch.from_numpy(patches).permute(0, 3, 1, 2).float().div_(255.0)
            if views > 1:
                f = torch.stack([enc(v.contiguous(), **kw) for v in dihedral_views(x, views)]).mean(0)
            else:
                f = enc(x, **kw)
            f = f.detach().float().cpu().numpy()
            if f.shape != (len(patches), spec.dim):
                raise RuntimeError(f"encoder {encoder!r} returned shape {f.shape}, expected ({len(patches)}, {spec.dim})")
            out[s : s + len(patches)] = f
            bar.update(len(patches))
    if not np.isfinite(out).all():
        raise RuntimeError(f"encoder {encoder!r} produced non-finite features for {image_path}")

    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, out, allow_pickle=False)
        _write_checksum(cache_file)
    return out
