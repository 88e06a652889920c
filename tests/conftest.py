"""Shared pytest fixtures. The tests mirror the package (tests/<layer>/); the shared fixture modules
(``model_fixtures``, ``reader_fixtures``) live here and are importable from every folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded machine two threads stall."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
