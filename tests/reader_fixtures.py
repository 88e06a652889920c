"""Builders of tiny real-format spatial transcriptomics inputs for reader tests.

Every builder writes files with the library that writes the real format
(anndata, h5py in the 10x HDF5 layout, scipy.io.mmwrite + gzip, tifffile
pyramids, JSON / CSV as Space Ranger and HEST write them) from one synthetic
section (:func:`synthetic_section`), so the same ``seed`` gives the same
counts and coordinates in every format. Geometry is realistic: a Visium hex
lattice (100 um centre spacing, 55 um spots) or a legacy ST square lattice
(200 um spacing), converted to full-resolution pixels with ``mpp`` (default
2.0 um/px so images stay a few hundred pixels a side).

Builders return a :class:`types.SimpleNamespace` of paths plus ``truth``
(the :class:`SyntheticSection`), whose :meth:`SyntheticSection.expected` gives
what a reader must return.
"""

from __future__ import annotations

import gzip
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

SAME = "same"  # sentinel: "use the section's mpp"


@dataclass
class SyntheticSection:
    """All lattice spots of one synthetic section and its features."""

    grid: str
    mpp: float
    barcodes: list[str]
    in_tissue: np.ndarray  # bool, per spot
    array_row: np.ndarray
    array_col: np.ndarray
    pixel_x: np.ndarray  # full-resolution column
    pixel_y: np.ndarray  # full-resolution row
    feature_ids: list[str]
    feature_names: list[str]
    feature_types: list[str]
    counts: np.ndarray  # (n_spots, n_features) int64, all spots and features
    width: int
    height: int

    @property
    def spot_diameter_fullres(self) -> float:
        return (55.0 if self.grid == "hex" else 100.0) / self.mpp

    def order(self, filtered: bool = True) -> np.ndarray:
        """Spot indices in count-matrix order (sorted barcodes), in-tissue only if ``filtered``."""
        idx = np.argsort(np.asarray(self.barcodes), kind="stable")
        return idx[self.in_tissue[idx]] if filtered else idx

    def ge(self) -> np.ndarray:
        return np.array([t == "Gene Expression" for t in self.feature_types])

    def expected(self) -> SimpleNamespace:
        """What a reader returns: in-tissue spots (sorted barcodes), GE genes, duplicates summed."""
        idx = self.order(True)
        ge = self.ge()
        names = [n for n, k in zip(self.feature_names, ge) if k]
        X = self.counts[idx][:, ge]
        codes, uniq = pd.factorize(pd.Index(names, dtype=object))
        Xs = np.zeros((len(idx), len(uniq)), dtype=np.float32)
        for j, c in enumerate(codes):
            Xs[:, c] += X[:, j]
        xy = np.column_stack([self.pixel_x[idx], self.pixel_y[idx]])
        if self.grid == "hex":
            arr = np.column_stack([self.array_col[idx], self.array_row[idx]])
        else:
            arr = np.column_stack([self.array_row[idx], self.array_col[idx]])
        return SimpleNamespace(
            spots=[self.barcodes[i] for i in idx], genes=[str(g) for g in uniq], X=Xs, xy=xy, array_xy=arr
        )


def synthetic_section(n_spots: int = 40, mpp: float = 2.0, grid: str = "hex", seed: int = 0) -> SyntheticSection:
    """Synthetic section of ``n_spots`` lattice spots (about 1 in 6 outside the tissue).

    ``grid="hex"``: Visium (array_col = 2k + row % 2, 100 um between neighbours,
    16-nt barcodes ``-1``). ``grid="square"``: legacy ST (200 um steps, ids
    ``"<x>x<y>"``; ``array_row``/``array_col`` hold x/y as in HEST).
    Features: 6 genes, the 4th sharing the 2nd one's symbol (different id),
    plus one ``Antibody Capture`` feature.
    """
    rng = np.random.default_rng(seed)
    per_row = max(2, math.ceil(math.sqrt(n_spots)))
    rows, cols = [], []
    for i in range(n_spots):
        r, k = divmod(i, per_row)
        rows.append(r)
        cols.append(2 * k + (r % 2) if grid == "hex" else k)
    r = np.array(rows, dtype=np.int64)
    c = np.array(cols, dtype=np.int64)
    margin = 60.25
    if grid == "hex":
        x_um, y_um = c * 50.0, r * 50.0 * math.sqrt(3.0)
        letters = np.array(list("ACGT"))
        barcodes = ["".join(rng.choice(letters, 16)) + "-1" for _ in range(n_spots)]
        array_row, array_col = r, c
    elif grid == "square":
        x_um, y_um = c * 200.0, r * 200.0
        # ST ids are "<x>x<y>" with 1-based array coordinates; HEST puts x in array_row
        barcodes = [f"{cc + 1}x{rr + 1}" for rr, cc in zip(r, c)]
        array_row, array_col = c + 1, r + 1
    else:
        raise ValueError(grid)
    px = margin + x_um / mpp
    py = margin + y_um / mpp
    in_tissue = np.ones(n_spots, dtype=bool)
    in_tissue[rng.choice(n_spots, size=max(1, n_spots // 6), replace=False)] = False
    names = ["ACTB", "GAPDH", "ERBB2", "GAPDH", "KRT19", "MT-CO1", "CD3"]
    ids = [f"ENSG{i:011d}" for i in range(len(names) - 1)] + ["CD3_TotalSeqB"]
    types = ["Gene Expression"] * (len(names) - 1) + ["Antibody Capture"]
    lam = rng.uniform(0.5, 8.0, size=len(names))
    counts = rng.poisson(lam, size=(n_spots, len(names))).astype(np.int64)
    counts[:, 2] = 0  # an all-zero gene
    counts[0, 2] = 3
    return SyntheticSection(
        grid=grid, mpp=float(mpp), barcodes=barcodes, in_tissue=in_tissue,
        array_row=array_row, array_col=array_col, pixel_x=px, pixel_y=py,
        feature_ids=ids, feature_names=names, feature_types=types, counts=counts,
        width=int(math.ceil(px.max() + margin)), height=int(math.ceil(py.max() + margin)),
    )


# --------------------------------------------------------------------------- images


def he_image(truth: SyntheticSection) -> np.ndarray:
    """RGB uint8 (height, width, 3): near-white slide with a pink tissue blob under the spots."""
    h, w = truth.height, truth.width
    img = np.full((h, w, 3), 242, dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = w / 2, h / 2
    blob = ((xx - cx) / (0.48 * w)) ** 2 + ((yy - cy) / (0.48 * h)) ** 2 <= 1.0
    img[blob] = (214, 140, 190)
    nuclei = blob & (((xx * 7 + yy * 13) % 23) == 0)
    img[nuclei] = (90, 60, 140)
    return img


def write_pyramid_tiff(path: Path, img: np.ndarray, mpp: float | None, levels: int = 2, tile: int = 64) -> Path:
    """Tiled pyramidal TIFF: full resolution + ``levels`` 2x-downsampled SubIFDs, resolution tags in cm."""
    import tifffile

    path = Path(path)
    opts = dict(tile=(tile, tile), photometric="rgb", compression="zlib", metadata=None)

    def res(f: int) -> dict:
        if mpp is None:
            return {}
        ppcm = 1e4 / (mpp * f)
        return dict(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")

    with tifffile.TiffWriter(path) as tif:
        tif.write(img, subifds=levels, **res(1), **opts)
        for i in range(1, levels + 1):
            f = 2**i
            tif.write(np.ascontiguousarray(img[::f, ::f]), subfiletype=1, **res(f), **opts)
    return path


def write_image(path: Path, truth: SyntheticSection, mpp: float | None = SAME) -> Path:
    """Write the H&E image of ``truth``: pyramidal TIFF for .tif/.tiff (with resolution
    tags for ``mpp``), else PIL (jpg/png; no resolution)."""
    path = Path(path)
    img = he_image(truth)
    m = truth.mpp if mpp == SAME else mpp
    if path.suffix.lower() in (".tif", ".tiff"):
        return write_pyramid_tiff(path, img, m)
    from PIL import Image

    Image.fromarray(img).save(path)
    return path


# --------------------------------------------------------------------------- HEST-1k


def make_hest_sample(
    root: Path,
    sample_id: str = "TENX99",
    n_spots: int = 40,
    mpp: float = 2.0,
    technology: str = "Visium",
    seed: int = 0,
    wsi: bool = True,
    meta_estimated: float | None | str = SAME,
    meta_embedded: float | None | str = SAME,
    tiff_mpp: float | None | str = SAME,
    coords: str = "obsm",
    tiff_tag_factor: float = 1.0,
    meta_nan: bool = False,
    zero_pad_ids: bool = False,
) -> SimpleNamespace:
    """One HEST-1k sample under ``root``: ``st/<id>.h5ad``, ``metadata/<id>.json``, ``wsis/<id>.tif``.

    The h5ad holds all spots with obs ``in_tissue``, ``array_row``, ``array_col``,
    ``pxl_col_in_fullres``, ``pxl_row_in_fullres`` and (``coords="obsm"``)
    ``obsm['spatial']`` = (pxl_col, pxl_row); ``.X`` CSR float32 raw counts of the
    Gene Expression features (the duplicated symbol kept twice). The metadata
    JSON uses HEST-1k's field names; ``meta_*``/``tiff_mpp`` set (or, with None,
    drop) the pixel sizes.

    HEST's quirks: ``tiff_tag_factor`` scales the mpp written to the TIFF resolution tags (0.1: HEST's
    tags, 10x too small, HEST issue #106); ``meta_nan`` writes dropped pixel sizes as ``NaN`` JSON tokens
    (and other empty fields as ``NaN`` / ``null`` / ``"nan"``, as HEST's metadata from its CSV table has
    them) instead of leaving them out; ``zero_pad_ids`` pads legacy ST ids as HEST does (``"002x011"``);
    ``technology="Xenium"`` writes HEST's 100 um square pseudo-spots (ids ``"<row:03d>x<col:03d>"``,
    ``array_row`` = lattice row, no ``inter_spot_dist`` / ``spot_diameter``).
    """
    root = Path(root)
    xenium = technology == "Xenium"
    grid = "square" if technology == "Spatial Transcriptomics" or xenium else "hex"
    # Xenium pseudo-spots: the 200 um square lattice at twice the mpp is 100 um apart at ``mpp``
    truth = synthetic_section(n_spots, 2 * mpp if xenium else mpp, grid, seed)
    if xenium:
        rows, cols = truth.array_col - 1, truth.array_row - 1
        truth.barcodes = [f"{r:03d}x{c:03d}" for r, c in zip(rows, cols)]
        truth.array_row, truth.array_col, truth.mpp = rows, cols, float(mpp)
    elif zero_pad_ids and grid == "square":
        truth.barcodes = [f"{int(x):03d}x{int(y):03d}" for x, y in (b.split("x") for b in truth.barcodes)]
    for d in ("st", "metadata", "wsis"):
        (root / d).mkdir(parents=True, exist_ok=True)
    idx = truth.order(filtered=False)
    ge = truth.ge()
    import anndata as ad

    obs = pd.DataFrame(
        {
            "in_tissue": truth.in_tissue[idx].astype(np.int64),
            "array_row": truth.array_row[idx],
            "array_col": truth.array_col[idx],
            "pxl_col_in_fullres": truth.pixel_x[idx],
            "pxl_row_in_fullres": truth.pixel_y[idx],
        },
        index=pd.Index([truth.barcodes[i] for i in idx]),
    )
    var = pd.DataFrame(
        {"gene_ids": [g for g, k in zip(truth.feature_ids, ge) if k]},
        index=pd.Index([g for g, k in zip(truth.feature_names, ge) if k]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicated var names, as in HEST files
        a = ad.AnnData(X=sp.csr_matrix(truth.counts[idx][:, ge].astype(np.float32)), obs=obs, var=var)
        if coords == "obsm":
            a.obsm["spatial"] = np.column_stack([truth.pixel_x[idx], truth.pixel_y[idx]])
        st = root / "st" / f"{sample_id}.h5ad"
        a.write_h5ad(st)
    est = mpp if meta_estimated == SAME else meta_estimated
    emb = mpp if meta_embedded == SAME else meta_embedded
    meta = {
        "dataset_title": "synthetic",
        "id": sample_id,
        "image_filename": f"{sample_id}.tif",
        "organ": "Breast",
        "species": "Homo sapiens",
        "st_technology": technology,
        "inter_spot_dist": 200.0 if grid == "square" else 100.0,
        "spot_diameter": 100.0 if grid == "square" else 55.0,
        "spots_under_tissue": int(truth.in_tissue.sum()),
        "preservation_method": "FFPE",
        "nb_genes": int(ge.sum()),
        "magnification": "40x",
        "fullres_px_width": truth.width,
        "fullres_px_height": truth.height,
    }
    if xenium:  # HEST's table has no spot spacing for Xenium
        for k in ("inter_spot_dist", "spot_diameter"):
            if meta_nan:
                meta[k] = float("nan")
            else:
                del meta[k]
    if est is not None or meta_nan:
        meta["pixel_size_um_estimated"] = float("nan") if est is None else est
    if emb is not None or meta_nan:
        meta["pixel_size_um_embedded"] = float("nan") if emb is None else emb
    if meta_nan:
        meta.update(oncotree_code=float("nan"), patient=None, treatment_comment="nan", subseries=float("nan"))
    mpath = root / "metadata" / f"{sample_id}.json"
    mpath.write_text(json.dumps(meta, indent=1))  # NaN -> the bare NaN token, as json.dump writes it
    wpath = None
    if wsi:
        tag = mpp if tiff_mpp == SAME else tiff_mpp
        wpath = write_image(root / "wsis" / f"{sample_id}.tif", truth, None if tag is None else tag * tiff_tag_factor)
    return SimpleNamespace(root=root, st=st, metadata=mpath, wsi=wpath, truth=truth)


# --------------------------------------------------------------------------- Space Ranger


def write_10x_h5(path: Path, truth: SyntheticSection, spot_idx: np.ndarray) -> Path:
    """10x HDF5 feature-barcode matrix (v3 layout, CSC features x barcodes) for the given spots."""
    import h5py

    M = sp.csc_matrix(truth.counts[spot_idx].T.astype(np.uint32))  # features x barcodes
    nf = len(truth.feature_names)
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["chemistry_description"] = "Spatial 3' v1"
        f.attrs["library_ids"] = np.array([b"synthetic"])
        f.attrs["original_gem_groups"] = np.array([1])
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array([truth.barcodes[i].encode() for i in spot_idx], dtype="S"),
                         compression="gzip")
        g.create_dataset("data", data=M.data.astype(np.int32), compression="gzip")
        g.create_dataset("indices", data=M.indices.astype(np.int64), compression="gzip")
        g.create_dataset("indptr", data=M.indptr.astype(np.int64), compression="gzip")
        g.create_dataset("shape", data=np.array([nf, len(spot_idx)], dtype=np.int32))
        fg = g.create_group("features")
        fg.create_dataset("_all_tag_keys", data=np.array([b"genome"], dtype="S"))
        fg.create_dataset("feature_type", data=np.array([t.encode() for t in truth.feature_types], dtype="S"))
        fg.create_dataset("genome", data=np.array([b"GRCh38"] * nf, dtype="S"))
        fg.create_dataset("id", data=np.array([i.encode() for i in truth.feature_ids], dtype="S"))
        fg.create_dataset("name", data=np.array([n.encode() for n in truth.feature_names], dtype="S"))
    return path


def write_10x_mtx(d: Path, truth: SyntheticSection, spot_idx: np.ndarray) -> Path:
    """MEX folder: matrix.mtx.gz (features x barcodes), features.tsv.gz, barcodes.tsv.gz."""
    d.mkdir(parents=True, exist_ok=True)
    M = sp.coo_matrix(truth.counts[spot_idx].T.astype(np.int64))
    with gzip.open(d / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, M, field="integer")
    with gzip.open(d / "features.tsv.gz", "wt") as f:
        for i, n, t in zip(truth.feature_ids, truth.feature_names, truth.feature_types):
            f.write(f"{i}\t{n}\t{t}\n")
    with gzip.open(d / "barcodes.tsv.gz", "wt") as f:
        for i in spot_idx:
            f.write(truth.barcodes[i] + "\n")
    return d


def write_tissue_positions(
    spatial: Path, truth: SyntheticSection, variant: str = "csv", scale: float = 1.0
) -> Path:
    """``tissue_positions.csv`` (header, Space Ranger >= 2.0) or ``tissue_positions_list.csv``
    (no header) for all lattice spots; ``scale`` multiplies the pixel coordinates."""
    lines = []
    if variant == "csv":
        path = spatial / "tissue_positions.csv"
        lines.append("barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres")
    elif variant == "list":
        path = spatial / "tissue_positions_list.csv"
    else:
        raise ValueError(variant)
    for i, b in enumerate(truth.barcodes):
        lines.append(
            f"{b},{int(truth.in_tissue[i])},{truth.array_row[i]},{truth.array_col[i]},"
            f"{float(truth.pixel_y[i] * scale)!r},{float(truth.pixel_x[i] * scale)!r}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def scalefactors(truth: SyntheticSection) -> dict:
    d = truth.spot_diameter_fullres
    return {
        "tissue_hires_scalef": 0.25,
        "tissue_lowres_scalef": 0.075,
        "fiducial_diameter_fullres": d * 1.6153846,
        "spot_diameter_fullres": d,
    }


def make_spaceranger_outs(
    root: Path,
    sample: str = "S1",
    n_spots: int = 40,
    mpp: float = 2.0,
    seed: int = 0,
    matrix: str = "h5",
    positions: str = "csv",
    image: str | None = "tif",
    filtered: bool = True,
    tiff_mpp: float | None | str = SAME,
    coord_scale: float = 1.0,
) -> SimpleNamespace:
    """Space Ranger sample ``root/<sample>/outs/`` (+ full-res image ``root/<sample>/image.<ext>``).

    ``matrix``: "h5" (filtered_feature_bc_matrix.h5) or "mtx" (filtered_feature_bc_matrix/).
    ``positions``: "csv" (tissue_positions.csv) or "list" (tissue_positions_list.csv).
    ``filtered=False`` puts out-of-tissue barcodes in the matrix too (to test in_tissue filtering).
    ``coord_scale`` scales the written pixel coordinates (e.g. 0.25 = hires pixels).
    Also writes scalefactors_json.json and the downsampled tissue_hires/lowres PNGs.
    """
    from PIL import Image

    truth = synthetic_section(n_spots, mpp, "hex", seed)
    sample_dir = Path(root) / sample
    outs = sample_dir / "outs"
    spatial = outs / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    idx = truth.order(filtered=filtered)
    if matrix == "h5":
        mpath = write_10x_h5(outs / "filtered_feature_bc_matrix.h5", truth, idx)
    elif matrix == "mtx":
        mpath = write_10x_mtx(outs / "filtered_feature_bc_matrix", truth, idx)
    else:
        raise ValueError(matrix)
    ppath = write_tissue_positions(spatial, truth, positions, coord_scale)
    sf = scalefactors(truth)
    spath = spatial / "scalefactors_json.json"
    spath.write_text(json.dumps(sf))
    he = Image.fromarray(he_image(truth))
    for kind in ("hires", "lowres"):
        s = sf[f"tissue_{kind}_scalef"]
        size = (max(1, round(truth.width * s)), max(1, round(truth.height * s)))
        he.resize(size, Image.BOX).save(spatial / f"tissue_{kind}_image.png")
    ipath = None
    if image is not None:
        ipath = write_image(sample_dir / f"image.{image}", truth, tiff_mpp)
    return SimpleNamespace(root=Path(root), sample_dir=sample_dir, outs=outs, matrix=mpath, positions=ppath,
                           scalefactors=spath, image=ipath, truth=truth)


# --------------------------------------------------------------------------- generic h5ad


def make_h5ad_section(
    root: Path,
    section: str = "S1",
    n_spots: int = 40,
    mpp: float = 2.0,
    seed: int = 0,
    grid: str = "hex",
    image: str | None = "tif",
    uns: str | None = "stgen",
    counts_layer: bool = True,
    coord_scale: float = 1.0,
    tiff_mpp: float | None | str = SAME,
) -> SimpleNamespace:
    """``root/<section>.h5ad`` (+ image ``root/<section>.<image>``) of the in-tissue spots.

    ``obsm['spatial']`` = full-resolution (x, y) x ``coord_scale``; obs
    ``array_row``/``array_col`` (hex) or ``array_x``/``array_y`` (square). ``counts_layer``: raw counts in
    ``layers['counts']`` and log1p-normalised ``.X``; else raw ``.X``.
    ``uns``: "stgen" (uns['stgen'] with mpp and grid), "visium"
    (uns['spatial'][section]['scalefactors'] as scanpy's read_visium) or None.
    """
    import anndata as ad

    truth = synthetic_section(n_spots, mpp, grid, seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    idx = truth.order(filtered=True)
    ge = truth.ge()
    raw = sp.csr_matrix(truth.counts[idx][:, ge].astype(np.float32))
    e = truth.expected()
    if grid == "hex":  # Visium / scanpy columns
        cols = {"array_row": e.array_xy[:, 1], "array_col": e.array_xy[:, 0]}
    else:
        cols = {"array_x": e.array_xy[:, 0], "array_y": e.array_xy[:, 1]}
    obs = pd.DataFrame(cols, index=pd.Index([truth.barcodes[i] for i in idx]))
    var = pd.DataFrame(index=pd.Index([n for n, k in zip(truth.feature_names, ge) if k]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if counts_layer:
            tot = np.asarray(raw.sum(axis=1)).ravel()
            norm = sp.diags(1e4 / np.maximum(tot, 1)) @ raw
            a = ad.AnnData(X=sp.csr_matrix(norm).log1p().astype(np.float32), obs=obs, var=var)
            a.layers["counts"] = raw
        else:
            a = ad.AnnData(X=raw, obs=obs, var=var)
        a.obsm["spatial"] = np.column_stack([truth.pixel_x[idx], truth.pixel_y[idx]]) * coord_scale
        if uns == "stgen":
            a.uns["stgen"] = {"mpp": mpp, "grid": grid, "section": section}
        elif uns == "visium":
            lib = {"scalefactors": scalefactors(truth), "metadata": {"source_image_path": ""}}
            a.uns["spatial"] = {section: lib}
        path = root / f"{section}.h5ad"
        a.write_h5ad(path)
    ipath = write_image(root / f"{section}.{image}", truth, tiff_mpp) if image is not None else None
    return SimpleNamespace(root=root, path=path, image=ipath, truth=truth)


# --------------------------------------------------------------------------- Her2ST


def make_her2st_root(root: Path, sections: tuple[str, ...] = ("A1", "B1"), n_spots: int = 30, mpp: float = 2.0,
                     seed: int = 0, imaged: tuple[str, ...] = ("A1",)) -> SimpleNamespace:
    """Her2ST-format folder (ST-cnts/*.tsv.gz, ST-spotfiles/*_selection.tsv, ST-imgs/<L>/<sec>/*.jpg).

    Square 200 um lattice; one unselected spot per section and one count row
    without a position (both dropped by the reader).
    """
    from PIL import Image

    root = Path(root)
    for d in ("ST-cnts", "ST-spotfiles"):
        (root / d).mkdir(parents=True, exist_ok=True)
    truths = {}
    for k, sec in enumerate(sections):
        t = synthetic_section(n_spots, mpp, "square", seed + k)
        truths[sec] = t
        ge = t.ge()
        genes = [n for n, g in zip(t.feature_names, ge) if g]
        lines = ["\t".join([""] + genes)]
        for i, b in enumerate(t.barcodes):
            lines.append("\t".join([b] + [str(v) for v in t.counts[i][ge]]))
        lines.append("\t".join(["99x99"] + ["1"] * len(genes)))
        with gzip.open(root / "ST-cnts" / f"{sec}.tsv.gz", "wt") as f:
            f.write("\n".join(lines) + "\n")
        rows = ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
        for i in range(len(t.barcodes)):
            ax, ay = t.array_row[i], t.array_col[i]
            rows.append(f"{ax}\t{ay}\t{ax}.0\t{ay}.0\t{float(t.pixel_x[i])!r}\t{float(t.pixel_y[i])!r}\t1")
        rows.append(f"{t.array_row.max() + 1}\t1\t0\t0\t5\t5\t0")
        (root / "ST-spotfiles" / f"{sec}_selection.tsv").write_text("\n".join(rows) + "\n")
        if sec in imaged:
            d = root / "ST-imgs" / sec[0] / sec
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(he_image(t)).save(d / f"HE_{sec}.jpg")
    return SimpleNamespace(root=root, truths=truths)
