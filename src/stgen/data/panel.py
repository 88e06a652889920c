"""Gene panel selection: CellFM vocabulary and HMHVG (highly-mean, highly-variable genes).

HMHVG follows the Stem / HINGE protocol: among genes measured in every training
section (and in the backbone's vocabulary), take the top-``n`` genes by mean
and the top-``n`` by variance of log-transformed expression over all training
spots, and keep their intersection.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from stgen.data.targets import transform_counts
from stgen.errors import InputError

__all__ = ["VOCAB_ENV", "default_vocab_path", "load_vocabulary", "select_hmhvg"]

VOCAB_ENV = "STGEN_VOCAB"
_VOCAB_REL = Path("shared/vocab/cellfm/gene_info.csv")


def _candidate_vocab_paths() -> list[Path]:
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parent]
    seen: list[Path] = []
    for start in starts:
        for d in (start, *start.parents):
            p = d / _VOCAB_REL
            if p not in seen:
                seen.append(p)
    return seen


def default_vocab_path() -> Path | None:
    """Default CellFM ``gene_info.csv``: ``$STGEN_VOCAB`` if set, else the first
    ``shared/vocab/cellfm/gene_info.csv`` found beside the current directory or
    the package folder or any of their parents (e.g. ``<repo>/../shared/...``).
    Returns None if nothing is found (``$STGEN_VOCAB`` is returned even if missing)."""
    env = os.environ.get(VOCAB_ENV)
    if env:
        return Path(env)
    for p in _candidate_vocab_paths():
        if p.is_file():
            return p
    return None


def load_vocabulary(path: str | os.PathLike | None = None) -> list[str]:
    """Gene symbols of the CellFM vocabulary (column ``HGNC_gene`` of ``gene_info.csv``).

    Returns unique, stripped symbols in file order.

    Raises
    ------
    InputError : file not found (or no default found), unreadable, no
        ``HGNC_gene`` column, or no genes.
    """
    p = Path(path) if path is not None else default_vocab_path()
    if p is None:
        raise InputError(
            f"CellFM vocabulary not found: set ${VOCAB_ENV} or place it at ../{_VOCAB_REL} "
            "relative to the repository"
        )
    if not p.is_file():
        raise InputError(f"{p}: vocabulary file not found")
    try:
        df = pd.read_csv(p, usecols=lambda c: c == "HGNC_gene", dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise InputError(f"{p}: cannot read vocabulary ({e})") from e
    if "HGNC_gene" not in df.columns:
        raise InputError(f"{p}: no 'HGNC_gene' column")
    genes = [g.strip() for g in df["HGNC_gene"].dropna() if g.strip()]
    genes = list(dict.fromkeys(genes))
    if not genes:
        raise InputError(f"{p}: vocabulary has no genes")
    return genes


def select_hmhvg(
    adatas: Sequence[AnnData],
    vocabulary: Iterable[str] | None,
    n_top: int = 300,
    transform: str = "log2",
) -> list[str]:
    """Highly-mean, highly-variable gene panel (HMHVG).

    Must be called on the TRAINING sections only (using held-out sections would
    leak test information into the panel).

    Parameters
    ----------
    adatas : training sections, raw counts in ``.X`` (spots x genes).
    vocabulary : allowed gene symbols (e.g. :func:`load_vocabulary`), or None.
    n_top : size of the top-by-mean and top-by-variance lists.
    transform : expression transform (see :func:`stgen.data.targets.transform_counts`).

    Returns
    -------
    Genes in ``top-n_top by mean ∩ top-n_top by variance`` (population variance,
    all spots of all sections pooled), ordered by descending mean. Candidate
    genes are those present in every section and in ``vocabulary``. Ties are
    broken by candidate order (first section's gene order).

    Raises
    ------
    InputError : no sections, ``n_top < 1``, no candidate genes or empty panel.
    """
    if len(adatas) == 0:
        raise InputError("select_hmhvg: no sections given")
    if int(n_top) < 1:
        raise InputError(f"select_hmhvg: n_top must be >= 1, got {n_top!r}")
    common = set(adatas[0].var_names)
    for a in adatas[1:]:
        common &= set(a.var_names)
    if vocabulary is not None:
        common &= set(vocabulary)
    genes = [g for g in adatas[0].var_names if g in common]
    if not genes:
        raise InputError("select_hmhvg: no gene is shared by all sections (and the vocabulary)")

    n = 0
    s1 = np.zeros(len(genes))
    s2 = np.zeros(len(genes))
    for a in adatas:
        idx = a.var_names.get_indexer(genes)
        Y = transform_counts(a.X[:, idx], method=transform).astype(np.float64)
        n += Y.shape[0]
        s1 += Y.sum(0)
        s2 += (Y * Y).sum(0)
    if n == 0:
        raise InputError("select_hmhvg: sections have no spots")
    mean = s1 / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    k = min(int(n_top), len(genes))
    top_mean = set(np.argsort(-mean, kind="stable")[:k].tolist())
    top_var = set(np.argsort(-var, kind="stable")[:k].tolist())
    sel = sorted(top_mean & top_var, key=lambda i: (-mean[i], i))
    if not sel:
        raise InputError(f"select_hmhvg: empty panel (no gene in both top-{k} lists)")
    return [genes[i] for i in sel]
