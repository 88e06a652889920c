"""Gene identifiers as users' data hold them: Ensembl ids, ``var_names_make_unique`` suffixes, case, aliases, species.

Every reader names genes by HGNC symbol, the names of the CellFM vocabulary. :func:`resolve_gene_names` turns
what a file holds into those symbols, column by column (duplicates are then summed by the reader):

1. **Ensembl ids** (``ENSG00000141510``, with or without a ``.version``): the symbols of a ``var`` column
   (``gene_symbols``, ``gene_name``, ``feature_name``, ... as scanpy, CELLxGENE and HEST write them; a
   Space Ranger features table's ``name``); InputError when there is none.
2. **``var_names_make_unique`` suffixes** (scanpy's ``read_visium``, HEST's Visium samples): ``TBCE-1``,
   ``TBCE-2`` after ``TBCE`` become ``TBCE`` again, so the duplicated features are summed as Space Ranger's
   reader sums them. Only a run ``X-1, X-2, ...`` numbered from 1 after an earlier ``X`` counts: real
   symbols such as ``IGHV1-69-2`` (no ``IGHV1-69-1``) or ``H1-2`` (no ``H1``) are kept.
3. With a vocabulary: a symbol outside it takes the vocabulary's name of the same CellFM gene index
   (``genemap.csv``, which lists former symbols beside current ones, e.g. ``SPMIP1`` -> ``ATP6V1FNB``), else
   the vocabulary symbol equal to it ignoring case, when exactly one is.
4. **Species**: mouse Ensembl ids (``ENSMUSG``) or a panel of mostly mouse-style symbols (``Actb``, ``Gapdh``:
   capital then lower case) that the human vocabulary only matches ignoring case raise one InputError that
   says so, naming a few genes.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Iterable, Sequence
import numpy as np
import pandas as pd
from stgen.errors import InputError

__all__ = ["SYMBOL_COLUMNS", "resolve_gene_names", "vocabulary_index"]

#: ``var`` columns that hold gene symbols beside Ensembl ``var_names``, in order of preference.
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "gene_name", "gene_names", "feature_name", "symbol", "symbols",
                  "name", "gene")

_ENSEMBL = re.compile(r"^ENS([A-Z]{0,4})G\d{6,}(\.\d+)?$")
_SUFFIX = re.compile(r"^(.+)-(\d+)$")
_MOUSE_STYLE = re.compile(r"^[A-Z][a-z][a-z0-9]*(-[a-z0-9]+)*$")


def _is_ensembl(names: Sequence[str]) -> tuple[bool, str | None]:
    """(most names are Ensembl gene ids, the species prefix of the first: '' human, 'MUS' mouse, ...)."""
    hits = [m for m in (_ENSEMBL.match(n) for n in names) if m]
    if not names or len(hits) < 0.8 * len(names):
        return False, None
    return True, hits[0].group(1)


def _symbols_from_var(names: list[str], var: pd.DataFrame | None, where: str) -> list[str]:
    if var is not None:
        cols = {str(c).lower(): c for c in var.columns}
        for want in SYMBOL_COLUMNS:
            col = cols.get(want)
            if col is None:
                continue
            vals = var[col].astype(str).str.strip().to_numpy()
            ok = np.array([v not in ("", "nan", "None") and not _ENSEMBL.match(v) for v in vals])
            if ok.mean() >= 0.5:  # a real symbol column: ids stay where a symbol is missing
                return [v if k else n for v, k, n in zip(vals, ok, names)]
    raise InputError(f"{where}: the genes are named by Ensembl id (e.g. {', '.join(names[:3])}) and no var column "
                     f"holds their symbols (looked for {', '.join(SYMBOL_COLUMNS)}); add one, e.g. from the "
                     "Space Ranger features table or HEST's Ensembl-to-symbol table")


def _undo_make_unique(names: list[str]) -> list[str]:
    """``X, ..., X-1, ..., X-2`` (anndata's ``var_names_make_unique``) -> ``X, X, X``; other names unchanged."""
    seen: dict[str, int] = {}  # base -> last suffix merged back
    out = []
    for n in names:
        m = _SUFFIX.match(n)
        if m and m.group(1) in seen and int(m.group(2)) == seen[m.group(1)] + 1:
            seen[m.group(1)] += 1
            out.append(m.group(1))
            continue
        seen.setdefault(n, 0)
        out.append(n)
    return out


@functools.lru_cache(maxsize=4)
def _vocab_tables(vocab: tuple[str, ...], genemap: str | None) -> tuple[frozenset, dict, dict]:
    vset = frozenset(vocab)
    upper: dict[str, list[str]] = {}
    for g in vocab:
        upper.setdefault(g.upper(), []).append(g)
    aliases: dict[str, str] = {}
    if genemap is not None and Path(genemap).is_file():
        try:
            gm = pd.read_csv(genemap, dtype={0: str})
        except (OSError, pd.errors.ParserError, UnicodeDecodeError):
            gm = None
        if gm is not None and gm.shape[1] >= 2:
            names, idx = gm.iloc[:, 0].astype(str).str.strip(), gm.iloc[:, 1]
            canon = {i: n for n, i in zip(names, idx) if n in vset}
            aliases = {n: canon[i] for n, i in zip(names, idx) if n not in vset and i in canon}
    return vset, {k: v[0] for k, v in upper.items() if len(v) == 1}, aliases


def vocabulary_index(vocabulary: Iterable[str], genemap: str | Path | None = None) -> tuple[frozenset, dict, dict]:
    """(vocabulary set, upper-case symbol -> vocabulary symbol where unique, alias -> vocabulary symbol from
    CellFM's ``genemap.csv``: names sharing a gene index with a vocabulary symbol). Cached per vocabulary."""
    return _vocab_tables(tuple(vocabulary), str(genemap) if genemap is not None else None)


def resolve_gene_names(
    names: Sequence[str],
    where: str,
    var: pd.DataFrame | None = None,
    vocabulary: Iterable[str] | None = None,
    genemap: str | Path | None = None,
    make_unique_suffixes: bool = True,
) -> list[str]:
    """HGNC symbols for the columns named ``names`` (module docstring); same length and order.

    Parameters
    ----------
    names : the file's gene names (``var_names``, a features table's names).
    where : file named in errors.
    var : the AnnData's ``var`` (for Ensembl ``var_names``: its symbol column).
    vocabulary : the backbone's symbols (e.g. :func:`stgen.data.panel.load_vocabulary`); None: steps 1-2 only.
    genemap : CellFM's ``genemap.csv`` (symbol, gene index) for former symbols.
    make_unique_suffixes : undo ``var_names_make_unique`` (AnnData inputs; not for tables that never had it).

    Raises
    ------
    InputError : Ensembl ids without symbols; a mouse section against the (human) vocabulary.
    """
    out = [str(n).strip() for n in names]
    ens, species = _is_ensembl(out)
    if ens and species not in ("", None):
        raise InputError(f"{where}: the genes are {'mouse' if species == 'MUS' else 'non-human'} Ensembl ids "
                         f"(ENS{species}G..., e.g. {', '.join(out[:3])}); stgen's models and the CellFM vocabulary are "
                         "human: use a human section")
    if ens:
        out = _symbols_from_var(out, var, where)
    if make_unique_suffixes:
        out = _undo_make_unique(out)
    if vocabulary is None:
        return out
    vset, upper, aliases = vocabulary_index(vocabulary, genemap)
    exact = sum(n in vset for n in out)
    mouse = [n for n in out if _MOUSE_STYLE.match(n) and n not in vset and n.upper() in upper]
    if len(out) >= 20 and len(mouse) > max(exact, 0.3 * len(out)):
        raise InputError(f"{where}: this looks like a mouse section: {len(mouse)} of {len(out)} genes are mouse-style "
                         f"symbols ({', '.join(mouse[:4])}) that the human CellFM vocabulary matches only ignoring "
                         "case; stgen's models are human: use a human section")
    return [n if n in vset else aliases.get(n) or upper.get(n.upper(), n) for n in out]
