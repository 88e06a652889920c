"""Bad inputs end in one clear error or a documented recovery, never a library traceback or a half-written output.

One test per item of the bad-input list: truncated gzip, wrong delimiters, duplicated spot ids,
coordinates outside the image, NaN/Inf/negative counts, zero-count spots, a single-spot section, an
image that is not an image, a panel gene missing from a new section and a full disk on write. Each
goes through the public readers (:mod:`stgen.data.her2st`, :mod:`stgen.data.dataset`,
:func:`stgen.image.slide.open_slide`) and, where a user meets it, through the CLI (``stgen predict`` /
``evaluate`` with :class:`typer.testing.CliRunner`): exit code 2, one stderr line ``error: ...``
naming the file, and no output file.

The last section holds the bugs found in files owned by others (then pipeline.py, cli.py, config.py; now under workflows/,
downstream.py): those tests assert the right behaviour and fail until the fix named in each is
applied.

:func:`make_ridge_run` (a tiny Her2ST folder and a ridge RUN_DIR on it, seconds) is shared with
``test_fuzz.py``.
"""

from __future__ import annotations

import errno
import gzip
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from stgen.data import her2st
from stgen.data.common import read_anndata
from stgen.data.h5ad import read_h5ad_section
from stgen.data.visium import read_spaceranger
from stgen.errors import InputError, StgenError

sys.path.insert(0, str(Path(__file__).parent))
from reader_fixtures import make_h5ad_section, make_spaceranger_outs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Variable names are not unique")  # duplicated symbols, on purpose

H2_HEADER = "x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"
GENES = ["G1", "G2", "G3"]


# --------------------------------------------------------------------------- builders


def _lattice(n_x: int = 3, n_y: int = 3) -> list[tuple[int, int]]:
    return [(x, y) for x in range(1, n_x + 1) for y in range(1, n_y + 1)]


def write_her2st(root: Path, section: str = "A1", spots: list[tuple[int, int]] | None = None,
                 counts: dict[str, list] | None = None, genes: list[str] = GENES, image: bool = True,
                 spot_lines: list[str] | None = None, counts_text: str | None = None,
                 image_bytes: bytes | None = None) -> SimpleNamespace:
    """One Her2ST-layout section (20 px per array step = 10 um/px; image 100 x 120 px).

    ``spot_lines`` / ``counts_text`` replace the generated spot rows / whole count table.
    """
    root = Path(root)
    (root / "ST-cnts").mkdir(parents=True, exist_ok=True)
    (root / "ST-spotfiles").mkdir(parents=True, exist_ok=True)
    spots = spots if spots is not None else _lattice()
    if counts is None:
        counts = {f"{x}x{y}": [(x + y + j) % 4 for j in range(len(genes))] for x, y in spots}
    text = counts_text if counts_text is not None else "\t".join(["", *genes]) + "\n" + "".join(
        "\t".join([s, *map(str, v)]) + "\n" for s, v in counts.items())
    cpath = root / "ST-cnts" / f"{section}.tsv.gz"
    with gzip.open(cpath, "wt") as f:
        f.write(text)
    lines = spot_lines if spot_lines is not None else [
        f"{x}\t{y}\t{x}.0\t{y}.0\t{10 + 20 * x}\t{5 + 20 * y}\t1" for x, y in spots]
    spath = root / "ST-spotfiles" / f"{section}_selection.tsv"
    spath.write_text("\n".join([H2_HEADER, *lines]) + "\n")
    ipath = None
    if image:
        d = root / "ST-imgs" / section[0] / section
        d.mkdir(parents=True, exist_ok=True)
        ipath = d / "he.jpg"
        if image_bytes is None:
            Image.new("RGB", (100, 120), (200, 150, 200)).save(ipath)
        else:
            ipath.write_bytes(image_bytes)
    return SimpleNamespace(root=root, counts=cpath, spots=spath, image=ipath)


def make_ridge_run(root: Path) -> SimpleNamespace:
    """A Her2ST folder (A1, A2, A3 imaged; 30 spots each; CellFM-vocabulary genes) and a ridge RUN_DIR
    trained on A2 + A3 with the rgb-stats encoder (held out: A1). Skips without the vocabulary."""
    from stgen.workflows.config import StgenConfig
    from stgen.data.panel import default_vocab_path, load_vocabulary
    from stgen.workflows.fit import fit

    if default_vocab_path() is None:
        pytest.skip("CellFM vocabulary not available")
    genes = load_vocabulary()[100:130]
    rng = np.random.default_rng(0)
    data = root / "her2st"
    spots = [(x, y) for x in range(1, 7) for y in range(1, 6)]
    for sec in ("A1", "A2", "A3"):
        lam = rng.gamma(2.0, 2.0, size=len(genes))
        counts = rng.poisson(lam[None] * rng.uniform(0.3, 2.0, size=(len(spots), 1)))
        write_her2st(data, sec, spots, {f"{x}x{y}": row.tolist() for (x, y), row in zip(spots, counts)}, genes,
                     spot_lines=[f"{x}\t{y}\t{x}.0\t{y}.0\t{20 * x}\t{20 * y}\t1" for x, y in spots],
                     image_bytes=_jpeg(rng.integers(0, 255, size=(140, 160, 3), dtype=np.uint8)))
    cfg = StgenConfig.from_dict({"data": {"n_top": 20}, "features": {"encoder": "rgb-stats", "patch_px": 16}})
    fit(data, "A1", root / "run", model="ridge", cfg=cfg, cache_dir=root / "cache", progress=False)
    sec = data / "ST-imgs" / "A" / "A1"
    return SimpleNamespace(root=root, data=data, run=root / "run", cache=root / "cache", image=sec / "he.jpg",
                           spots=data / "ST-spotfiles" / "A1_selection.tsv", counts=data / "ST-cnts" / "A1.tsv.gz",
                           panel=json.loads((root / "run" / "run.json").read_text())["panel"])


def _jpeg(arr: np.ndarray) -> bytes:
    import io

    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG")
    return b.getvalue()


def cli(args: list[str]):
    from typer.testing import CliRunner

    from stgen.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


def assert_cli_error(r, *names: str) -> str:
    """Exit code 2, no traceback, exactly one stderr line ``error: ...`` that contains every ``names``."""
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def no_temp_files(dest: Path) -> bool:
    """No ``.<name>.*`` temporary left next to ``dest`` (stgen.utils.io.atomic_path / atomic_dir)."""
    return not list(Path(dest).parent.glob(f".{Path(dest).name}.*"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    return make_ridge_run(tmp_path_factory.mktemp("ridge"))


def predict_args(run: SimpleNamespace, out: Path, image=None, spots=None, *extra) -> list:
    args = ["predict", "--model", run.run, "--image", image or run.image, "--out", out, "--cache", run.cache, "--quiet"]
    if spots is not False:
        args += ["--spots", spots or run.spots]
    return args + list(extra)


# --------------------------------------------------------------------------- truncated gzip


def test_truncated_gzip(tmp_path: Path) -> None:
    """A truncated .gz (count table, 10x matrix / features) is an InputError naming the file."""
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(100)]
    s = write_her2st(tmp_path / "h", counts={f"{i}x1": rng.integers(0, 9, 100).tolist() for i in range(1, 101)},
                     genes=genes)
    data = s.counts.read_bytes()
    for cut in (5, 20, len(data) // 2, len(data) - 4):
        s.counts.write_bytes(data[:cut])
        with pytest.raises(InputError, match="truncated") as ei:
            her2st.read_counts(s.counts)
        assert str(s.counts) in str(ei.value)
        with pytest.raises(InputError, match="A1.tsv.gz"):
            her2st.read_section(s.root, "A1")

    sr = make_spaceranger_outs(tmp_path / "sr", matrix="mtx", image=None)
    for name in ("matrix.mtx.gz", "features.tsv.gz", "barcodes.tsv.gz"):
        p = sr.matrix / name
        good = p.read_bytes()
        p.write_bytes(good[: len(good) // 2])
        with pytest.raises(InputError) as ei:
            read_spaceranger(sr.outs)
        assert name in str(ei.value)
        p.write_bytes(good)
    assert read_spaceranger(sr.outs).n_obs > 0


# --------------------------------------------------------------------------- wrong delimiters


def test_wrong_delimiters(tmp_path: Path) -> None:
    """Comma/semicolon-separated files where tabs are expected (and the reverse) name the file and what
    was expected; a table that parses into one column is never read as 'genes = []'."""
    s = write_her2st(tmp_path, counts_text=",G1,G2\n1x1,1,2\n2x1,0,3\n")
    with pytest.raises(InputError, match="no genes") as ei:
        her2st.read_counts(s.counts)
    assert str(s.counts) in str(ei.value)

    p = tmp_path / "spots_semicolon.tsv"
    p.write_text(H2_HEADER.replace("\t", ";") + "\n1;1;1.0;1.0;10;10;1\n")
    with pytest.raises(InputError, match="missing columns") as ei:
        her2st.read_spots(p)
    assert str(p) in str(ei.value)

    sr = make_spaceranger_outs(tmp_path / "sr", image=None)
    sr.positions.write_text(sr.positions.read_text().replace(",", "\t"))
    with pytest.raises(InputError, match="expected 6 columns") as ei:
        read_spaceranger(sr.outs)
    assert str(sr.positions) in str(ei.value)


# --------------------------------------------------------------------------- duplicated spot ids


def test_duplicated_spot_ids(tmp_path: Path) -> None:
    s = write_her2st(tmp_path / "h", counts_text="\tG1\tG2\n1x1\t1\t2\n1x1\t3\t4\n")
    with pytest.raises(InputError, match=r"duplicated spot id.*'1x1'") as ei:
        her2st.read_counts(s.counts)
    assert str(s.counts) in str(ei.value)

    s = write_her2st(tmp_path / "h2", spot_lines=["1\t1\t1.0\t1.0\t30\t25\t1", "1\t1\t1.0\t1.0\t50\t25\t1"])
    with pytest.raises(InputError, match=r"duplicated spot id.*'1x1'") as ei:
        her2st.read_spots(s.spots)
    assert str(s.spots) in str(ei.value)

    csv = tmp_path / "spots.csv"
    csv.write_text("barcode,pixel_x,pixel_y\nAAA,1,2\nAAA,3,4\n")
    with pytest.raises(InputError, match=r"duplicated spot id.*'AAA'"):
        her2st.read_spots(csv)

    h = make_h5ad_section(tmp_path / "h5", image=None)
    a = ad.read_h5ad(h.path)
    a.obs_names = ["S"] * a.n_obs
    a.write_h5ad(h.path)
    with pytest.raises(InputError, match=r"duplicated spot id.*'S'") as ei:
        read_h5ad_section(h.path)
    assert str(h.path) in str(ei.value)

    sr = make_spaceranger_outs(tmp_path / "sr", image=None)
    lines = sr.positions.read_text().splitlines()
    sr.positions.write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(InputError, match="duplicated spot id") as ei:
        read_spaceranger(sr.outs)
    assert str(sr.positions) in str(ei.value)


# --------------------------------------------------------------------------- coordinates outside the image


def test_coordinates_outside_the_image(tmp_path: Path, run: SimpleNamespace) -> None:
    spots = _lattice()
    lines = [f"{x}\t{y}\t{x}.0\t{y}.0\t{10 + 20 * x}\t{5 + 20 * y}\t1" for x, y in spots]
    lines[-1] = "3\t3\t3.0\t3.0\t500\t65\t1"  # the image is 100 x 120 px
    s = write_her2st(tmp_path / "h", spots=spots, spot_lines=lines)
    with pytest.raises(InputError, match=r"1 spot\(s\) lie outside the image.*'3x3'") as ei:
        her2st.read_section(s.root, "A1")
    assert str(s.spots) in str(ei.value) and "he.jpg" in str(ei.value)

    h = make_h5ad_section(tmp_path / "h5", image="png")
    a = ad.read_h5ad(h.path)
    a.obsm["spatial"] = a.obsm["spatial"] + np.array([1e4, 0.0])
    a.write_h5ad(h.path)
    with pytest.raises(InputError, match="outside the image") as ei:
        read_h5ad_section(h.path, image=h.image)
    assert str(h.path) in str(ei.value)

    # predict: exit 2, one line naming the spot file, no output
    bad = tmp_path / "outside.csv"
    bad.write_text("barcode,pixel_x,pixel_y\nA,10,10\nB,10000,10\n")
    out = tmp_path / "pred.h5ad"
    r = cli(predict_args(run, out, spots=bad))
    assert_cli_error(r, bad, "outside the image")
    assert not out.exists() and no_temp_files(out)


# --------------------------------------------------------------------------- NaN / Inf / negative counts


@pytest.mark.parametrize("cell, match", [("nan", "NaN"), ("", "NaN"), ("inf", "infinite"), ("-1", "negative"),
                                         ("1.5", "non-integer"), ("abc", "non-numeric"), ("True", "non-numeric"),
                                         ("1e400", "non-numeric")])
def test_nan_inf_negative_counts(tmp_path: Path, cell: str, match: str) -> None:
    s = write_her2st(tmp_path, counts_text=f"\tG1\tG2\n1x1\t1\t{cell}\n2x1\t3\t4\n")
    with pytest.raises(InputError, match=match) as ei:
        her2st.read_counts(s.counts)
    assert str(s.counts) in str(ei.value)


@pytest.mark.parametrize("value, match", [(np.nan, "NaN"), (np.inf, "infinite"), (-2.0, "negative"),
                                          (0.5, "non-integer")])
def test_nan_inf_negative_counts_h5ad(tmp_path: Path, value: float, match: str) -> None:
    h = make_h5ad_section(tmp_path, image=None)
    a = ad.read_h5ad(h.path)
    X = a.layers["counts"].toarray()
    X[0, 0] = value
    a.layers["counts"] = sp.csr_matrix(X)
    a.write_h5ad(h.path)
    with pytest.raises(InputError, match=match) as ei:
        read_h5ad_section(h.path)
    assert str(h.path) in str(ei.value) and "layers['counts']" in str(ei.value)


# --------------------------------------------------------------------------- zero-count spots


def test_zero_count_spots_are_valid_data(tmp_path: Path) -> None:
    """A spot with no counts is real data (an empty spot on tissue): it is read, its target is
    log2(0 + 1) = 0, and it is scored like any other spot."""
    from stgen.data.targets import transform_counts
    from stgen.evaluation.metrics import evaluate_section

    spots = _lattice()
    counts = {f"{x}x{y}": [0, 0, 0] if (x, y) == (2, 2) else [x, y, x + y] for x, y in spots}
    s = write_her2st(tmp_path, spots=spots, counts=counts)
    a = her2st.read_section(s.root, "A1")
    assert a.n_obs == 9 and "2x2" in a.obs_names
    row = a[["2x2"]].X.toarray()
    assert (row == 0).all()
    y = transform_counts(a.X, "log2")
    assert np.isfinite(y).all() and (y[list(a.obs_names).index("2x2")] == 0).all()
    pred = y + 0.1 * np.arange(y.size).reshape(y.shape) / y.size
    m = evaluate_section(pred, y, list(a.var_names), coords=a.obsm["spatial"], k=4)
    assert np.isfinite([m["pcc50"], m["mse"], m["mae"], m["ssc"]]).all()


# --------------------------------------------------------------------------- a single-spot section


def test_single_spot_section(tmp_path: Path) -> None:
    """One spot: Her2ST cannot estimate the pixel size from its spot lattice (InputError naming the spot
    file); a format that carries its mpp reads it; scoring it gives NaN for every correlation (PCC, GSC,
    SSC: undefined on one spot, SSC with a logged warning) and finite MSE/MAE - a documented recovery,
    no exception."""
    from stgen.evaluation.metrics import evaluate_section

    s = write_her2st(tmp_path / "h", spots=[(2, 2)])
    with pytest.raises(InputError, match="too few non-collinear spots") as ei:
        her2st.read_section(s.root, "A1")
    assert str(s.spots) in str(ei.value)

    h = make_h5ad_section(tmp_path / "h5", image="png")
    a = ad.read_h5ad(h.path)
    a[:1].copy().write_h5ad(h.path)
    one = read_h5ad_section(h.path, image=h.image)
    assert one.n_obs == 1 and one.obsm["spatial"].shape == (1, 2)

    y = np.array([[0.0, 1.0, 2.0]])
    m = evaluate_section(y + 0.5, y, ["G1", "G2", "G3"], coords=np.array([[5.0, 5.0]]), label="one spot")
    assert np.isnan(m["pcc50"]) and np.isnan(m["ssc"]) and np.isnan(m["gsc"])
    assert m["mse"] == pytest.approx(0.25) and m["mae"] == pytest.approx(0.5) and m["n_spots"] == 1


# --------------------------------------------------------------------------- an image that is not an image


@pytest.mark.parametrize("name", ["he.png", "he.jpg", "he.tif", "he.ome.tiff", "he.svs", "he"])
def test_image_that_is_not_an_image(tmp_path: Path, name: str) -> None:
    from stgen.image.patches import image_size, open_image
    from stgen.image.slide import open_slide

    p = tmp_path / name
    p.write_bytes(b"this is a text file, not a slide\n" * 4)
    with pytest.raises(InputError) as ei:
        open_slide(p)
    assert str(p) in str(ei.value)
    for fn in (image_size, open_image):
        with pytest.raises(InputError) as ei:
            fn(p)
        assert str(p) in str(ei.value)


def test_image_that_is_not_an_image_in_a_section_and_in_predict(tmp_path: Path, run: SimpleNamespace) -> None:
    s = write_her2st(tmp_path / "h", image_bytes=b"<html>not an image</html>")
    with pytest.raises(InputError, match="not a readable image") as ei:
        her2st.read_section(s.root, "A1")
    assert str(s.image) in str(ei.value)

    junk = tmp_path / "slide.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature, then nothing
    out = tmp_path / "pred.h5ad"
    r = cli(predict_args(run, out, image=junk))
    assert_cli_error(r, junk)
    assert not out.exists() and no_temp_files(out)


# --------------------------------------------------------------------------- a panel gene missing from a new section


def test_panel_gene_missing_from_a_new_section(tmp_path: Path, run: SimpleNamespace) -> None:
    """Scoring a prediction against a section whose count table lacks a panel gene names the gene."""
    from stgen.workflows.evaluate import load_truth, score_prediction
    from stgen.workflows.predict import predict

    pred_path = tmp_path / "pred.h5ad"
    pred = predict(run.run, run.image, run.spots, pred_path, cache_dir=run.cache, progress=False)
    gone = run.panel[3]
    counts = her2st.read_counts(run.counts)
    keep = [g for g in counts.var_names if g != gone]
    table = pd.DataFrame(counts[:, keep].X.toarray().astype(int), index=counts.obs_names, columns=keep)
    new = tmp_path / "B9.tsv.gz"
    with gzip.open(new, "wt") as f:
        table.to_csv(f, sep="\t")
    truth = load_truth(new, "log2")
    with pytest.raises(InputError, match=f"1 panel gene.*missing from the truth: {gone}") as ei:
        score_prediction(pred, truth, label=f"{pred_path} vs {new}")
    assert str(new) in str(ei.value)

    out = tmp_path / "metrics.json"
    r = cli(["evaluate", "--pred", pred_path, "--counts", new, "--out", out])
    assert_cli_error(r, gone, new)
    assert not out.exists() and no_temp_files(out)


# --------------------------------------------------------------------------- disk full on write (simulated)


def _enospc_after_partial_write(path) -> None:
    Path(path).write_bytes(b"half of an h5ad")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_on_write(tmp_path: Path, run: SimpleNamespace, monkeypatch) -> None:
    """A full disk while writing is not an input error, but neither is it a bug worth a traceback:
    :func:`stgen.utils.io.atomic_path` (and ``atomic_dir``) turn ENOSPC/EDQUOT - also when a library
    wraps it in its own message, as h5py does - into :class:`stgen.utils.io.OutputError` (a
    :class:`StgenError` that is also an ``OSError`` with its errno), message ``no space left on device
    writing <dest>``; the CLI prints it as one ``error:`` line with exit code 2. The destination keeps
    its previous content and the temporary file is removed."""
    from stgen.utils.io import OutputError, atomic_dir, atomic_path, write_json

    out = tmp_path / "pred.h5ad"
    out.write_bytes(b"previous prediction")
    monkeypatch.setattr(ad.AnnData, "write_h5ad", lambda self, path, *a, **k: _enospc_after_partial_write(path))
    r = cli(predict_args(run, out))
    assert_cli_error(r, f"no space left on device writing {out}")
    assert out.read_bytes() == b"previous prediction" and no_temp_files(out)
    monkeypatch.undo()

    # the feature cache (numpy.save part-way), a JSON file and a folder
    from stgen.features.extract import extract_features

    real_save = np.save

    def full_save(fh, arr, **kw):
        real_save(fh, arr[: len(arr) // 2], **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full_save)
    cache = tmp_path / "cache"
    with pytest.raises(OutputError, match="no space left on device writing") as ei:
        extract_features(run.image, np.array([[30.0, 30.0], [60.0, 40.0]]), 16, "rgb-stats", cache_dir=cache,
                         show_progress=False)
    assert isinstance(ei.value, StgenError) and isinstance(ei.value, OSError) and ei.value.errno == errno.ENOSPC
    assert not [p for p in cache.rglob("*") if p.is_file()]
    monkeypatch.undo()

    js = tmp_path / "m.json"
    js.write_text("{}")
    with pytest.raises(OutputError, match=f"no space left on device writing {js}"):
        with atomic_path(js) as tmp:
            tmp.write_text('{"half": ')
            raise OSError("Can't write data (file write failed: errno = 28, error message = "
                          "'No space left on device')")  # h5py-style: no errno attribute
    assert js.read_text() == "{}" and no_temp_files(js)
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: _enospc_after_partial_write(self))
    with pytest.raises(OutputError):
        write_json(js, {"a": 1})
    monkeypatch.undo()
    assert js.read_text() == "{}" and no_temp_files(js)

    d = tmp_path / "dir_out"
    d.mkdir()
    (d / "old.txt").write_text("old")
    with pytest.raises(OutputError):
        with atomic_dir(d) as tmp:
            (tmp / "new.txt").write_text("new")
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert [p.name for p in d.iterdir()] == ["old.txt"] and no_temp_files(d)


def test_output_path_that_cannot_be_written(tmp_path: Path, run: SimpleNamespace) -> None:
    """--out naming a folder, an empty path or a path below a file: one error line, nothing written."""
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path, tmp_path / "a_file" / "pred.h5ad", Path("")):
        r = cli(predict_args(run, out))
        assert_cli_error(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    assert (tmp_path / "a_file").read_text() == "x"


# --------------------------------------------------------------------------- readers: smaller findings of the fuzz run


def test_reader_findings(tmp_path: Path) -> None:
    """Cases the fuzz run found that used to be accepted silently or crash (fixed in the readers)."""
    # an empty or 'NA' spot id in a count table used to become the spot 'nan'
    for cell in ("", "NA"):
        s = write_her2st(tmp_path / f"c{cell}", counts_text=f"\tG1\n{cell}\t1\n2x1\t2\n")
        with pytest.raises(InputError, match="empty or missing spot id") as ei:
            her2st.read_counts(s.counts)
        assert str(s.counts) in str(ei.value)
    # array coordinates beyond int64 used to wrap around to -9223372036854775808
    s = write_her2st(tmp_path / "big", spot_lines=["1e30\t1\t1.0\t1.0\t30\t25\t1"])
    with pytest.raises(InputError, match="out of range"):
        her2st.read_spots(s.spots)
    csv = tmp_path / "b.csv"
    csv.write_text("barcode,pixel_x,pixel_y\n,1,2\n")
    with pytest.raises(InputError, match="empty barcode"):
        her2st.read_spots(csv)
    csv.write_text("barcode,pixel_x,pixel_y,array_x,array_y\nA,1,2,1.5,3\n")
    with pytest.raises(InputError, match="must be integers"):
        her2st.read_spots(csv)
    sr = make_spaceranger_outs(tmp_path / "sr", image=None)
    lines = sr.positions.read_text().splitlines()
    lines[1] = ",".join(lines[1].split(",")[:2] + ["1e30"] + lines[1].split(",")[3:])
    sr.positions.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="out of range"):
        read_spaceranger(sr.outs)
    # h5ad metadata that is not a string (arrays) used to raise numpy's "truth value ... ambiguous"
    h = make_h5ad_section(tmp_path / "h5", image=None)
    a = ad.read_h5ad(h.path)
    a.uns["stgen"]["section"] = np.array([1, 2])
    a.uns["stgen"]["image_path"] = np.array(["a", "b"])
    a.write_h5ad(h.path)
    assert read_h5ad_section(h.path).uns["stgen"]["section"] == h.path.stem
    a.uns["stgen"]["grid"] = np.array([1, 2])
    a.write_h5ad(h.path)
    with pytest.raises(InputError, match="unknown spot grid"):
        read_h5ad_section(h.path)
    # an unreadable .h5ad, through the public helper the pipeline can use
    junk = tmp_path / "junk.h5ad"
    junk.write_bytes(b"junk")
    with pytest.raises(InputError, match="not a readable prediction file") as ei:
        read_anndata(junk, "prediction file")
    assert str(junk) in str(ei.value)


def test_bare_slide_grid_with_absurd_origin_or_mpp() -> None:
    """--grid-origin nan/inf/outside the slide and an mpp that puts billions of spots (or a spot wider
    than the slide) on it used to end in ValueError / a 4 EiB allocation: now InputError."""
    from stgen.data.tissue import TissueMask, lay_spot_grid

    mask = np.zeros((100, 120), bool)
    mask[20:80, 30:90] = True
    t = TissueMask(mask, scale=0.1, threshold=10.0)
    assert len(lay_spot_grid(t, 1200, 1000, 1.0, origin=(400.0, 300.0))) > 0
    for origin in ((float("nan"), 1.0), (float("inf"), 0.0), (1e300, 1e300), (-5.0, 5.0), (1200.0, 5.0), ("a", 1)):
        with pytest.raises(InputError, match="origin"):
            lay_spot_grid(t, 1200, 1000, 1.0, origin=origin)
    with pytest.raises(InputError, match="is the mpp right"):
        lay_spot_grid(t, 1200, 1000, 1e9)
    with pytest.raises(InputError, match="is the mpp right"):
        lay_spot_grid(t, 1200, 1000, 1e-9)
    with pytest.raises(InputError, match="spot spacing"):
        lay_spot_grid(t, 1200, 1000, 1.0, spacing_um=float("inf"))


# --------------------------------------------------------------------------- bugs in files owned by others
# Each test below asserts the right behaviour and FAILS until the fix in its docstring is applied.


def test_predict_seed_out_of_range(tmp_path: Path, run: SimpleNamespace) -> None:
    """``--seed 99999999999999999999``: typer accepts any int, the prediction is computed, and then
    ``adata.write_h5ad`` raises ``TypeError: Object dtype dtype('O') has no native HDF5 equivalent``
    (``uns['stgen']['seed']`` is beyond int64; torch's ``manual_seed`` refuses it for HINGE/FLAG too).
    Fix (workflows/predict.py, ``predict``, first lines): ``if not -2**63 <= int(seed) < 2**63: raise
    InputError(f"--seed must be a 64-bit integer, got {seed}")`` (or the same check in cli.py ``predict``)."""
    out = tmp_path / "pred.h5ad"
    r = cli(predict_args(run, out, None, None, "--seed", "99999999999999999999"))
    assert_cli_error(r, "seed")
    assert not out.exists() and no_temp_files(out)


def test_predict_maps_folder_that_is_a_file(tmp_path: Path, run: SimpleNamespace) -> None:
    """``--maps FILE``: the prediction is written, then the maps fail (``error: ...`` since stgen.utils.io
    checks output folders), so the command fails but leaves its --out behind. Fix (workflows/predict.py,
    ``predict``, before ``load_run``): ``if maps_dir is not None and Path(maps_dir).exists() and not
    Path(maps_dir).is_dir(): raise InputError(f"--maps {maps_dir}: not a folder")``."""
    (tmp_path / "maps").write_text("a file")
    out = tmp_path / "pred.h5ad"
    r = cli(predict_args(run, out, None, None, "--maps", tmp_path / "maps"))
    assert_cli_error(r, tmp_path / "maps")
    assert not out.exists()


@pytest.mark.parametrize("which", ["pred", "counts"])
def test_evaluate_unreadable_h5ad(tmp_path: Path, run: SimpleNamespace, which: str) -> None:
    """A --pred or --counts .h5ad that is not HDF5 escapes as h5py's ``OSError: Unable to synchronously
    open file (file signature not found)``. Fix (workflows/evaluate.py): in ``evaluate_prediction`` replace
    ``pred = ad.read_h5ad(pred_path)`` by ``pred = read_anndata(pred_path, "prediction file")`` and in
    ``load_truth`` ``truth = ad.read_h5ad(path)`` by ``truth = read_anndata(path, "truth file")``, with
    ``stgen.data.common.read_anndata`` (added for this; it raises InputError naming the file)."""
    from stgen.workflows.predict import predict

    good = tmp_path / "pred.h5ad"
    predict(run.run, run.image, run.spots, good, cache_dir=run.cache, progress=False)
    junk = tmp_path / "junk.h5ad"
    junk.write_bytes(b"junk, not HDF5")
    out = tmp_path / "m.json"
    pred, counts = (junk, run.counts) if which == "pred" else (good, junk)
    r = cli(["evaluate", "--pred", pred, "--counts", counts, "--out", out])
    assert_cli_error(r, junk)
    assert not out.exists()


def test_evaluate_prediction_with_malformed_metadata(tmp_path: Path, run: SimpleNamespace) -> None:
    """A prediction whose ``uns['stgen']`` is not a mapping: ``AttributeError: 'str' object has no
    attribute 'get'``. Fix (workflows/evaluate.py, ``evaluate_prediction``): ``info = pred.uns.get("stgen");
    info = info if isinstance(info, dict) else {}`` and use ``info.get(...)`` for ``units`` and ``model``
    (a prediction without stgen metadata is scored in log2 units, as one without ``uns['stgen']`` is)."""
    from stgen.workflows.predict import predict

    p = tmp_path / "pred.h5ad"
    a = predict(run.run, run.image, run.spots, p, cache_dir=run.cache, progress=False)
    a.uns["stgen"] = "not a mapping"
    a.write_h5ad(p)
    r = cli(["evaluate", "--pred", p, "--counts", run.counts, "--out", tmp_path / "m.json"])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code in (0, 2)


@pytest.mark.parametrize("out", ["", "/"])
def test_fit_out_without_a_name(run: SimpleNamespace, out: str) -> None:
    """``stgen fit --out ''`` (or ``/``): ``ValueError: PosixPath('.') has an empty name`` from
    ``out.with_name`` in ``_PartialRun.__init__``. Fix (workflows/fit.py, ``fit``, before ``_PartialRun``):
    ``if not Path(out).name: raise InputError(f"--out {str(out)!r}: not a valid RUN_DIR name")``."""
    r = cli(["fit", "--model", "ridge", "--test-section", "A1", "--out", out, "--data", run.root / "nowhere"])
    assert_cli_error(r)


def test_fit_does_not_replace_a_folder_that_is_not_a_run(tmp_path: Path, run: SimpleNamespace) -> None:
    """DATA LOSS: ``stgen fit --out EXISTING_FOLDER`` (or an existing file) trains, then
    ``_PartialRun._finish_publish`` moves the folder aside and deletes it - the user's files are gone.
    Fix (workflows/fit.py, ``fit``, before any work): ``if out.exists() and not (out / "run.json").is_file():
    raise InputError(f"{out} exists and is not a stgen run directory; choose a new --out or delete it")``
    (a RUN_DIR of an earlier fit may still be replaced)."""
    import yaml

    precious = tmp_path / "my_documents"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"n_top": 20}, "features": {"encoder": "rgb-stats", "patch_px": 16}}))
    r = cli(["fit", "--model", "ridge", "--test-section", "A1", "--out", precious, "--data", run.data,
             "--config", cfg, "--cache", run.cache, "--quiet"])
    assert (precious / "thesis.txt").is_file()
    assert_cli_error(r, precious)


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    """``--config`` with non-UTF-8 bytes: ``UnicodeDecodeError`` from ``StgenConfig.load``. Fix
    (workflows/config.py, ``StgenConfig.load``): read with ``except (OSError, UnicodeDecodeError) as e: raise
    InputError(f"config file {p} is not a readable UTF-8 text file ({e})") from e`` around
    ``p.read_text()``."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(b"\xff\xfe\x00hinge: 1\n")
    r = cli(["fit", "--test-section", "A1", "--out", tmp_path / "run", "--data", tmp_path / "nowhere",
             "--config", cfg])
    assert_cli_error(r, cfg)


def test_config_that_is_not_valid_yaml(tmp_path: Path) -> None:
    """A YAML syntax error is an InputError, but its message carries PyYAML's multi-line excerpt, so the
    CLI prints eight lines. Fix (workflows/config.py, ``StgenConfig.load``): put the error on one line,
    ``raise InputError(f"config file {p} is not valid YAML: {' '.join(str(e).split())}") from e``."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("hinge: [1, 2\n")
    r = cli(["fit", "--test-section", "A1", "--out", tmp_path / "run", "--data", tmp_path / "nowhere",
             "--config", cfg])
    assert_cli_error(r, cfg, "not valid YAML")


def test_evaluate_downstream_dir_that_is_a_file(tmp_path: Path, run: SimpleNamespace) -> None:
    """``--downstream-dir FILE``: after the scoring and Leiden clustering, ``folder.mkdir`` in
    downstream.py raises ``FileExistsError``. Fix (workflows/evaluate.py, ``evaluate_prediction``, first lines):
    ``if downstream_dir is not None and Path(downstream_dir).exists() and not
    Path(downstream_dir).is_dir(): raise InputError(f"--downstream-dir {downstream_dir}: not a folder")``."""
    from stgen.workflows.predict import predict

    p = tmp_path / "pred.h5ad"
    predict(run.run, run.image, run.spots, p, cache_dir=run.cache, progress=False)
    (tmp_path / "ds").write_text("a file")
    out = tmp_path / "m.json"
    r = cli(["evaluate", "--pred", p, "--counts", run.counts, "--out", out, "--downstream-dir", tmp_path / "ds"])
    assert_cli_error(r, tmp_path / "ds")
    assert not out.exists()
