"""Seconds per FLAG training step and per denoiser call for a configuration, and the fit time it implies.

    .venv/bin/python benchmarks/flag_step_time.py [--config configs/flag-paper.yaml] [--steps 5] [--genes 300]
        [--features 1280] [--spots 600] [--crop N] [--device cpu|cuda]

Builds FLAG from the ``flag`` section of ``--config`` (default: the package defaults) with contextual
alignment to a width-128 state (the embedded backbone's), and times, after one warm-up step, ``--steps``
training steps (forward, DSM + alignment loss, backward, AdamW, gradient clipping) on random crops of
``crop_spots`` spots (the config's, or ``--crop``) and ``--steps`` denoiser calls on a whole section of ``--spots`` spots.
Prints the parameter count of one network, s/step of one network, the implied training time of ``max_steps``
steps of every ensemble member (``ensemble x max_steps`` network steps; validation excluded),
the s/call, the implied predict time (order x steps x samples calls) and the peak RSS. Synthetic inputs: the
numbers measure cost, not accuracy.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--genes", type=int, default=300)
    ap.add_argument("--features", type=int, default=1280)
    ap.add_argument("--spots", type=int, default=600)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--crop", type=int, default=None, help="spots per training crop instead of the config's "
                    "crop_spots (the paper size at 512 spots needs more than 24 GB on a CPU)")
    args = ap.parse_args(argv)

    from stgen.models.flag.network import FLAG
    from stgen.nn.graph import build_spot_graph
    from stgen.sampling.vesde import dsm_loss
    from stgen.workflows.config import StgenConfig

    cfg = (StgenConfig.load(args.config) if args.config else StgenConfig()).flag
    if args.crop:
        cfg.crop_spots = int(args.crop)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    net = FLAG(cfg, args.genes, args.features, align_dim=128).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(max(cfg.crop_spots, args.spots))))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2) * 200.0

    def inputs(n):
        xy, f = grid[:n], rng.normal(size=(n, args.features)).astype(np.float32)
        return (torch.as_tensor(f, device=dev), build_spot_graph(xy, f, k=cfg.knn).to(dev),
                torch.randn(n, args.genes, device=dev))

    feats, graph, x0 = inputs(cfg.crop_spots)
    genes = torch.arange(args.genes, device=dev)
    targets = torch.randn(cfg.crop_spots, args.genes, 128, device=dev)

    def step():
        sigma = net.sde.sample_sigma(device=dev)
        d, h = net(x0 + sigma * torch.randn_like(x0), sigma, feats, graph, return_align=True)
        loss = dsm_loss(d, x0, sigma, net.sde) + cfg.align_weight * net.align_loss(h, targets=targets, genes=genes)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    per_step = (time.perf_counter() - t0) / args.steps
    feats, graph, x = inputs(args.spots)
    net.eval()
    with torch.no_grad():
        net(x, 1.0, feats, graph)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            net(x, 1.0, feats, graph)
        sync()
    per_call = (time.perf_counter() - t0) / args.steps
    n_par = sum(p.numel() for p in net.parameters())
    calls = cfg.order * cfg.steps * cfg.samples  # Heun: two calls a step (the last one), Euler one
    member_steps = cfg.ensemble * cfg.max_steps  # an ensemble trains every member on every step
    print(f"config={args.config or 'defaults'}  device={dev}  threads={torch.get_num_threads()}  "
          f"params={n_par / 1e6:.2f}M x {cfg.ensemble} members  crop_spots={cfg.crop_spots}  "
          f"s_per_step={per_step:.3f}  train_{cfg.ensemble}x{cfg.max_steps}_steps_min="
          f"{per_step * member_steps / 60:.1f}  s_per_call_{args.spots}_spots={per_call:.3f}  "
          f"predict_{calls}_calls_s={per_call * calls:.1f}  "
          f"peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}", flush=True)


if __name__ == "__main__":
    main()
