"""The Python API for notebooks: read -> fit -> predict -> evaluate, mirroring ``stgen fit|predict|evaluate``.

Each function is a thin layer over the workflow the CLI runs (same defaults, errors and files)::

    import stgen
    sections = stgen.read("../shared/data/her2st")           # list[AnnData], one per section
    run = stgen.fit("../shared/data/her2st", test_section="C2", model="hinge", out="runs/C2_hinge")
    pred = stgen.predict(run, image=".../C2.jpg", spots=".../C2_selection.tsv")
    print(stgen.evaluate(pred, "../shared/data/her2st/ST-cnts/C2.tsv.gz")["pcc50"])

Units: predictions and truths are compared in the run's target units (log2(count+1) by default);
``obsm['spatial']`` holds full-resolution pixel (x, y); every user error is an
:class:`~stgen.errors.InputError` naming the bad file or value.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import anndata as ad
import numpy as np

from stgen.data.dataset import Dataset, as_dataset
from stgen.errors import InputError
from stgen.training.trainer import is_launch_zero
from stgen.workflows.config import StgenConfig
from stgen.workflows.evaluate import load_truth, score_prediction, truth_in_units
from stgen.workflows.fit import fit as _fit
from stgen.workflows.predict import predict as _predict
from stgen.workflows.rundir import TrainedRun, load_run

Run = TrainedRun  #: a fitted run (RUN_DIR loaded): ``.meta``, ``.cfg``, ``.model``, ``.panel``, ``.run_dir``


def read(path: str | Path | Dataset, sections: Sequence[str] | None = None, format: str | None = None,
         require_image: bool = False) -> list[ad.AnnData]:
    """The sections of a data-set folder as AnnData, one per section.

    ``path``: a Her2ST, HEST-1k, Space Ranger or ``<section>.h5ad`` folder (``format`` names it, else it is
    detected). Each AnnData has raw counts in ``.X`` (spots x genes, gene symbols in ``var_names``),
    ``obsm['spatial']`` (full-resolution pixel x, y) and ``uns['stgen']`` (section, image path, mpp, grid).
    ``sections`` picks some (default: all, sorted); ``require_image`` refuses sections without an H&E image.
    InputError for an unreadable folder or an unknown section.
    """
    ds = as_dataset(path, format)
    names = list(sections) if sections is not None else ds.sections()
    return [ds.read(s, require_image=require_image) for s in names]


def _config(config: StgenConfig | dict | str | Path | None) -> StgenConfig:
    if config is None or isinstance(config, StgenConfig):
        return config or StgenConfig()
    if isinstance(config, dict):
        return StgenConfig.from_dict(config, source="config")
    return StgenConfig.load(config)


def fit(data: str | Path | Dataset, test_section: str, model: str = "hinge", out: str | Path | None = None,
        config: StgenConfig | dict | str | Path | None = None, cache_dir: str | Path | None = None,
        progress: bool = True, **options: Any) -> TrainedRun | None:
    """Train ``model`` on every imaged section of ``data`` except ``test_section``; returns the loaded run.

    ``out`` is the RUN_DIR (default ``runs/<test_section>_<model>``); ``config`` a :class:`StgenConfig`, a
    dict of YAML sections (``{"hinge": {"max_epochs": 10}}``) or a YAML file. ``options`` go to
    :func:`stgen.workflows.fit.fit` (``resume``, ``accelerator``, ``devices``, ``data_format``, ...).
    An existing RUN_DIR at ``out`` is refitted and replaced, as by ``stgen fit``; with ``resume=True`` an
    interrupted fit continues and a finished one of the same configuration is returned as it is.
    Under a multi-process launch (``devices`` > 1) only global rank 0 writes RUN_DIR; the other processes
    return None.
    """
    out = Path(out) if out is not None else Path("runs") / f"{test_section}_{model}"
    _fit(data, test_section, out, model=model, cfg=_config(config), cache_dir=cache_dir, progress=progress, **options)
    return load_run(out) if is_launch_zero() else None


def predict(run: TrainedRun | str | Path, image: str | Path, spots: str | Path | None = None,
            out: str | Path | None = None, **options: Any) -> ad.AnnData:
    """Predict the run's panel at ``spots`` on ``image`` (or on a bare slide when ``spots`` is None).

    Returns the AnnData of ``stgen predict``: ``.X`` the mean prediction (target units), ``layers['std']``
    the per-spot sample sd, ``obsm['spatial']``, ``uns['spatial']`` (thumbnail + scale factors for
    ``scanpy.pl.spatial``) and ``uns['stgen']`` provenance. It is also written to ``out`` (.h5ad) when given.
    ``options`` go to :func:`stgen.workflows.predict.predict` (``samples``, ``steps``, ``seed``, ``mpp``,
    ``device``, ``maps_dir``, ...).
    """
    run_dir = run.run_dir if isinstance(run, TrainedRun) else Path(run)
    if run_dir is None:
        raise InputError("predict needs a run loaded from a RUN_DIR (stgen.fit or stgen.workflows.rundir.load_run)")
    if out is not None:
        return _predict(run_dir, image, spots, out, **options)
    with tempfile.TemporaryDirectory(prefix="stgen-predict-") as tmp:
        pred = _predict(run_dir, image, spots, Path(tmp) / "prediction.h5ad", **options)
        return pred.to_memory() if pred.isbacked else pred


def _truth(truth: ad.AnnData | str | Path, units: str) -> ad.AnnData:
    if isinstance(truth, ad.AnnData):  # raw counts, as stgen.read returns them
        return truth_in_units(truth, units)
    return load_truth(truth, units)


def evaluate(pred: ad.AnnData | str | Path, truth: ad.AnnData | str | Path) -> dict:
    """PCC-50, PCC-200, MSE, MAE, GSC, SSC, RVD, SSIM and per-gene r of a prediction against its truth.

    ``pred``: an AnnData from :func:`predict` (or its .h5ad); ``truth``: raw counts as an AnnData (e.g. from
    :func:`read`), a Her2ST counts table or an .h5ad. Both are aligned on common spots and the prediction's
    panel, in the prediction's units (``uns['stgen']['units']``). InputError when they share no spots or
    panel genes are missing from the truth.
    """
    if not isinstance(pred, ad.AnnData):
        from stgen.data.common import read_anndata

        pred = read_anndata(Path(pred), "prediction file")
    info = pred.uns.get("stgen") if isinstance(pred.uns.get("stgen"), dict) else {}
    units = info.get("units", "log2")
    metrics = score_prediction(pred, _truth(truth, units), "prediction vs truth").metrics
    metrics.update(units=units, model=info.get("model"))
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in metrics.items()}


__all__ = ["read", "fit", "predict", "evaluate", "Run"]
