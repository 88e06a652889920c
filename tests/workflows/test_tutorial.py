"""docs/tutorial.md runs: every ```python block, in order, on a tiny synthetic HEST-1k folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reader_fixtures import make_hest_sample

TUTORIAL = Path(__file__).resolve().parents[2] / "docs" / "tutorial.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), flags=re.S)


def test_tutorial_has_code():
    assert len(_blocks()) >= 5


def test_tutorial_runs_on_a_hest_folder(tmp_path, one_thread):
    hest = tmp_path / "hest"
    samples = [f"TENX{i}" for i in (1, 2, 3)]
    for i, s in enumerate(samples):
        make_hest_sample(hest, s, n_spots=48, seed=i)
    ns = {"HEST_DIR": hest, "SAMPLES": samples, "WORK": tmp_path / "work", "ENCODER": "rgb-stats"}
    (tmp_path / "work").mkdir()
    for i, code in enumerate(_blocks()):
        try:
            exec(compile(code, f"{TUTORIAL.name}[block {i}]", "exec"), ns)
        except Exception as e:  # name the block that broke
            pytest.fail(f"tutorial block {i} failed: {type(e).__name__}: {e}\n{code}")
    pred = ns["pred"]
    assert pred.uns["stgen"]["bare_slide"] and pred.n_obs > 10
    assert (tmp_path / "work" / "scanpy_maps.png").stat().st_size > 1000
    assert (tmp_path / "work" / "maps" / "uncertainty.png").is_file()
