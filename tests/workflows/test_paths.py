"""Default locations are found from any working directory, not only from the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

from stgen.errors import InputError
from stgen.workflows.paths import default_data_dir

REPO = Path(__file__).resolve().parents[2]


def test_default_data_dir_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("STGEN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing here: the checkout's data or ../shared must be found
    if not any((p / "ST-cnts").is_dir() for p in (REPO / "data/her2st", REPO / "data", REPO.parent / "shared/data/her2st")):
        with pytest.raises(InputError, match="--data"):
            default_data_dir()
        return
    found = default_data_dir()
    assert (found / "ST-cnts").is_dir() and REPO.parent in found.parents  # not resolved: ../shared may be a link


def test_stgen_data_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("STGEN_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
