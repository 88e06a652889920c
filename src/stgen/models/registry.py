"""Every model ``stgen fit/predict/benchmark --model`` accepts.

``hinge``, ``ridge`` and ``flag`` have their own code paths in
:mod:`stgen.pipeline` (a backbone, a spot graph, a scikit-learn estimator).
The benchmark models below implement :class:`stgen.models.base.SpotModel` and
share one path; each is imported when first used.

=========  ===========================================================  ==========
name       method (source)                                              sampled
=========  ===========================================================  ==========
hinge      HINGE, CVPR 2026 (:mod:`stgen.models.hinge`)                 yes
ridge      standardise + PCA + RidgeCV on the features                 no
flag       FLAG (:mod:`stgen.models.flag`)                              yes
hifusion   HiFusion (:mod:`stgen.models.hifusion`)                      no
stnet      ST-Net, He et al. 2020 (:mod:`stgen.models.stnet`)           no
bleep      BLEEP, Xie et al. 2023 (:mod:`stgen.models.bleep`)           no
stem       Stem, Zhu et al. 2025 (:mod:`stgen.models.stem`)             yes
stflow     STFlow, Huang et al. 2025 (:mod:`stgen.models.stflow`)       yes
=========  ===========================================================  ==========
"""

from __future__ import annotations

import importlib

from stgen.errors import InputError
from stgen.models.base import SpotModel

#: name -> (module, class) of the SpotModel benchmark models
SPOT_MODELS: dict[str, tuple[str, str]] = {
    "hifusion": ("stgen.models.hifusion", "HiFusion"),
    "stnet": ("stgen.models.stnet", "STNet"),
    "bleep": ("stgen.models.bleep", "BLEEP"),
    "stem": ("stgen.models.stem", "Stem"),
    "stflow": ("stgen.models.stflow", "STFlow"),
}
#: every model name, in report order
MODELS: tuple[str, ...] = ("hinge", "flag", "ridge", *SPOT_MODELS)
#: sampled models: the benchmark predicts them once per sampling seed
GENERATIVE: tuple[str, ...] = ("hinge", "flag", "stem", "stflow")


def check_model(name: str) -> str:
    """``name`` if it is a model; InputError listing the available ones otherwise."""
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return name


def expand_models(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"all"`` -> every model; ``"hinge,ridge"`` or a list -> those (checked, duplicates dropped)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(MODELS)
    out: list[str] = []
    for n in names:
        if check_model(n) not in out:
            out.append(n)
    if not out:
        raise InputError(f"no model given; available: all, {', '.join(MODELS)}")
    return out


def spot_model(name: str) -> type[SpotModel]:
    """The :class:`SpotModel` class of a benchmark model (InputError for hinge/ridge/flag or unknown)."""
    if name not in SPOT_MODELS:
        raise InputError(f"{name!r} is not one of the SpotModel benchmark models {sorted(SPOT_MODELS)}")
    module, cls = SPOT_MODELS[name]
    return getattr(importlib.import_module(module), cls)
