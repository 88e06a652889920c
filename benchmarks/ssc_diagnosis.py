"""Why a prediction's SSC is low or negative (issue 16): what its per-gene Moran's I ranks, section by section.

    .venv/bin/python benchmarks/ssc_diagnosis.py reports/issue16/five/preds --models flag,ridge \\
        [--sections B4,C2,C3,C4,C5] [--out reports/issue16/ssc_diagnosis.csv] [--data DIR]

Reads the predictions a benchmark wrote (``PREDS/<model>/<section>.h5ad``, ``.X`` in log2(count+1)) and the
truth of the same spots (Her2ST layout under ``--data``) and prints per section and model:

* ``ssc``: SSC as FLAG defines it (of any model's prediction), the Pearson r across genes of predicted and true
  Moran's I on the 8-NN spot graph (:func:`stgen.evaluation.spatial.morans_i_pair`);
* ``i_pred_mean``/``i_pred_sd`` and ``i_true_mean``/``i_true_sd``: the mean and spread across genes of Moran's I.
  A spread much smaller than the truth's means every predicted gene has about the same spatial smoothness, so
  SSC correlates small differences;
* ``r_true_i_level``: r across genes of the true Moran's I with the gene's mean level (low counts are noisier,
  so spatially rougher); ``r_pred_i_level`` the same for the prediction;
* ``r_pred_i_pcc``: r across genes of the predicted Moran's I with the gene's Pearson r against the truth;
* ``pc1_pred``/``pc1_true``: the share of the per-gene standardised variance in the first principal component
  (how close to one shared spatial pattern the matrix is).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from nested import print_row, write_rows


def _pc1_share(m: np.ndarray) -> float:
    """Share of the variance of the standardised non-constant columns of ``m`` (N, G) in its first component."""
    from stgen.evaluation.basics import _standardised_columns

    z, const = _standardised_columns(m)
    s = np.linalg.svd(z[:, ~const], compute_uv=False) ** 2
    return float(s[0] / s.sum())


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preds", type=Path, help="a benchmark's preds folder (PREDS/<model>/<section>.h5ad)")
    ap.add_argument("--models", default="flag,ridge")
    ap.add_argument("--sections", default="B4,C2,C3,C4,C5")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=None)
    args = ap.parse_args(argv)

    import anndata as ad

    from stgen.data.her2st import read_section
    from stgen.evaluation.basics import _finite_pair_correlation as _r
    from stgen.evaluation.basics import pearson_per_gene
    from stgen.evaluation.spatial import morans_i_pair
    from stgen.workflows.analysis import section_truth
    from stgen.workflows.paths import default_data_dir

    rows = []
    for section in args.sections.split(","):
        adata = read_section(Path(args.data or default_data_dir()), section, require_image=False)
        known = set(adata.obs_names)
        for model in args.models.split(","):
            pred = ad.read_h5ad(args.preds / model / f"{section}.h5ad")
            spots = [o for o in pred.obs_names if o in known]
            sub = adata[spots]
            truth, _ = section_truth(sub, list(pred.var_names), "log2")
            p = np.asarray(pred[spots].X, dtype=np.float64)
            i_pred, i_true = morans_i_pair(p, truth, np.asarray(sub.obsm["spatial"], dtype=np.float64), 8)
            level = truth.mean(0)
            row = {"section": section, "model": model, "ssc": _r(i_pred, i_true),
                   "i_pred_mean": float(np.nanmean(i_pred)), "i_pred_sd": float(np.nanstd(i_pred)),
                   "i_true_mean": float(np.nanmean(i_true)), "i_true_sd": float(np.nanstd(i_true)),
                   "r_true_i_level": _r(i_true, level), "r_pred_i_level": _r(i_pred, level),
                   "r_pred_i_pcc": _r(i_pred, pearson_per_gene(p, truth)),
                   "pc1_pred": _pc1_share(p), "pc1_true": _pc1_share(truth)}
            rows.append(row)
            print_row(row)
    return write_rows(rows, args.out)


if __name__ == "__main__":
    main()
