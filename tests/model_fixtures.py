"""Tiny synthetic sections for the benchmark-model tests (stgen.models.base.SectionInput).

Each section is a square grid of spots on a small RGB image whose local colour
drives the expression, so a model that reads the image (features or patches)
can learn it: ``targets = relu(colour @ W + noise)`` in log2-like units.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from stgen.models.base import FeatureSettings, SectionInput

SPACING = 16  # px between spot centres
PATCH = 16  # spot patch side, px


def synthetic_sections(tmp_path: Path, n_sections: int = 3, side: int = 6, n_genes: int = 12,
                       seed: int = 0) -> tuple[list[SectionInput], FeatureSettings, list[str]]:
    """``n_sections`` sections of ``side x side`` spots, their FeatureSettings (rgb-stats, 16 px) and panel.

    Images are written to ``tmp_path/S<i>.png``; ``feats`` are the real
    rgb-stats features (6-d) of each spot's 16-px patch.
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(3, n_genes)).astype(np.float32)
    fs = FeatureSettings(encoder="rgb-stats", patch_px=PATCH, batch_size=64, cache_dir=None)
    sections = []
    for s in range(n_sections):
        size = side * SPACING + SPACING
        # smooth random colour field: a coarse grid upsampled, so neighbouring spots look alike
        coarse = rng.uniform(0, 255, size=(3, 3, 3)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        path = tmp_path / f"S{s}.png"
        img.save(path)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        gx, gy = np.meshgrid(np.arange(side), np.arange(side))
        xy = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float64) * SPACING + SPACING
        colour = arr[xy[:, 1].astype(int), xy[:, 0].astype(int)]  # (N, 3)
        targets = np.maximum(0.0, (colour - 0.5) @ w * 2 + 1 + 0.1 * rng.normal(size=(len(xy), n_genes)))
        feats = fs.encode(path, xy)
        sections.append(SectionInput(f"S{s}", xy, feats, path, targets.astype(np.float32)))
    return sections, fs, [f"G{i}" for i in range(n_genes)]
