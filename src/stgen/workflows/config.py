"""Run configuration: dataclasses with YAML overrides.

Defaults reproduce the HINGE protocol of the paper (Supp. A.3, A.6) on Her2ST
with the embedded small backbone. A YAML file given with ``--config`` may set
any subset of fields, e.g.::

    hinge:
      max_epochs: 10
    pretrain:
      corpus: [A1, A2]

Unknown sections or keys raise :class:`~stgen.errors.InputError`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
import yaml
from stgen.errors import InputError
if TYPE_CHECKING:  # every model owns its hyper-parameter dataclass (stgen.models.<name>)
    from stgen.models.bleep.model import BLEEPConfig
    from stgen.models.flag.config import FlagConfig
    from stgen.models.hifusion.model import HiFusionConfig
    from stgen.models.hinge.config import HingeConfig
    from stgen.models.ridge.config import RidgeConfig
    from stgen.models.stem.model import StemConfig
    from stgen.models.stflow.model import STFlowConfig
    from stgen.models.stnet.model import STNetConfig
    from stgen.models.triplex.config import TriplexConfig
from stgen.backbones.config import PretrainConfig
from stgen.utils.config import coerce_numbers


@dataclass
class DataConfig:
    """Targets and gene panel (Stem/HINGE protocol)."""

    transform: str = "log2"  # log2(count+1); or log1p, normalize_log1p
    n_top: int = 300  # HMHVG: top-n by mean ∩ top-n by variance over training sections
    train_sections: list[str] | None = None  # default: every imaged section except the test one


@dataclass
class FeatureConfig:
    """Histology patches and encoder."""

    # spec: efficientnet-lite0 | uni:PATH | conch:PATH | timm:ARCH:PATH | torchscript:PATH, joined by '+' to
    # concatenate features (e.g. uni:A+conch:B, 1536-d); see stgen.features.spec
    encoder: str = "efficientnet-lite0"
    patch_px: int = 224  # square patch side, full-resolution pixels (~154 um on Her2ST at 0.688 um/px)
    # patch side in microns: each section's patch is patch_um / mpp pixels (sections scanned at other
    # resolutions); None = patch_px pixels everywhere (predict still converts by the slide's mpp)
    patch_um: float | None = None
    # test-time augmentation: the mean feature over dihedral views of each patch, true/8 (all flips and rotations),
    # 4 (rotations), 2 (the patch and its 180-degree rotation), false/1 (off)
    tta: bool | int = False
    batch_size: int = 32
    # stain normalisation before encoding: none | macenko (each slide mapped to a reference H&E with its own
    # Macenko stain matrix, stgen.image.stain) | auto (each model's measured default, SpotModel.default_stain:
    # macenko for hinge and ridge, none for the others; see StgenConfig.for_model)
    stain: str = "auto"

    def __post_init__(self) -> None:
        from stgen.features.cache import tta_views
        from stgen.image.stain import check_stain_method

        tta_views(self.tta)  # InputError naming features.tta for anything but a bool or 1, 2, 4, 8
        check_stain_method(self.stain, allow_auto=True)  # likewise features.stain


def _model_section(name: str):
    """A config section holding the ``config_cls`` of the model ``name``
    (:mod:`stgen.models.registry`), imported when a configuration is built."""

    def make():
        from stgen.models.registry import spot_model

        return spot_model(name).config_cls()

    return field(default_factory=make)


@dataclass
class StgenConfig:
    """The whole configuration: one section per concern and one per model.

    A model's section enters only its own config hash except for ``hinge`` and
    ``ridge`` (``in_every_hash``; ridge also uses ``hinge.seed``), see
    :func:`stgen.workflows.rundir.config_hash`.
    """

    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    hinge: "HingeConfig" = _model_section("hinge")
    ridge: "RidgeConfig" = _model_section("ridge")
    flag: "FlagConfig" = _model_section("flag")
    hifusion: "HiFusionConfig" = _model_section("hifusion")
    stnet: "STNetConfig" = _model_section("stnet")
    bleep: "BLEEPConfig" = _model_section("bleep")
    stem: "StemConfig" = _model_section("stem")
    stflow: "STFlowConfig" = _model_section("stflow")
    triplex: "TriplexConfig" = _model_section("triplex")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def for_model(self, model: str) -> "StgenConfig":
        """This configuration as model ``model`` trains and predicts with it: ``features.stain: auto`` replaced
        by the model's own default (``SpotModel.default_stain``, chosen per model on nested leave-one-section-out
        folds, docs/results.md "Stain normalisation"), and a preset model's section with its preset applied
        (``SpotModel.trained_section``: ``hinge-paper``'s ``hinge`` section is the paper's); itself when nothing
        is left to resolve. Every fit resolves its configuration so: the saved ``config.yaml`` and the config
        hash hold the resolved values.

        Raises InputError for an unknown model."""
        from stgen.image.stain import STAIN_AUTO
        from stgen.models.registry import spot_model

        cls = spot_model(model)
        out = self
        if out.features.stain == STAIN_AUTO:
            out = dataclasses.replace(out, features=dataclasses.replace(out.features, stain=cls.default_stain))
        section = cls.section_of(out)
        trained = cls.trained_section(section)
        if trained is not section:
            out = dataclasses.replace(out, **{cls.config_section or cls.name: trained})
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str = "config") -> "StgenConfig":
        cfg = cls()
        for section, values in (d or {}).items():
            if section not in {f.name for f in dataclasses.fields(cls)}:
                raise InputError(f"{source}: unknown section {section!r}")
            if values is None:
                continue
            if not isinstance(values, dict):
                raise InputError(f"{source}: section {section!r} must be a mapping")
            sub = getattr(cfg, section)
            names = {f.name for f in dataclasses.fields(sub)}
            for k in values:
                if k not in names:
                    raise InputError(f"{source}: unknown key {section}.{k}; known: {sorted(names)}")
            try:  # a rebuilt dataclass runs its own validation (__post_init__), if it has one
                new = dataclasses.replace(sub, **values)
                coerce_numbers(new, section)
                setattr(cfg, section, new)
            except (TypeError, ValueError) as e:
                raise InputError(f"{source}: section {section!r}: {e}") from e
        return cfg

    @classmethod
    def load(cls, path: str | Path | None) -> "StgenConfig":
        """Defaults, overridden by the YAML file at ``path`` (if given)."""
        if path is None:
            return cls()
        p = Path(path)
        if not p.is_file():
            raise InputError(f"config file {p} does not exist")
        try:
            d = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"config file {p} cannot be read as UTF-8 text ({e})") from e
        except yaml.YAMLError as e:
            raise InputError(f"config file {p} is not valid YAML: {' '.join(str(e).split())}") from e
        if d is not None and not isinstance(d, dict):
            raise InputError(f"config file {p} must contain a mapping")
        return cls.from_dict(d, source=str(p))
