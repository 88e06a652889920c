"""The interface of every model (:class:`SpotModel`), its inputs and what the workflows hand in.

Every model kind registered in :mod:`stgen.models.registry` is a
:class:`SpotModel`. The pipeline (:mod:`stgen.workflows.fit`) does everything around
it - reading sections, choosing the HMHVG panel, caching encoder features,
writing RUN_DIR atomically, re-using runs by config hash - so a model only
learns, predicts and hands over its weights:

* ``fit(train, panel, cfg, features)`` trains on a list of :class:`SectionInput`
  (one per training section, ``targets`` set) and returns ``(model, history)``;
* ``state()`` returns ``(tensors, meta)``: ``tensors`` are written to
  ``model.safetensors``, ``meta`` (JSON-serialisable) to ``run.json``;
  ``from_state(tensors, meta, cfg)`` rebuilds the same model (no pickle);
* ``predict(section, features, samples, steps, seed)`` returns the mean and the
  per-spot sample sd ``(N, G)`` each, in the run's target units (log2(count+1)
  by default); deterministic models return a zero sd.

Units: ``xy`` are full-resolution pixel coordinates (x = column, y = row) of
spot centres; ``feats`` are the run's encoder features of the spot patch
(``features.patch_px`` pixels, e.g. 1280-d EfficientNet-Lite0); ``targets`` are
in the run's target units.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stgen.errors import InputError
from stgen.features.extract import extract_features
from stgen.image.scaled import SlideRef, as_slide_ref

__all__ = ["SectionInput", "FeatureSettings", "FitContext", "SpotModel", "load_state_strict", "read_weights", "autocast_dtype", "sampling_device", "check_sampler_options", "check_training_sections", "check_predict_section",
           "resolve_count"]


@dataclass
class SectionInput:
    """One section's inputs.

    Attributes
    ----------
    name : section id, e.g. ``"C2"``.
    xy : (N, 2) float64 spot centres, full-resolution pixels (x, y); ``None`` only for models without
        ``needs_xy`` (HINGE without position-keyed reveal orders, ridge).
    feats : (N, F) float32 encoder features of each spot's patch.
    image : the H&E image: a path of the full-resolution slide or a
        :class:`~stgen.image.scaled.SlideRef` (a downsampled image at its scale); ``None`` only when a model
        needs nothing beyond ``feats``.
    targets : (N, G) float32 expression in the run's units, or ``None`` (predict).
    """

    name: str
    xy: np.ndarray | None
    feats: np.ndarray
    image: Path | None = None
    targets: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.feats = np.asarray(self.feats, dtype=np.float32)
        n = len(self.feats)
        if self.xy is not None:
            self.xy = np.asarray(self.xy, dtype=np.float64)
        if self.xy is not None and self.xy.shape != (n, 2):
            raise InputError(f"section {self.name}: xy must be ({n}, 2), got {self.xy.shape}")
        if self.targets is not None:
            self.targets = np.asarray(self.targets, dtype=np.float32)
            if self.targets.ndim != 2 or len(self.targets) != n:
                raise InputError(f"section {self.name}: targets must be ({n}, G), got {self.targets.shape}")

    @property
    def n_spots(self) -> int:
        return len(self.feats)

    def require_image(self, model: str) -> SlideRef:
        """The image as a :class:`~stgen.image.scaled.SlideRef` (open it with
        :func:`~stgen.image.scaled.open_ref`); InputError naming ``model`` when the section has none."""
        ref = as_slide_ref(self.image) if self.image is not None else None
        if ref is None or not ref.path.is_file():
            raise InputError(f"{model} reads image patches itself: section {self.name} has no image ({self.image})")
        return ref


@dataclass
class FeatureSettings:
    """The run's patch encoder settings (config section ``features``) and feature cache.

    :meth:`encode` encodes patches of any size around any centres through
    :func:`stgen.features.extract.extract_features` (cached on disk when ``cache_dir``
    is set), e.g. HiFusion's sub-patches and neighbourhood patches.
    """

    encoder: str = "efficientnet-lite0"
    patch_px: int = 224
    tta: bool | int = False  # dihedral views averaged (stgen.features.cache.tta_views)
    batch_size: int = 32
    stain: str = "none"  # stain normalisation before encoding (stgen.image.stain): none | macenko
    cache_dir: Path | None = None
    progress: bool = False

    def encode(self, image: SlideRef | str | Path, xy: np.ndarray, patch_px: int | None = None,
               input_px: int | None = None, slide=None) -> np.ndarray:
        """(N, dim) float32 features of ``patch_px``-pixel patches (default: the spot patch) around ``xy``,
        resized to ``input_px`` (default: the encoder's input size; ``slide``: ``image`` already opened;
        see :func:`stgen.features.extract.extract_features`)."""
        return extract_features(image, xy, patch_px=int(patch_px or self.patch_px), encoder=self.encoder,
                                tta=self.tta, batch_size=self.batch_size, cache_dir=self.cache_dir,
                                show_progress=self.progress, input_px=input_px, slide=slide, stain=self.stain)


@dataclass
class FitContext:
    """What some models need beyond their own config section, handed in by :func:`stgen.workflows.fit.fit`.

    Attributes
    ----------
    backbone : the frozen expression backbone (an :class:`~stgen.backbones.embedded.ExpressionBackbone`,
        CellFM or scGPT ``nn.Module``) for models with ``needs_backbone``; ``None`` otherwise.
    backbone_meta : its description for ``run.json['backbone']`` (kind, genes/config or path + SHA-256,
        ``panel_genes_dropped``).
    patch_px : the spot patch side in full-resolution pixels (config ``features.patch_px``), e.g. FLAG's
        default RBF length scale.
    seed : the run seed of the models that have none of their own (ridge's PCA: config ``hinge.seed``,
        kept so that ridge's config hash and results stay those of earlier versions).
    """

    backbone: Any = None
    backbone_meta: dict | None = None
    patch_px: int = 224
    seed: int = 42


class SpotModel(ABC):
    """A trainable spot-level expression predictor (see the module docstring).

    Class attributes: ``name`` (the ``--model`` value and config section),
    ``generative`` (sampled: ``predict`` draws ``samples`` samples and averages
    them, so the benchmark runs it once per seed), ``config_cls`` (a dataclass
    of its hyper-parameters, the YAML section ``name``), ``needs_backbone``
    (the fit restricts the panel to the backbone's vocabulary and hands the
    backbone in :class:`FitContext`; with ``panel_from_backbone`` False the
    panel keeps genes outside the vocabulary: FLAG, whose backbone only gives
    alignment targets), ``in_every_hash`` (its config section
    enters every model's config hash: ``hinge`` and ``ridge``, the first two
    models, so that cached runs of every model keep their hashes), ``config_section`` (the YAML section it
    reads when not its ``name``: ``hinge-paper`` reads ``hinge``; see :meth:`section_of`), ``default_stain``
    (the stain normalisation of its features under ``features.stain: auto``, the default: ``none`` or
    ``macenko``, chosen per model on nested leave-one-section-out folds; ST-Net, which never reads it, keeps ``none``).
    """

    name: ClassVar[str]
    config_section: ClassVar[str | None] = None
    generative: ClassVar[bool] = False
    config_cls: ClassVar[type]
    needs_backbone: ClassVar[bool] = False
    panel_from_backbone: ClassVar[bool] = True
    in_every_hash: ClassVar[bool] = False
    weights_file: ClassVar[str] = "model.safetensors"
    needs_xy: ClassVar[bool] = True
    cuts_own_patches: ClassVar[bool] = False  # reads image patches itself: features.patch_um is refused
    default_stain: ClassVar[str] = "none"

    @classmethod
    def section_of(cls, cfg: Any) -> Any:
        """This model's hyper-parameters in a whole configuration (``cfg.<config_section or name>``)."""
        return getattr(cfg, cls.config_section or cls.name)

    @classmethod
    def trained_section(cls, section: Any) -> Any:
        """The hyper-parameters this model trains and samples with, given its config section: the section
        itself, or a preset model's section with its preset applied (``hinge-paper``); what its config hash
        holds, so a default the preset overrides never invalidates its runs."""
        return section

    @classmethod
    @abstractmethod
    def fit(cls, train: list[SectionInput], panel: list[str], cfg: Any, features: FeatureSettings,
            progress: bool = True, context: FitContext | None = None) -> tuple["SpotModel", dict]:
        """Train on ``train`` (each with ``targets`` (N_s, G), G = len(panel)); return (model, history)."""

    @abstractmethod
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, meta)``: everything :meth:`from_state` needs; meta JSON-serialisable
        (``run.json[name]``)."""

    @classmethod
    @abstractmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, cfg: Any) -> "SpotModel":
        """Rebuild a fitted model from :meth:`state`'s output and its config.

        ``meta`` is the run's metadata (``run.json``): :meth:`state`'s meta is ``meta[cls.name]``,
        :meth:`run_entries` are at the top level beside ``panel`` and ``feature_dim``."""

    @abstractmethod
    def predict(self, section: SectionInput, features: FeatureSettings, samples: int | None = None,
                steps: int | None = None, seed: int = 0, progress: bool = False,
                **options) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, sd)``, (N, G) float32 each, target units. ``samples``/``steps`` default to the config's.

        ``options`` are ``batch_size``, ``device`` and ``precision`` (``bf16-mixed``...): the backbone models
        (HINGE, FLAG) use them; the others run on the CPU and ignore them."""

    def run_entries(self) -> dict:
        """Top-level ``run.json`` entries besides ``run.json[name]`` (e.g. HINGE's ``backbone``)."""
        return {}

    def save(self, folder: Path) -> dict:
        """Write the weights into RUN_DIR ``folder`` (:attr:`weights_file`); returns :meth:`state`'s meta."""
        tensors, meta = self.state()
        save_file({k: v.contiguous() for k, v in tensors.items()}, Path(folder) / self.weights_file)
        return meta

    @classmethod
    def load(cls, folder: Path, meta: dict, cfg: Any) -> "SpotModel":
        """The model saved by :meth:`save` in RUN_DIR ``folder`` (``meta``: its ``run.json``).
        InputError when the weights file is unreadable or does not match."""
        return cls.from_state(read_weights(Path(folder) / cls.weights_file), meta, cfg)


def check_training_sections(train: list[SectionInput], panel: list[str], model: str, feats: bool = True) -> int:
    """Validate training sections for ``model``; returns the feature width ``F``.

    Every section needs spots, ``targets`` (N_s, G = len(panel)) and finite
    targets; with ``feats`` (models that read ``section.feats``) also the same
    ``F`` and finite features (``feats=False``, e.g. ST-Net, which reads image
    patches: not checked, returns -1). InputError names the section and the problem.
    """
    if not train:
        raise InputError(f"{model} needs at least one training section, got none")
    if not panel:
        raise InputError(f"{model} needs a non-empty gene panel")
    g, f = len(panel), train[0].feats.shape[1] if train[0].feats.ndim == 2 else -1
    for s in train:
        if s.n_spots < 1:
            raise InputError(f"{model}: training section {s.name} has no spots")
        if feats and (s.feats.ndim != 2 or s.feats.shape[1] != f or f < 1):
            raise InputError(f"{model}: training section {s.name} has features of shape {s.feats.shape}, "
                             f"expected (N, {f}) like section {train[0].name}")
        if s.targets is None:
            raise InputError(f"{model}: training section {s.name} has no targets")
        if s.targets.shape[1] != g:
            raise InputError(f"{model}: training section {s.name} has {s.targets.shape[1]} target genes (targets "
                             f"of shape {s.targets.shape}), but the panel has {g}")
        if feats and not np.isfinite(s.feats).all():
            raise InputError(f"{model}: training section {s.name} has NaN or infinite features")
        if not np.isfinite(s.targets).all():
            raise InputError(f"{model}: training section {s.name} has NaN or infinite targets")
    return int(f) if feats else -1


def check_predict_section(section: SectionInput, feat_dim: int, model: str) -> None:
    """InputError naming ``section`` when its features are not finite (N >= 1, ``feat_dim``)."""
    if section.n_spots < 1:
        raise InputError(f"{model}: section {section.name} has no spots")
    if section.feats.ndim != 2 or section.feats.shape[1] != feat_dim:
        raise InputError(f"{model}: section {section.name} has features of shape {section.feats.shape}, "
                         f"the model was trained on {feat_dim}-d features")
    if not np.isfinite(section.feats).all():
        raise InputError(f"{model}: section {section.name} has NaN or infinite features")


def resolve_count(value: int | None, default: int, name: str, model: str) -> int:
    """``value`` (or ``default`` when None) as an int >= 1, e.g. ``samples``/``steps``; InputError otherwise."""
    v = default if value is None else value
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise InputError(f"{model}: {name} must be an integer >= 1, got {v!r}")
    return int(v)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; InputError naming ``path`` when it is missing, truncated or corrupt."""
    try:
        return load_file(path)
    except (RuntimeError, OSError, SafetensorError) as e:
        raise InputError(f"{path} is not a readable safetensors file: {e}") from e


def load_state_strict(net: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path,
                      keep_prefix: str | None = None) -> None:
    """Load ``state`` into ``net`` strictly; entries of ``net``'s own state whose keys start with
    ``keep_prefix`` (e.g. an external frozen backbone) are kept where ``state`` lacks them.
    InputError naming ``source`` when the keys or shapes do not match."""
    if keep_prefix is not None:
        state = {**{k: v for k, v in net.state_dict().items() if k.startswith(keep_prefix)}, **state}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(f"{source} does not match run.json: {e}") from e


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision string (``bf16-mixed`` -> bfloat16, ``16-mixed`` ->
    float16; ``32-true`` -> None: no autocast)."""
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])


def sampling_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when available and else the CPU (where the samplers run by default)."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def check_sampler_options(samples: int, batch_size: int | None) -> None:
    """InputError for ``samples`` < 1 or a ``batch_size`` < 1 (the ``--samples``/``--batch-size`` options)."""
    if samples < 1:
        raise InputError(f"--samples must be >= 1, got {samples}")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
