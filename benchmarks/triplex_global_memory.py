"""TRIPLEX's global view at inference: time and peak memory against the number of spots.

Each measurement runs in a fresh child process (``ru_maxrss`` of the child alone): the default network
(width 128, 5 global layers) encodes one synthetic section of N spots on a square lattice, with 1280-d
features (EfficientNet-Lite0's width). The reference is the same network with attention computed the naive
way (the full N x N score matrix), measured in the same run.

    .venv/bin/python benchmarks/triplex_global_memory.py --spots 1000,5000,20000

Prints one row per (N, attention): seconds, peak RSS (MiB) and the growth exponents of time and memory.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
import torch.nn.functional as F
from stgen.models.triplex.config import TriplexConfig
from stgen.models.triplex.model import section_pitch, spot_lattice
from stgen.models.triplex.network import TriplexNet
n, naive = int(sys.argv[1]), sys.argv[2] == "naive"
if naive:
    def sdpa(q, k, v, dropout_p=0.0):
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
    F.scaled_dot_product_attention = sdpa
torch.manual_seed(0)
side = int(np.ceil(np.sqrt(n)))
xy = (np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] * 290.0).astype(np.float64)
feats = torch.randn(n, 1280)
lat = torch.from_numpy(spot_lattice(xy, section_pitch(xy, 224)))
net = TriplexNet(1280, 250, TriplexConfig()).eval()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
with torch.no_grad():
    g = net.encode_global(feats, lat)
dt = time.perf_counter() - t
assert g.shape == (n, 128) and torch.isfinite(g).all()
print(json.dumps({"seconds": dt, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "before_mib": base / 1024}))
"""


def measure(n: int, mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(n), mode], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spots", default="1000,5000,20000")
    ap.add_argument("--naive-max", type=int, default=20000, help="largest N for the naive reference")
    args = ap.parse_args()
    ns = [int(s) for s in args.spots.split(",")]
    rows = {}
    print(f"{'spots':>7} {'attention':>9} {'seconds':>8} {'peak MiB':>9}")
    for mode in ("sdpa", "naive"):
        for n in ns:
            if mode == "naive" and n > args.naive_max:
                continue
            t0 = time.perf_counter()
            m = measure(n, mode)
            rows[(mode, n)] = m
            if "error" in m:
                print(f"{n:>7} {mode:>9} failed: {m['error']}")
            else:
                print(f"{n:>7} {mode:>9} {m['seconds']:>8.2f} {m['peak_mib']:>9.0f}   (child wall {time.perf_counter() - t0:.1f} s)")
    for mode in ("sdpa", "naive"):
        ok = [(n, rows[(mode, n)]) for n in ns if (mode, n) in rows and "error" not in rows[(mode, n)]]
        if len(ok) >= 2:
            (n0, a), (n1, b) = ok[0], ok[-1]
            et = math.log(b["seconds"] / a["seconds"]) / math.log(n1 / n0)
            em = math.log(max(b["peak_mib"] - b["before_mib"], 1.0) / max(a["peak_mib"] - a["before_mib"], 1.0)) / math.log(n1 / n0)
            print(f"{mode}: growth exponent {n0} -> {n1} spots: time {et:.2f}, memory above the idle process {em:.2f}")
    print(f"(parent peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
