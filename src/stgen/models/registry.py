"""Every model ``stgen fit/predict/benchmark --model`` accepts: one registry line each.

Each model is a :class:`stgen.models.base.SpotModel` in its own package ``stgen.models.<name>``; the
workflows (:mod:`stgen.workflows`) read sections, choose the panel, cache features, hand in a backbone
when the model ``needs_backbone`` and write RUN_DIR for all of them through one path. A model is imported
when first used. Adding a model: one package plus one line in :data:`SPOT_MODELS`.

=========  ===========================================================  ==========
name       method (source)                                              sampled
=========  ===========================================================  ==========
hinge      HINGE, CVPR 2026 (:mod:`stgen.models.hinge.network`)                 yes
           with stgen's predictive head (config ``hinge``)
hinge-paper  HINGE exactly as published (same ``hinge`` section, paper preset)     yes
flag       FLAG (:mod:`stgen.models.flag.network`)                              yes
ridge      standardise + PCA + RidgeCV on the features                 no
hifusion   HiFusion (:mod:`stgen.models.hifusion.model`)                      no
stnet      ST-Net, He et al. 2020 (:mod:`stgen.models.stnet.model`)           no
bleep      BLEEP, Xie et al. 2023 (:mod:`stgen.models.bleep.model`)           no
stem       Stem, Zhu et al. 2025 (:mod:`stgen.models.stem.model`)             yes
stflow     STFlow, Huang et al. 2025 (:mod:`stgen.models.stflow.model`)       yes
triplex    TRIPLEX, Chung et al. 2024 (:mod:`stgen.models.triplex`)     no
=========  ===========================================================  ==========
"""

from __future__ import annotations

import importlib

from stgen.errors import InputError
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry itself imports no model (nor torch): the CLI starts fast
    from stgen.models.base import SpotModel

#: name -> (module, class) of every model, in report order
SPOT_MODELS: dict[str, tuple[str, str]] = {
    "hinge": ("stgen.models.hinge.model", "HingeModel"),
    "hinge-paper": ("stgen.models.hinge.model", "HingePaperModel"),
    "flag": ("stgen.models.flag.model", "FlagModel"),
    "ridge": ("stgen.models.ridge.model", "Ridge"),
    "hifusion": ("stgen.models.hifusion.model", "HiFusion"),
    "stnet": ("stgen.models.stnet.model", "STNet"),
    "bleep": ("stgen.models.bleep.model", "BLEEP"),
    "stem": ("stgen.models.stem.model", "Stem"),
    "stflow": ("stgen.models.stflow.model", "STFlow"),
    "triplex": ("stgen.models.triplex.model", "Triplex"),
}
#: every model name, in report order
MODELS: tuple[str, ...] = tuple(SPOT_MODELS)
#: sampled models: the benchmark predicts them once per sampling seed (each class's ``generative``)
GENERATIVE: tuple[str, ...] = ("hinge", "hinge-paper", "flag", "stem", "stflow")


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


def spot_model(name: str) -> "type[SpotModel]":
    """The :class:`SpotModel` class of model ``name`` (InputError listing the models for an unknown name)."""
    check_model(name)
    module, cls = SPOT_MODELS[name]
    return getattr(importlib.import_module(module), cls)
