"""Fitting a model: sections -> HMHVG panel -> (backbone) -> features -> SpotModel.fit -> RUN_DIR.

A *run directory* (``stgen fit --out RUN_DIR``) holds everything ``predict``
needs, written atomically (a failed fit leaves no RUN_DIR behind):

* ``run.json`` - model kind, target units, gene panel, feature settings,
  backbone/HINGE configs, training history and timings;
* ``config.yaml`` - the full resolved configuration;
* ``model.safetensors`` (HINGE: adapter + frozen default backbone; with an
  external ``cellfm:``/``scgpt:`` backbone the adapter only, the backbone's path
  and SHA-256 being in ``run.json``; FLAG: the whole model, including its
  normalisation statistics and the frozen GFM gene embeddings) or ``ridge.npz``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch
import yaml

from stgen import __version__
from stgen.backbones.external import genes_in_vocabulary, load_external_backbone, parse_backbone_spec
from stgen.backbones.pretrain import get_backbone
from stgen.data.common import section_image
from stgen.data.dataset import as_dataset
from stgen.data.panel import load_vocabulary, select_hmhvg
from stgen.data.targets import transform_counts
from stgen.errors import InputError
from stgen.models.base import FitContext, SectionInput
from stgen.models.registry import spot_model
from stgen.utils.io import write_json
from stgen.workflows.config import StgenConfig
from stgen.workflows.inputs import _training_data, feature_settings, section_features, spot_layout
from stgen.workflows.paths import default_cache_dir
from stgen.workflows.rundir import _PartialRun, config_hash

log = logging.getLogger(__name__)


def _panel_backbone(data_dir: Path, cfg: StgenConfig, cache_dir: Path, evaluated: Sequence[str], panel: list[str],
                    progress: bool, restrict: bool = True) -> tuple[torch.nn.Module, list[str], dict]:
    """The backbone named by ``cfg.hinge.backbone`` and the panel restricted to its vocabulary (``restrict``;
    otherwise kept whole: FLAG leaves the genes without a backbone token out of its alignment loss only).

    Returns ``(backbone, panel, meta)``; ``meta`` describes the backbone for
    run.json, with ``panel_genes_dropped`` (panel genes missing from the vocabulary and dropped).
    """
    kind, bpath = parse_backbone_spec(cfg.hinge.backbone)
    if kind == "default":
        backbone, bmeta = get_backbone(data_dir, cfg, cache_dir, evaluated=evaluated, progress=progress)
        meta = {"kind": "default", "genes": backbone.genes, "config": backbone.config.to_dict(),
                "corpus": bmeta["corpus"]}
    else:
        backbone, meta = load_external_backbone(kind, bpath)
    if not restrict:  # recorded with the vocabulary test FLAG applies (gene_index, aliases included)
        known = genes_in_vocabulary(backbone, panel).tolist()
        meta["panel_genes_dropped"] = []
        meta["panel_genes_outside_vocabulary"] = [g for g, k in zip(panel, known) if not k]
        return backbone, panel, meta
    dropped = [g for g in panel if g not in backbone.gene_to_idx]
    meta["panel_genes_dropped"] = dropped
    if dropped:
        log.warning("%d panel gene(s) are not in the %s backbone vocabulary and are dropped: %s",
                    len(dropped), kind, dropped[:20])
    return backbone, [g for g in panel if g in backbone.gene_to_idx], meta


def fit(
    data_dir: str | Path,
    test_section: str | None,
    out: str | Path,
    model: str = "hinge",
    cfg: StgenConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    data_format: str | None = None,
    resume: bool = False,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    num_nodes: int = 1,
) -> dict:
    """Train ``model`` on every imaged section except ``test_section``; write RUN_DIR ``out``.

    ``test_section=None`` trains on every imaged section (``data.train_sections`` if set): a run to apply to
    new slides, e.g. the package's model zoo (:mod:`stgen.workflows.zoo`); its ``run.json`` says
    ``test_section: null``.

    ``data_dir`` is a data-set folder (Her2ST, HEST-1k, Space Ranger samples, ``<section>.h5ad`` files;
    ``data_format`` names it, else it is detected: :func:`stgen.data.dataset.open_dataset`) or a
    :class:`~stgen.data.dataset.Dataset`.

    Returns the run metadata (also in ``out/run.json``). Raises InputError for
    an unknown section or model, missing images, or an empty gene panel.

    **Checkpoints and resuming.** An unfinished fit works in ``<out>.partial/``:
    ``resume.json`` (config hash, model, test section), ``checkpoints/last.ckpt``
    (every Lightning model: rewritten at the end of every epoch, and mid-epoch
    when a SIGTERM stops HINGE or FLAG; ``last.json`` says which epoch/step) and
    ``out/`` (the run being written). On success ``out/`` replaces RUN_DIR and
    the ``.partial`` folder is deleted; a fit that fails or is killed keeps it
    when it holds a checkpoint (else removes it, or the next fit does). Rules:

    * without ``resume``, a ``.partial`` with a checkpoint is refused
      (InputError: pass ``resume=True`` / ``--resume``, or delete it); one without
      a checkpoint is removed and the fit starts over;
    * with ``resume``, the ``.partial``'s config hash must be this fit's
      (:func:`config_hash` of config, model, test section and stgen version;
      InputError otherwise); training continues from ``last.ckpt``, or starts
      over with a warning when there is none yet. Without a ``.partial``, a
      RUN_DIR of the same config hash is returned as it is (nothing to resume),
      else a fresh fit starts (warning);
    * a ``.partial`` locked by another running fit is refused.

    HINGE and FLAG resume to the same weights as an uninterrupted fit (the
    curriculum, early stopping and best-weights history included); the
    benchmark models resume from their last end-of-epoch checkpoint (close to,
    not bit-identical with, an uninterrupted fit; see :mod:`stgen.training.trainer`).
    SIGTERM stops training after the current step with a checkpoint and raises
    :class:`stgen.training.trainer.TrainingInterrupted` (``stgen fit`` exits with 143).

    **Devices.** ``accelerator``, ``devices`` (per node), ``strategy`` and
    ``num_nodes`` go to the Lightning Trainer; more than one process (e.g.
    ``devices=2, strategy="ddp"``) is for ``hinge`` and ``flag`` only (global
    batch as in one process for HINGE, one crop per process and step for FLAG;
    see :mod:`stgen.training.trainer`). With ``ddp`` Lightning starts the other processes
    by re-running the command; every process prepares the data (the backbone
    and features come from the cache that the first process filled) and trains,
    only global rank 0 manages ``.partial`` and writes RUN_DIR. Several nodes:
    start the same command on each (``MASTER_ADDR``, ``MASTER_PORT``,
    ``NODE_RANK``, or SLURM), with RUN_DIR and the cache on a shared filesystem
    when resuming.
    """
    cls = spot_model(model)
    cfg = (cfg or StgenConfig()).for_model(model)  # stain auto resolved; hinge-paper: the paper preset applied
    if cfg.features.patch_um is not None and cls.cuts_own_patches:
        raise InputError(f"{model} cuts its own image patches at features.patch_px pixels: unset features.patch_um")
    data_dir, cache_dir = as_dataset(data_dir, data_format), Path(cache_dir or default_cache_dir())
    work = _PartialRun(Path(out), {"config_hash": config_hash(cfg, model, test_section), "model": model,
                                   "test_section": test_section}, resume,
                       dict(accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=num_nodes))
    finished = work.preflight()  # refuses early (before features and training) what the rules refuse
    if finished is not None:
        return finished
    t_start = time.time()
    train, imaged = _training_data(data_dir, test_section, cfg)
    panel = select_hmhvg(list(train.values()), load_vocabulary(), n_top=cfg.data.n_top, transform=cfg.data.transform)
    timings: dict[str, float] = {}
    meta: dict = {"model": model, "stgen_version": __version__, "test_section": test_section,
                  "train_sections": list(train), "units": cfg.data.transform}
    context = FitContext(patch_px=int(cfg.features.patch_px), seed=int(cfg.hinge.seed))
    if cls.needs_backbone:  # HINGE's frozen prior; FLAG's GFM alignment targets
        t0 = time.time()
        context.backbone, panel, context.backbone_meta = _panel_backbone(data_dir, cfg, cache_dir,
                                                                         [s for s in (test_section, *train) if s],
                                                                         panel, progress, cls.panel_from_backbone)
        timings["backbone_s"] = round(time.time() - t0, 1)
    if not panel:
        raise InputError("the gene panel is empty after intersecting with the backbone vocabulary")
    t0 = time.time()
    feat_list = [section_features(a, cfg, cache_dir, progress) for a in train.values()]
    timings["features_s"] = round(time.time() - t0, 1)
    target_list = [transform_counts(a[:, panel].X, cfg.data.transform) for a in train.values()]
    meta.update(panel=panel, n_train_spots=int(sum(len(f) for f in feat_list)), feature_dim=int(feat_list[0].shape[1]),
                features={"encoder": cfg.features.encoder, "patch_px": cfg.features.patch_px, "tta": cfg.features.tta,
                          "stain": cfg.features.stain},
                spots=spot_layout(train.values(), cfg.features.patch_px, cfg.features.patch_um))
    sections = [SectionInput(name, a.obsm["spatial"], fs, section_image(a), ts)
                for name, fs, a, ts in zip(train, feat_list, train.values(), target_list)]
    sub = cls.section_of(cfg)
    with work as tmp:  # <out>.partial/out (rank 0), published as out on success; checkpoints, resume, devices
        t0 = time.time()
        net, history = cls.fit(sections, panel, sub, feature_settings(cfg, cache_dir, progress), progress=progress,
                               context=context)
        if history is not None:
            meta["training"] = history
        meta.update(net.run_entries())
        state_meta = net.save(tmp)
        if state_meta:
            meta[model] = state_meta
        if cls.generative and not {"steps", "samples"} <= set(state_meta):
            meta["sampler"] = {"steps": int(sub.steps), "samples": int(sub.samples)}
        timings["train_s"] = round(time.time() - t0, 1)
        timings["fit_total_s"] = round(time.time() - t_start, 1)
        meta["timings"] = timings
        meta["config_hash"] = config_hash(cfg, model, test_section)
        write_json(tmp / "run.json", meta)
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return meta
