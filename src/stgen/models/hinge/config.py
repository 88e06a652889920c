"""HINGE's hyper-parameters (YAML section ``hinge``): adapter architecture, masked diffusion, training, sampler.

One dataclass, :class:`HingeConfig`; :meth:`HingeConfig.architecture` is the part a trained run needs to
rebuild its network (``run.json['hinge']['config']``). Defaults follow HINGE Supp. A.3/A.6 except the
learning rate (see ``lr``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from stgen.errors import InputError
from stgen.utils.config import coerce_numbers

ADAPTATIONS = ("hinge", "scratch", "decoder_tune", "lora")
OBJECTIVES = ("mask", "gauss")
#: the fields that define the adapter network (stored in run.json; the rest is training and sampling)
ARCH_FIELDS = ("cond_dim", "time_dim", "soft_norm", "identity_init", "gate", "adaptation", "lora_rank",
               "lora_alpha", "objective")


@dataclass
class HingeConfig:
    """HINGE adapter, masked diffusion, training (HINGE Supp. A.6) and sampler.

    Architecture (:data:`ARCH_FIELDS`): ``cond_dim``, ``time_dim`` are the widths of ``c_t`` and of the
    timestep embedding ``e_t``; ``soft_norm`` SoftNorm with learned ``eta`` (False: fixed at 1);
    ``identity_init`` zero-initialised SoftAdaLN heads; ``gate`` the SoftAdaLN output gate ``tau(c)``;
    ``adaptation`` ``hinge`` | ``scratch`` | ``decoder_tune`` | ``lora``; ``lora_rank``, ``lora_alpha``
    (update x ``alpha / r``, with ``adaptation="lora"``); ``objective`` ``mask`` (masked diffusion) |
    ``gauss`` (Gaussian diffusion).

    Raises InputError naming the bad value of an unknown ``adaptation`` or ``objective``, a LoRA rank < 1
    or a field that is not a number where one is expected.
    """

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
    # ablation switches (HINGE Supp. Tables S2-S4; named overrides in stgen.workflows.ablation); defaults = HINGE
    adaptation: str = "hinge"  # hinge | scratch | decoder_tune | lora (backbone adaptation)
    lora_rank: int = 8  # LoRA rank r (adaptation: lora)
    lora_alpha: float = 8.0  # LoRA update scale alpha / r (adaptation: lora)
    objective: str = "mask"  # mask (masked diffusion) | gauss (Gaussian diffusion, x0-prediction, DDIM)
    mask_ratio: str = "schedule"  # schedule: t ~ U{1..T}, ratio 1 - alpha_bar(t) | uniform: ratio ~ U(0, 1), t nearest
    soft_norm: bool = True  # SoftNorm with learned eta (False: eta fixed at 1, plain LayerNorm)
    identity_init: bool = True  # zero-initialised SoftAdaLN heads (False: PyTorch default init)
    gate: bool = True  # SoftAdaLN output gate tau(c) (False: no gate)

    def __post_init__(self) -> None:
        coerce_numbers(self, "hinge")
        if self.adaptation not in ADAPTATIONS:
            raise InputError(f"unknown HINGE adaptation {self.adaptation!r}; choose one of {ADAPTATIONS}")
        if self.objective not in OBJECTIVES:
            raise InputError(f"unknown HINGE objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.adaptation == "lora" and (not isinstance(self.lora_rank, int) or self.lora_rank < 1):
            raise InputError(f"lora_rank must be an integer >= 1, got {self.lora_rank!r}")

    def architecture(self) -> dict:
        """The network-defining fields (:data:`ARCH_FIELDS`) as a dict, as stored in ``run.json``."""
        return {k: getattr(self, k) for k in ARCH_FIELDS}

    @classmethod
    def from_architecture(cls, arch: dict) -> "HingeConfig":
        """A config with a stored :meth:`architecture` (other fields at their defaults)."""
        unknown = set(arch) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown HINGE architecture field(s) {sorted(unknown)}")
        return cls(**arch)
