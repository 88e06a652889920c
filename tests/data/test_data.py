"""Tests of the Her2ST reader, target transforms and HMHVG panel selection."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from PIL import Image

from stgen.data import her2st
from stgen.data.panel import default_vocab_path, load_vocabulary, select_hmhvg
from stgen.data.targets import TARGET_TRANSFORMS, transform_counts
from stgen.errors import InputError

REAL = Path(__file__).resolve().parents[3] / "shared/data/her2st"

GENES = ["G1", "G2", "G3", "G2"]  # G2 duplicated -> summed
# spot -> counts (in GENES order); 9x9 is absent from the spot file (dropped by the join)
COUNTS = {
    "2x1": [1, 2, 0, 3],
    "1x1": [0, 0, 4, 1],
    "3x2": [5, 1, 1, 0],
    "9x9": [7, 7, 7, 7],
    "1x3": [2, 0, 0, 0],
}


def _spot_rows(extra: list[str] | None = None) -> list[str]:
    rows = ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
    for x in range(1, 4):
        for y in range(1, 4):
            # 20 px per array step -> mpp = 200 / 20 = 10 um/px
            rows.append(f"{x}\t{y}\t{x}.0\t{y}.0\t{10 + 20 * x}\t{5 + 20 * y}\t1")
    rows.append("2\t2\t2\t2\t50\t45\t0")  # not selected, duplicates nothing once filtered
    return rows + (extra or [])


def _write_counts(path: Path, genes=GENES, counts=COUNTS, raw: str | None = None) -> None:
    text = raw if raw is not None else "\t".join([""] + genes) + "\n" + "".join(
        "\t".join([s] + [str(v) for v in vals]) + "\n" for s, vals in counts.items()
    )
    with gzip.open(path, "wt") as f:
        f.write(text)


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    r = tmp_path / "her2st"
    (r / "ST-cnts").mkdir(parents=True)
    (r / "ST-spotfiles").mkdir()
    for sec in ("A1", "B1"):
        _write_counts(r / "ST-cnts" / f"{sec}.tsv.gz")
        (r / "ST-spotfiles" / f"{sec}_selection.tsv").write_text("\n".join(_spot_rows()) + "\n")
    d = r / "ST-imgs" / "A" / "A1"
    d.mkdir(parents=True)
    Image.new("RGB", (100, 120), (200, 150, 200)).save(d / "he.jpg")
    return r


def test_list_sections_and_find_image(root: Path, tmp_path: Path) -> None:
    assert her2st.list_sections(root) == ["A1", "B1"]
    assert her2st.list_sections(root, imaged_only=True) == ["A1"]
    assert her2st.find_image(root, "A1") == root / "ST-imgs/A/A1/he.jpg"
    assert her2st.find_image(root, "B1") is None
    with pytest.raises(InputError, match="ST-cnts"):
        her2st.list_sections(tmp_path / "nowhere")


def test_read_section_shapes_join_and_coordinates(root: Path) -> None:
    a = her2st.read_section(root, "A1")
    # inner join keeps count-table order and drops 9x9 (no position)
    assert list(a.obs_names) == ["2x1", "1x1", "3x2", "1x3"]
    assert sp.isspmatrix_csr(a.X) or isinstance(a.X, sp.csr_array)
    assert a.X.dtype == np.float32
    assert list(a.var_names) == ["G1", "G2", "G3"]
    # duplicated G2 summed: 2x1 -> G2 = 2 + 3
    np.testing.assert_array_equal(a.X.toarray()[0], [1, 5, 0])
    np.testing.assert_array_equal(a.X.toarray()[1], [0, 1, 4])
    # spatial = (pixel_x, pixel_y) = (column, row)
    assert a.obsm["spatial"].dtype == np.float64 and a.obsm["spatial"].shape == (4, 2)
    np.testing.assert_array_equal(a.obsm["spatial"][0], [10 + 20 * 2, 5 + 20 * 1])
    np.testing.assert_array_equal(a.obsm["spatial"][:, 0], a.obs["pixel_x"].to_numpy())
    np.testing.assert_array_equal(a.obsm["spatial"][:, 1], a.obs["pixel_y"].to_numpy())
    assert list(a.obs["array_x"]) == [2, 1, 3, 1] and list(a.obs["array_y"]) == [1, 1, 2, 3]
    assert (a.obs["section"] == "A1").all()
    meta = a.uns["stgen"]
    assert meta["mpp"] == pytest.approx(10.0)
    assert meta["image_path"].endswith("he.jpg") and meta["section"] == "A1"
    assert meta["spot_diameter_um"] == 100.0 and meta["spot_spacing_um"] == 200.0
    assert meta["source"] == "her2st"
    assert her2st.read_section(root, "B1").uns["stgen"]["image_path"] is None


def test_read_dataset(root: Path) -> None:
    ds = her2st.read_dataset(root)
    assert list(ds) == ["A1", "B1"]
    assert list(her2st.read_dataset(root, imaged_only=True)) == ["A1"]


def test_unknown_section_and_missing_image(root: Path) -> None:
    with pytest.raises(InputError, match=r"'Z9'.*A1, B1"):
        her2st.read_section(root, "Z9")
    with pytest.raises(InputError, match="B1"):
        her2st.read_section(root, "B1", require_image=True)


def test_read_spots_selected_and_csv(root: Path, tmp_path: Path) -> None:
    s = her2st.read_spots(root / "ST-spotfiles/A1_selection.tsv")
    assert len(s) == 9 and s.loc["3x2", "pixel_x"] == 70.0 and s.loc["3x2", "pixel_y"] == 45.0
    assert s["array_x"].dtype == np.int64
    csv = tmp_path / "spots.csv"
    csv.write_text("barcode,pixel_x,pixel_y\nAAA,1.5,2.5\nCCC,3,4\n")
    c = her2st.read_spots(csv)
    assert list(c.index) == ["AAA", "CCC"] and c.loc["AAA", "pixel_y"] == 2.5


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "empty"),
        ("x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected\n", "no .*rows"),
        ("x\ty\tpx\tpy\n1\t2\t3\t4\n", "missing columns"),
        ("x\ty\tpixel_x\tpixel_y\n1\t2\tnan\t4\n", "non-finite"),
        ("x\ty\tpixel_x\tpixel_y\n1\t2\t3\t4\n1\t2\t5\t6\n", "duplicated spot id"),
    ],
)
def test_read_spots_errors(tmp_path: Path, content: str, match: str) -> None:
    p = tmp_path / "S_selection.tsv"
    p.write_text(content)
    with pytest.raises(InputError, match=match) as ei:
        her2st.read_spots(p)
    assert str(p) in str(ei.value)
    with pytest.raises(InputError, match="not found"):
        her2st.read_spots(tmp_path / "missing.tsv")


@pytest.mark.parametrize(
    "raw, match",
    [
        ("\tG1\tG2\ns1\t1\t\n", "NaN"),
        ("\tG1\tG2\ns1\t1\t-2\n", "negative"),
        ("\tG1\tG2\ns1\t1\t2.5\n", "non-integer"),
        ("\tG1\tG2\ns1\t1\tabc\n", "non-numeric"),
        ("\tG1\tG2\n", "no spots"),
        ("\tG1\tG2\ns1\t1\t2\ns1\t3\t4\n", "duplicated spot"),
    ],
)
def test_read_counts_errors(tmp_path: Path, raw: str, match: str) -> None:
    p = tmp_path / "bad.tsv.gz"
    _write_counts(p, raw=raw)
    with pytest.raises(InputError, match=match) as ei:
        her2st.read_counts(p)
    assert str(p) in str(ei.value)


def test_read_counts_truncated_gzip(tmp_path: Path) -> None:
    good = tmp_path / "good.tsv.gz"
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(200)]
    _write_counts(good, genes, {f"{i}x1": rng.integers(0, 9, 200).tolist() for i in range(200)})
    assert her2st.read_counts(good).shape == (200, 200)
    bad = tmp_path / "trunc.tsv.gz"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="trunc.tsv.gz"):
        her2st.read_counts(bad)


def test_spots_outside_image(root: Path) -> None:
    extra = ["5\t5\t5\t5\t500\t10\t1", "6\t5\t6\t5\t10\t-3\t1"]
    (root / "ST-spotfiles/A1_selection.tsv").write_text("\n".join(_spot_rows(extra)) + "\n")
    counts = dict(COUNTS, **{"5x5": [1, 1, 1, 1], "6x5": [1, 1, 1, 1]})
    _write_counts(root / "ST-cnts/A1.tsv.gz", counts=counts)
    with pytest.raises(InputError, match=r"A1_selection.tsv.*2 spot\(s\) lie outside"):
        her2st.read_section(root, "A1")


def test_duplicate_spot_ids_in_section(root: Path) -> None:
    extra = ["1\t1\t1\t1\t30\t25\t1"]  # 1x1 again
    (root / "ST-spotfiles/A1_selection.tsv").write_text("\n".join(_spot_rows(extra)) + "\n")
    with pytest.raises(InputError, match=r"duplicated spot id.*'1x1'"):
        her2st.read_section(root, "A1")


def test_transforms_match_hand_computation() -> None:
    X = np.array([[0, 1, 3], [7, 0, 0]], dtype=np.float32)
    np.testing.assert_allclose(transform_counts(X), [[0, 1, 2], [3, 0, 0]], rtol=1e-6)
    out = transform_counts(sp.csr_matrix(X), "log1p")
    assert out.dtype == np.float32 and isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, np.log(X + 1), rtol=1e-6)
    norm = transform_counts(X, "normalize_log1p", target_sum=8)
    np.testing.assert_allclose(norm[0], np.log1p([0, 2, 6]), rtol=1e-6)
    np.testing.assert_allclose(norm[1], np.log1p([8, 0, 0]), rtol=1e-6)
    zero = transform_counts(np.zeros((1, 3)), "normalize_log1p")
    np.testing.assert_array_equal(zero, 0)
    assert TARGET_TRANSFORMS == ("log2", "log1p", "normalize_log1p")
    with pytest.raises(InputError, match="log2, log1p, normalize_log1p"):
        transform_counts(X, "sqrt")


def _adata(cols: dict[str, list[int]]) -> AnnData:
    names = list(cols)
    X = np.array([cols[g] for g in names], dtype=np.float32).T
    return AnnData(X=sp.csr_matrix(X), var=pd.DataFrame(index=names))


def test_hmhvg_known_answer() -> None:
    # log2(c+1) per gene over the 4 pooled spots (2 per section):
    #   BOTH [0,4,0,4] mean 2 var 4 | MEAN [3,3,3,3] mean 3 var 0
    #   VAR [0,0,0,6] mean 1.5 var 6.75 | MID [1,1,1,2] mean 1.25 var .1875 | ZERO 0/0
    #   NOVOC: top in both but not in the vocabulary; ONLY1: only in section 1
    s1 = _adata({"ZERO": [0, 0], "MID": [1, 1], "VAR": [0, 0], "MEAN": [7, 7], "BOTH": [0, 15],
                 "NOVOC": [255, 0], "ONLY1": [0, 1000]})
    s2 = _adata({"BOTH": [0, 15], "MEAN": [7, 7], "VAR": [0, 63], "MID": [1, 3], "ZERO": [0, 0],
                 "NOVOC": [255, 0]})
    vocab = ["ZERO", "MID", "VAR", "MEAN", "BOTH", "ONLY1"]
    assert select_hmhvg([s1, s2], vocab, n_top=2) == ["BOTH"]
    assert select_hmhvg([s1, s2], vocab, n_top=3) == ["BOTH", "VAR"]
    assert select_hmhvg([s1, s2], vocab, n_top=10) == ["MEAN", "BOTH", "VAR", "MID", "ZERO"]
    assert select_hmhvg([s1, s2], None, n_top=2) == ["NOVOC"]
    with pytest.raises(InputError, match="empty panel"):
        select_hmhvg([s1, s2], ["MEAN", "VAR"], n_top=1)
    with pytest.raises(InputError):
        select_hmhvg([s1, s2], ["ONLY1"], n_top=5)


def test_load_vocabulary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "gene_info.csv"
    p.write_text("HGNC_gene,biotype\nA1BG,x\n TP53 ,y\nA1BG,z\n,w\n")
    assert load_vocabulary(p) == ["A1BG", "TP53"]
    monkeypatch.setenv("STGEN_VOCAB", str(p))
    assert default_vocab_path() == p and load_vocabulary() == ["A1BG", "TP53"]
    monkeypatch.setenv("STGEN_VOCAB", str(tmp_path / "nope.csv"))
    with pytest.raises(InputError, match="nope.csv"):
        load_vocabulary()
    bad = tmp_path / "bad.csv"
    bad.write_text("gene\nA\n")
    with pytest.raises(InputError, match="HGNC_gene"):
        load_vocabulary(bad)


@pytest.mark.skipif(not REAL.is_dir(), reason="real Her2ST data not present")
def test_real_section_c2() -> None:
    a = her2st.read_section(REAL, "C2", require_image=True)
    assert 180 <= a.n_obs <= 190 and a.n_vars > 15_000
    # 200 um spacing / ~290.7 px per array step; the images are ~0.69 um/px
    assert 0.65 < a.uns["stgen"]["mpp"] < 1.0
    w, h = Image.open(a.uns["stgen"]["image_path"]).size
    xy = a.obsm["spatial"]
    assert (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
    assert "ERBB2" in a.var_names and a.X.sum() > 0
    assert np.array_equal(a.X.toarray(), np.round(a.X.toarray()))
