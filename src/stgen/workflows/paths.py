"""Default locations: the data set, the cache, a Her2ST section's image."""

from __future__ import annotations

import os
from pathlib import Path
from stgen.data.her2st import find_image
from stgen.errors import InputError
from stgen.utils.io import default_cache_dir  # noqa: F401 - re-exported: the workflows' default


def default_data_dir() -> Path:
    """``$STGEN_DATA``, else the first of ``./data/her2st``, ``./data``, ``../shared/data/her2st``
    (relative to the working directory, then to the source checkout) that holds ``ST-cnts``."""
    if "STGEN_DATA" in os.environ:
        return Path(os.environ["STGEN_DATA"])
    repo = Path(__file__).resolve().parents[3]  # src/stgen/workflows/paths.py -> the checkout
    for base in (Path.cwd(), repo):
        for cand in (base / "data/her2st", base / "data", base.parent / "shared/data/her2st"):
            if (cand / "ST-cnts").is_dir():
                return cand
    raise InputError("no Her2ST data found: pass --data DIR (a folder with ST-cnts/, ST-spotfiles/, ST-imgs/)")


def image_for_section(data_dir: Path, section: str) -> Path:
    img = find_image(data_dir, section)
    if img is None:
        raise InputError(f"section {section} has no image under {data_dir / 'ST-imgs'}")
    return img
