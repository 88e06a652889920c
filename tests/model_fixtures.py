"""Tiny synthetic sections for the benchmark-model tests (stgen.models.base.SectionInput), and checks they share.

Each section is a square grid of spots on a small RGB image whose local colour
drives the expression, so a model that reads the image (features or patches)
can learn it: ``targets = relu(colour @ W + noise)`` in log2-like units.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from stgen.models.base import FeatureSettings, SectionInput, SpotModel

SPACING = 16  # px between spot centres
PATCH = 16  # spot patch side, px

#: sized so that every model fits the 2 x 30 training spots of the fixture in a second or two
TINY = {
    "data": {"n_top": 30},
    "features": {"encoder": "rgb-stats", "patch_px": 16},
    "pretrain": {"dim": 16, "n_layers": 2, "n_heads": 2, "value_bins": 8, "epochs": 1, "genes_per_step": 30},
    "hinge": {"T": 5, "cond_dim": 16, "time_dim": 8, "max_epochs": 1, "es_warmup": 1, "curriculum_epochs": 1,
              "batch_size": 16, "val_steps": 2, "steps": 2, "samples": 2},
    "flag": {"dim": 16, "graph_layers": 1, "graph_heads": 2, "dit_layers": 2, "dit_heads": 2, "knn": 8,
             "crop_spots": 16, "max_steps": 4, "val_every": 4, "val_steps": 1, "steps": 2, "samples": 2},
    "hifusion": {"d_model": 16, "n_heads": 2, "max_epochs": 2, "batch_size": 16},
    "stnet": {"encoder_arch": "tiny-cnn", "input_px": 16, "max_epochs": 2, "batch_size": 16},
    "bleep": {"proj_dim": 16, "max_epochs": 3, "batch_size": 32, "top_k": 5},
    "stem": {"dim": 16, "layers": 1, "heads": 2, "genes_per_token": 8, "max_steps": 20, "val_every": 10,
             "val_steps": 2, "steps": 20, "samples": 2},
    "triplex": {"dim": 16, "fusion_layers": 1, "global_layers": 2, "neighbour_layers": 1, "fusion_heads": 2,
                "global_heads": 2, "neighbour_heads": 2, "max_epochs": 2, "batch_size": 16},
    "stflow": {"dim": 16, "layers": 1, "heads": 2, "knn": 8, "dist_basis": 8, "crop_spots": 16, "max_steps": 20,
               "val_every": 10, "steps": 3, "samples": 2},
}


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


def backbone_context(panel: list[str]) -> "FitContext":
    """A FitContext with a tiny embedded backbone over ``panel`` (seeded), for models that ``needs_backbone``."""
    from stgen.backbones.embedded import BackboneConfig, ExpressionBackbone
    from stgen.models.base import FitContext

    torch.manual_seed(0)
    bcfg = BackboneConfig(dim=16, n_layers=2, n_heads=2, value_bins=8)
    meta = {"kind": "default", "genes": list(panel), "config": bcfg.to_dict(), "panel_genes_dropped": []}
    return FitContext(backbone=ExpressionBackbone(list(panel), bcfg).eval(), backbone_meta=meta, patch_px=16, seed=3)


def tiny_backbone(kind: str) -> torch.nn.Module:
    """A fresh, untrained tiny expression backbone of ``kind`` (eval mode; seed it before the call):
    ``embedded`` (genes G0..G19, width 8), ``cellfm`` (CellFM architecture, G0..G49, width 32, row i + 1 = gene i)
    or ``scgpt`` (vocabulary ``<pad>`` = 0 and G0..G29 = 1..30, width 32)."""
    if kind == "embedded":
        from stgen.backbones.embedded import BackboneConfig, ExpressionBackbone

        return ExpressionBackbone([f"G{i}" for i in range(20)],
                                  BackboneConfig(dim=8, n_layers=2, n_heads=2, value_bins=4)).eval()
    if kind == "cellfm":
        from stgen.backbones.cellfm import CellFMBackbone, CellFMConfig

        return CellFMBackbone(CellFMConfig.tiny(), [f"G{i}" for i in range(50)]).eval()
    from stgen.backbones.scgpt import ScGPTBackbone, ScGPTConfig

    vocab = {"<pad>": 0, **{f"G{i}": i + 1 for i in range(30)}}
    return ScGPTBackbone(vocab, ScGPTConfig(dim=32, n_heads=4, d_hid=32, n_layers=2)).eval()


# ------------------------------------------------------------------ shared checks of the SpotModel tests
def fit_one_thread(cls: type[SpotModel], train: list[SectionInput], panel: list[str], cfg, features: FeatureSettings):
    """``cls.fit(..., progress=False)`` on one intra-op thread, for module-scoped fixtures (``one_thread`` is
    function-scoped); the thread count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cls.fit(train, panel, cfg, features, progress=False)
    finally:
        torch.set_num_threads(n)


def assert_same_state(a: SpotModel, b: SpotModel) -> dict[str, torch.Tensor]:
    """Assert that ``a.state()`` and ``b.state()`` hold the same tensors (names and values); returns ``a``'s."""
    ta, tb = a.state()[0], b.state()[0]
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    return ta


def assert_seed_fixes_samples(model: SpotModel, section: SectionInput, features: FeatureSettings) -> None:
    """A sampled model: the same ``seed`` gives the same ``(mean, sd)``, another seed another mean."""
    p1, p2 = model.predict(section, features, seed=5), model.predict(section, features, seed=5)
    assert np.array_equal(p1[0], p2[0]) and np.array_equal(p1[1], p2[1])
    assert not np.array_equal(p1[0], model.predict(section, features, seed=6)[0])


def save_and_load(model: SpotModel, cfg, tmp_path: Path, name: str = "model") -> SpotModel:
    """``model`` written as the pipeline does (tensors to ``<name>.safetensors``, meta to ``<name>.json``) and
    rebuilt with ``from_state(tensors, {name: meta, **run_entries()}, cfg)`` (the run meta)."""
    tensors, meta = model.state()
    save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    run_meta = {type(model).name: json.loads((tmp_path / f"{name}.json").read_text()), **model.run_entries()}
    return type(model).from_state(load_file(str(tmp_path / f"{name}.safetensors")), run_meta, cfg)


def flag_toy_sections(n_sections: int = 2, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``[(feats (30, 6), xy (30, 2) px on a 100-px grid, targets (30, 10))]``: FLAG's training sections for the
    resume and DDP tests; the targets follow the first feature, plus noise."""
    rng = np.random.default_rng(seed)
    sections = []
    for _ in range(n_sections):
        xy = np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2) * 100.0
        f = rng.normal(size=(len(xy), 6))
        sections.append((f, xy, 2.0 + f[:, :1] * np.linspace(-1, 1, 10)[None] + 0.1 * rng.normal(size=(len(xy), 10))))
    return sections


def synthetic_her2st(root, genes, rng):
    """Her2ST-like folder: imaged sections A1, A2, A3 and expression-only B1, B2 (pre-training corpus)."""
    import gzip

    from PIL import Image

    (root / "ST-cnts").mkdir(parents=True)
    (root / "ST-spotfiles").mkdir()
    spots = [(x, y) for x in range(1, 7) for y in range(1, 6)]
    for sec in ("A1", "A2", "A3", "B1", "B2"):
        lam = rng.gamma(2.0, 2.0, size=len(genes))
        counts = rng.poisson(lam[None] * rng.uniform(0.3, 2.0, size=(len(spots), 1)))
        with gzip.open(root / "ST-cnts" / f"{sec}.tsv.gz", "wt") as f:
            f.write("\t".join(["", *genes]) + "\n")
            for (x, y), row in zip(spots, counts):
                f.write("\t".join([f"{x}x{y}", *map(str, row)]) + "\n")
        rows = ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"]
        rows += [f"{x}\t{y}\t{x}.0\t{y}.0\t{20 * x}\t{20 * y}\t1" for x, y in spots]
        (root / "ST-spotfiles" / f"{sec}_selection.tsv").write_text("\n".join(rows) + "\n")
        if sec.startswith("A"):
            d = root / "ST-imgs" / sec[0] / sec
            d.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, size=(140, 160, 3), dtype=np.uint8)).save(d / "he.jpg")


def hest_ridge_run(tmp: Path, n_sections: int = 3, test_section: str | None = None, n_top: int = 50):
    """A synthetic HEST folder ``tmp/hest`` of ``n_sections`` Visium samples S0.. (40 spots each) and a ridge run
    ``tmp/run`` fitted on its rgb-stats features (patch 110 um), holding out ``test_section`` (None: none).
    Returns ``(hest, run, cache)``."""
    from reader_fixtures import make_hest_sample
    from stgen.workflows.config import StgenConfig
    from stgen.workflows.fit import fit

    hest = tmp / "hest"
    for i in range(n_sections):
        make_hest_sample(hest, f"S{i}", n_spots=40, seed=i)
    cfg = StgenConfig.from_dict({"features": {"encoder": "rgb-stats", "patch_um": 110.0}, "data": {"n_top": n_top}})
    fit(hest, test_section, tmp / "run", model="ridge", cfg=cfg, cache_dir=tmp / "cache", progress=False)
    return hest, tmp / "run", tmp / "cache"
