"""SpatialData Zarr stores (scverse ``spatialdata``; Visium stores of ``spatialdata-io``) as stgen sections.

A store holds a **table** (AnnData of counts) that annotates a **shapes** element of circles (the spots:
``spatialdata_attrs`` ``region`` / ``region_key`` / ``instance_key``) and **images**, each with
transformations to named coordinate systems. :func:`read_spatialdata_section` brings the spots into the
full-resolution (``scale0``) pixels of the chosen image through those transformations, and writes that
image once, tile by tile, as a pyramidal TIFF in the cache (``$STGEN_CACHE/images/<sha256>.tif``), so
features are cut from it like from any slide. Needs the optional extra ``stgen[spatialdata]``; the
library is imported only when a store is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from stgen.data.common import (
    GRIDS,
    _anndata_counts,
    _assemble,
    _check_grid,
    _int_column,
    _pos_float,
    _spot_ids,
)
from stgen.errors import InputError, StgenError

#: Side (px) of the blocks read from the store's image while a pyramid level is written.
_BLOCK_PX = 2048


def import_spatialdata(what: str):
    """The ``spatialdata`` module, or InputError saying that ``what`` (e.g. "<store>: reading a SpatialData
    store") needs it and how to install it."""
    try:
        import spatialdata
    except ImportError as e:
        raise InputError(f"{what} needs the spatialdata package ({e}); install it with: "
                         'pip install "stgen[spatialdata]"') from e
    return spatialdata


def is_spatialdata_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a SpatialData Zarr store (a folder with Zarr group metadata and an
    ``images``/``shapes``/``tables`` group), checked on disk without importing spatialdata."""
    p = Path(path)
    if not p.is_dir() or not any((p / f).is_file() for f in ("zarr.json", ".zgroup")):
        return False
    return any((p / g).is_dir() for g in ("tables", "shapes", "images"))


def open_store(path: str | os.PathLike, elements: tuple[str, ...] = ("tables", "shapes", "images")):
    """``spatialdata.read_zarr(path)`` of the ``elements`` groups (images stay lazy, dask), with a missing or
    unreadable store raised as InputError naming ``path``."""
    path = Path(path)
    sd = import_spatialdata(f"{path}: reading a SpatialData store")
    if not path.is_dir():
        raise InputError(f"{path}: SpatialData store not found (a .zarr folder)")
    if not is_spatialdata_store(path):
        raise InputError(f"{path}: not a SpatialData store (no Zarr group with images/, shapes/ or tables/)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sd.read_zarr(path, selection=elements)
    except Exception as e:  # zarr / ome-zarr / anndata raise many different errors
        raise InputError(f"{path}: not a readable SpatialData store ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------- table and spots


def _circles(sdata) -> list[str]:
    """Names of the shapes elements made of circles (points with a ``radius`` column)."""
    out = []
    for name, gdf in sdata.shapes.items():
        if "radius" in gdf.columns and len(gdf) and (gdf.geometry.geom_type == "Point").all():
            out.append(name)
    return out


def _regions(t: ad.AnnData) -> tuple[list[str], str | None, str | None]:
    attrs = t.uns.get("spatialdata_attrs") if isinstance(t.uns.get("spatialdata_attrs"), dict) else {}
    region = attrs.get("region")
    regions = [] if region is None else [str(r) for r in np.atleast_1d(np.asarray(region, dtype=object)).tolist()]
    return regions, attrs.get("region_key"), attrs.get("instance_key")


def choose_table(sdata, path: Path, table: str | None = None, shapes: str | None = None
                 ) -> tuple[str, str, ad.AnnData]:
    """``(table name, shapes name, the table's rows of those spots)``: the table whose ``spatialdata_attrs``
    region annotates a shapes element of circles (``table``/``shapes`` pick one when there are several).
    InputError naming ``path`` and the field when there is none, several, or a named one is missing."""
    circles = _circles(sdata)
    tables = dict(sdata.tables)
    if table is not None and table not in tables:
        raise InputError(f"{path}: no table {table!r} (tables: {', '.join(tables) or 'none'})")
    if shapes is not None and shapes not in circles:
        what = "is not made of circles (points with a radius)" if shapes in sdata.shapes else "does not exist"
        raise InputError(f"{path}: shapes element {shapes!r} {what} (circle shapes: {', '.join(circles) or 'none'})")
    cands = {}
    for name, t in tables.items():
        if table is not None and name != table:
            continue
        regs = [r for r in _regions(t)[0] if r in circles and (shapes is None or r == shapes)]
        if regs:
            cands[name] = regs
    if not cands:
        which = f"table {table!r}" if table is not None else f"none of the tables ({', '.join(tables) or 'none'})"
        raise InputError(f"{path}: {which} annotates a shapes element of circles (the spots; table "
                         f"uns['spatialdata_attrs']['region'] must name one of: {', '.join(circles) or 'none'})")
    if len(cands) > 1:
        raise InputError(f"{path}: several tables annotate spot circles ({', '.join(cands)}); pass table=")
    tname, regs = next(iter(cands.items()))
    if len(regs) > 1:
        raise InputError(f"{path}: table {tname!r} annotates several circle shapes ({', '.join(regs)}); pass shapes=")
    t = tables[tname]
    _, region_key, instance_key = _regions(t)
    where = f"{path}: tables[{tname!r}]"
    if not instance_key or instance_key not in t.obs.columns:
        raise InputError(f"{where}: the instance key column {instance_key!r} (spatialdata_attrs['instance_key']) "
                         "is missing from obs")
    if region_key and region_key in t.obs.columns:
        t = t[(t.obs[region_key].astype(str) == regs[0]).to_numpy()]
    if t.n_obs == 0:
        raise InputError(f"{where}: no rows annotate shapes {regs[0]!r}")
    return tname, regs[0], t


def _spot_centres(gdf, rows: ad.AnnData, instance_key: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(xy (n, 2), radius (n,))`` of the shapes rows ``rows.obs[instance_key]`` names, in the shapes' own
    coordinates."""
    ids = np.asarray(rows.obs[instance_key].to_numpy())
    index = gdf.index
    if not index.is_unique:
        raise InputError(f"{where}: the shapes' index (the spot ids that obs[{instance_key!r}] refers to) has "
                         "duplicates")
    if index.dtype != ids.dtype:  # e.g. ids stored as text for an integer index
        index, ids = index.astype(str), ids.astype(str)
    pos = index.get_indexer(ids)
    if (pos < 0).any():
        bad = ids[pos < 0][0]
        raise InputError(f"{where}: {int((pos < 0).sum())} of {len(ids)} row(s) name a spot missing from the shapes "
                         f"(obs[{instance_key!r}] = {bad!r})")
    g = gdf.iloc[pos]
    xy = np.column_stack([g.geometry.x.to_numpy(np.float64), g.geometry.y.to_numpy(np.float64)])
    return xy, g["radius"].to_numpy(np.float64)


# --------------------------------------------------------------------------- images and transformations


def _affine(element, cs: str) -> np.ndarray:
    """3 x 3 affine matrix of ``element`` -> coordinate system ``cs`` on the (x, y) axes."""
    from spatialdata.transformations import get_transformation

    return np.asarray(get_transformation(element, cs).to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")),
                      dtype=np.float64)


def _scale0(element):
    """The finest-resolution DataArray of an image (a multiscale DataTree's ``scale0``, or the array)."""
    import xarray as xr

    if isinstance(element, xr.DataArray):
        return element
    node = element["scale0"] if "scale0" in element.children else element[min(element.children)]
    return next(iter(node.data_vars.values()))


def _channels(element) -> int:
    a = _scale0(element)
    return int(a.sizes.get("c", 1)) if "c" in a.dims else 1


def _coordinate_system(names: list[tuple[str, Any]], coordinate_system: str | None, path: Path,
                       mapping) -> tuple[str, np.ndarray]:
    """``(coordinate system, mapping(it))``: ``coordinate_system``, else ``global``, else any coordinate system
    the elements ``names`` (``[(field, element)]``) share when ``mapping`` (cs -> 3 x 3 matrix: the spots'
    coordinates -> output) is the same through all of them. InputError naming the fields otherwise."""
    from spatialdata.transformations import get_transformation

    sets = [set(get_transformation(e, get_all=True)) for _, e in names]
    common = set.intersection(*sets)
    what = " and ".join(n for n, _ in names)
    if coordinate_system is not None:
        if coordinate_system not in common:
            raise InputError(f"{path}: {what} have no transformation to coordinate system {coordinate_system!r} "
                             f"(shared: {', '.join(sorted(common)) or 'none'})")
        return coordinate_system, mapping(coordinate_system)
    if not common:
        found = "; ".join(f"{n}: {', '.join(sorted(s_)) or 'none'}" for (n, _), s_ in zip(names, sets))
        raise InputError(f"{path}: {what} share no coordinate system ({found}); align them "
                         "(spatialdata.transformations.set_transformation)")
    cands = sorted(common, key=lambda c: (c != "global", c))
    first = mapping(cands[0])
    if cands[0] == "global" or all(np.allclose(mapping(c), first, rtol=1e-6, atol=1e-9) for c in cands[1:]):
        return cands[0], first
    raise InputError(f"{path}: {what} share several coordinate systems that place the spots differently "
                     f"({', '.join(cands)}); pass coordinate_system=")


def choose_image(sdata, path: Path, image: str | None, cs_of_shapes: set[str], require: bool = False) -> str | None:
    """The image element to cut patches from: ``image``, else the RGB(A) image (3 or 4 channels), the finest
    one in a coordinate system it shares with the spots when there are several; None when the store has no
    (RGB) image. InputError naming ``path`` and the field for an unknown name, several equally fine images, or
    (with ``require``) no RGB image."""
    images = dict(sdata.images)
    if image is not None:
        if image not in images:
            raise InputError(f"{path}: no image {image!r} (images: {', '.join(images) or 'none'})")
        return image
    rgb = [n for n, e in images.items() if _channels(e) in (3, 4)]
    if not rgb and require:
        if not images:
            raise InputError(f"{path}: no H&E image (the store's 'images' field is empty); add the slide with "
                             "spatialdata.models.Image2DModel")
        found = ", ".join(f"{n}: {_channels(e)} channel(s)" for n, e in images.items())
        raise InputError(f"{path}: no RGB H&E image among the images ({found}); pass image= to use one of them")
    if not rgb:
        return None
    if len(rgb) == 1:
        return rgb[0]
    from spatialdata.transformations import get_transformation

    size = {}
    for n in rgb:
        common = set(get_transformation(images[n], get_all=True)) & cs_of_shapes
        cs = "global" if "global" in common else (min(common) if common else None)
        if cs is not None:
            size[n] = math.sqrt(abs(np.linalg.det(_affine(images[n], cs)[:2, :2])))
    if size:
        best = min(size, key=size.get)
        if all(size[n] > 1.01 * size[best] for n in size if n != best):
            return best
    raise InputError(f"{path}: several RGB images ({', '.join(rgb)}) at the same resolution; pass image=")


def _image_key(path: Path, name: str, arr, mpp: float | None) -> str:
    """Content address of an image element: the store, element, shape, dtype, chunks, mpp and the size and
    modification time of every file of the element (a rewritten image gets a new key)."""
    files = []
    root = path / "images" / name
    for dirpath, _, fnames in os.walk(root):
        for f in fnames:
            st = (Path(dirpath) / f).stat()
            files.append((str(Path(dirpath, f).relative_to(root)), st.st_size, st.st_mtime_ns))
    key = {"store": str(path.resolve()), "element": name, "shape": list(arr.shape), "dtype": str(arr.dtype),
           "chunks": [list(c) for c in getattr(arr, "chunks", ())], "mpp": mpp, "files": sorted(files)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _rgb_block(block: np.ndarray) -> np.ndarray:
    """(c, h, w) uint8 with 1, 3 or 4 channels -> (h, w, 3) uint8 (alpha composited over white)."""
    a = np.moveaxis(block, 0, -1)
    if a.shape[2] == 1:
        return np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        al = a[:, :, 3:].astype(np.uint16)
        return ((a[:, :, :3].astype(np.uint16) * al + 255 * (255 - al) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(a[:, :, :3])


def store_image_file(path: Path, name: str, element, mpp: float | None,
                     cache_dir: str | os.PathLike | None = None) -> tuple[Path, tuple[int, int]]:
    """``(cache file, (width, height) px)`` that :func:`materialise_store_image` writes for image element
    ``name``, without writing it. InputError naming the store and the element for an image that is not 8-bit
    (c, y, x) with 1, 3 or 4 channels."""
    from stgen.utils.io import default_cache_dir

    a = _scale0(element)
    where = f"{path}: images[{name!r}]"
    if tuple(a.dims) != ("c", "y", "x"):
        raise InputError(f"{where}: expected a 2-D image with axes (c, y, x), got {tuple(a.dims)}")
    c, h, w = (int(v) for v in a.shape)
    if c not in (1, 3, 4):
        raise InputError(f"{where}: {c} channels; an H&E image has 3 (RGB), 4 (RGBA) or 1 (grey)")
    if np.dtype(a.dtype) != np.uint8:
        raise InputError(f"{where}: pixel type {a.dtype}; only 8-bit images are supported (convert to uint8 RGB)")
    return Path(cache_dir or default_cache_dir()) / "images" / f"{_image_key(path, name, a.data, mpp)}.tif", (w, h)


def materialise_store_image(path: Path, name: str, element, mpp: float | None,
                            cache_dir: str | os.PathLike | None = None) -> tuple[Path, tuple[int, int]]:
    """Write the ``scale0`` array of image element ``name`` as a tiled pyramidal TIFF
    ``<cache>/images/<sha256>.tif`` (:func:`_image_key`; ``cache_dir`` default ``$STGEN_CACHE`` or
    ``./.stgen_cache``), tile by tile from the lazy array (bounded memory: blocks of at most
    :data:`_BLOCK_PX` px a side), atomically, reused when present. Returns the file and its (width, height)
    in px. ``mpp`` (um per pixel) goes into its resolution tags. InputError as :func:`store_image_file`, or
    naming the element when its data cannot be read."""
    from stgen.image.patches import PAD_VALUE
    from stgen.image.slide import write_pyramidal_tiff

    out, (w, h) = store_image_file(path, name, element, mpp, cache_dir)
    if out.is_file():
        return out, (w, h)
    data = _scale0(element).data
    where = f"{path}: images[{name!r}]"

    def tile_fn(x0: int, y0: int, tw: int, th: int, ds: float) -> np.ndarray:
        f = round(ds)
        tile = np.empty((th, tw, 3), dtype=np.uint8)
        step = max(1, _BLOCK_PX // f)  # output px per block side: at most _BLOCK_PX source px are read at once
        for oy in range(0, th, step):
            for ox in range(0, tw, step):
                bh, bw = min(step, th - oy), min(step, tw - ox)
                sy, sx = (y0 + oy) * f, (x0 + ox) * f
                blk = _rgb_block(np.asarray(data[:, sy:sy + bh * f, sx:sx + bw * f]))
                if blk.shape[:2] != (bh * f, bw * f):
                    blk = np.pad(blk, ((0, bh * f - blk.shape[0]), (0, bw * f - blk.shape[1]), (0, 0)),
                                 constant_values=PAD_VALUE)
                if f > 1:
                    blk = np.round(blk.reshape(bh, f, bw, f, 3).mean(axis=(1, 3), dtype=np.float32)).astype(np.uint8)
                tile[oy:oy + bh, ox:ox + bw] = blk
        return tile

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_pyramidal_tiff(out, w, h, tile_fn, mpp=mpp)
    except StgenError:  # InputError, OutputError (a full disk): the temporary file is already removed
        raise
    except Exception as e:  # zarr / codec errors on damaged chunks
        raise InputError(f"{where}: cannot read the image data ({type(e).__name__}: {e})") from e
    return out, (w, h)


# --------------------------------------------------------------------------- reader


def spatialdata_counts(path: str | os.PathLike, table: str | None = None, shapes: str | None = None):
    """``(counts CSR float32, spot ids, genes)`` of a store's spot table (:func:`choose_table`), without
    images or geometry checks."""
    path = Path(path)
    sdata = open_store(path, ("tables", "shapes"))
    tname, _, t = choose_table(sdata, path, table, shapes)
    X, genes = _anndata_counts(t, f"{path}: tables[{tname!r}]")
    return X, _spot_ids(t.obs_names, f"{path}: tables[{tname!r}]"), genes


def read_spatialdata_section(
    path: str | os.PathLike,
    table: str | None = None,
    shapes: str | None = None,
    image: str | None = None,
    coordinate_system: str | None = None,
    mpp: float | None = None,
    grid: str | None = None,
    section: str | None = None,
    require_image: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> ad.AnnData:
    """Read a SpatialData Zarr store as one section (layout of :mod:`stgen.data.dataset`).

    * Table: ``table``, else the one table whose ``uns['spatialdata_attrs']['region']`` is a shapes element of
      circles (``shapes`` picks the element when it annotates several); its rows of that element are the
      spots, matched to the circles by ``instance_key``; spot ids are the table's ``obs_names``.
    * Counts: ``layers['counts']`` if present, else ``.X``; raw non-negative integers.
    * Image: ``image``, else the RGB(A) image (the finest of several, :func:`choose_image`); its ``scale0``
      array is written once to a pyramidal TIFF in the cache (:func:`materialise_store_image`) and becomes
      ``uns['stgen']['image_path']`` (``image_scale`` 1).
    * Coordinates: circle centres mapped shapes -> coordinate system -> image ``scale0`` pixels with the
      elements' transformations (``coordinate_system``, else ``global``, else the one they share):
      ``obsm['spatial']`` is full-resolution pixel (x, y). Without an image, the coordinate system's units.
    * Grid: ``grid``, else ``"hex"`` when obs has ``array_row``/``array_col`` (Visium; also the array
      coordinates ``array_x = array_col``, ``array_y = array_row``, else -1).
    * mpp (um per full-resolution pixel): ``mpp``, else from the circles' radius in pixels and the grid's spot
      diameter (55 um Visium, 100 um legacy ST).
    * Section name: ``section``, else the store's name without ``.zarr``.

    Raises
    ------
    InputError : spatialdata not installed; missing/unreadable store; no or ambiguous table, shapes, image or
        coordinate system (listing the candidates); no image when ``require_image``; bad counts; no grid or
        mpp; wrong coordinate scale; spots outside the image. Every message names the store and the field.
    """
    path = Path(path)
    sdata = open_store(path)
    section = section or path.name.removesuffix(".zarr")
    tname, sname, t = choose_table(sdata, path, table, shapes)
    where = f"{path}: tables[{tname!r}]"
    _, _, instance_key = _regions(t)
    gdf = sdata.shapes[sname]
    xy_s, radius = _spot_centres(gdf, t, instance_key, f"{where} -> shapes[{sname!r}]")
    spots = _spot_ids(t.obs_names, where)
    X, genes = _anndata_counts(t, where)

    from spatialdata.transformations import get_transformation

    shapes_cs = set(get_transformation(gdf, get_all=True))
    iname = choose_image(sdata, path, image, shapes_cs, require=require_image)
    if iname is not None:  # shapes -> coordinate system -> image pixels
        elements = [(f"shapes[{sname!r}]", gdf), (f"images[{iname!r}]", sdata.images[iname])]
        cs, to_px = _coordinate_system(elements, coordinate_system, path, lambda c: np.linalg.inv(
            _affine(sdata.images[iname], c)) @ _affine(gdf, c))
    else:  # shapes -> coordinate system
        cs, to_px = _coordinate_system([(f"shapes[{sname!r}]", gdf)], coordinate_system, path,
                                       lambda c: _affine(gdf, c))
    pixel_xy = xy_s @ to_px[:2, :2].T + to_px[:2, 2]
    radius_px = radius * math.sqrt(abs(np.linalg.det(to_px[:2, :2])))

    cols = set(t.obs.columns)
    visium = {"array_row", "array_col"} <= cols
    if visium:
        array_xy = np.column_stack([_int_column(t.obs["array_col"], where, "array_col"),
                                    _int_column(t.obs["array_row"], where, "array_row")])
    else:
        array_xy = np.full((t.n_obs, 2), -1, dtype=np.int64)
    if grid is not None:
        g = _check_grid(grid, where)
    elif visium:
        g = "hex"
    else:
        raise InputError(f"{where}: unknown spot grid (no obs 'array_row'/'array_col' of a Visium table); pass "
                         "grid='hex' (Visium) or grid='square' (legacy ST)")
    spacing, diameter = GRIDS[g]
    if mpp is not None:
        m, m_src = _pos_float(mpp), "argument"
        if m is None:
            raise InputError(f"mpp must be a positive number, got {mpp!r}")
    else:
        r = float(np.median(radius_px))
        if not (math.isfinite(r) and r > 0):
            raise InputError(f"{path}: shapes[{sname!r}]: circle radius {r:g}; cannot derive the microns per "
                             "pixel: pass mpp=")
        m, m_src = diameter / (2.0 * r), f"shapes[{sname!r}] radius ({diameter:g} um spots)"

    img_path, image_wh = None, None
    if iname is not None:  # the cache file's name now; it is written once the spots passed the checks
        img_path, image_wh = store_image_file(path, iname, sdata.images[iname], m, cache_dir)
    a = _assemble(
        X, spots, genes, array_xy, pixel_xy,
        where=where, section=section, image=img_path, image_wh=image_wh,
        image_name=f"images[{iname!r}] of {path}" if iname is not None else None,
        mpp=m, mpp_source=m_src, grid=g, spacing_um=spacing, diameter_um=diameter, source="spatialdata",
    )
    if iname is not None:
        materialise_store_image(path, iname, sdata.images[iname], m, cache_dir)
    a.uns["stgen"]["spatialdata"] = {"store": str(path), "table": tname, "shapes": sname,
                                     "image": iname or "", "coordinate_system": cs}
    return a
