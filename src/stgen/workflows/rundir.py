"""Run directories: the resumable ``.partial`` work folder, config hashes, loading a RUN_DIR."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from stgen import __version__
from stgen.errors import InputError
from stgen.utils.zoo import looks_like_zoo_name, zoo_run_dir
from stgen.image.scaled import SlideRef, as_slide_ref
from stgen.models.base import FeatureSettings, SectionInput, SpotModel
from stgen.models.registry import MODELS, spot_model
from stgen.utils.io import sha256_json, write_json
from stgen.workflows.config import StgenConfig
from stgen.workflows.inputs import feature_settings

log = logging.getLogger(__name__)


class _PartialRun:
    """The work folder ``<out>.partial`` of :func:`fit` (rules in its docstring).

    :meth:`preflight` applies the rules before any work; as a context manager
    it claims the folder (a lock; stale content removed unless resuming),
    sets :func:`stgen.training.trainer.training_context` (checkpoints in ``checkpoints/``,
    the checkpoint to resume from, devices) and yields ``out/``, which replaces
    ``out`` on success. Processes other than global rank 0 of a multi-process
    launch only train: they resume from the same checkpoint and write into a
    private temporary folder that is deleted.
    """

    def __init__(self, out: Path, ident: dict, resume: bool, devices: dict) -> None:
        from stgen.training.trainer import check_trainer_options, is_launch_zero

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

        from stgen.training.trainer import training_context

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
                from stgen.utils.io import OutputError, _disk_full
            except ImportError:
                return False
            if _disk_full(exc):  # as stgen.utils.io.atomic_dir reports it
                raise OutputError(f"no space left on device writing {self.out}", getattr(exc, "errno", None)) from exc
        return False


#: ``hinge`` fields read by HINGE alone (sampler, predictive head) and the values other models' hashes keep
HINGE_ONLY = ("steps", "samples", "predictive", "reveal", "estimate", "sd_scale", "context_radii", "grad_clip",
              "feat_dropout", "cond_token")
HINGE_ONLY_AS_HASHED = {"steps": 5, "samples": 10}
#: per config section, fields added after runs existed, at the value every earlier run was trained with: at that
#: value they stay out of every hash, so earlier runs (and the shipped zoo runs) keep their identity, and a saved
#: ``config.yaml`` without them loads at that value (:func:`read_run_config`), whatever the default is now
ADDED_AS_BEFORE = {
    "features": {"patch_um": None, "stain": "none"},
    "hinge": {"context_radii": [], "grad_clip": None, "feat_dropout": 0.0, "estimate": "mixture", "cond_token": False},
    "flag": {"context_radii": [], "ema": None, "ensemble": 1, "sd_scale": 1.0},
}


def config_hash(cfg: StgenConfig, model: str, test_section: str) -> str:
    """Identity of a fit: same hash = same model would be trained.

    A model's config section counts only for that model, except the sections of
    the models with ``in_every_hash`` (``hinge`` and ``ridge``, the first two):
    the hashes (and cached runs) of the others must not change when a model is
    added or its section is edited. HINGE's sampler and predictive-head fields (:data:`HINGE_ONLY`) count
    only for ``hinge`` and ``hinge-paper``; ``hinge-paper`` counts them at its preset's values
    (:meth:`~stgen.models.base.SpotModel.trained_section`), so a new HINGE default leaves its runs valid.
    """
    d = cfg.for_model(model).to_dict()  # stain auto resolved, a preset model's section with its preset applied
    if not model.startswith("hinge"):  # HINGE's sampler and head train no other model: they enter other
        d["hinge"] = {**{k: v for k, v in d["hinge"].items() if k not in HINGE_ONLY},  # models' hashes at
                      **HINGE_ONLY_AS_HASHED}  # their values when those hashes were first computed
    for section, added in ADDED_AS_BEFORE.items():
        for k, before in added.items():
            if d[section].get(k, before) == before:
                d[section].pop(k, None)
    for other in MODELS:
        if other != model and not spot_model(other).in_every_hash:
            d.pop(other, None)
    return sha256_json({"cfg": d, "model": model, "test": test_section, "v": __version__})[:16]


# ------------------------------------------------------------------ predict
@dataclass
class TrainedRun:
    """A loaded RUN_DIR: ``predict(feats (N, F)) -> (mean (N, G), std (N, G))``.

    ``model`` is the run's :class:`~stgen.models.base.SpotModel` (e.g. ``model.net`` is HINGE's network).
    """

    meta: dict
    cfg: StgenConfig
    model: SpotModel
    cache_dir: Path | None = None  # feature cache of the benchmark models' extra patches (HiFusion)
    patch_px: int | None = None  # spot patch side at the predicted slide's resolution (default: as trained)
    run_dir: Path | None = None  # where it was loaded from (load_run)

    @property
    def panel(self) -> list[str]:
        return self.meta["panel"]

    def features(self, progress: bool = False) -> FeatureSettings:
        """The run's encoder settings with the spot patch at :attr:`patch_px` (when set); a configuration still
        saying ``features.stain: auto`` (a run assembled by hand) resolves to the run's model's default."""
        fs = feature_settings(self.cfg.for_model(self.meta["model"]), self.cache_dir, progress)
        if self.patch_px is not None:
            fs.patch_px = int(self.patch_px)
        return fs

    def predict(self, feats: np.ndarray, samples: int | None = None, steps: int | None = None,
                seed: int = 0, progress: bool = False, batch_size: int | None = None,
                device: str | None = None, precision: str | None = None,
                xy: np.ndarray | None = None, image: "SlideRef | str | Path | None" = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and sd over samples, (N, G) each, in the run's target units.

        ``feats`` (N, F) are the spot-patch features, ``xy`` (N, 2) the spots' full-resolution pixel
        coordinates (needed by every model with ``needs_xy`` and by FLAG, whose spot graph is built from
        them; HINGE keys each spot's reveal orders on its position when given), ``image`` the slide (a path,
        or a :class:`~stgen.image.scaled.SlideRef` to a downsampled image; HiFusion and ST-Net encode or fine-tune on its patches). All spots are one section, generated
        together. ``batch_size``, ``device`` (default: CUDA when available) and ``precision``
        (``bf16-mixed``/``16-mixed``: autocast) go to the backbone models; the others run on the CPU.
        """
        cls = type(self.model)
        if xy is None and cls.needs_xy:
            raise InputError(f"{self.meta['model']} needs the spots' pixel coordinates xy")
        section = SectionInput("predict", xy, feats, as_slide_ref(image) if image is not None else None)
        mean, std = self.model.predict(section, self.features(progress), samples=samples, steps=steps, seed=seed,
                                       progress=progress, batch_size=batch_size, device=device, precision=precision)
        return np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)


def read_run_config(run_dir: str | Path) -> StgenConfig:
    """The configuration a RUN_DIR was trained with (its ``config.yaml``): a field the file lacks, added to
    stgen after the run was written, takes the value the run was trained at (:data:`ADDED_AS_BEFORE`, e.g.
    ``features.stain: none``), not today's default. InputError when the file is missing or invalid."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise InputError(f"{run_dir} has no config.yaml; refit the run with `stgen fit`")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{path} cannot be read as YAML ({' '.join(str(e).split())})") from e
    if not isinstance(d, dict):
        raise InputError(f"{path} must contain a mapping")
    for section, added in ADDED_AS_BEFORE.items():
        saved = d.get(section)
        if saved is None or isinstance(saved, dict):  # a bad section is from_dict's to refuse
            d[section] = {**added, **(saved or {})}
    return StgenConfig.from_dict(d, source=str(path))


def load_run(run_dir: str | Path) -> TrainedRun:
    """Load a RUN_DIR written by :func:`stgen.workflows.fit.fit` (safetensors / npz only, no pickle), or a
    built-in model of the package's zoo by name (``her2st-hinge``; :mod:`stgen.utils.zoo`).

    InputError when ``run_dir`` has no ``run.json``, names an unknown model, or its weights do not load."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file() and looks_like_zoo_name(run_dir):
        run_dir = zoo_run_dir(str(run_dir))  # a built-in model (`stgen models`), checked by SHA-256
    if not (run_dir / "run.json").is_file():
        raise InputError(f"{run_dir} is not a stgen run directory (no run.json); create one with `stgen fit`")
    meta = yaml.safe_load((run_dir / "run.json").read_text())
    cfg = read_run_config(run_dir)
    name = meta["model"]
    cls = spot_model(name)
    return TrainedRun(meta, cfg, cls.load(run_dir, meta, cls.section_of(cfg)), run_dir=run_dir)
