"""H&E stain normalisation: Macenko et al., "A method for normalizing histology slides for quantitative
analysis" (ISBI 2009).

A section's stain matrix is estimated once, on its thumbnail (:meth:`stgen.image.slide.Slide.thumbnail`), with
torchstain's Macenko normaliser (numpy backend, ``NumpyMacenkoNormalizer.fit``): optical density
``OD = -log((I + 1) / Io)`` of the stained pixels (every channel's OD >= ``beta``), the plane of its two
leading eigenvectors, and the robust extreme angles (``alpha`` and ``100 - alpha`` percentiles) as the
haematoxylin and eosin vectors ``HE`` (3, 2), with the 99th percentile ``max_c`` (2,) of each stain's
concentration. Every patch of the section is then mapped to the reference stains with that one matrix:
``C = lstsq(HE, OD)``, ``C *= max_c_ref / max_c``, ``I' = Io exp(-HE_ref C)``. Estimating once per section
instead of per patch keeps the mapping the same for every spot (a patch of stroma alone has no haematoxylin
direction to find). The reference is torchstain's (``HERef``, ``maxCRef``, from Macenko's paper code).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stgen.errors import InputError

#: stain-normalisation methods of ``features.stain``
STAIN_METHODS = ("none", "macenko")
#: ``features.stain`` value meaning "each model's own default" (``SpotModel.default_stain``), resolved per model by
#: :meth:`stgen.workflows.config.StgenConfig.for_model` before any patch is encoded
STAIN_AUTO = "auto"
#: transmitted light intensity and the OD threshold of a stained pixel (Macenko's defaults, torchstain's)
IO, BETA, ALPHA = 240, 0.15, 1
#: optical density ``-log((I + 1) / Io)`` of every 8-bit intensity ``I``
_OD_OF_UINT8 = -np.log((np.arange(256, dtype=np.float64) + 1) / IO)


def check_stain_method(stain: str, allow_auto: bool = False) -> str:
    """``stain`` if it is one of :data:`STAIN_METHODS` (or :data:`STAIN_AUTO` with ``allow_auto``, as the config
    accepts it); InputError naming ``features.stain`` otherwise."""
    choices = (STAIN_AUTO, *STAIN_METHODS) if allow_auto else STAIN_METHODS
    if stain not in choices:
        raise InputError(f"unknown stain normalisation {stain!r} (features.stain); choose one of {choices}")
    return stain


@dataclass(frozen=True)
class StainMatrix:
    """Macenko stain parameters: ``he`` (3, 2) unit OD vectors of haematoxylin and eosin (RGB rows),
    ``max_c`` (2,) the 99th percentile of each stain's concentration."""

    he: np.ndarray
    max_c: np.ndarray


def reference_stains() -> StainMatrix:
    """torchstain's reference stain matrix and maximal concentrations (Macenko's reference H&E)."""
    from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer

    n = NumpyMacenkoNormalizer()
    return StainMatrix(np.asarray(n.HERef, dtype=np.float64), np.asarray(n.maxCRef, dtype=np.float64))


def estimate_stains(rgb: np.ndarray, where: str = "image", min_pixels: int = 500) -> StainMatrix:
    """The Macenko stain matrix of an RGB image (H, W, 3) uint8, e.g. a slide thumbnail (torchstain ``fit``).

    Raises InputError naming ``where`` when fewer than ``min_pixels`` pixels are stained (a blank or
    white image has no stain to estimate) or the estimate is not finite.
    """
    from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer

    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise InputError(f"{where}: stain estimation needs an RGB image (H, W, 3), got shape {img.shape}")
    od = -np.log((img.reshape(-1, 3).astype(np.float64) + 1) / IO)
    stained = int(np.count_nonzero(np.all(od >= BETA, axis=1)))
    if stained < min_pixels:
        raise InputError(f"{where}: only {stained} stained pixels, too few to estimate the H&E stain matrix "
                         f"(features.stain: macenko needs at least {min_pixels}); use features.stain: none")
    n = NumpyMacenkoNormalizer()
    n.fit(img, Io=IO, alpha=ALPHA, beta=BETA)
    he, max_c = np.asarray(n.HERef, dtype=np.float64), np.asarray(n.maxCRef, dtype=np.float64)
    if not (np.isfinite(he).all() and np.isfinite(max_c).all() and (max_c > 0).all()):
        raise InputError(f"{where}: the H&E stain matrix could not be estimated (not finite); use features.stain: none")
    return StainMatrix(he, max_c)


def normalise_stains(patches: np.ndarray, source: StainMatrix, target: StainMatrix) -> np.ndarray:
    """Map RGB patches (..., 3) uint8 stained with ``source`` to ``target``'s stains (Macenko's mapping,
    module docstring); returns uint8 of the same shape. Unstained (white) pixels stay near ``Io``."""
    x = np.asarray(patches)
    if x.dtype != np.uint8 or x.shape[-1:] != (3,):
        raise InputError(f"stain normalisation needs uint8 RGB patches (..., 3), got {x.dtype} {x.shape}")
    od = _OD_OF_UINT8[x.reshape(-1, 3)]  # (P, 3) optical density, looked up per 8-bit value
    # least-squares concentrations C = pinv(HE) OD (HE is 3 x 2 of full rank: lstsq's solution), rescaled and
    # rendered with the target's stains: one 3 x 3 map of the optical density
    od_map = target.he @ ((target.max_c / source.max_c)[:, None] * np.linalg.pinv(source.he))
    rgb = IO * np.exp(-(od @ od_map.T))
    return np.clip(rgb, 0, 255).reshape(x.shape).astype(np.uint8)
