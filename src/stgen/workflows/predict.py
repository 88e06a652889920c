"""Prediction: spot files or bare slides -> AnnData (.X mean, layers['std'], obsm['spatial'], uns['spatial'])."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence
import anndata as ad
import numpy as np
import pandas as pd
from stgen import __version__
from stgen.data.common import GRIDS
from stgen.errors import InputError
from stgen.utils.zoo import looks_like_zoo_name, zoo_run_dir
from stgen.image.scaled import SlideRef
from stgen.utils.io import atomic_path, sha256_file
from stgen.models.registry import GENERATIVE
from stgen.workflows.inputs import THUMBNAIL_PX
from stgen.workflows.inputs import _check_folder
from stgen.workflows.inputs import _slide_mpp
from stgen.workflows.inputs import _spots_from_file
from stgen.workflows.inputs import spots_image
from stgen.workflows.paths import default_cache_dir
from stgen.workflows.rundir import load_run


def predict(
    run_dir: str | Path,
    image: str | Path | SlideRef | None,
    spots: str | Path | None,
    out: str | Path,
    samples: int | None = None,
    steps: int | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    mpp: float | None = None,
    grid_origin: tuple[float, float] | None = None,
    min_tissue: float = 0.5,
    maps_dir: str | Path | None = None,
    genes: Sequence[str] | None = None,
    spatialdata_out: str | Path | None = None,
) -> ad.AnnData:
    """Predict the panel's expression at every spot of ``spots`` on ``image``, or on a bare slide.

    ``image`` is any slide :func:`stgen.image.slide.open_slide` reads (JPEG/PNG, pyramidal TIFF/OME-TIFF,
    SVS/NDPI/MRXS with OpenSlide), read lazily, or a :class:`~stgen.image.scaled.SlideRef` to a downsampled
    image; None when ``spots`` is an ``.h5ad`` holding its image (:func:`stgen.workflows.inputs.spots_image`:
    scanpy/squidpy's hires image at its scale factor, patches upsampled). ``mpp`` (microns per full-resolution pixel) overrides
    the slide's metadata. When the slide's mpp is known, spot patches are ``patch_um / mpp`` pixels
    (``patch_um`` from the run's training images, ``run.json['spots']``), so a model applies at another
    scan resolution; otherwise they have the trained ``features.patch_px``.

    Without ``spots`` (a slide that was never sequenced) the tissue is found by Otsu thresholding
    (:func:`stgen.data.tissue.detect_tissue`) and virtual spots are laid on it at the training spot spacing
    (:func:`stgen.data.tissue.lay_spot_grid`: hexagonal for Visium-trained runs, square for legacy ST;
    ``grid_origin`` pins one lattice point, full-resolution (x, y)); this needs the slide's mpp.

    Writes ``out`` (.h5ad) atomically: ``.X`` mean prediction in the run's target units,
    ``layers['std']`` the per-spot sample standard deviation (zeros for ridge), ``obsm['spatial']``
    full-resolution pixel (x, y), ``.uns['spatial'][library_id]`` a thumbnail (``images['hires']``)
    and ``scalefactors`` (``tissue_hires_scalef``, ``spot_diameter_fullres``) for
    ``scanpy.pl.spatial`` / ``squidpy.pl.spatial_scatter``, and ``.uns['stgen']`` provenance (model,
    units, steps, samples, mpp, patch_px, grid, ``run_sha256`` - the SHA-256 of the run's ``run.json``,
    which :func:`prediction_is_current` uses - and ``predict_s``, the wall time of this call up to
    writing). With ``maps_dir``, PNG maps of ``genes`` (default: the 4 most variable predictions) and
    of the uncertainty (mean sd over genes) over the thumbnail go there
    (:func:`stgen.evaluation.plots.plot_slide_maps`). With ``spatialdata_out`` (``.zarr``) the prediction is
    also written, after the ``.h5ad``, as a SpatialData store (slide image, spot circles, table) for
    napari-spatialdata (:func:`stgen.workflows.spatialdata_out.write_spatialdata`).

    Raises
    ------
    InputError : unreadable/truncated image, no mpp where one is needed, spots outside the image or in
        the wrong coordinate scale, no tissue, genes not in the panel, and the run's own errors.
    """
    from stgen.data.common import SPACING_RANGE_UM, check_spot_scale
    from stgen.image.scaled import as_slide_ref, open_ref
    from stgen.data.tissue import detect_tissue, lay_spot_grid

    t_start = time.perf_counter()
    if not -(2**63) <= int(seed) < 2**63:
        raise InputError(f"--seed must be a 64-bit integer, got {seed}")
    _check_folder(maps_dir, "--maps")
    if spatialdata_out is not None:
        from stgen.workflows.spatialdata_out import check_spatialdata_out

        check_spatialdata_out(spatialdata_out)
    run = load_run(run_dir)
    run_dir = run.run_dir  # a built-in model's name -> its folder in the package
    run.cache_dir = Path(cache_dir or default_cache_dir())
    # runs fitted before run.json had 'spots' were trained on Her2ST (legacy ST, square grid)
    layout = run.meta.get("spots") or {"grid": "square", "spacing_um": GRIDS["square"][0],
                                       "diameter_um": GRIDS["square"][1], "mpp": None, "patch_um": None}
    if genes:
        missing = [g for g in genes if g not in run.panel]
        if missing:
            raise InputError(f"gene(s) {missing} are not in the run's panel of {len(run.panel)} genes "
                             f"(e.g. {run.panel[:5]})")
    if image is None:  # an AnnData's own image (scanpy/squidpy: uns['spatial'][library]['images']['hires'])
        image, spots_mpp = spots_image(spots, run.cache_dir)
        mpp = mpp or spots_mpp
    image = as_slide_ref(image)
    if mpp is None and image.scale == 1.0:  # HEST-1k wsis/<id>.tif: metadata/<id>.json's mpp, not its 10x-off tag
        from stgen.data.hest import hest_slide_mpp

        mpp = hest_slide_mpp(image.path)
    with open_ref(image, mpp=mpp) as slide:
        w, h = slide.width, slide.height
        thumb, scale = slide.thumbnail(THUMBNAIL_PX)
        if spots is not None:
            spots_df = _spots_from_file(spots)
            xy = spots_df[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
            outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
            if outside.any():
                raise InputError(f"{spots}: {int(outside.sum())} spot(s) lie outside the image {image} ({w} x {h} "
                                 f"px), e.g. {spots_df.index[outside][:3].tolist()}")
            if slide.mpp is not None:  # spot arrays (40-500 um), or the bins of a run trained on finer ones
                fine = layout.get("spacing_um") and layout["spacing_um"] < SPACING_RANGE_UM[0]
                check_spot_scale(xy, slide.mpp, layout["spacing_um"] if fine else None, str(spots))
            grid = None
        else:
            slide_mpp = _slide_mpp(slide, image, "a bare-slide prediction (no --spots)")
            tissue = detect_tissue(thumb, scale, mpp=slide_mpp, source=str(image))
            spots_df = lay_spot_grid(tissue, w, h, slide_mpp, kind=layout["grid"], spacing_um=layout["spacing_um"],
                                     diameter_um=layout["diameter_um"], origin=grid_origin, min_tissue=min_tissue)
            xy = spots_df[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
            grid = {"kind": layout["grid"], "spacing_um": layout["spacing_um"], "tissue_fraction": tissue.fraction,
                    "otsu_threshold": tissue.threshold, "origin": list(map(float, grid_origin or xy[0]))}
        slide_mpp = slide.mpp
        patch_px = int(run.cfg.features.patch_px)
        if slide_mpp is not None and layout.get("patch_um"):
            patch_px = max(1, int(round(layout["patch_um"] / slide_mpp)))
        run.patch_px = patch_px
        feats = run.features().encode(image, xy, slide=slide)  # the open slide: a JPEG is decoded once
    mean, std = run.predict(feats, samples=samples, steps=steps, seed=seed, progress=progress,
                            batch_size=batch_size, device=device, precision=precision, xy=xy, image=image)
    is_gen = run.meta["model"] in GENERATIVE
    hs = sampler_defaults(run.meta)
    library_id = image.path.stem if image.scale == 1 else Path(spots).stem
    diameter_px = layout["diameter_um"] / slide_mpp if slide_mpp else float(patch_px)
    adata = ad.AnnData(
        X=mean.astype(np.float32),
        obs=spots_df.copy(),
        var=pd.DataFrame(index=pd.Index(run.panel, name="gene")),
        obsm={"spatial": xy},
        layers={"std": std.astype(np.float32)},
    )
    adata.uns["spatial"] = {library_id: {
        "images": {"hires": thumb},
        "scalefactors": {"tissue_hires_scalef": float(scale), "spot_diameter_fullres": float(diameter_px)},
        "metadata": {"source_image_path": str(image)}}}
    adata.uns["stgen"] = {
        "model": run.meta["model"], "units": run.meta["units"], "run_dir": str(Path(run_dir).resolve()),
        "image": str(image), "steps": int(steps or hs.get("steps", 0)) if is_gen else 0,
        "samples": int(samples or hs.get("samples", 1)) if is_gen else 1, "seed": seed,
        "test_section": run.meta.get("test_section"), "stgen_version": __version__,
        "mpp": float(slide_mpp) if slide_mpp else float("nan"), "patch_px": patch_px,
        "library_id": library_id, "bare_slide": spots is None, **({"grid": grid} if grid else {}),
        "run_sha256": sha256_file(Path(run_dir) / "run.json"),
        "predict_s": round(time.perf_counter() - t_start, 3),
    }
    with atomic_path(out, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    if spatialdata_out is not None:
        from stgen.workflows.spatialdata_out import write_spatialdata

        write_spatialdata(adata, image, spatialdata_out)
    if maps_dir is not None:
        from stgen.evaluation.plots import plot_slide_maps

        plot_slide_maps(adata, maps_dir, genes=genes)
    return adata


def sampler_defaults(meta: dict) -> dict:
    """``{"steps", "samples"}`` a generative run samples with by default (``run.json``): hinge and flag keep
    them in their own section, the benchmark models in ``sampler``; ``{}`` for deterministic models."""
    if meta.get("model") not in GENERATIVE:
        return {}
    return meta.get("sampler") or meta.get(meta["model"], {}) or {}


def list_slides(source: str | Path) -> list[Path]:
    """Slides of a multi-slide prediction: the image files of a folder (sorted; ``.tif``, ``.svs``,
    ``.jpg``, ...), or the paths listed one per line in a text file (relative to the file; ``#`` comments).
    InputError when there is none, a listed file is missing, or two slides share a file stem."""
    from stgen.data.common import IMAGE_SUFFIXES

    source = Path(source)
    if source.is_dir():
        slides = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in
                        (*IMAGE_SUFFIXES, ".mrxs", ".scn"))
    elif source.is_file():
        try:
            lines = source.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{source}: cannot read the slide list ({e})") from e
        slides = [(source.parent / ln.strip()) for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        missing = [str(p) for p in slides if not p.is_file()]
        if missing:
            raise InputError(f"{source}: {len(missing)} listed slide(s) do not exist, e.g. {missing[:3]}")
    else:
        raise InputError(f"{source}: no such folder or slide list")
    if not slides:
        raise InputError(f"{source}: no slides found")
    stems = pd.Series([p.stem for p in slides])
    if stems.duplicated().any():
        raise InputError(f"{source}: slides share the name {stems[stems.duplicated()].iloc[0]!r} (outputs are "
                         f"named <stem>.h5ad)")
    return slides


def predict_slides(run_dir: str | Path, slides: str | Path, out_dir: str | Path, shard: tuple[int, int] = (0, 1),
                   seed: int = 0, progress: bool = True, **kwargs) -> dict[str, str]:
    """Bare-slide :func:`predict` of many slides into ``out_dir/<stem>.h5ad`` (maps in ``<stem>_maps/`` when
    ``maps_dir`` is given), resumable and shardable.

    A slide whose output is current (same fit - the SHA-256 of ``run.json`` -, seed, default sampler and
    image: :func:`prediction_is_current`) is skipped, so a killed job re-run with the same command only does
    what is left. ``shard = (k, n)`` takes slides ``k, k + n, k + 2n, ...`` of the sorted list: on a cluster,
    a job array runs the same command with ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`` (the
    scheduler distributes the work; every output is written atomically). Returns ``{slide: status}`` with
    status ``done``, ``skipped`` or ``failed: <error>`` (an InputError of one slide does not stop the others;
    the caller reports them). ``kwargs`` go to :func:`predict` (``mpp``, ``samples``, ``maps_dir``, ...).
    """
    k, n = shard
    if not (isinstance(k, int) and isinstance(n, int) and n >= 1 and 0 <= k < n):
        raise InputError(f"--shard must be K/N with 0 <= K < N, got {k}/{n}")
    todo = list_slides(slides)[k::n]
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: not a folder (several slides are predicted into a folder)")
    maps = kwargs.pop("maps_dir", None)
    status: dict[str, str] = {}
    from tqdm.auto import tqdm

    for img in tqdm(todo, desc=f"slides (shard {k}/{n})", unit="slide", disable=not progress):
        out = out_dir / f"{img.stem}.h5ad"
        if prediction_is_current(out, run_dir, seed=seed, image=img):
            status[str(img)] = "skipped"
            continue
        try:
            predict(run_dir, img, None, out, seed=seed, progress=False,
                    maps_dir=Path(maps) / img.stem if maps is not None else None, **kwargs)
            status[str(img)] = "done"
        except InputError as e:
            status[str(img)] = f"failed: {e}"
    return status


def prediction_is_current(pred_path: str | Path, run_dir: str | Path, seed: int = 0,
                          image: str | Path | None = None) -> bool:
    """True when ``pred_path`` exists and was written by :func:`predict` from the current fit in ``run_dir``
    with the run's default steps/samples and sampling seed ``seed`` (its ``uns['stgen']['run_sha256']``
    matches ``run.json``), and, when ``image`` is given, from that image."""
    pred_path, meta_path = Path(pred_path), Path(run_dir) / "run.json"
    if not meta_path.is_file() and looks_like_zoo_name(run_dir):
        meta_path = zoo_run_dir(str(run_dir)) / "run.json"
    if not (pred_path.is_file() and meta_path.is_file()):
        return False
    try:
        info = ad.read_h5ad(pred_path, backed="r").uns.get("stgen", {})
    except (OSError, KeyError, ValueError):
        return False
    meta = json.loads(meta_path.read_text())
    h = sampler_defaults(meta)
    defaults = info.get("model") not in GENERATIVE or (
        int(info.get("steps", -1)) == int(h.get("steps", -2)) and int(info.get("samples", -1)) == int(h.get("samples", -2)))
    same_image = image is None or info.get("image") == str(image)
    return (info.get("run_sha256") == sha256_file(meta_path) and int(info.get("seed", -1)) == int(seed) and defaults
            and same_image)


def predict_or_reuse(
    run_dir: str | Path,
    image: str | Path,
    spots: str | Path,
    out: str | Path,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[ad.AnnData, float]:
    """``(prediction, predict_s)``: read ``out`` when :func:`prediction_is_current` (same fit, default sampler,
    ``seed``), else :func:`predict` it with the run's defaults. ``predict_s`` is the prediction's stored
    ``uns['stgen']['predict_s']`` (NaN for a file written before it was stored)."""
    if prediction_is_current(out, run_dir, seed=seed):
        pred = ad.read_h5ad(out)
    else:
        pred = predict(run_dir, image, spots, out, cache_dir=cache_dir, seed=seed, progress=progress)
    return pred, float(pred.uns.get("stgen", {}).get("predict_s", float("nan")))
