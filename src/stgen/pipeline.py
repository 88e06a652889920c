"""The main job: pre-train -> fit -> predict -> evaluate, and run directories.

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

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch
import yaml
from safetensors.torch import load_file, save_file

from stgen import __version__
from stgen.config import StgenConfig
from stgen.data.her2st import find_image, read_counts, read_spots
from stgen.data.readers import GRIDS, Dataset, as_dataset, read_anndata
from stgen.data.panel import load_vocabulary, select_hmhvg
from stgen.data.targets import transform_counts
from stgen.errors import InputError
from stgen.graph import build_spot_graph
from stgen.io import atomic_dir, atomic_path, sha256_file, sha256_json, write_json
from stgen.masking import MaskSchedule, spot_keys
from stgen.metrics import align_prediction_to_truth, evaluate_section, prediction_coords
from stgen.models.backbone import BackboneConfig, ExpressionBackbone
from stgen.models.base import FeatureSettings, SectionInput
from stgen.models.external import gene_token_embeddings, load_external_backbone, parse_backbone_spec
from stgen.models.flag import FLAG, FlagConfig
from stgen.models.hinge import HINGE, HingeConfig
from stgen.models.registry import GENERATIVE, MODELS, SPOT_MODELS, check_model, spot_model
from stgen.models.ridge import RidgeBaseline
from stgen.train import pretrain_backbone, train_flag, train_hinge

log = logging.getLogger(__name__)

BACKBONE_FORMAT = 2


def default_cache_dir() -> Path:
    """``$STGEN_CACHE`` or ``./.stgen_cache`` (features and pre-trained backbones)."""
    return Path(os.environ.get("STGEN_CACHE", Path.cwd() / ".stgen_cache"))


def default_data_dir() -> Path:
    """``$STGEN_DATA``, else the first of ``./data/her2st``, ``./data``, ``../shared/data/her2st``
    (relative to the working directory, then to the source checkout) that holds ``ST-cnts``."""
    if "STGEN_DATA" in os.environ:
        return Path(os.environ["STGEN_DATA"])
    repo = Path(__file__).resolve().parents[2]
    for base in (Path.cwd(), repo):
        for cand in (base / "data/her2st", base / "data", base.parent / "shared/data/her2st"):
            if (cand / "ST-cnts").is_dir():
                return cand
    raise InputError("no Her2ST data found: pass --data DIR (a folder with ST-cnts/, ST-spotfiles/, ST-imgs/)")


# ------------------------------------------------------------------ features
def section_patch_px(cfg: StgenConfig, mpp: float | None, section: str = "section") -> int:
    """Spot patch side in full-resolution pixels of a section scanned at ``mpp`` microns per pixel:
    ``features.patch_um / mpp`` when ``patch_um`` is set, else ``features.patch_px``."""
    um = cfg.features.patch_um
    if um is None:
        return int(cfg.features.patch_px)
    if not mpp:
        raise InputError(f"{section}: features.patch_um is set but the section's pixel size (mpp) is unknown")
    return max(1, int(round(float(um) / float(mpp))))


def section_features(adata: ad.AnnData, cfg: StgenConfig, cache_dir: Path, progress: bool = True) -> np.ndarray:
    """Histology features (N, F) of a section's spots (cached on disk); patches of :func:`section_patch_px`."""
    info = adata.uns["stgen"]
    path = info.get("image_path")
    if not path:
        raise InputError(f"section {info.get('section')} has no H&E image")
    px = section_patch_px(cfg, info.get("mpp"), str(info.get("section")))
    return feature_settings(cfg, cache_dir, progress).encode(path, adata.obsm["spatial"], patch_px=px)


def feature_settings(cfg: StgenConfig, cache_dir: str | Path | None, progress: bool = False) -> FeatureSettings:
    """The run's encoder settings (config section ``features``) and feature cache: every spot-patch
    encoding (fit, predict) and the benchmark models' extra patches go through its ``encode``."""
    f = cfg.features
    return FeatureSettings(encoder=f.encoder, patch_px=f.patch_px, tta=f.tta, batch_size=f.batch_size,
                           cache_dir=Path(cache_dir) if cache_dir is not None else None, progress=progress)


# ------------------------------------------------------------------ backbone
def _pretrain_corpus(ds: Dataset, cfg: StgenConfig, evaluated: Sequence[str]) -> list[str]:
    corpus = cfg.pretrain.corpus
    if corpus is None:
        imaged = set(ds.sections(imaged_only=True))
        corpus = [s for s in ds.sections() if s not in imaged and s not in evaluated]
    leak = sorted(set(corpus) & set(evaluated))
    if leak:
        raise InputError(f"pre-training corpus contains evaluated section(s) {leak}: remove them from pretrain.corpus")
    if not corpus:
        raise InputError(f"pre-training corpus is empty: {ds.root} ({ds.format}) has no expression-only section "
                         f"outside the evaluated ones; list sections in pretrain.corpus, or give HINGE a released "
                         f"backbone (--backbone cellfm:PATH | scgpt:DIR)")
    unknown = [s for s in corpus if s not in ds]
    if unknown:
        raise InputError(f"pretrain.corpus names section(s) {unknown} that are not in {ds.root}")
    return sorted(corpus)


def get_backbone(
    data_dir: Path, cfg: StgenConfig, cache_dir: Path, evaluated: Sequence[str] = (), progress: bool = True
) -> tuple[ExpressionBackbone, dict]:
    """The pre-trained expression backbone for this corpus and config (cached).

    The corpus defaults to every Her2ST section that has no image (none of
    them is ever evaluated); ``evaluated`` sections are refused in it.
    The vocabulary is every gene of CellFM's ``gene_info.csv`` detected in the
    corpus (capped at the ``pretrain.n_genes`` of highest mean, if set).
    """
    ds = as_dataset(data_dir)
    corpus = _pretrain_corpus(ds, cfg, evaluated)
    key = sha256_json({"format": BACKBONE_FORMAT, "corpus": corpus, "pretrain": cfg.pretrain.__dict__,
                       "transform": cfg.data.transform})[:16]
    bdir = cache_dir / "backbones" / key
    cached = _load_cached_backbone(bdir)
    if cached is not None:
        return cached
    t0 = time.time()
    vocab = set(load_vocabulary())
    adatas = [ds.counts(s) for s in corpus]
    # a Her2ST table lists the genes detected in that section: absent genes are zero counts
    genes_all = sorted(set().union(*(a.var_names for a in adatas)) & vocab)
    if not genes_all:
        raise InputError("pre-training corpus shares no genes with the CellFM vocabulary")
    col = {g: i for i, g in enumerate(genes_all)}
    values = np.zeros((sum(a.n_obs for a in adatas), len(genes_all)), dtype=np.float32)
    row = 0
    for a in adatas:
        keep = [j for j, g in enumerate(a.var_names) if g in col]
        values[row : row + a.n_obs, [col[a.var_names[j]] for j in keep]] = transform_counts(a.X, cfg.data.transform)[:, keep]
        row += a.n_obs
    order = np.argsort(-values.mean(0), kind="stable")[: cfg.pretrain.n_genes]
    genes = [genes_all[i] for i in order]
    # reorder columns block by block in place: the dense corpus matrix (~1 GB for
    # Her2ST) is never copied whole
    for r in range(0, values.shape[0], 1024):
        values[r : r + 1024, : len(order)] = values[r : r + 1024][:, order]
    values = values[:, : len(order)]
    bb, hist = pretrain_backbone(values, genes, cfg.pretrain, progress=progress)
    meta = {"genes": genes, "config": bb.config.to_dict(), "corpus": corpus, "n_spots": int(values.shape[0]),
            "pretrain_seconds": round(time.time() - t0, 1), **hist}
    with atomic_dir(bdir) as tmp:
        save_file(bb.state_dict(), tmp / "backbone.safetensors")
        meta["safetensors_sha256"] = sha256_file(tmp / "backbone.safetensors")
        write_json(tmp / "backbone.json", meta)
    return bb, meta


def _load_cached_backbone(bdir: Path) -> tuple[ExpressionBackbone, dict] | None:
    """The cached pre-trained backbone in ``bdir``, or None when it must be rebuilt: missing, unreadable,
    not matching its recorded SHA-256 (caches written before the checksum are checked by loading only),
    or not matching its own config. Never unpickles (JSON + safetensors)."""
    meta_path, weights = bdir / "backbone.json", bdir / "backbone.safetensors"
    if not (meta_path.is_file() and weights.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        want = meta.get("safetensors_sha256")
        if want is not None and sha256_file(weights) != want:
            raise ValueError("weights do not match their SHA-256")
        bb = ExpressionBackbone(meta["genes"], BackboneConfig(**meta["config"]))
        bb.load_state_dict(load_file(weights), strict=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        log.warning("backbone cache %s is corrupted (%s): rebuilding it", bdir, e)
        return None
    return bb.eval(), meta


def _panel_backbone(data_dir: Path, cfg: StgenConfig, cache_dir: Path, evaluated: Sequence[str], panel: list[str],
                    progress: bool) -> tuple[torch.nn.Module, list[str], dict]:
    """The backbone named by ``cfg.hinge.backbone`` and the panel restricted to its vocabulary.

    Returns ``(backbone, panel, meta)``; ``meta`` describes the backbone for
    run.json, with ``panel_genes_dropped`` (panel genes missing from the vocabulary).
    """
    kind, bpath = parse_backbone_spec(cfg.hinge.backbone)
    if kind == "default":
        backbone, bmeta = get_backbone(data_dir, cfg, cache_dir, evaluated=evaluated, progress=progress)
        meta = {"kind": "default", "genes": backbone.genes, "config": backbone.config.to_dict(),
                "corpus": bmeta["corpus"]}
    else:
        backbone, meta = load_external_backbone(kind, bpath)
    dropped = [g for g in panel if g not in backbone.gene_to_idx]
    meta["panel_genes_dropped"] = dropped
    if dropped:
        log.warning("%d panel gene(s) are not in the %s backbone vocabulary and are dropped: %s",
                    len(dropped), kind, dropped[:20])
    return backbone, [g for g in panel if g in backbone.gene_to_idx], meta


def flag_graph_settings(cfg: StgenConfig) -> dict:
    """FLAG's spot-graph settings of a configuration, as stored in ``run.json``: ``sigma_px`` (RBF length
    scale in full-resolution pixels, ``flag.sigma_px`` defaulting to ``features.patch_px``) and ``knn``."""
    f = cfg.flag
    return {"sigma_px": float(f.sigma_px if f.sigma_px is not None else cfg.features.patch_px), "knn": int(f.knn)}


def graph_builder(settings: dict):
    """``(xy, feats) -> SpotGraph`` with ``settings`` of :func:`flag_graph_settings` (or a FLAG run's
    ``meta['flag']``, which holds them)."""
    return lambda xy, feats: build_spot_graph(xy, feats, sigma_px=settings["sigma_px"], k=settings["knn"])


# ------------------------------------------------------------------ fit
def _training_data(data_dir: Path | Dataset, test_section: str, cfg: StgenConfig) -> tuple[dict, list[str]]:
    ds = as_dataset(data_dir)
    imaged = ds.sections(imaged_only=True)
    if test_section not in imaged:
        raise InputError(f"unknown test section {test_section!r} in {ds.root}; sections with images: {imaged}")
    train = cfg.data.train_sections or [s for s in imaged if s != test_section]
    bad = [s for s in train if s not in imaged]
    if bad:
        raise InputError(f"training section(s) {bad} have no image in {ds.root}; available: {imaged}")
    if test_section in train:
        raise InputError(f"test section {test_section} is also listed as a training section")
    return {s: ds.read(s, require_image=True) for s in train}, imaged


def fit(
    data_dir: str | Path,
    test_section: str,
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

    ``data_dir`` is a data-set folder (Her2ST, HEST-1k, Space Ranger samples, ``<section>.h5ad`` files;
    ``data_format`` names it, else it is detected: :func:`stgen.data.readers.open_dataset`) or a
    :class:`~stgen.data.readers.Dataset`.

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
    not bit-identical with, an uninterrupted fit; see :mod:`stgen.train`).
    SIGTERM stops training after the current step with a checkpoint and raises
    :class:`stgen.train.TrainingInterrupted` (``stgen fit`` exits with 143).

    **Devices.** ``accelerator``, ``devices`` (per node), ``strategy`` and
    ``num_nodes`` go to the Lightning Trainer; more than one process (e.g.
    ``devices=2, strategy="ddp"``) is for ``hinge`` and ``flag`` only (global
    batch as in one process for HINGE, one crop per process and step for FLAG;
    see :mod:`stgen.train`). With ``ddp`` Lightning starts the other processes
    by re-running the command; every process prepares the data (the backbone
    and features come from the cache that the first process filled) and trains,
    only global rank 0 manages ``.partial`` and writes RUN_DIR. Several nodes:
    start the same command on each (``MASTER_ADDR``, ``MASTER_PORT``,
    ``NODE_RANK``, or SLURM), with RUN_DIR and the cache on a shared filesystem
    when resuming.
    """
    check_model(model)
    cfg = cfg or StgenConfig()
    if cfg.features.patch_um is not None and model in ("hifusion", "stnet"):
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
    backbone = None
    if model in ("hinge", "flag"):  # FLAG: the backbone's gene-token rows are its frozen GFM embeddings
        t0 = time.time()
        backbone, panel, meta["backbone"] = _panel_backbone(data_dir, cfg, cache_dir, [test_section, *train], panel,
                                                            progress)
        timings["backbone_s"] = round(time.time() - t0, 1)
    if not panel:
        raise InputError("the gene panel is empty after intersecting with the backbone vocabulary")
    t0 = time.time()
    feat_list = [section_features(a, cfg, cache_dir, progress) for a in train.values()]
    feats = np.concatenate(feat_list)
    timings["features_s"] = round(time.time() - t0, 1)
    target_list = [transform_counts(a[:, panel].X, cfg.data.transform) for a in train.values()]
    targets = np.concatenate(target_list)
    meta.update(panel=panel, n_train_spots=int(len(feats)), feature_dim=int(feats.shape[1]),
                features={"encoder": cfg.features.encoder, "patch_px": cfg.features.patch_px, "tta": cfg.features.tta},
                spots=spot_layout(train.values(), cfg.features.patch_px, cfg.features.patch_um))
    out = Path(out)
    with work as tmp:  # <out>.partial/out (rank 0), published as out on success; checkpoints, resume, devices
        t0 = time.time()
        if model == "hinge":
            h = cfg.hinge
            schedule = MaskSchedule(len(panel), h.T, h.schedule, h.zeta)
            hcfg = HingeConfig.from_train_config(h)  # architecture + ablation switches (stgen.ablation)
            torch.manual_seed(h.seed)  # the initial weights must not depend on what ran before (pre-training)
            net = HINGE(backbone, panel, feats.shape[1], h.T, hcfg)
            meta["training"] = train_hinge(net, feats, targets, h, schedule, progress=progress)
            meta["hinge"] = {"config": hcfg.to_dict(), "T": h.T, "schedule": h.schedule, "zeta": schedule.exponent,
                             "steps": h.steps, "samples": h.samples, "mask_ratio": h.mask_ratio,
                             "curriculum_epochs": h.curriculum_epochs,
                             "n_trainable": sum(p.numel() for p in net.trainable_parameters())}
            # an external backbone stays where it is (run.json has its path and SHA-256); trained
            # backbone weights (LoRA adapters, a Scratch backbone) are saved
            external = meta["backbone"]["kind"] != "default"
            frozen = net.frozen_state_keys() if external else set()
            state = {k: v.contiguous() for k, v in net.state_dict().items() if k not in frozen}
            save_file(state, tmp / "model.safetensors")
        elif model == "flag":
            f = cfg.flag
            fcfg = FlagConfig.from_train_config(f)
            emb = gene_token_embeddings(backbone, panel)
            torch.manual_seed(f.seed)
            net = FLAG(fcfg, len(panel), feats.shape[1], emb)
            meta["backbone"].pop("genes", None)  # not needed to load a FLAG run: the embeddings are in the model
            sections = [(fs, a.obsm["spatial"], ts) for fs, a, ts in zip(feat_list, train.values(), target_list)]
            graph = flag_graph_settings(cfg)
            meta["training"] = train_flag(net, sections, f, graph_builder(graph), progress=progress)
            meta["flag"] = {"config": fcfg.to_dict(), "steps": f.steps, "samples": f.samples, **graph,
                            "embedding_dim": int(emb.shape[1]), "align_weight": f.align_weight,
                            "n_trainable": sum(p.numel() for p in net.parameters() if p.requires_grad)}
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp / "model.safetensors")
        elif model in SPOT_MODELS:
            sections = [SectionInput(name, a.obsm["spatial"], fs, a.uns["stgen"].get("image_path"), ts)
                        for name, fs, a, ts in zip(train, feat_list, train.values(), target_list)]
            net, meta["training"] = spot_model(model).fit(sections, panel, getattr(cfg, model),
                                                          feature_settings(cfg, cache_dir, progress), progress=progress)
            tensors, meta[model] = net.state()
            if model in GENERATIVE:
                sub = getattr(cfg, model)
                meta["sampler"] = {"steps": int(sub.steps), "samples": int(sub.samples)}
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "model.safetensors")
        else:
            RidgeBaseline(n_components=cfg.ridge.n_components, seed=cfg.hinge.seed).fit(feats, targets).save(tmp)
        timings["train_s"] = round(time.time() - t0, 1)
        timings["fit_total_s"] = round(time.time() - t_start, 1)
        meta["timings"] = timings
        meta["config_hash"] = config_hash(cfg, model, test_section)
        write_json(tmp / "run.json", meta)
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return meta


class _PartialRun:
    """The work folder ``<out>.partial`` of :func:`fit` (rules in its docstring).

    :meth:`preflight` applies the rules before any work; as a context manager
    it claims the folder (a lock; stale content removed unless resuming),
    sets :func:`stgen.train.training_context` (checkpoints in ``checkpoints/``,
    the checkpoint to resume from, devices) and yields ``out/``, which replaces
    ``out`` on success. Processes other than global rank 0 of a multi-process
    launch only train: they resume from the same checkpoint and write into a
    private temporary folder that is deleted.
    """

    def __init__(self, out: Path, ident: dict, resume: bool, devices: dict) -> None:
        from stgen.train import check_trainer_options, is_launch_zero

        if out.name in ("", ".", ".."):
            raise InputError(f"--out {str(out)!r}: not a valid RUN_DIR name")
        check_trainer_options(**devices)  # before any work
        self.out, self.ident, self.resume, self.devices = out, ident, resume, devices
        self.part = out.with_name(out.name + ".partial")
        self.last = self.part / "checkpoints" / "last.ckpt"
        self.writer = is_launch_zero()
        self._lock = self._context = self._tmp = None

    def _finish_publish(self) -> None:
        """Complete the publication of a fit killed while moving its finished run into place."""
        if not (self.part / "finished").exists():
            return
        if (self.part / "out").is_dir():
            if self.out.exists() and not (self.part / "old").exists():
                os.replace(self.out, self.part / "old")
            os.replace(self.part / "out", self.out)
        import shutil

        shutil.rmtree(self.part, ignore_errors=True)

    def _refuse(self) -> None:
        """InputError where the rules refuse this fit."""
        if self.last.is_file():
            if not self.resume:
                raise InputError(f"{self.part} holds an unfinished fit with a checkpoint: pass --resume to continue "
                                 f"it, or delete {self.part} to start over")
            info = json.loads((self.part / "resume.json").read_text()) if (self.part / "resume.json").is_file() else {}
            if info.get("config_hash") != self.ident["config_hash"]:
                raise InputError(
                    f"cannot resume {self.part}: it was started with another configuration (config hash "
                    f"{info.get('config_hash')}, model {info.get('model')}, test section {info.get('test_section')}; "
                    f"this fit: {self.ident['config_hash']}, {self.ident['model']}, {self.ident['test_section']}): "
                    f"resume with the same --config, --model, --test-section and stgen version, or delete {self.part}")

    def preflight(self) -> dict | None:
        """InputError where the rules refuse; the existing run's metadata when resuming finds it finished.

        The other processes of a multi-process launch take the same (read-only) decisions, so that none of
        them trains alone."""
        if self.writer:
            self._finish_publish()
        if self.out.exists() and not (self.out / "run.json").is_file():  # only an earlier fit's RUN_DIR is replaced
            raise InputError(f"{self.out} exists and is not a stgen run directory; choose a new --out or delete it")
        self._refuse()
        if not self.resume or self.last.is_file():
            return None
        if self.part.is_dir():
            if self.writer:
                log.warning("%s has no checkpoint yet: the fit starts over", self.part)
            return None
        run_json = self.out / "run.json"
        meta = json.loads(run_json.read_text()) if run_json.is_file() else {}
        if meta.get("config_hash") == self.ident["config_hash"]:
            if self.writer:
                log.warning("nothing to resume: %s is a finished run of this configuration", self.out)
            return meta
        if self.writer:
            log.warning("nothing to resume (no %s): starting a fresh fit", self.part)
        return None

    def __enter__(self) -> Path:
        import shutil
        import tempfile

        from stgen.train import training_context

        resume_from = self.last if self.resume and self.last.is_file() else None
        if not self.writer:
            self._tmp = Path(tempfile.mkdtemp(prefix="stgen-fit-"))
        else:
            try:
                self.part.mkdir(parents=True, exist_ok=True)
                self._lock = open(self.part / "lock", "w")
            except OSError as e:
                raise InputError(f"cannot create the work folder {self.part} ({e.strerror or e})") from e
            try:
                import fcntl

                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # no fcntl (Windows): no lock
                pass
            except OSError:
                self._lock.close()
                raise InputError(f"another stgen fit is writing {self.part}; wait for it or stop it") from None
        try:
            if self.writer:
                self._refuse()  # again, under the lock
                for p in self.part.iterdir():  # a fresh start keeps nothing; a resumed one its checkpoints
                    if p.name != "lock" and (resume_from is None or p.name != "checkpoints"):
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
                write_json(self.part / "resume.json", {**self.ident, "stgen_version": __version__})
                if resume_from is not None:
                    try:
                        info = json.loads((resume_from.parent / "last.json").read_text())
                        at = (f"step {info['global_step']}, mid-epoch" if info["mid_epoch"]
                              else f"{info['epoch']} epoch(s) done")
                    except (OSError, ValueError, KeyError):  # killed between writing the two files
                        at = "progress unknown"
                    log.warning("resuming from %s (%s)", resume_from, at)
                self._tmp = self.part / "out"
                self._tmp.mkdir()
            self._context = training_context(ckpt_dir=self.part / "checkpoints", resume_from=resume_from,
                                             **self.devices)
            self._context.__enter__()
        except BaseException as e:
            self._context = None
            self.__exit__(type(e), e, None)
            raise
        return self._tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        import shutil

        try:
            if self._context is not None:
                self._context.__exit__(exc_type, exc, tb)
            if not self.writer or (exc_type is not None and self.last.is_file()):
                if self._tmp is not None:  # a resumable .partial keeps its checkpoints, not the half-written run
                    shutil.rmtree(self._tmp, ignore_errors=True)
            elif exc_type is None:
                (self.part / "finished").write_text("")
                self._finish_publish()
            else:
                shutil.rmtree(self.part, ignore_errors=True)
        finally:
            if self._lock is not None:
                self._lock.close()
        from stgen.errors import StgenError

        if exc is not None and not isinstance(exc, StgenError):
            try:
                from stgen.io import OutputError, _disk_full
            except ImportError:
                return False
            if _disk_full(exc):  # as stgen.io.atomic_dir reports it
                raise OutputError(f"no space left on device writing {self.out}", getattr(exc, "errno", None)) from exc
        return False


def config_hash(cfg: StgenConfig, model: str, test_section: str) -> str:
    """Identity of a fit: same hash = same model would be trained.

    The sections of the models added after HINGE and ridge (``flag`` and the
    benchmark models) count only for their own model: the hashes (and cached
    runs) of the others must not change with them.
    """
    d = cfg.to_dict()
    if d["features"].get("patch_um") is None:  # added later: unset, it must not change earlier runs' hashes
        d["features"].pop("patch_um", None)
    for other in ("flag", *SPOT_MODELS):
        if other != model:
            d.pop(other, None)
    return sha256_json({"cfg": d, "model": model, "test": test_section, "v": __version__})[:16]


# ------------------------------------------------------------------ predict
@dataclass
class TrainedRun:
    """A loaded RUN_DIR: ``predict(feats (N, F)) -> (mean (N, G), std (N, G))``."""

    meta: dict
    cfg: StgenConfig
    model: object
    cache_dir: Path | None = None  # feature cache of the benchmark models' extra patches (HiFusion)
    patch_px: int | None = None  # spot patch side at the predicted slide's resolution (default: as trained)

    @property
    def panel(self) -> list[str]:
        return self.meta["panel"]

    def features(self, progress: bool = False) -> FeatureSettings:
        """The run's encoder settings with the spot patch at :attr:`patch_px` (when set)."""
        fs = feature_settings(self.cfg, self.cache_dir, progress)
        if self.patch_px is not None:
            fs.patch_px = int(self.patch_px)
        return fs

    def predict(self, feats: np.ndarray, samples: int | None = None, steps: int | None = None,
                seed: int = 0, progress: bool = False, batch_size: int | None = None,
                device: str | None = None, precision: str | None = None,
                xy: np.ndarray | None = None, image: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and sd over samples, (N, G) each, in the run's target units.

        ``device`` defaults to CUDA when available; ``precision`` (default: the
        run's training precision) ``bf16-mixed``/``16-mixed`` samples under autocast.
        FLAG needs ``xy`` (N, 2), the spots' full-resolution pixel coordinates
        (its spot graph is built from them); all spots of ``feats`` are one
        section, generated together. For FLAG ``batch_size`` is the number of
        spots per DiT chunk (default: all). The benchmark models (:data:`SPOT_MODELS`) need ``xy`` too,
        HiFusion and ST-Net also the ``image`` (they encode or fine-tune on its patches); they run on the CPU.
        """
        if self.meta["model"] == "ridge":
            mean = self.model.predict(feats)
            return mean, np.zeros_like(mean)
        if self.meta["model"] in SPOT_MODELS:
            if xy is None:
                raise InputError(f"{self.meta['model']} needs the spots' pixel coordinates xy")
            section = SectionInput("predict", xy, feats, Path(image) if image is not None else None)
            mean, std = self.model.predict(section, self.features(progress),
                                           samples=samples, steps=steps, seed=seed, progress=progress)
            return np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        flag = self.meta["model"] == "flag"
        h = self.meta["flag" if flag else "hinge"]
        steps = steps or h["steps"]
        samples = samples or h["samples"]
        batch_size = batch_size or (None if flag else self.cfg.hinge.sample_batch_size)
        if samples < 1:
            raise InputError(f"--samples must be >= 1, got {samples}")
        if batch_size is not None and batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {batch_size}")
        if flag and xy is None:
            raise InputError("FLAG predicts whole sections from a spot graph: give the spots' pixel coordinates xy")
        precision = precision or (self.cfg.flag.precision if flag else self.cfg.hinge.precision)
        dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # FLAG: the section's spot graph; HINGE: the masking schedule
        plan = (graph_builder(h)(xy, feats) if flag
                else MaskSchedule(len(self.panel), h["T"], h["schedule"], h["zeta"]))
        gen = torch.Generator().manual_seed(seed)
        model = self.model.to(dev)
        # HINGE: a spot's reveal orders follow from its pixel position, so its samples do not depend on the
        # other spots predicted with it (a bare-slide grid point equals the same position in a spot file)
        keys = {} if flag or xy is None else {"spot_keys": spot_keys(xy)}
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            mean, std = model.generate(torch.as_tensor(feats, dtype=torch.float32, device=dev), plan, steps=steps,
                                       n_samples=samples, generator=gen, progress=progress, batch_size=batch_size,
                                       **keys)
        return mean.float().cpu().numpy(), std.float().cpu().numpy()


def load_run(run_dir: str | Path) -> TrainedRun:
    """Load a RUN_DIR written by :func:`fit` (safetensors / npz only, no pickle)."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise InputError(f"{run_dir} is not a stgen run directory (no run.json); create one with `stgen fit`")
    meta = yaml.safe_load((run_dir / "run.json").read_text())
    cfg = StgenConfig.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()), source=str(run_dir / "config.yaml"))
    if meta["model"] == "ridge":
        return TrainedRun(meta, cfg, RidgeBaseline.load(run_dir))
    if meta["model"] in SPOT_MODELS:
        name = meta["model"]
        try:
            tensors = load_file(run_dir / "model.safetensors")
        except (RuntimeError, OSError) as e:
            raise InputError(f"{run_dir / 'model.safetensors'} is not a readable safetensors file: {e}") from e
        return TrainedRun(meta, cfg, spot_model(name).from_state(tensors, meta[name], getattr(cfg, name)))
    if meta["model"] == "flag":
        fm = meta["flag"]
        emb = torch.zeros(len(meta["panel"]), fm["embedding_dim"]) if fm.get("embedding_dim") else None
        net = FLAG(FlagConfig(**fm["config"]), len(meta["panel"]), meta["feature_dim"], emb)
        _load_state(net, run_dir / "model.safetensors")
        return TrainedRun(meta, cfg, net.eval())
    b = meta["backbone"]
    kind = b.get("kind", "default")
    if kind == "default":
        bb = ExpressionBackbone(b["genes"], BackboneConfig(**b["config"]))
    else:
        bb, _ = load_external_backbone(kind, Path(b["path"]), expect_sha256=b["sha256"])
    net = HINGE(bb, meta["panel"], meta["feature_dim"], meta["hinge"]["T"], HingeConfig(**meta["hinge"]["config"]))
    # adapter only with an external backbone: the frozen backbone comes from its own file
    _load_state(net, run_dir / "model.safetensors", keep_prefix="backbone." if kind != "default" else None)
    return TrainedRun(meta, cfg, net.eval())


def _load_state(net: torch.nn.Module, path: Path, keep_prefix: str | None = None) -> None:
    """Load ``path`` (safetensors) into ``net`` strictly; entries of ``net``'s own state whose
    keys start with ``keep_prefix`` are kept where the file lacks them. InputError when the
    file is unreadable or does not match."""
    try:
        state = load_file(path)
    except (RuntimeError, OSError) as e:
        raise InputError(f"{path} is not a readable safetensors file: {e}") from e
    if keep_prefix is not None:
        state = {**{k: v for k, v in net.state_dict().items() if k.startswith(keep_prefix)}, **state}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(f"{path} does not match run.json: {e}") from e


#: Thumbnail stored in a prediction's ``.uns['spatial']`` (longer side, px) and used for tissue detection.
THUMBNAIL_PX = 2000
def spot_layout(sections, patch_px: int, patch_um: float | None = None) -> dict:
    """The training spots' layout for ``run.json``: ``grid`` (square | hex), ``spacing_um``, ``diameter_um``,
    ``mpp`` (mean microns per pixel of the training images) and ``patch_um`` (the spot patch's side in
    microns, ``patch_px * mpp``), from the sections' ``uns['stgen']`` (see :func:`stgen.data.her2st.read_section`)."""
    infos = [a.uns["stgen"] for a in sections]
    grids = sorted({i.get("grid", "square") for i in infos})
    if len(grids) > 1:
        raise InputError(f"training sections mix spot grids {grids} (legacy ST and Visium): train on one technology")
    mpps = [float(i["mpp"]) for i in infos if i.get("mpp")]
    mpp = float(np.mean(mpps)) if mpps else None
    return {"grid": grids[0], "spacing_um": float(infos[0]["spot_spacing_um"]),
            "diameter_um": float(infos[0]["spot_diameter_um"]), "mpp": mpp,
            "patch_um": float(patch_um) if patch_um else (float(patch_px) * mpp if mpp else None)}


def _spots_from_file(spots: str | Path) -> pd.DataFrame:
    """Spot table of ``--spots``: :func:`read_spots` formats, or an ``.h5ad`` whose ``obsm['spatial']`` holds
    full-resolution (x, y) pixels."""
    spots = Path(spots)
    if spots.suffix != ".h5ad":
        return read_spots(spots)
    a = read_anndata(spots, "spot file")
    if "spatial" not in a.obsm:
        raise InputError(f"{spots}: no obsm['spatial'] (full-resolution spot pixel coordinates)")
    xy = np.asarray(a.obsm["spatial"], dtype=np.float64)
    names = a.obs_names.astype(str).to_numpy()
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise InputError(f"{spots}: obsm['spatial'] must be finite (N, 2) pixel coordinates, got {xy.shape}")
    return pd.DataFrame({"pixel_x": xy[:, 0], "pixel_y": xy[:, 1]}, index=pd.Index(names, name="spot"))


def _slide_mpp(slide, image: str | Path, need: str) -> float:
    if slide.mpp is None:
        raise InputError(f"{image}: the image has no pixel-size metadata; {need} needs it: pass --mpp "
                         f"(microns per full-resolution pixel, e.g. 0.5 for a 20x scan)")
    return float(slide.mpp)


def predict(
    run_dir: str | Path,
    image: str | Path,
    spots: str | Path | None,
    out: str | Path,
    samples: int | None = None,
    steps: int | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    mpp: float | None = None,
    grid_origin: tuple[float, float] | None = None,
    min_tissue: float = 0.5,
    maps_dir: str | Path | None = None,
    genes: Sequence[str] | None = None,
) -> ad.AnnData:
    """Predict the panel's expression at every spot of ``spots`` on ``image``, or on a bare slide.

    ``image`` is any slide :func:`stgen.slide.open_slide` reads (JPEG/PNG, pyramidal TIFF/OME-TIFF,
    SVS/NDPI/MRXS with OpenSlide), read lazily. ``mpp`` (microns per full-resolution pixel) overrides
    the slide's metadata. When the slide's mpp is known, spot patches are ``patch_um / mpp`` pixels
    (``patch_um`` from the run's training images, ``run.json['spots']``), so a model applies at another
    scan resolution; otherwise they have the trained ``features.patch_px``.

    Without ``spots`` (a slide that was never sequenced) the tissue is found by Otsu thresholding
    (:func:`stgen.tissue.detect_tissue`) and virtual spots are laid on it at the training spot spacing
    (:func:`stgen.tissue.lay_spot_grid`: hexagonal for Visium-trained runs, square for legacy ST;
    ``grid_origin`` pins one lattice point, full-resolution (x, y)); this needs the slide's mpp.

    Writes ``out`` (.h5ad) atomically: ``.X`` mean prediction in the run's target units,
    ``layers['std']`` the per-spot sample standard deviation (zeros for ridge), ``obsm['spatial']``
    full-resolution pixel (x, y), ``.uns['spatial'][library_id]`` a thumbnail (``images['hires']``)
    and ``scalefactors`` (``tissue_hires_scalef``, ``spot_diameter_fullres``) for
    ``scanpy.pl.spatial`` / ``squidpy.pl.spatial_scatter``, and ``.uns['stgen']`` provenance (model,
    units, steps, samples, mpp, patch_px, grid, ``run_sha256`` - the SHA-256 of the run's ``run.json``,
    which :func:`prediction_is_current` uses - and ``predict_s``, the wall time of this call up to
    writing). With ``maps_dir``, PNG maps of ``genes`` (default: the 4 most variable predictions) and
    of the uncertainty (mean sd over genes) over the thumbnail go there
    (:func:`stgen.plots.plot_slide_maps`).

    Raises
    ------
    InputError : unreadable/truncated image, no mpp where one is needed, spots outside the image or in
        the wrong coordinate scale, no tissue, genes not in the panel, and the run's own errors.
    """
    from stgen.data.readers import check_spot_scale
    from stgen.slide import open_slide
    from stgen.tissue import detect_tissue, lay_spot_grid

    t_start = time.perf_counter()
    if not -(2**63) <= int(seed) < 2**63:
        raise InputError(f"--seed must be a 64-bit integer, got {seed}")
    _check_folder(maps_dir, "--maps")
    run = load_run(run_dir)
    run.cache_dir = Path(cache_dir or default_cache_dir())
    # runs fitted before run.json had 'spots' were trained on Her2ST (legacy ST, square grid)
    layout = run.meta.get("spots") or {"grid": "square", "spacing_um": GRIDS["square"][0],
                                       "diameter_um": GRIDS["square"][1], "mpp": None, "patch_um": None}
    if genes:
        missing = [g for g in genes if g not in run.panel]
        if missing:
            raise InputError(f"gene(s) {missing} are not in the run's panel of {len(run.panel)} genes "
                             f"(e.g. {run.panel[:5]})")
    with open_slide(image, mpp=mpp) as slide:
        w, h = slide.width, slide.height
        thumb, scale = slide.thumbnail(THUMBNAIL_PX)
        if spots is not None:
            spots_df = _spots_from_file(spots)
            xy = spots_df[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
            outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
            if outside.any():
                raise InputError(f"{spots}: {int(outside.sum())} spot(s) lie outside the image {image} ({w} x {h} "
                                 f"px), e.g. {spots_df.index[outside][:3].tolist()}")
            if slide.mpp is not None:
                check_spot_scale(xy, slide.mpp, None, str(spots))
            grid = None
        else:
            slide_mpp = _slide_mpp(slide, image, "a bare-slide prediction (no --spots)")
            tissue = detect_tissue(thumb, scale, mpp=slide_mpp, source=str(image))
            spots_df = lay_spot_grid(tissue, w, h, slide_mpp, kind=layout["grid"], spacing_um=layout["spacing_um"],
                                     diameter_um=layout["diameter_um"], origin=grid_origin, min_tissue=min_tissue)
            xy = spots_df[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
            grid = {"kind": layout["grid"], "spacing_um": layout["spacing_um"], "tissue_fraction": tissue.fraction,
                    "otsu_threshold": tissue.threshold, "origin": list(map(float, grid_origin or xy[0]))}
        slide_mpp = slide.mpp
        patch_px = int(run.cfg.features.patch_px)
        if slide_mpp is not None and layout.get("patch_um"):
            patch_px = max(1, int(round(layout["patch_um"] / slide_mpp)))
        run.patch_px = patch_px
        feats = run.features().encode(image, xy, slide=slide)  # the open slide: a JPEG is decoded once
    mean, std = run.predict(feats, samples=samples, steps=steps, seed=seed, progress=progress,
                            batch_size=batch_size, device=device, precision=precision, xy=xy, image=image)
    is_gen = run.meta["model"] in GENERATIVE
    hs = sampler_defaults(run.meta)
    library_id = Path(image).stem
    diameter_px = layout["diameter_um"] / slide_mpp if slide_mpp else float(patch_px)
    adata = ad.AnnData(
        X=mean.astype(np.float32),
        obs=spots_df.copy(),
        var=pd.DataFrame(index=pd.Index(run.panel, name="gene")),
        obsm={"spatial": xy},
        layers={"std": std.astype(np.float32)},
    )
    adata.uns["spatial"] = {library_id: {
        "images": {"hires": thumb},
        "scalefactors": {"tissue_hires_scalef": float(scale), "spot_diameter_fullres": float(diameter_px)},
        "metadata": {"source_image_path": str(image)}}}
    adata.uns["stgen"] = {
        "model": run.meta["model"], "units": run.meta["units"], "run_dir": str(Path(run_dir).resolve()),
        "image": str(image), "steps": int(steps or hs.get("steps", 0)) if is_gen else 0,
        "samples": int(samples or hs.get("samples", 1)) if is_gen else 1, "seed": seed,
        "test_section": run.meta.get("test_section"), "stgen_version": __version__,
        "mpp": float(slide_mpp) if slide_mpp else float("nan"), "patch_px": patch_px,
        "library_id": library_id, "bare_slide": spots is None, **({"grid": grid} if grid else {}),
        "run_sha256": sha256_file(Path(run_dir) / "run.json"),
        "predict_s": round(time.perf_counter() - t_start, 3),
    }
    with atomic_path(out, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    if maps_dir is not None:
        from stgen.plots import plot_slide_maps

        plot_slide_maps(adata, maps_dir, genes=genes)
    return adata


def sampler_defaults(meta: dict) -> dict:
    """``{"steps", "samples"}`` a generative run samples with by default (``run.json``): hinge and flag keep
    them in their own section, the benchmark models in ``sampler``; ``{}`` for deterministic models."""
    if meta.get("model") not in GENERATIVE:
        return {}
    return meta.get("sampler") or meta.get(meta["model"], {}) or {}


def list_slides(source: str | Path) -> list[Path]:
    """Slides of a multi-slide prediction: the image files of a folder (sorted; ``.tif``, ``.svs``,
    ``.jpg``, ...), or the paths listed one per line in a text file (relative to the file; ``#`` comments).
    InputError when there is none, a listed file is missing, or two slides share a file stem."""
    from stgen.data.readers import IMAGE_SUFFIXES

    source = Path(source)
    if source.is_dir():
        slides = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in
                        (*IMAGE_SUFFIXES, ".mrxs", ".scn"))
    elif source.is_file():
        try:
            lines = source.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{source}: cannot read the slide list ({e})") from e
        slides = [(source.parent / ln.strip()) for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        missing = [str(p) for p in slides if not p.is_file()]
        if missing:
            raise InputError(f"{source}: {len(missing)} listed slide(s) do not exist, e.g. {missing[:3]}")
    else:
        raise InputError(f"{source}: no such folder or slide list")
    if not slides:
        raise InputError(f"{source}: no slides found")
    stems = pd.Series([p.stem for p in slides])
    if stems.duplicated().any():
        raise InputError(f"{source}: slides share the name {stems[stems.duplicated()].iloc[0]!r} (outputs are "
                         f"named <stem>.h5ad)")
    return slides


def predict_slides(run_dir: str | Path, slides: str | Path, out_dir: str | Path, shard: tuple[int, int] = (0, 1),
                   seed: int = 0, progress: bool = True, **kwargs) -> dict[str, str]:
    """Bare-slide :func:`predict` of many slides into ``out_dir/<stem>.h5ad`` (maps in ``<stem>_maps/`` when
    ``maps_dir`` is given), resumable and shardable.

    A slide whose output is current (same fit - the SHA-256 of ``run.json`` -, seed, default sampler and
    image: :func:`prediction_is_current`) is skipped, so a killed job re-run with the same command only does
    what is left. ``shard = (k, n)`` takes slides ``k, k + n, k + 2n, ...`` of the sorted list: on a cluster,
    a job array runs the same command with ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`` (the
    scheduler distributes the work; every output is written atomically). Returns ``{slide: status}`` with
    status ``done``, ``skipped`` or ``failed: <error>`` (an InputError of one slide does not stop the others;
    the caller reports them). ``kwargs`` go to :func:`predict` (``mpp``, ``samples``, ``maps_dir``, ...).
    """
    k, n = shard
    if not (isinstance(k, int) and isinstance(n, int) and n >= 1 and 0 <= k < n):
        raise InputError(f"--shard must be K/N with 0 <= K < N, got {k}/{n}")
    todo = list_slides(slides)[k::n]
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: not a folder (several slides are predicted into a folder)")
    maps = kwargs.pop("maps_dir", None)
    status: dict[str, str] = {}
    from tqdm.auto import tqdm

    for img in tqdm(todo, desc=f"slides (shard {k}/{n})", unit="slide", disable=not progress):
        out = out_dir / f"{img.stem}.h5ad"
        if prediction_is_current(out, run_dir, seed=seed, image=img):
            status[str(img)] = "skipped"
            continue
        try:
            predict(run_dir, img, None, out, seed=seed, progress=False,
                    maps_dir=Path(maps) / img.stem if maps is not None else None, **kwargs)
            status[str(img)] = "done"
        except InputError as e:
            status[str(img)] = f"failed: {e}"
    return status


def prediction_is_current(pred_path: str | Path, run_dir: str | Path, seed: int = 0,
                          image: str | Path | None = None) -> bool:
    """True when ``pred_path`` exists and was written by :func:`predict` from the current fit in ``run_dir``
    with the run's default steps/samples and sampling seed ``seed`` (its ``uns['stgen']['run_sha256']``
    matches ``run.json``), and, when ``image`` is given, from that image."""
    pred_path, meta_path = Path(pred_path), Path(run_dir) / "run.json"
    if not (pred_path.is_file() and meta_path.is_file()):
        return False
    try:
        info = ad.read_h5ad(pred_path, backed="r").uns.get("stgen", {})
    except (OSError, KeyError, ValueError):
        return False
    meta = json.loads(meta_path.read_text())
    h = sampler_defaults(meta)
    defaults = info.get("model") not in GENERATIVE or (
        int(info.get("steps", -1)) == int(h.get("steps", -2)) and int(info.get("samples", -1)) == int(h.get("samples", -2)))
    same_image = image is None or info.get("image") == str(image)
    return (info.get("run_sha256") == sha256_file(meta_path) and int(info.get("seed", -1)) == int(seed) and defaults
            and same_image)


def predict_or_reuse(
    run_dir: str | Path,
    image: str | Path,
    spots: str | Path,
    out: str | Path,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[ad.AnnData, float]:
    """``(prediction, predict_s)``: read ``out`` when :func:`prediction_is_current` (same fit, default sampler,
    ``seed``), else :func:`predict` it with the run's defaults. ``predict_s`` is the prediction's stored
    ``uns['stgen']['predict_s']`` (NaN for a file written before it was stored)."""
    if prediction_is_current(out, run_dir, seed=seed):
        pred = ad.read_h5ad(out)
    else:
        pred = predict(run_dir, image, spots, out, cache_dir=cache_dir, seed=seed, progress=progress)
    return pred, float(pred.uns.get("stgen", {}).get("predict_s", float("nan")))


# ------------------------------------------------------------------ evaluate
def _check_folder(path: str | Path | None, option: str) -> None:
    """InputError when ``path`` exists and is not a folder (checked before any work is done)."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise InputError(f"{option} {path}: not a folder")


def load_truth(path: str | Path, units: str) -> ad.AnnData:
    """Ground truth in target ``units``: a Her2ST counts table or an .h5ad of raw counts."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"truth file {path} does not exist")
    if path.suffix == ".h5ad":
        truth = read_anndata(path, "truth file")
        raw = truth.layers["counts"] if "counts" in truth.layers else truth.X
    else:
        truth = read_counts(path)
        raw = truth.X
    return ad.AnnData(X=transform_counts(raw, units), obs=pd.DataFrame(index=truth.obs_names),
                      var=pd.DataFrame(index=truth.var_names))


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

    The metrics are those of :func:`stgen.metrics.evaluate` with the scored
    spots' ``obsm['spatial']`` as coordinates, so they always include ``ssc``,
    ``ssim`` and ``rvd`` (and ``per_gene_r``). Without ``obsm['spatial']``,
    ``ssc`` and ``ssim`` are NaN; with fewer than ``k + 1`` scored spots ``ssc``
    is NaN and a warning is logged (:func:`stgen.metrics.evaluate_section`).
    ``label`` (e.g. the two file names) prefixes any InputError, such as panel
    genes missing from the truth or no common spots.
    """
    try:
        p, t, genes, spots = align_prediction_to_truth(pred, truth)
        coords = prediction_coords(pred, spots)
        metrics = evaluate_section(p, t, genes, coords=coords, k=k, label=label)
        if coords is None:
            metrics.update(ssc=float("nan"), ssim=float("nan"))
        return Scored(metrics, p, t, genes, spots)
    except InputError as e:
        raise InputError(f"{label}: {e}") from e


def evaluate_prediction(pred_path: str | Path, truth_path: str | Path, out: str | Path | None = None,
                        downstream_dir: str | Path | None = None) -> dict:
    """The metrics of :func:`score_prediction` (PCC-50, PCC-200, MSE, MAE, GSC, SSC, RVD, SSIM, per-gene r)
    of a prediction file against a truth file, written to ``out`` (JSON) if given.

    With ``downstream_dir``, :func:`stgen.downstream.run_downstream` also runs (Leiden domains ARI/NMI,
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
        from stgen.downstream import run_downstream

        try:
            metrics["downstream"] = run_downstream(pred, truth, out_dir=downstream_dir)
        except InputError as e:
            raise InputError(f"{label}: {e}") from e
    if out is not None:
        write_json(out, metrics)
    return metrics


def image_for_section(data_dir: Path, section: str) -> Path:
    img = find_image(data_dir, section)
    if img is None:
        raise InputError(f"section {section} has no image under {data_dir / 'ST-imgs'}")
    return img


__all__ = ["fit", "predict", "predict_or_reuse", "prediction_is_current", "evaluate_prediction", "score_prediction",
           "load_run", "get_backbone", "MODELS"]
