"""A fit's and a prediction's inputs: training sections, spot patches and features, spot layout, spot files."""

from __future__ import annotations

from pathlib import Path
import anndata as ad
import numpy as np
import pandas as pd
from stgen.workflows.config import StgenConfig
from stgen.data.her2st import read_spots
from stgen.data.common import read_anndata, section_image
from stgen.data.dataset import Dataset, as_dataset
from stgen.errors import InputError
from stgen.image.scaled import SlideRef
from stgen.models.base import FeatureSettings


# ------------------------------------------------------------------ features
def section_patch_px(cfg: StgenConfig, mpp: float | None, section: str = "section") -> int:
    """Spot patch side in full-resolution pixels of a section scanned at ``mpp`` microns per pixel:
    ``features.patch_um / mpp`` when ``patch_um`` is set, else ``features.patch_px``."""
    um = cfg.features.patch_um
    if um is None:
        return int(cfg.features.patch_px)
    if not mpp:
        raise InputError(f"{section}: features.patch_um is set but the section's pixel size (mpp) is unknown")
    return max(1, int(round(float(um) / float(mpp))))


def section_features(adata: ad.AnnData, cfg: StgenConfig, cache_dir: Path, progress: bool = True) -> np.ndarray:
    """Histology features (N, F) of a section's spots (cached on disk); patches of :func:`section_patch_px`."""
    info = adata.uns["stgen"]
    image = section_image(adata)
    if image is None:
        raise InputError(f"section {info.get('section')} has no H&E image")
    px = section_patch_px(cfg, info.get("mpp"), str(info.get("section")))
    return feature_settings(cfg, cache_dir, progress).encode(image, adata.obsm["spatial"], patch_px=px)


def feature_settings(cfg: StgenConfig, cache_dir: str | Path | None, progress: bool = False) -> FeatureSettings:
    """The run's encoder settings (config section ``features``) and feature cache: every spot-patch
    encoding (fit, predict) and the benchmark models' extra patches go through its ``encode``."""
    f = cfg.features
    return FeatureSettings(encoder=f.encoder, patch_px=f.patch_px, tta=f.tta, batch_size=f.batch_size,
                           stain=f.stain, cache_dir=Path(cache_dir) if cache_dir is not None else None,
                           progress=progress)


# ------------------------------------------------------------------ fit
def _training_data(data_dir: Path | Dataset, test_section: str | None, cfg: StgenConfig) -> tuple[dict, list[str]]:
    ds = as_dataset(data_dir)
    imaged = ds.sections(imaged_only=True)
    if test_section is None:  # nothing held out: every imaged section (or data.train_sections) trains
        train = cfg.data.train_sections or imaged
        bad = [s for s in train if s not in imaged]
        if bad or not train:
            raise InputError(f"training section(s) {bad} have no image in {ds.root}; available: {imaged}")
        return {s: ds.read(s, require_image=True) for s in train}, imaged
    if test_section not in imaged:
        raise InputError(f"unknown test section {test_section!r} in {ds.root}; sections with images: {imaged}")
    train = cfg.data.train_sections or [s for s in imaged if s != test_section]
    bad = [s for s in train if s not in imaged]
    if bad:
        raise InputError(f"training section(s) {bad} have no image in {ds.root}; available: {imaged}")
    if test_section in train:
        raise InputError(f"test section {test_section} is also listed as a training section")
    return {s: ds.read(s, require_image=True) for s in train}, imaged


#: Thumbnail stored in a prediction's ``.uns['spatial']`` (longer side, px) and used for tissue detection.
THUMBNAIL_PX = 2000
def spot_layout(sections, patch_px: int, patch_um: float | None = None) -> dict:
    """The training spots' layout for ``run.json``: ``grid`` (square | hex), ``spacing_um``, ``diameter_um``,
    ``mpp`` (mean microns per pixel of the training images) and ``patch_um`` (the spot patch's side in
    microns, ``patch_px * mpp``), from the sections' ``uns['stgen']`` (see :func:`stgen.data.her2st.read_section`)."""
    infos = [a.uns["stgen"] for a in sections]
    grids = sorted({i.get("grid", "square") for i in infos})
    if len(grids) > 1:
        raise InputError(f"training sections mix spot grids {grids} (legacy ST and Visium): train on one technology")
    mpps = [float(i["mpp"]) for i in infos if i.get("mpp")]
    mpp = float(np.mean(mpps)) if mpps else None
    return {"grid": grids[0], "spacing_um": float(infos[0]["spot_spacing_um"]),
            "diameter_um": float(infos[0]["spot_diameter_um"]), "mpp": mpp,
            "patch_um": float(patch_um) if patch_um else (float(patch_px) * mpp if mpp else None)}


def _spots_from_file(spots: str | Path) -> pd.DataFrame:
    """Spot table of ``--spots``: :func:`read_spots` formats, or an ``.h5ad`` whose ``obsm['spatial']`` holds
    full-resolution (x, y) pixels."""
    spots = Path(spots)
    if spots.suffix != ".h5ad":
        return read_spots(spots)
    a = read_anndata(spots, "spot file")
    if "spatial" not in a.obsm:
        raise InputError(f"{spots}: no obsm['spatial'] (full-resolution spot pixel coordinates)")
    xy = np.asarray(a.obsm["spatial"], dtype=np.float64)
    names = a.obs_names.astype(str).to_numpy()
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise InputError(f"{spots}: obsm['spatial'] must be finite (N, 2) pixel coordinates, got {xy.shape}")
    return pd.DataFrame({"pixel_x": xy[:, 0], "pixel_y": xy[:, 1]}, index=pd.Index(names, name="spot"))


def spots_image(spots: str | Path | None, cache_dir: Path | None) -> tuple[SlideRef, float | None]:
    """The image of a ``--spots`` AnnData given without ``--image``: its ``uns['stgen']`` image, else the largest
    image in ``uns['spatial'][library]['images']`` at its scale factor (scanpy/squidpy ``read_visium``; with a
    :class:`~stgen.errors.LowResolutionImageWarning`), and microns per full-resolution pixel from the Visium
    ``spot_diameter_fullres`` (or ``uns['stgen']['mpp']``) when known. InputError when there is none."""
    from stgen.data.common import warn_downsampled
    from stgen.data.h5ad import anndata_image, anndata_mpp

    if spots is None or Path(spots).suffix != ".h5ad":
        raise InputError("--image is needed (the H&E slide), unless --spots is an .h5ad that holds its image "
                         "(uns['spatial'][library]['images'], as scanpy/squidpy read_visium writes it)")
    a = read_anndata(spots, "spot file")
    mpp = anndata_mpp(a)[0]
    own = section_image(a)
    if own is not None and own.path.is_file():
        return own, mpp
    found = anndata_image(a, str(spots), cache_dir)
    if found is None:
        raise InputError(f"{spots}: no --image given and the AnnData holds no image (uns['stgen']['image_path'] or "
                         "uns['spatial'][library]['images']); pass --image SLIDE")
    ref, wh, name = found
    warn_downsampled(Path(spots).stem, name, wh, ref.scale, mpp)
    return ref, mpp


def _slide_mpp(slide, image: str | Path, need: str) -> float:
    if slide.mpp is None:
        raise InputError(f"{image}: the image has no pixel-size metadata; {need} needs it: pass --mpp "
                         f"(microns per full-resolution pixel, e.g. 0.5 for a 20x scan)")
    return float(slide.mpp)


# ------------------------------------------------------------------ evaluate
def _check_folder(path: str | Path | None, option: str) -> None:
    """InputError when ``path`` exists and is not a folder (checked before any work is done)."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise InputError(f"{option} {path}: not a folder")
