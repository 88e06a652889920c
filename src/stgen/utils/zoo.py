"""The model zoo shipped inside the package: trained runs and the pre-trained backbone as package data.

``src/stgen/zoo/manifest.json`` lists every built-in entry::

    {"runs": {"her2st-hinge": {"model": "hinge", "dir": "her2st-hinge", "files": {"run.json": "<sha256>", ...},
                               "trained_on": ..., "sections": [...], "panel_size": 250, "benchmark": {...}}, ...},
     "backbones": {"<backbone cache key>": {"dir": "backbone", "files": {...}, ...}}}

Each entry's files lie in ``src/stgen/zoo/<dir>/`` (safetensors / npz + JSON / YAML, no pickle). Every use
checks each file against its SHA-256 in the manifest first: an edited or corrupted file is refused with an
error that says how to reinstall. The zoo is written by :func:`stgen.workflows.zoo.build_zoo`.
"""

from __future__ import annotations

import json
from pathlib import Path
from stgen.errors import InputError
from stgen.utils.io import sha256_file

#: Folder of the shipped entries (package data).
ZOO_DIR = Path(__file__).resolve().parents[1] / "zoo"
MANIFEST = ZOO_DIR / "manifest.json"

_REINSTALL = ('reinstall stgen (pip install --force-reinstall stgen, or `git checkout src/stgen/zoo` in a '
              'checkout) or rebuild the zoo (bash scripts/build_zoo.sh)')


def manifest(zoo_dir: Path | None = None) -> dict:
    """The zoo manifest (``{"runs": {...}, "backbones": {...}}``); empty sections when there is no zoo."""
    path = (zoo_dir or ZOO_DIR) / "manifest.json"
    if not path.is_file():
        return {"runs": {}, "backbones": {}}
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: the model zoo's manifest is unreadable ({e}); {_REINSTALL}") from e
    return {"runs": dict(m.get("runs") or {}), "backbones": dict(m.get("backbones") or {})}


def zoo_names(zoo_dir: Path | None = None) -> list[str]:
    """Names of the built-in runs (``stgen predict --model NAME``)."""
    return sorted(manifest(zoo_dir)["runs"])


def verified_dir(entry: dict, what: str, zoo_dir: Path | None = None) -> Path:
    """The folder of a manifest ``entry`` after checking every listed file's SHA-256; InputError naming
    ``what`` and the file when one is missing or differs (with how to reinstall)."""
    d = (zoo_dir or ZOO_DIR) / entry["dir"]
    for name, want in entry["files"].items():
        p = d / name
        if not p.is_file():
            raise InputError(f"{what}: shipped file {p} is missing; {_REINSTALL}")
        if sha256_file(p) != want:
            raise InputError(f"{what}: shipped file {p} does not match its SHA-256 in {MANIFEST.name} (edited or "
                             f"corrupted); {_REINSTALL}")
    return d


def zoo_run_dir(name: str, zoo_dir: Path | None = None) -> Path:
    """The verified RUN_DIR of built-in run ``name``. InputError for an unknown name (listing the built-in
    ones) or a file that fails its SHA-256."""
    runs = manifest(zoo_dir)["runs"]
    if name not in runs:
        avail = ", ".join(sorted(runs)) or "none (this installation ships no zoo)"
        raise InputError(f"{name!r} is neither a RUN_DIR (no run.json there) nor a built-in model; built-in: {avail} "
                         "(`stgen models` lists them)")
    return verified_dir(runs[name], f"built-in model {name!r}", zoo_dir)


def zoo_backbone_dir(key: str, zoo_dir: Path | None = None) -> Path | None:
    """The verified folder (``backbone.json`` + ``backbone.safetensors``) of the shipped backbone with cache
    key ``key``, or None when the zoo has none for that key."""
    entry = manifest(zoo_dir)["backbones"].get(key)
    return None if entry is None else verified_dir(entry, f"shipped backbone {key}", zoo_dir)


def looks_like_zoo_name(run: str | Path) -> bool:
    """A ``--model`` value that is not an existing path and has no path separator: a built-in name."""
    s = str(run)
    return not Path(s).exists() and "/" not in s and "\\" not in s
