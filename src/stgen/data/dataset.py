"""Readers for spot-level spatial transcriptomics data sets beyond Her2ST.

Every reader returns one section as an AnnData with the layout of
:func:`stgen.data.her2st.read_section`:

* ``.X`` CSR float32 raw counts; ``obs_names`` spot ids; ``var_names`` unique
  gene symbols (duplicated symbols are summed, first-seen order);
* ``.obs`` columns ``array_x``, ``array_y`` (int; lattice column / row, ``-1``
  when the input has none), ``pixel_x``, ``pixel_y`` (float, full-resolution
  pixels, ``x`` = image column) and ``section``;
* ``.obsm['spatial']`` float64 ``(n, 2)`` = ``(pixel_x, pixel_y)``;
* ``.uns['stgen']`` = dict(section, image_path (str or None), mpp (um per
  full-resolution pixel), spot_diameter_um, spot_spacing_um, source, grid
  (``"hex"`` for Visium: 55 um spots 100 um apart; ``"square"`` for legacy
  Spatial Transcriptomics: 100 um spots 200 um apart) and mpp_source (where the
  mpp came from)).

Supported inputs
----------------
* **HEST-1k** (:func:`read_hest_sample`)::

      <root>/st/<id>.h5ad          counts; obsm['spatial'] = (pxl_col_in_fullres, pxl_row_in_fullres)
      <root>/metadata/<id>.json    st_technology, pixel_size_um_estimated, pixel_size_um_embedded,
                                   inter_spot_dist, spot_diameter, fullres_px_width/height, ...
      <root>/wsis/<id>.tif         pyramidal full-resolution H&E (optional for expression-only use)

* **10x Space Ranger** ``outs/`` folders (:func:`read_spaceranger`)::

      outs/filtered_feature_bc_matrix.h5        (or filtered_feature_bc_matrix/ with
                                                 matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz)
      outs/spatial/tissue_positions.csv         (Space Ranger >= 2.0, with header; or the older
                                                 headerless tissue_positions_list.csv)
      outs/spatial/scalefactors_json.json       spot_diameter_fullres, tissue_hires_scalef, ...

  The full-resolution H&E image is not part of ``outs/`` and is passed
  separately.

* **Generic h5ad** (:func:`read_h5ad_section`): any AnnData with
  ``obsm['spatial']`` in full-resolution pixels of its H&E image.

Data-set folders (:func:`open_dataset`) and their image conventions
-------------------------------------------------------------------
* ``"her2st"``: ``<root>/ST-cnts/`` ... (see :mod:`stgen.data.her2st`).
* ``"hest"``: ``<root>/st/*.h5ad`` + ``<root>/metadata/``; image
  ``<root>/wsis/<id>.tif`` (or ``.tiff``).
* ``"visium"``: ``<root>/<sample>/outs/`` (or ``<root>/<sample>/`` being itself an
  ``outs`` folder; ``<root>`` may also be a single such sample). Section name =
  ``<sample>``. Image: the image file (``.tif .tiff .btf .svs .ndpi .jpg .jpeg
  .png``) lying directly in ``<root>/<sample>/``; if there are several, the one
  whose stem is ``image`` or ``<sample>``; if there is none, a file of
  ``outs/spatial/`` whose name contains ``fullres``. The downsampled
  ``tissue_hires_image.png`` / ``tissue_lowres_image.png`` are never used.
* ``"visium_hd"``: Visium HD samples ``<root>/<sample>/outs/binned_outputs/square_NNNum/`` (``<root>`` may
  be one sample); one bin size per data set (:class:`VisiumHdDataset` ``bin_um``, default 16 um); images
  as ``"visium"``, else the hires PNG at its scale factor (:mod:`stgen.data.visium_hd`).
* ``"h5ad"``: ``<root>/<section>.h5ad`` with the image ``<root>/<section>.<ext>``
  beside it (one of the suffixes above; several -> error).
* ``"spatialdata"``: ``<root>/<section>.zarr`` SpatialData stores (``<root>`` may be one store); table,
  spot circles and image inside each store (:mod:`stgen.data.spatialdata`; needs ``stgen[spatialdata]``).

Every user-caused problem is raised as :class:`stgen.errors.InputError` naming
the file and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path
import anndata as ad
from stgen.errors import InputError
from stgen.data.common import _anndata_counts
from stgen.data.common import _check_grid
from stgen.data.common import _counts_anndata
from stgen.data.hest import _hest_counts
from stgen.data.hest import _hest_paths
from stgen.data.hest import HestSelection
from stgen.data.common import _image_files
from stgen.data.visium import _outs_dir
from stgen.data.visium import downsampled_image
from stgen.data.common import _pos_float
from stgen.data.common import _read_json
from stgen.data.visium import _section_name
from stgen.data.visium import _spaceranger_counts
from stgen.data.common import _spot_ids
from stgen.data.common import read_anndata
from stgen.data.h5ad import has_embedded_image
from stgen.data.h5ad import read_h5ad_section
from stgen.data.hest import read_hest_sample
from stgen.data.visium import read_spaceranger
from stgen.data.spatialdata import is_spatialdata_store
from stgen.data.visium_hd import DEFAULT_BIN_UM
from stgen.data.visium_hd import _check_bin_um
from stgen.data.visium_hd import hd_bins_dir
from stgen.data.visium_hd import hd_downsampled_image
from stgen.data.visium_hd import hd_sample
from stgen.data.visium_hd import is_hd_bin_folder
from stgen.data.visium_hd import read_visium_hd
from stgen.data.visium_hd import read_visium_hd_counts


#: Data-set formats understood by :func:`open_dataset`.
FORMATS = ("her2st", "hest", "visium", "visium_hd", "h5ad", "spatialdata")


class Dataset:
    """A folder of sections in one of :data:`FORMATS` (see :func:`open_dataset`).

    Attributes
    ----------
    root : the data-set folder.
    format : one of :data:`FORMATS`.
    """

    format: str = ""

    def __init__(self, root: str | os.PathLike, mpp: float | None = None, grid: str | None = None):
        self.root = Path(root)
        self.mpp = mpp
        self.grid = grid

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, format={self.format!r})"

    # subclasses implement these four
    def _all_sections(self) -> list[str]:
        raise NotImplementedError

    def image(self, section: str) -> Path | None:
        """Path of the full-resolution H&E image of ``section`` or None."""
        raise NotImplementedError

    def _read(self, section: str, require_image: bool) -> ad.AnnData:
        raise NotImplementedError

    def has_image(self, section: str) -> bool:
        """Whether ``section`` has an H&E image to cut patches from: :meth:`image`, or a downsampled one
        (Space Ranger's hires PNG, an AnnData's ``uns['spatial']`` image) where the format has it."""
        return self.image(section) is not None

    def _counts(self, section: str) -> ad.AnnData:
        raise NotImplementedError

    # public API
    def sections(self, imaged_only: bool = False) -> list[str]:
        """Sorted section names (only those with an image when ``imaged_only``)."""
        out = sorted(self._all_sections())
        if imaged_only:
            out = [s for s in out if self.has_image(s)]
        return out

    def __contains__(self, section: object) -> bool:
        return isinstance(section, str) and section in self._all_sections()

    def _check(self, section: str) -> None:
        avail = self.sections()
        if section not in avail:
            raise InputError(
                f"unknown section {section!r} in {self.root} ({self.format}); available: {', '.join(avail)}"
            )

    def read(self, section: str, require_image: bool = False) -> ad.AnnData:
        """Read ``section`` with the layout of :func:`stgen.data.her2st.read_section` (plus ``grid``).

        Raises InputError for an unknown section, a missing image when
        ``require_image``, or any reader error.
        """
        self._check(section)
        return self._read(section, require_image)

    def counts(self, section: str) -> ad.AnnData:
        """Raw counts of ``section`` (spots x genes, CSR float32, ``obs['section']``).

        Same spots (and order) as :meth:`read` where a position table exists,
        but needs neither image nor mpp and runs no geometry checks: for
        expression-only corpora.
        """
        self._check(section)
        return self._counts(section)


class Her2stDataset(Dataset):
    """Her2ST folder; delegates to :mod:`stgen.data.her2st` (adds ``grid='square'``)."""

    format = "her2st"

    def __init__(self, root: str | os.PathLike, mpp: float | None = None, grid: str | None = None):
        if mpp is not None or grid not in (None, "square"):
            raise InputError(
                f"{root}: Her2ST sections take their mpp from the spot lattice and use the square "
                "grid; mpp/grid overrides are not supported"
            )
        super().__init__(root)
        from stgen.data import her2st

        her2st.list_sections(self.root)  # validates the layout

    def _all_sections(self) -> list[str]:
        from stgen.data import her2st

        return her2st.list_sections(self.root)

    def sections(self, imaged_only: bool = False) -> list[str]:
        from stgen.data import her2st

        return her2st.list_sections(self.root, imaged_only=imaged_only)

    def image(self, section: str) -> Path | None:
        from stgen.data import her2st

        return her2st.find_image(self.root, section)

    def read(self, section: str, require_image: bool = False) -> ad.AnnData:
        from stgen.data import her2st

        a = her2st.read_section(self.root, section, require_image=require_image)
        a.uns["stgen"]["grid"] = "square"
        a.uns["stgen"]["mpp_source"] = "spot lattice"
        return a

    def counts(self, section: str) -> ad.AnnData:
        from stgen.data import her2st

        self._check(section)
        cdir = self.root / "ST-cnts"
        cpath = cdir / f"{section}.tsv.gz"
        if not cpath.exists():
            cpath = cdir / f"{section}.tsv"
        a = her2st.read_counts(cpath)
        spath = self.root / "ST-spotfiles" / f"{section}_selection.tsv"
        if spath.is_file():
            keep = a.obs_names.isin(her2st.read_spots(spath).index)
            if not keep.any():
                raise InputError(f"{cpath}: no spot ids in common with {spath}")
            a = a[keep].copy()
        a.obs["section"] = section
        return a


class HestDataset(Dataset):
    """HEST-1k folder: ``st/<id>.h5ad``, ``metadata/<id>.json``, ``wsis/<id>.tif``.

    :meth:`sections` lists the samples of one ``st_technology`` (:class:`stgen.data.hest.HestSelection`):
    ``technology`` ('Visium' or 'Spatial Transcriptomics'), by default the larger of the two groups, with a
    warning naming it and counting every sample left out (Xenium and Visium HD are never trained on).
    :meth:`read` and :meth:`counts` take any sample of the folder by name.
    """

    format = "hest"

    def __init__(self, root: str | os.PathLike, mpp: float | None = None, grid: str | None = None,
                 technology: str | None = None):
        super().__init__(root, mpp=mpp, grid=grid)
        self.selection = HestSelection(self.root, technology)

    def sections(self, imaged_only: bool = False) -> list[str]:
        """Sorted ids of the selected technology's samples (only those with a WSI when ``imaged_only``)."""
        out = self.selection.select(self._all_sections())
        return [s for s in out if self.has_image(s)] if imaged_only else out

    def _check(self, section: str) -> None:
        avail = self._all_sections()
        if section not in avail:
            raise InputError(f"unknown section {section!r} in {self.root} (hest: no st/{section}.h5ad); "
                             f"available: {', '.join(avail)}")

    def _all_sections(self) -> list[str]:
        d = self.root / "st"
        if not d.is_dir():
            raise InputError(f"{self.root}: not a HEST folder (no 'st' sub-folder)")
        return sorted(p.name[: -len(".h5ad")] for p in d.iterdir() if p.is_file() and p.name.endswith(".h5ad"))

    def image(self, section: str) -> Path | None:
        return _hest_paths(self.root, section)[2]

    def technology(self, section: str) -> str:
        """``st_technology`` of a sample's metadata (e.g. 'Visium', 'Xenium')."""
        self._check(section)
        p = self.root / "metadata" / f"{section}.json"
        t = _read_json(p, "HEST metadata").get("st_technology")
        if not isinstance(t, str):
            raise InputError(f"{p}: no 'st_technology' field")
        return t

    def _read(self, section: str, require_image: bool) -> ad.AnnData:
        return read_hest_sample(self.root, section, mpp=self.mpp, require_image=require_image)

    def _counts(self, section: str) -> ad.AnnData:
        self.selection.note_outside(section, self._all_sections())
        X, spots, genes = _hest_counts(self.root, section)
        return _counts_anndata(X, spots, genes, section)


class VisiumDataset(Dataset):
    """Folder of Space Ranger samples: ``<root>/<sample>/outs/`` (or ``<root>/<sample>/`` = outs)."""

    format = "visium"

    def _samples(self) -> dict[str, tuple[Path, Path]]:
        """section -> (sample folder, outs folder)."""
        if not self.root.is_dir():
            raise InputError(f"{self.root}: folder not found")
        own = _outs_dir(self.root)
        if own is not None:
            sample_dir = self.root.parent if self.root.name == "outs" else self.root
            return {_section_name(own): (sample_dir, own)}
        out = {}
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            o = _outs_dir(d)
            if o is not None:
                out[d.name] = (d, o)
        return out

    def _all_sections(self) -> list[str]:
        return list(self._samples())

    def image(self, section: str) -> Path | None:
        samples = self._samples()
        if section not in samples:
            return None
        sample_dir, outs = samples[section]
        imgs = _image_files(sample_dir)
        if len(imgs) > 1:
            named = [p for p in imgs if {p.name[: -len(p.suffix)], p.name.split(".")[0]} & {"image", section}]
            if len(named) != 1:
                raise InputError(
                    f"{sample_dir}: several images ({', '.join(p.name for p in imgs)}); keep one, "
                    f"or name the full-resolution H&E 'image.<ext>' or '{section}.<ext>'"
                )
            return named[0]
        if imgs:
            return imgs[0]
        full = [p for p in _image_files(outs / "spatial") if "fullres" in p.name.lower()]
        return full[0] if full else None

    def has_image(self, section: str) -> bool:
        """A full-resolution image (:meth:`image`) or ``outs/spatial/tissue_hires_image.png`` / ``_lowres_``."""
        samples = self._samples()
        return self.image(section) is not None or (
            section in samples and downsampled_image(samples[section][1] / "spatial") is not None)

    def _read(self, section: str, require_image: bool) -> ad.AnnData:
        _, outs = self._samples()[section]
        img = self.image(section)
        if require_image and not self.has_image(section):
            raise InputError(
                f"section {section!r} has no H&E image (expected an image file in "
                f"{self._samples()[section][0]}, or outs/spatial/tissue_hires_image.png)"
            )
        return read_spaceranger(outs, image=img, mpp=self.mpp, section=section)

    def _counts(self, section: str) -> ad.AnnData:
        _, outs = self._samples()[section]
        counts, _ = _spaceranger_counts(outs)
        counts.obs["section"] = section
        return counts


class VisiumHdDataset(VisiumDataset):
    """Folder of Visium HD samples (``<root>/<sample>/outs/binned_outputs/square_NNNum/``; ``<root>`` may be one
    sample, its ``outs`` or ``binned_outputs``), read at one bin size: ``bin_um`` (default 16 um; 8 with
    ``VisiumHdDataset(root, bin_um=8)``), see :mod:`stgen.data.visium_hd`. Images as for ``"visium"``;
    without a full-resolution one, the bin's (or ``outs/spatial/``) ``tissue_hires_image.png`` at its scale."""

    format = "visium_hd"

    def __init__(self, root: str | os.PathLike, mpp: float | None = None, grid: str | None = None,
                 bin_um: int = DEFAULT_BIN_UM):
        if grid not in (None, "square"):
            raise InputError(f"{root}: Visium HD bins tile a square grid; grid={grid!r} is not supported")
        super().__init__(root, mpp=mpp, grid="square")
        self.bin_um = _check_bin_um(bin_um, str(root))

    def _samples(self) -> dict[str, tuple[Path, Path]]:
        """section -> (sample folder, outs folder)."""
        if not self.root.is_dir():
            raise InputError(f"{self.root}: folder not found")
        own = hd_sample(self.root)
        if own is not None:
            return {_section_name(own[1]): own[:2]}
        return {d.name: s[:2] for d in sorted(p for p in self.root.iterdir() if p.is_dir())
                if (s := hd_sample(d)) is not None}

    def has_image(self, section: str) -> bool:
        """A full-resolution image (:meth:`image`) or the bin's / ``outs/spatial/`` hires (lowres) PNG."""
        samples = self._samples()
        if self.image(section) is not None:
            return True
        if section not in samples:
            return False
        outs = samples[section][1]
        bins = hd_bins_dir(outs)
        return hd_downsampled_image(outs, bins / f"square_{self.bin_um:03d}um" if bins else None) is not None

    def _read(self, section: str, require_image: bool) -> ad.AnnData:
        return read_visium_hd(self._samples()[section][1], bin_um=self.bin_um, image=self.image(section),
                              mpp=self.mpp, section=section, require_image=require_image)

    def _counts(self, section: str) -> ad.AnnData:
        return read_visium_hd_counts(self._samples()[section][1], bin_um=self.bin_um, section=section)


class H5adDataset(Dataset):
    """Folder of ``<section>.h5ad`` files with images ``<section>.<ext>`` beside them."""

    format = "h5ad"

    def _all_sections(self) -> list[str]:
        if not self.root.is_dir():
            raise InputError(f"{self.root}: folder not found")
        return sorted(p.stem for p in self.root.iterdir() if p.is_file() and p.suffix == ".h5ad")

    def image(self, section: str) -> Path | None:
        imgs = [p for p in _image_files(self.root) if p.name[: -len(p.suffix)] == section]
        if len(imgs) > 1:
            raise InputError(
                f"{self.root}: several images for section {section!r} "
                f"({', '.join(p.name for p in imgs)}); keep only the full-resolution H&E"
            )
        return imgs[0] if imgs else None

    def has_image(self, section: str) -> bool:
        """An image file beside the ``.h5ad`` (:meth:`image`) or one in its ``uns['spatial']`` (scanpy/squidpy)."""
        return self.image(section) is not None or has_embedded_image(self.root / f"{section}.h5ad")

    def _read(self, section: str, require_image: bool) -> ad.AnnData:
        return read_h5ad_section(
            self.root / f"{section}.h5ad", image=self.image(section), mpp=self.mpp,
            section=section, grid=self.grid, require_image=require_image,
        )

    def _counts(self, section: str) -> ad.AnnData:
        path = self.root / f"{section}.h5ad"
        a = read_anndata(path)
        X, genes = _anndata_counts(a, path)
        return _counts_anndata(X, _spot_ids(a.obs_names, str(path)), genes, section)


class SpatialDataDataset(Dataset):
    """SpatialData Zarr stores ``<root>/<section>.zarr`` (or ``<root>`` itself a store), read by
    :func:`stgen.data.spatialdata.read_spatialdata_section`; the store's image is written once to the cache."""

    format = "spatialdata"

    def _stores(self) -> dict[str, Path]:
        if not self.root.is_dir():
            raise InputError(f"{self.root}: folder not found")
        if is_spatialdata_store(self.root):
            return {self.root.name.removesuffix(".zarr"): self.root}
        return {p.name.removesuffix(".zarr"): p for p in sorted(self.root.iterdir()) if is_spatialdata_store(p)}

    def _all_sections(self) -> list[str]:
        return list(self._stores())

    def has_image(self, section: str) -> bool:
        d = self._stores().get(section)
        return d is not None and (d / "images").is_dir() and any(p.is_dir() for p in (d / "images").iterdir())

    def image(self, section: str) -> Path | None:
        """The store's image as the cached pyramidal TIFF (written on first use), or None."""
        if not self.has_image(section):
            return None
        p = self.read(section).uns["stgen"]["image_path"]
        return Path(p) if p else None

    def _read(self, section: str, require_image: bool) -> ad.AnnData:
        from stgen.data.spatialdata import read_spatialdata_section

        return read_spatialdata_section(self._stores()[section], mpp=self.mpp, grid=self.grid, section=section,
                                        require_image=require_image)

    def _counts(self, section: str) -> ad.AnnData:
        from stgen.data.spatialdata import spatialdata_counts

        return _counts_anndata(*spatialdata_counts(self._stores()[section]), section)


_DATASETS: dict[str, type[Dataset]] = {
    "her2st": Her2stDataset,
    "hest": HestDataset,
    "visium": VisiumDataset,
    "visium_hd": VisiumHdDataset,
    "h5ad": H5adDataset,
    "spatialdata": SpatialDataDataset,
}

_LOOKED_FOR = (
    "her2st: ST-cnts/; hest: st/*.h5ad + metadata/; visium: <sample>/outs/ (or outs-like "
    "folders with spatial/ and filtered_feature_bc_matrix[.h5]); visium_hd: <sample>/outs/binned_outputs/"
    "square_NNNum/; h5ad: *.h5ad files; spatialdata: *.zarr SpatialData stores"
)


def _matches(root: Path) -> list[str]:
    found = []
    if (root / "ST-cnts").is_dir():
        found.append("her2st")
    st = root / "st"
    if st.is_dir() and (root / "metadata").is_dir() and any(p.suffix == ".h5ad" for p in st.iterdir()):
        found.append("hest")
    dirs = [d for d in root.iterdir() if d.is_dir()]
    # a Visium HD bin folder (square_016um/) looks like an outs folder: it is visium_hd, never visium
    if (_outs_dir(root) is not None and not is_hd_bin_folder(root)) or any(
            _outs_dir(d) is not None and not is_hd_bin_folder(d) for d in dirs):
        found.append("visium")
    if hd_sample(root) is not None or any(hd_sample(d) is not None for d in dirs):
        found.append("visium_hd")
    if any(p.is_file() and p.suffix == ".h5ad" for p in root.iterdir()):
        found.append("h5ad")
    if is_spatialdata_store(root) or any(is_spatialdata_store(d) for d in dirs):
        found.append("spatialdata")
    return found


def detect_format(root: str | os.PathLike) -> str:
    """The format of a data-set folder, one of :data:`FORMATS`.

    Raises
    ------
    InputError : folder missing, no format matches, or several do (ambiguous);
        the message lists what was looked for.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: data-set folder not found")
    found = _matches(root)
    if not found:
        raise InputError(f"{root}: unrecognised data-set layout; looked for {_LOOKED_FOR}")
    if len(found) > 1:
        raise InputError(
            f"{root}: ambiguous data-set layout, matches {', '.join(found)}; pass format= "
            f"one of {', '.join(found)} (looked for {_LOOKED_FOR})"
        )
    return found[0]


def open_dataset(
    root: str | os.PathLike,
    format: str | None = None,
    mpp: float | None = None,
    grid: str | None = None,
    technology: str | None = None,
) -> Dataset:
    """Open a data-set folder as a :class:`Dataset`.

    Parameters
    ----------
    root : the folder (layouts in the module docstring).
    format : one of :data:`FORMATS`; auto-detected when None.
    mpp : microns-per-pixel override for every section (not for Her2ST).
    grid : spot grid for h5ad sections that do not record one ('hex' or 'square').
    technology : HEST-1k only: the ``st_technology`` whose samples are used ('Visium' or 'Spatial
        Transcriptomics'); default: the larger group, with a warning (see :class:`HestDataset`).

    Raises
    ------
    InputError : unknown/undetectable/ambiguous format, or a layout that does
        not match the requested format.
    """
    root = Path(root)
    if format is None:
        format = detect_format(root)
    fmt = str(format).strip().lower()
    if fmt not in _DATASETS:
        raise InputError(f"unknown data-set format {format!r}; use one of {', '.join(FORMATS)}")
    if not root.is_dir():
        raise InputError(f"{root}: data-set folder not found")
    if fmt != "her2st" and fmt not in _matches(root):
        raise InputError(f"{root}: not a {fmt} data set; looked for {_LOOKED_FOR}")
    if grid is not None:
        grid = _check_grid(grid, str(root))
    if mpp is not None and _pos_float(mpp) is None:
        raise InputError(f"mpp must be a positive number, got {mpp!r}")
    if technology is not None:
        if fmt != "hest":
            raise InputError(f"technology={technology!r} selects HEST-1k samples; {root} is a {fmt} data set")
        return HestDataset(root, mpp=mpp, grid=grid, technology=technology)
    return _DATASETS[fmt](root, mpp=mpp, grid=grid)


def as_dataset(data: "str | os.PathLike | Dataset", format: str | None = None) -> Dataset:
    """``data`` itself when it is a :class:`Dataset`, else :func:`open_dataset` of the folder."""
    return data if isinstance(data, Dataset) else open_dataset(data, format=format)
