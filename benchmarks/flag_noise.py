"""Where FLAG's sample noise comes from (issue 16): per-sample structure metrics against steps and sampler order.

    .venv/bin/python benchmarks/flag_noise.py RUN_DIR SECTION [--samples 4] [--steps 2,5,10,20] [--orders 1,2]
        [--out reports/flag_noise.csv] [--data DIR] [--cache DIR]

For a fitted FLAG run and a section with truth (Her2ST layout under ``--data``; use a section the run never
trained on, e.g. a nested inner fold) it draws ``--samples`` probability-flow samples for every
(steps, order) pair and prints one row per setting:

* ``pcc50_1``, ``gsc_1``, ``ssc_1``: the mean over samples of each single sample's PCC-50, GSC and SSC
  (:func:`stgen.evaluation.metrics.evaluate`, log2(count+1));
* ``pcc50_avg``, ``gsc_avg``, ``ssc_avg``: the same for the average of the samples (what ``predict`` returns);
* ``err_corr``: the mean absolute off-diagonal gene-gene correlation of one sample's error (sample - truth),
  beside ``true_corr`` (the same for the truth): errors correlated across genes like the truth means the noise
  follows gene programs; near 0 means independent per-gene noise, which averaging dilutes and which lowers GSC;
* ``noise_sd``: the sd of sample - sample average (target units), the per-sample noise;
* ``x0_pcc50``, ``x0_gsc``: the denoiser's one-call estimate ``D(x_T, sigma_max)`` (the conditional mean the
  network predicts from pure noise, as a regressor would; an ensemble's: the mean of its members').
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from nested import print_row, write_rows


def offdiag_abs_corr(m: np.ndarray) -> float:
    """Mean |Pearson r| over the gene pairs of ``m`` (N, G), constant genes left out."""
    m = m[:, m.std(0) > 1e-8]
    c = np.corrcoef(m.T)
    return float(np.abs(c[~np.eye(len(c), dtype=bool)]).mean())


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("section")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", default="2,5,10,20")
    ap.add_argument("--orders", default="1,2")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from stgen.data.her2st import read_section
    from stgen.evaluation.metrics import evaluate
    from stgen.models.base import SectionInput
    from stgen.models.flag.model import graph_builder, image_inputs
    from stgen.models.flag.network import member_networks
    from stgen.workflows.analysis import section_truth
    from stgen.workflows.inputs import section_features
    from stgen.workflows.paths import default_cache_dir, default_data_dir
    from stgen.workflows.rundir import load_run

    torch.set_num_threads(2)
    run = load_run(args.run_dir)
    adata = read_section(Path(args.data or default_data_dir()), args.section, require_image=True)
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    feats = section_features(adata, run.cfg, Path(args.cache or default_cache_dir()), progress=False)
    truth, _ = section_truth(adata, list(run.panel), run.meta.get("units", "log2"))
    genes = list(run.panel)
    net = run.model.net.eval()
    graph = graph_builder(run.model.meta)(xy, feats)
    f = torch.as_tensor(image_inputs(SectionInput(args.section, xy, feats), net.config.context_radii),
                        dtype=torch.float32)

    def score(pred):
        m = evaluate(pred, truth, genes, coords=xy)
        return m["pcc50"], m["gsc"], m["ssc"]

    with torch.no_grad():
        noise = torch.randn(len(f), len(genes), generator=torch.Generator().manual_seed(0))
        x0 = net.denormalise(torch.stack([m(noise * net.sde.sigma_max, net.sde.sigma_max, f, graph)
                                          for m in member_networks(net)]).mean(0)).numpy()  # members' mean
    x0_scores = score(x0)
    rows = []
    for order in [int(o) for o in args.orders.split(",")]:
        for steps in [int(s) for s in args.steps.split(",")]:
            t0 = time.perf_counter()
            nets = member_networks(net)  # an ensemble's members in turn, as predict samples them
            samples = [nets[s % len(nets)].generate(f, graph, n_samples=1, steps=steps, order=order,
                                                    generator=torch.Generator().manual_seed(s))[0].numpy()
                       for s in range(args.samples)]
            dt = time.perf_counter() - t0
            avg = np.mean(samples, 0)
            single = np.array([score(s) for s in samples])
            row = {"order": order, "steps": steps, "samples": args.samples,
                   **dict(zip(("pcc50_1", "gsc_1", "ssc_1"), single.mean(0).tolist())),
                   **dict(zip(("pcc50_avg", "gsc_avg", "ssc_avg"), score(avg))),
                   "err_corr": float(np.mean([offdiag_abs_corr(s - truth) for s in samples])),
                   "true_corr": offdiag_abs_corr(truth),
                   "noise_sd": float(np.std(np.array(samples) - avg)),
                   "x0_pcc50": x0_scores[0], "x0_gsc": x0_scores[1], "x0_ssc": x0_scores[2],
                   "s_per_sample": dt / args.samples}
            rows.append(row)
            print_row(row)
    return write_rows(rows, args.out)


if __name__ == "__main__":
    main()
