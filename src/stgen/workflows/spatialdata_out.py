"""A prediction as a SpatialData Zarr store (``stgen predict --spatialdata OUT.zarr``), for napari-spatialdata.

The store holds, all in one coordinate system ``global`` = the slide's full-resolution pixels:

* ``images['slide']``: the slide (the whole image when its longer side is at most :data:`FULL_IMAGE_PX`,
  else the prediction's thumbnail, ``uns['spatial'][library]['images']['hires']``, with a ``Scale``
  transformation of ``1 / tissue_hires_scalef``), multiscale;
* ``shapes['spots']``: one circle per spot at ``obsm['spatial']`` with radius ``spot_diameter_fullres / 2``
  (full-resolution pixels);
* ``tables['table']``: ``.X`` the predicted mean, ``layers['std']`` the per-spot sample sd, the prediction's
  ``obs``/``var``/``obsm['spatial']`` and ``uns['stgen']``, annotating ``spots`` (``region_key`` ``region``,
  ``instance_key`` ``spot_id``).

The store is written to a temporary folder beside ``out`` and renamed into place when complete, so a failed
write leaves nothing at ``out`` (and an existing store there untouched).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from stgen.data.spatialdata import import_spatialdata
from stgen.errors import InputError

#: A slide whose longer side is at most this (px) goes into the store whole; larger ones as the thumbnail.
FULL_IMAGE_PX = 4096


def check_spatialdata_out(out: str | os.PathLike) -> Path:
    """``out`` as a Path when a SpatialData store can be written there (checked before any work): the name
    ends with ``.zarr``, it is not an existing file, and spatialdata is installed. InputError otherwise."""
    out = Path(out)
    if out.suffix != ".zarr":
        raise InputError(f"--spatialdata {out}: a SpatialData store is a folder whose name ends with .zarr")
    if out.exists() and not out.is_dir():
        raise InputError(f"--spatialdata {out}: exists and is not a folder")
    import_spatialdata(f"--spatialdata {out}")
    return out


def _slide_image(pred: ad.AnnData, lib: str, image: str | os.PathLike | None) -> tuple[np.ndarray, float]:
    """``(RGB uint8 (h, w, 3), image pixels per full-resolution pixel)`` for the store."""
    info = pred.uns["spatial"][lib]
    thumb = np.asarray(info["images"]["hires"])
    scale = float(info["scalefactors"]["tissue_hires_scalef"])
    if image is not None and scale < 1.0:
        from stgen.image.scaled import open_ref

        with open_ref(image) as slide:
            if max(slide.width, slide.height) <= FULL_IMAGE_PX:
                return slide.read_region(0, 0, slide.width, slide.height), 1.0
    return thumb, scale


def _scale_factors(h: int, w: int) -> list[int]:
    """2x steps until the longer side is at most 512 px (a napari-friendly pyramid)."""
    out, s = [], max(h, w)
    while s > 512 and len(out) < 8:
        out.append(2)
        s //= 2
    return out


def prediction_spatialdata(pred: ad.AnnData, image: str | os.PathLike | None = None):
    """The :class:`spatialdata.SpatialData` of a prediction (module docstring); ``image`` the predicted slide
    (used whole when small), else the thumbnail in ``uns['spatial']``. InputError for a prediction without
    ``obsm['spatial']`` or ``uns['spatial']``."""
    sd = import_spatialdata("writing a SpatialData store")
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    spatial = pred.uns.get("spatial")
    lib = (pred.uns.get("stgen") or {}).get("library_id")
    if not isinstance(spatial, dict) or not spatial or "spatial" not in pred.obsm:
        raise InputError("the prediction has no uns['spatial'] thumbnail or obsm['spatial'] spot centres")
    lib = lib if lib in spatial else next(iter(spatial))
    rgb, scale = _slide_image(pred, lib, image)
    img = Image2DModel.parse(np.ascontiguousarray(np.moveaxis(rgb, -1, 0)), dims=("c", "y", "x"),
                             c_coords=["r", "g", "b"], scale_factors=_scale_factors(*rgb.shape[:2]) or None,
                             transformations={"global": Scale([1.0 / scale, 1.0 / scale], axes=("y", "x"))})
    xy = np.asarray(pred.obsm["spatial"], dtype=np.float64)
    radius = float(spatial[lib]["scalefactors"]["spot_diameter_fullres"]) / 2.0
    spots = ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), radius), index=np.arange(len(xy)),
                              transformations={"global": Identity()})
    obs = pred.obs.copy()
    obs["region"] = pd.Categorical(["spots"] * pred.n_obs)
    obs["spot_id"] = np.arange(pred.n_obs)
    table = ad.AnnData(X=np.asarray(pred.X, dtype=np.float32), obs=obs, var=pred.var.copy(),
                       layers={k: np.asarray(v, dtype=np.float32) for k, v in pred.layers.items()},
                       obsm={"spatial": xy}, uns={"stgen": dict(pred.uns.get("stgen") or {})})
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    return sd.SpatialData(images={"slide": img}, shapes={"spots": spots}, tables={"table": table})


def write_spatialdata(pred: ad.AnnData, image: str | os.PathLike | None, out: str | os.PathLike) -> Path:
    """Write a prediction (:func:`stgen.workflows.predict.predict`'s AnnData) as the SpatialData store ``out``
    (module docstring), atomically. Returns ``out``. InputError for a bad ``out`` or a missing spatialdata;
    :class:`~stgen.utils.io.OutputError` for a full disk."""
    from stgen.utils.io import atomic_dir

    out = check_spatialdata_out(out)
    sdata = prediction_spatialdata(pred, image)
    with atomic_dir(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's notes on sharding defaults
        store = tmp / "store.zarr"  # spatialdata writes a new folder only
        sdata.write(store)
        for p in store.iterdir():
            os.replace(p, tmp / p.name)
        store.rmdir()
    return out
