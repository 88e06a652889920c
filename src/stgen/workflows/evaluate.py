"""Scoring a prediction against its truth (PCC-50/200, MSE, MAE, GSC, SSC, RVD, SSIM; downstream checks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import anndata as ad
import numpy as np
import pandas as pd
from stgen.data.her2st import read_counts
from stgen.data.common import _anndata_counts, read_anndata
from stgen.data.targets import transform_counts
from stgen.errors import InputError
from stgen.utils.io import write_json
from stgen.evaluation.metrics import align_prediction_to_truth, evaluate_section, prediction_coords, prediction_sd
from stgen.workflows.inputs import _check_folder


def load_truth(path: str | Path, units: str) -> ad.AnnData:
    """Ground truth in target ``units``: a Her2ST counts table or an .h5ad of raw counts."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"truth file {path} does not exist")
    truth = read_anndata(path, "truth file") if path.suffix == ".h5ad" else read_counts(path)
    return truth_in_units(truth, units, str(path))


def truth_in_units(counts: ad.AnnData, units: str, where: str = "truth") -> ad.AnnData:
    """A raw-count AnnData (``layers['counts']`` when present, else ``.X``) as a truth in target ``units``
    (e.g. log2(count+1)), spots kept; genes resolved to symbols as the readers resolve them (scanpy's
    ``var_names_make_unique`` suffixes summed back, Ensembl ids through a ``var`` symbol column:
    :func:`stgen.data.genes.resolve_gene_names`). InputError naming ``where`` for counts that are not raw."""
    raw, genes = _anndata_counts(counts, where)  # gene names resolved as the readers resolve them
    return ad.AnnData(X=transform_counts(raw, units), obs=pd.DataFrame(index=counts.obs_names),
                      var=pd.DataFrame(index=pd.Index(genes)))


@dataclass
class Scored:
    """A prediction aligned to its truth: ``pred``/``true`` (N, G) over common ``spots`` x ``genes``."""

    metrics: dict
    pred: np.ndarray
    true: np.ndarray
    genes: list[str]
    spots: list[str]


def score_prediction(pred: ad.AnnData, truth: ad.AnnData, label: str, k: int = 8) -> Scored:
    """Align a prediction to the truth (same units) and compute the metrics.

    The metrics are those of :func:`stgen.evaluation.metrics.evaluate` with the scored
    spots' ``obsm['spatial']`` as coordinates, so they always include ``ssc``,
    ``ssim`` and ``rvd`` (and ``per_gene_r``). Without ``obsm['spatial']``,
    ``ssc`` and ``ssim`` are NaN; ``coverage_90`` and ``width_90`` score ``layers['std']`` (NaN without it
    or where it is zero); with fewer than ``k + 1`` scored spots ``ssc``
    is NaN and a warning is logged (:func:`stgen.evaluation.metrics.evaluate_section`).
    ``label`` (e.g. the two file names) prefixes any InputError, such as panel
    genes missing from the truth or no common spots.
    """
    try:
        p, t, genes, spots = align_prediction_to_truth(pred, truth)
        coords = prediction_coords(pred, spots)
        metrics = evaluate_section(p, t, genes, coords=coords, k=k, label=label, sd=prediction_sd(pred, spots))
        if coords is None:
            metrics.update(ssc=float("nan"), ssim=float("nan"))
        return Scored(metrics, p, t, genes, spots)
    except InputError as e:
        raise InputError(f"{label}: {e}") from e


def evaluate_prediction(pred_path: str | Path, truth_path: str | Path, out: str | Path | None = None,
                        downstream_dir: str | Path | None = None) -> dict:
    """The metrics of :func:`score_prediction` (PCC-50, PCC-200, MSE, MAE, GSC, SSC, RVD, SSIM, per-gene r)
    of a prediction file against a truth file, written to ``out`` (JSON) if given.

    With ``downstream_dir``, :func:`stgen.evaluation.downstream.run_downstream` also runs (Leiden domains ARI/NMI,
    DEG top-20/50 overlap; ``morans_scatter.png`` and ``coexpression.png`` into that folder) and its
    numbers go under ``"downstream"``.
    """
    pred_path = Path(pred_path)
    if not pred_path.is_file():
        raise InputError(f"prediction file {pred_path} does not exist")
    _check_folder(downstream_dir, "--downstream-dir")
    pred = read_anndata(pred_path, "prediction file")
    info = pred.uns.get("stgen")
    info = info if isinstance(info, dict) else {}
    units = info.get("units", "log2")
    truth = load_truth(truth_path, units)
    label = f"{pred_path} vs {truth_path}"
    metrics = score_prediction(pred, truth, label).metrics
    metrics.update(units=units, prediction=str(pred_path), truth=str(truth_path), model=info.get("model"))
    if downstream_dir is not None:
        from stgen.evaluation.downstream import run_downstream

        try:
            metrics["downstream"] = run_downstream(pred, truth, out_dir=downstream_dir)
        except InputError as e:
            raise InputError(f"{label}: {e}") from e
    if out is not None:
        write_json(out, metrics)
    return metrics
