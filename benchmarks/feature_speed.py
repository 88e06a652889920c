"""Where feature extraction spends its time, and ONNX Runtime against torch for EfficientNet-Lite0, in one run.

    python benchmarks/feature_speed.py [--section C2] [--n 320] [--batch 32] [--threads 2]

On one Her2ST section (``../shared/data/her2st`` or ``$STGEN_DATA``) it times, for ``--n`` spots:
JPEG decode (once per section), patch cutting, and the encoder (resize + normalise + network) on the torch
path and on the ONNX Runtime path, and prints patches/s of the whole extraction on each, their ratio and the
largest absolute difference of the features. Nothing is cached: every number is measured here.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--section", default="C2")
    ap.add_argument("--n", type=int, default=320)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from stgen.data.her2st import read_section
    from stgen.features import efficientnet
    from stgen.image.slide import open_slide
    from stgen.workflows.paths import default_data_dir

    a = read_section(default_data_dir(), args.section, require_image=True)
    xy = a.obsm["spatial"][: args.n]
    n = len(xy)
    t0 = time.perf_counter()
    slide = open_slide(a.uns["stgen"]["image_path"])
    t_decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    patches = [slide.read_patches(xy[s:s + args.batch], 224) for s in range(0, n, args.batch)]
    t_cut = time.perf_counter() - t0

    os.environ["STGEN_ONNX"] = "0"
    torch_enc = efficientnet.EfficientNetLite0Encoder()
    os.environ["STGEN_ONNX"] = "1"
    t0 = time.perf_counter()
    ort_enc = efficientnet.EfficientNetLite0Encoder()
    t_export = time.perf_counter() - t0
    assert torch_enc.backend == "torch" and ort_enc.backend == "onnxruntime", (torch_enc.backend, ort_enc.backend)

    def run(enc):
        out = []
        t = time.perf_counter()
        with torch.no_grad():
            for p in patches:
                x = torch.from_numpy(p).permute(0, 3, 1, 2).float().div_(255.0)
                out.append(enc(x).numpy())
        return np.concatenate(out), time.perf_counter() - t

    run(torch_enc), run(ort_enc)  # warm-up (allocator, thread pools)
    f_torch, t_torch = run(torch_enc)
    f_ort, t_ort = run(ort_enc)
    diff = float(np.abs(f_torch - f_ort).max())
    whole_torch = n / (t_decode + t_cut + t_torch)
    whole_ort = n / (t_decode + t_cut + t_ort)
    print(f"section {args.section}: {n} patches of 224 px, batch {args.batch}, {args.threads} threads")
    print(f"  JPEG decode      {t_decode:7.2f} s (once per section)")
    print(f"  patch cutting    {t_cut:7.2f} s  ({n / t_cut:8.1f} patches/s)")
    print(f"  encoder torch    {t_torch:7.2f} s  ({n / t_torch:8.1f} patches/s)")
    print(f"  encoder ORT      {t_ort:7.2f} s  ({n / t_ort:8.1f} patches/s)  export/load {t_export:.1f} s (once)")
    print(f"  whole extraction torch {whole_torch:.1f} patches/s, ORT {whole_ort:.1f} patches/s: "
          f"{whole_ort / whole_torch:.2f}x; encoder alone {t_torch / t_ort:.2f}x")
    print(f"  max |features torch - ORT| = {diff:.2e}")


if __name__ == "__main__":
    main()
