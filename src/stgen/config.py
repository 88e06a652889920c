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
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from stgen.errors import InputError

if TYPE_CHECKING:  # the benchmark models own their hyper-parameter dataclasses
    from stgen.models.bleep import BLEEPConfig
    from stgen.models.hifusion import HiFusionConfig
    from stgen.models.stem import StemConfig
    from stgen.models.stflow import STFlowConfig
    from stgen.models.stnet import STNetConfig


def coerce_numbers(cfg: object, section: str) -> None:
    """Convert a config dataclass's numeric fields in place (YAML gives ``1e-3`` as a string).

    A field whose default is a float becomes ``float``; one whose default is an
    int must hold a whole number and becomes ``int``; InputError (a
    ValueError) naming ``section.field`` otherwise (a bool is not a number
    here). Fields with a bool default are left alone.
    """
    for f in fields(cfg):
        v, d = getattr(cfg, f.name), f.default
        if v is None or isinstance(d, bool) or not isinstance(d, (int, float)):
            continue
        try:
            if isinstance(v, bool):  # YAML true/false in a numeric field is a mistake, not 1/0
                raise TypeError
            x = float(v)
        except (TypeError, ValueError):
            raise InputError(f"{section}.{f.name} must be a number, got {v!r}") from None
        if not math.isfinite(x):
            raise InputError(f"{section}.{f.name} must be finite, got {v!r}")
        if isinstance(d, int):
            if x != int(x):
                raise InputError(f"{section}.{f.name} must be a whole number, got {v!r}")
            x = int(x)
        setattr(cfg, f.name, x)



def check_ranges(cfg: object, section: str, *, at_least_1: tuple[str, ...] = (), at_least_0: tuple[str, ...] = (),
                 positive: tuple[str, ...] = (), fraction: tuple[str, ...] = ()) -> None:
    """InputError naming ``section.field`` for the first field out of its range: ``at_least_1`` >= 1,
    ``at_least_0`` >= 0, ``positive`` > 0, ``fraction`` in [0, 1) (NaN is out of every range).
    Used by the config dataclasses' ``__post_init__`` after :func:`coerce_numbers`."""
    for names, ok, rule in ((at_least_1, lambda v: v >= 1, ">= 1"), (at_least_0, lambda v: v >= 0, ">= 0"),
                            (positive, lambda v: v > 0, "> 0"), (fraction, lambda v: 0 <= v < 1, "in [0, 1)")):
        for name in names:
            v = getattr(cfg, name)
            if not ok(v):
                raise InputError(f"{section}.{name} must be {rule}, got {v!r}")


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
    # concatenate features (e.g. uni:A+conch:B, 1536-d); see stgen.encoders
    encoder: str = "efficientnet-lite0"
    patch_px: int = 224  # square patch side, full-resolution pixels (~154 um on Her2ST at 0.688 um/px)
    # patch side in microns: each section's patch is patch_um / mpp pixels (sections scanned at other
    # resolutions); None = patch_px pixels everywhere (predict still converts by the slide's mpp)
    patch_um: float | None = None
    tta: bool = False  # mean over the 8 flips/rot90
    batch_size: int = 32


@dataclass
class PretrainConfig:
    """Masked auto-encoding pre-training of the embedded expression backbone."""

    corpus: list[str] | None = None  # default: all Her2ST sections except the imaged (evaluated) ones
    n_genes: int | None = None  # backbone vocabulary cap (top by corpus mean); None = every corpus gene in CellFM's vocabulary
    genes_per_step: int = 256  # gene subset per step, drawn with probability ~ corpus mean + 10% of its average
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 8
    value_bins: int = 64
    epochs: int = 10  # ~1,900 optimizer steps on the 12,427 corpus spots (3 epochs left gene-gene coupling weak)
    batch_size: int = 64
    lr: float = 1e-3
    min_mask: float = 0.1
    max_mask: float = 1.0  # up to fully masked spots: HINGE's sampler starts there
    seed: int = 42


@dataclass
class HingeTrainConfig:
    """HINGE adapter, masked diffusion and training (HINGE Supp. A.6)."""

    T: int = 50
    schedule: str = "power"
    zeta: float | None = None  # None: log_T G
    cond_dim: int = 256
    time_dim: int = 128
    lr: float = 5e-4  # A.6 says 1e-4 for ~16x more steps per epoch; 5e-4 gives lower validation MSE on all 5 folds here
    weight_decay: float = 0.0
    batch_size: int = 32
    milestones: list[int] = field(default_factory=lambda: [20, 30])
    gamma: float = 0.2
    max_epochs: int = 50
    patience: int = 5
    es_warmup: int = 15  # early stopping only after this many epochs
    curriculum_epochs: int = 5
    curriculum_max_ratio: float = 0.2
    val_fraction: float = 0.1
    val_steps: int = 5  # sampler steps used for the validation MSE
    steps: int = 5  # default inference budget K
    samples: int = 10  # default number of averaged samples
    seed: int = 42
    backbone: str = "default"  # default | cellfm:PATH.safetensors (from `stgen convert cellfm`) | scgpt:MODEL_DIR
    precision: str = "32-true"  # Lightning precision for training, e.g. bf16-mixed (also used to sample)
    sample_batch_size: int = 64  # spots x samples per sampler batch
    # ablation switches (HINGE Supp. Tables S2-S4; named overrides in stgen.ablation); defaults = HINGE
    adaptation: str = "hinge"  # hinge | scratch | decoder_tune | lora (backbone adaptation)
    lora_rank: int = 8  # LoRA rank r (adaptation: lora)
    lora_alpha: float = 8.0  # LoRA update scale alpha / r (adaptation: lora)
    objective: str = "mask"  # mask (masked diffusion) | gauss (Gaussian diffusion, x0-prediction, DDIM)
    mask_ratio: str = "schedule"  # schedule: t ~ U{1..T}, ratio 1 - alpha_bar(t) | uniform: ratio ~ U(0, 1), t nearest
    soft_norm: bool = True  # SoftNorm with learned eta (False: eta fixed at 1, plain LayerNorm)
    identity_init: bool = True  # zero-initialised SoftAdaLN heads (False: PyTorch default init)
    gate: bool = True  # SoftAdaLN output gate tau(c) (False: no gate)


@dataclass
class RidgeConfig:
    n_components: int = 256


@dataclass
class FlagTrainConfig:
    """FLAG model, VE-SDE and training (FLAG Sec. 3.4-3.6, App. G, Table 5).

    The architecture is much smaller than Table 5 (graph 6 x 384, DiT 12 x 384)
    so that one Her2ST fold (~2,000 training spots, 300 genes) trains in ~5 min
    and a ~600-spot section predicts in ~1 min on a 2-core CPU: DiT attention
    over 300 gene tokens dominates the cost, so the DiT is 2 blocks x 32 wide
    with 2 heads (fewer, wider heads run ~3x faster on CPU), and
    steps x samples = 10 x 10 (200 denoiser calls) instead of 18 x 5. Measured
    with one torch thread beside another job (synthetic 4 x 500 spots, 300
    genes, 1280-d features): 0.38-0.42 s per training step (a 128-spot crop),
    6-8 s per validation (2 Euler steps), 0.6-0.8 s per denoiser call on 600
    spots: 3.7-4.2 min of training, ~2-2.5 min to predict a 600-spot section
    (C2, 187 spots: 996 s of training and 44 s for 3 samples, both beside other jobs).
    Training uses random spatially contiguous crops (``crop_spots``) instead of
    whole sections for speed; prediction always runs on whole sections.
    """

    dim: int = 32  # graph-node and gene-token width (Table 5: 384)
    graph_layers: int = 2  # Table 5: 6
    graph_heads: int = 4  # Table 5: 8
    dit_layers: int = 2  # Table 5: 12
    dit_heads: int = 2  # Table 5: 6
    mlp_ratio: float = 2.0  # Table 5: 4.0
    align_layer: int = 1  # DiT block whose tokens are aligned to the GFM (Table 5: 8 of 12)
    dropout: float = 0.0
    knn: int = 32  # graph neighbours per spot, self included (FLAG: dense graph)
    sigma_px: float | None = None  # RBF length scale in pixels; None = features.patch_px (FLAG: 224)
    sigma_min: float = 0.01  # VE-SDE limits (Table 5)
    sigma_max: float = 10.0
    # DSM weight of ||D - x0||^2: edm = (sigma^2 + 1) / sigma^2 (Karras et al., whose VE-SDE FLAG cites) |
    # ve = 1 / sigma^2 (lambda = sigma^2 on the score, Song et al.). With ve the high-noise levels, where the
    # histology decides the sample, get ~1/sigma^2 of the weight: on a synthetic fixture 300 steps of ve left the
    # held-out MSE at the target variance (0.40 -> 0.44), edm reached 0.03 (see stgen.vesde)
    loss_weighting: str = "edm"
    align_weight: float = 0.5  # weight of the GFM alignment loss (0: off)
    lr: float = 2e-3  # constant; Table 5: 1e-4 for far more steps, which barely moves in a 500-step budget
    weight_decay: float = 0.01  # AdamW (Table 5)
    grad_clip: float = 1.0  # gradient-norm clip (Table 5)
    max_steps: int = 500  # optimiser steps, one crop (one noise level) each
    val_every: int = 100  # steps between validations (best-validation weights are kept)
    crop_spots: int = 128  # train on random spatially contiguous crops of at most this many spots (speed)
    val_fraction: float = 0.1  # spots of each training section held out of the loss for validation
    val_steps: int = 2  # Euler (= DDIM) steps of the validation generation (1 sample; Heun needs >= ~6 steps)
    steps: int = 10  # default Heun steps at inference (2 steps denoiser calls per sample)
    samples: int = 10  # averaged samples; on C2 PCC-50 0.475 (1 sample), 0.573 (3), 0.634 (10): FLAG samples are noisy
    seed: int = 42
    precision: str = "32-true"  # Lightning precision for training (also used to sample)


def _model_section(name: str):
    """A config section holding the ``config_cls`` of the benchmark model ``name``
    (:mod:`stgen.models.registry`), imported when a configuration is built."""

    def make():
        from stgen.models.registry import spot_model

        return spot_model(name).config_cls()

    return field(default_factory=make)


@dataclass
class StgenConfig:
    """The whole configuration: one section per concern and one per model.

    A model's section enters only its own config hash except for ``hinge``,
    whose ``seed`` ridge also uses (:func:`stgen.pipeline.config_hash`).
    """

    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    hinge: HingeTrainConfig = field(default_factory=HingeTrainConfig)
    ridge: RidgeConfig = field(default_factory=RidgeConfig)
    flag: FlagTrainConfig = field(default_factory=FlagTrainConfig)
    hifusion: "HiFusionConfig" = _model_section("hifusion")
    stnet: "STNetConfig" = _model_section("stnet")
    bleep: "BLEEPConfig" = _model_section("bleep")
    stem: "StemConfig" = _model_section("stem")
    stflow: "STFlowConfig" = _model_section("stflow")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
