"""Atomic file output and content hashing.

Outputs are written to a temporary name in the destination folder and renamed
into place only when complete, so an interrupted or failed job never leaves a
half-written file (or run directory) at the requested path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator
from stgen.errors import InputError, StgenError


#: errno values that mean "the device is full" (a quota counts as full).
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class OutputError(StgenError, OSError):
    """Writing an output failed for a reason outside the user's inputs, e.g. a full disk.

    Also an :class:`OSError` (``errno`` is kept), so code that handles OS errors still
    catches it; ``str()`` is the message alone. The destination was left untouched and no
    temporary file remains (:func:`atomic_path`, :func:`atomic_dir`).
    """

    def __init__(self, message: str, err: int | None = None) -> None:
        OSError.__init__(self, err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _disk_full(e: BaseException) -> bool:
    """An OSError (or a library's error wrapping one, e.g. h5py's) saying the device is full."""
    if isinstance(e, OSError) and e.errno in _FULL:
        return True
    return isinstance(e, (OSError, RuntimeError)) and (
        "no space left on device" in str(e).lower() or "disk quota exceeded" in str(e).lower())


def _output_folder(dest: Path, kind: str) -> None:
    """Create ``dest``'s parent folder; InputError when ``dest`` or its folder cannot be used."""
    if not dest.name or dest.name in (".", ".."):
        raise InputError(f"{dest}: not a valid output {kind} name")
    if kind == "file" and dest.is_dir():
        raise InputError(f"{dest}: is a folder; give the path of the output file to write")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if _disk_full(e):
            raise OutputError(f"no space left on device creating the folder of {dest}", e.errno) from e
        raise InputError(f"{dest}: cannot create its folder {dest.parent} ({e.strerror or e})") from e


def _temp_failed(dest: Path, e: OSError) -> StgenError:
    if _disk_full(e):
        return OutputError(f"no space left on device writing {dest}", e.errno)
    return InputError(f"{dest}: cannot write in {dest.parent} ({e.strerror or e})")


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; rename it onto ``dest`` on success.

    On any exception inside the ``with`` block the temporary file is removed and
    ``dest`` is left untouched. ``suffix`` keeps an extension on the temporary
    name for writers that infer the format from it (e.g. ``.h5ad``, ``.png``).

    Raises
    ------
    InputError : ``dest`` is a folder, or its folder cannot be created or written
        (raised on entering the ``with`` block, before anything is computed into it).
    OutputError : the device is full (``ENOSPC``/``EDQUOT``, also when a library
        wraps it): message ``"no space left on device writing <dest>"``; ``dest``
        keeps its previous content and the temporary file is removed.
    """
    dest = Path(dest)
    _output_folder(dest, "file")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or dest.suffix, dir=dest.parent)
    except OSError as e:
        raise _temp_failed(dest, e) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, dest)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if _disk_full(e) and not isinstance(e, StgenError):
            raise OutputError(f"no space left on device writing {dest}", getattr(e, "errno", None)) from e
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``dest``; move it onto ``dest`` on success.

    An existing ``dest`` is replaced only after the new content is complete. On
    failure the temporary directory is deleted and ``dest`` is untouched. Errors
    as :func:`atomic_path` (a full device: :class:`OutputError`).
    """
    dest = Path(dest)
    _output_folder(dest, "folder")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as e:
        raise _temp_failed(dest, e) from e
    try:
        yield tmp
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e) and not isinstance(e, StgenError):
            raise OutputError(f"no space left on device writing {dest}", getattr(e, "errno", None)) from e
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (streamed, constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of a JSON-serialisable object in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$STGEN_CACHE`` or ``./.stgen_cache``: features, pre-trained backbones and images materialised from
    AnnData / SpatialData stores (``images/``)."""
    return Path(os.environ.get("STGEN_CACHE", Path.cwd() / ".stgen_cache"))
