"""Gene identifiers: Ensembl ids, var_names_make_unique suffixes, aliases, case, species (stgen.data.genes)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from reader_fixtures import make_h5ad_section
from stgen.data.genes import resolve_gene_names
from stgen.data.h5ad import read_h5ad_section
from stgen.errors import InputError


def test_make_unique_suffixes_are_undone_but_real_dashed_symbols_kept():
    names = ["TBCE", "ACTB", "TBCE-1", "TBCE-2", "IGHV1-69", "IGHV1-69-2", "H1-2", "H1-3", "NKX2-1", "ACTB-2"]
    got = resolve_gene_names(names, "x.h5ad")
    assert got == ["TBCE", "ACTB", "TBCE", "TBCE", "IGHV1-69", "IGHV1-69-2", "H1-2", "H1-3", "NKX2-1", "ACTB-2"]
    assert resolve_gene_names(names, "x", make_unique_suffixes=False) == names


def test_ensembl_ids_take_the_symbol_column():
    var = pd.DataFrame({"gene_ids": ["ENSG00000075624", "ENSG00000141736.13", "ENSG00000999999"],
                        "feature_name": ["ACTB", "ERBB2", "nan"]},
                       index=["ENSG00000075624", "ENSG00000141736.13", "ENSG00000999999"])
    assert resolve_gene_names(list(var.index), "x", var=var) == ["ACTB", "ERBB2", "ENSG00000999999"]
    with pytest.raises(InputError, match=r"x: the genes are named by Ensembl id \(e\.g\. ENSG00000075624.*gene_symbols"):
        resolve_gene_names(list(var.index), "x", var=var[["gene_ids"]])


def test_mouse_sections_are_refused_with_examples():
    with pytest.raises(InputError, match=r"mouse Ensembl ids \(ENSMUSG.*ENSMUSG00000029580"):
        resolve_gene_names(["ENSMUSG00000029580", "ENSMUSG00000057666"], "m.h5ad")
    vocab = ["ACTB", "GAPDH", "ERBB2", "KRT19", "CD74"] + [f"GENE{i}" for i in range(40)]
    mouse = ["Actb", "Gapdh", "Erbb2", "Krt19", "Cd74"] + [f"Gene{i}" for i in range(20)]
    with pytest.raises(InputError, match=r"m\.h5ad: this looks like a mouse section: 25 of 25 .*Actb, Gapdh"):
        resolve_gene_names(mouse, "m.h5ad", vocabulary=vocab)
    # a human panel with a few odd-case symbols is fine: case is resolved
    human = ["ACTB", "gapdh", "Erbb2"] + [f"GENE{i}" for i in range(30)]
    assert resolve_gene_names(human, "h", vocabulary=vocab)[:3] == ["ACTB", "GAPDH", "ERBB2"]


def test_aliases_from_a_genemap_table(tmp_path):
    """CellFM's genemap.csv lists former and current symbols with one gene index (e.g. ATP6V1FNB / SPMIP1)."""
    gm = tmp_path / "genemap.csv"
    pd.DataFrame({"idx": [1, 2, 2, 3]}, index=["ACTB", "ATP6V1FNB", "SPMIP1", "KRT19"]).to_csv(gm)
    vocab = ["ACTB", "ATP6V1FNB", "KRT19"]
    assert resolve_gene_names(["SPMIP1", "ACTB", "OTHER"], "x", vocabulary=vocab, genemap=gm) == \
        ["ATP6V1FNB", "ACTB", "OTHER"]


def test_real_cellfm_genemap_resolves_a_former_symbol():
    from stgen.data.common import _default_vocabulary

    vocab, genemap = _default_vocabulary()
    if vocab is None or not genemap.is_file():
        pytest.skip("CellFM vocabulary not available")
    assert "ATP6V1FNB" in vocab and "SPMIP1" not in vocab
    assert resolve_gene_names(["SPMIP1"], "x", vocabulary=vocab, genemap=genemap) == ["ATP6V1FNB"]


def test_scanpy_style_h5ad_with_suffixed_duplicates_is_summed_back(tmp_path):
    """An AnnData written after var_names_make_unique (GAPDH, GAPDH-1) reads as the Space Ranger reader reads
    the same features: one GAPDH column holding their sum."""
    s = make_h5ad_section(tmp_path, "S1", uns="visium", image=None)
    a = read_h5ad_section(s.path)
    b = ad.read_h5ad(s.path)
    raw = b.layers["counts"] if "counts" in b.layers else b.X
    genes = list(b.var_names)
    # rewrite it with the duplicated symbol split as anndata's make_unique would have left it
    extra = sp.csr_matrix(np.ones((b.n_obs, 1), dtype=np.float32))
    c = ad.AnnData(X=sp.hstack([sp.csr_matrix(raw), extra]).tocsr(), obs=b.obs.copy(),
                   var=pd.DataFrame(index=genes + ["GAPDH"]), obsm=dict(b.obsm), uns=dict(b.uns))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c.var_names_make_unique()
    assert "GAPDH-1" in c.var_names
    c.write_h5ad(tmp_path / "S1.h5ad")
    r = read_h5ad_section(tmp_path / "S1.h5ad")
    assert list(r.var_names) == list(a.var_names)
    g = list(r.var_names).index("GAPDH")
    np.testing.assert_array_equal(r.X[:, g].toarray().ravel(), a.X[:, g].toarray().ravel() + 1)
