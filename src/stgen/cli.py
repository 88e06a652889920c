"""Command-line interface: ``stgen pretrain | fit | predict | evaluate | benchmark | ablate | steps | horizon``.

Models (``--model`` / ``--models``): every name of :data:`stgen.models.registry.MODELS` (the help texts
are built from it); ``--models all`` runs every one.

Every user-caused error (bad file, unknown section, ...) is printed as one line
``error: ...`` on stderr with exit code 2; nothing half-written is left behind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from stgen.workflows.config import StgenConfig
from stgen.errors import StgenError
from stgen.models.registry import GENERATIVE, MODELS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Spatial gene expression from H&E histology. Models: " + ", ".join(MODELS)
                       + " (hinge = HINGE, the flagship).")

DataOpt = typer.Option(None, "--data", help="data folder: Her2ST (ST-cnts/, ST-spotfiles/, ST-imgs/), HEST-1k, Space Ranger "
                       "samples, <section>.h5ad files or SpatialData .zarr stores (see --format); default: ../shared/data/her2st")
ConfigOpt = typer.Option(None, "--config", help="YAML file overriding defaults (see stgen.workflows.config)")
CacheOpt = typer.Option(None, "--cache", help="feature/backbone cache folder (default $STGEN_CACHE or ./.stgen_cache)")
QuietOpt = typer.Option(False, "--quiet", help="no progress bars")


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except StgenError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None


def _data(data: Optional[Path]) -> Path:
    from stgen.workflows.paths import default_data_dir

    return data if data is not None else _run(default_data_dir)


@app.command()
def pretrain(data: Optional[Path] = DataOpt, config: Optional[Path] = ConfigOpt, cache: Optional[Path] = CacheOpt,
             quiet: bool = QuietOpt,
             force: bool = typer.Option(False, "--force", help="pre-train again even when a cached or shipped "
                                        "backbone of this corpus and config exists")) -> None:
    """Pre-train (or find cached, or shipped with stgen) the expression backbone by masked auto-encoding on the
    expression-only sections (every Her2ST section without an image by default)."""
    from stgen.workflows.paths import default_cache_dir
    from stgen.backbones.pretrain import get_backbone

    cfg = _run(StgenConfig.load, config)
    bb, meta = _run(get_backbone, _data(data), cfg, Path(cache or default_cache_dir()), progress=not quiet,
                    force=force)
    typer.echo(f"backbone: {len(bb.genes)} genes, {bb.config}, corpus {len(meta['corpus'])} sections "
               f"({meta['n_spots']} spots), final masked-AE loss {meta.get('final_mae_loss')}")


@app.command()
def fit(test_section: str = typer.Option(..., "--test-section", help="held-out section, e.g. C2; 'none' trains on "
                                         "every imaged section (a model to ship or apply to new slides)"),
        out: Path = typer.Option(..., "--out", help="RUN_DIR to create"),
        model: str = typer.Option("hinge", "--model", help=" | ".join(MODELS)),
        backbone: Optional[str] = typer.Option(
            None, "--backbone", help="HINGE backbone (FLAG: source of its frozen gene embeddings): default | "
            "cellfm:PATH.safetensors (see `stgen convert cellfm`) | scgpt:MODEL_DIR (best_model.pt, args.json, "
            "vocab.json); overrides hinge.backbone of --config"),
        data: Optional[Path] = DataOpt, config: Optional[Path] = ConfigOpt, cache: Optional[Path] = CacheOpt,
        quiet: bool = QuietOpt,
        data_format: Optional[str] = typer.Option(
            None, "--format", help="layout of --data: her2st | hest (HEST-1k) | visium (Space Ranger outs/ folders) | "
            "h5ad (<section>.h5ad + image) | spatialdata (SpatialData .zarr stores); default: detected"),
        technology: Optional[str] = typer.Option(
            None, "--technology", help="HEST-1k: train on the samples of this st_technology: Visium | 'Spatial "
            "Transcriptomics' (default: the larger group, with a warning naming what is left out)"),
        encoder: Optional[str] = typer.Option(
            None, "--encoder", help="patch encoder: efficientnet-lite0 | uni:PATH | conch:PATH | timm:ARCH:PATH | "
            "torchscript:PATH, several joined by + (features concatenated); overrides features.encoder"),
        resume: bool = typer.Option(False, "--resume", help="continue the unfinished fit in RUN_DIR.partial from its "
                                    "last checkpoint (run the same command again with --resume)"),
        accelerator: str = typer.Option("auto", "--accelerator",
                                        help="Lightning accelerator: auto | cpu | gpu | cuda | mps"),
        devices: str = typer.Option("1", "--devices", help="devices per node: a number, -1 or auto (all); > 1 "
                                    "trains hinge/flag on several processes"),
        strategy: str = typer.Option("auto", "--strategy", help="Lightning strategy: auto | ddp | ddp_spawn | ..."),
        num_nodes: int = typer.Option(1, "--num-nodes", help="machines; start the same command on each (MASTER_ADDR, "
                                      "MASTER_PORT, NODE_RANK) or under SLURM")) -> None:
    """Train on every imaged section except --test-section and write RUN_DIR.

    Checkpoints: an unfinished fit works in RUN_DIR.partial/ and checkpoints every
    epoch (checkpoints/last.ckpt); RUN_DIR appears only when the fit is done.
    After a crash, kill or SIGTERM (which stops after the current step with a
    checkpoint; exit code 143) run the same command with --resume: HINGE and FLAG
    end with the same weights as an uninterrupted fit. Without --resume a
    RUN_DIR.partial that holds a checkpoint is refused (delete it to start over);
    --resume with another config, model or test section is refused.

    Several processes: --devices N --strategy ddp [--num-nodes M] trains hinge or
    flag through Lightning DDP (HINGE: the global batch hinge.batch_size is split
    over the processes, same result as one process up to rounding; FLAG: one
    crop per process and step). Only global rank 0 writes.
    """
    from stgen.workflows.fit import fit as _fit
    from stgen.training.trainer import TrainingInterrupted, is_launch_zero

    cfg = _run(StgenConfig.load, config)
    if backbone is not None:
        cfg.hinge.backbone = backbone
    if encoder is not None:
        cfg.features.encoder = encoder
    try:
        ndev: int | str = int(devices)
    except ValueError:
        ndev = devices  # auto, 0,1, or invalid (refused with a one-line error)
    fit_data = _data(data)
    if technology is not None:
        from stgen.data.dataset import open_dataset

        fit_data = _run(open_dataset, fit_data, format=data_format, technology=technology)
    try:
        meta = _fit(fit_data, None if test_section.lower() == "none" else test_section, out, model=model, cfg=cfg, cache_dir=cache, progress=not quiet,
                    data_format=data_format, resume=resume, accelerator=accelerator, devices=ndev, strategy=strategy, num_nodes=num_nodes)
    except TrainingInterrupted as e:
        typer.echo(f"interrupted: {e}; continue with the same command and --resume", err=True)
        raise typer.Exit(code=143) from None
    except StgenError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None
    if not is_launch_zero():
        return
    tr = meta.get("training") or {}
    best = [f"{k.removeprefix('best_').replace('_', ' ')} {v:.4g}" for k, v in tr.items()
            if k.startswith("best_val") and isinstance(v, (int, float))]  # MSE, or BLEEP's contrastive loss
    typer.echo(f"{model}: {len(meta['panel'])} genes, {meta['n_train_spots']} training spots from "
               f"{meta['train_sections']}; timings {meta['timings']}"
               + (f"; best epoch {tr.get('best_epoch')} {', '.join(best)}" if best else "")
               + f" -> {out}")


@app.command()
def predict(model: Path = typer.Option(..., "--model", help="RUN_DIR written by `stgen fit`, or a built-in model "
                                      "(`stgen models`: her2st-hinge, her2st-stflow, her2st-ridge)"),
            image: Optional[Path] = typer.Option(
                None, "--image", help="H&E slide: JPEG/PNG, (pyramidal) TIFF/OME-TIFF, or SVS/NDPI/MRXS with "
                "OpenSlide; read lazily. A folder or a .txt list of slides predicts each bare slide into "
                "--out/<stem>.h5ad, skipping current outputs. May be left out when --spots is an .h5ad holding its "
                "image (scanpy/squidpy read_visium: the hires image is used, upsampled)"),
            spots: Optional[Path] = typer.Option(
                None, "--spots", help="spot positions: Her2ST *_selection.tsv, CSV barcode,pixel_x,pixel_y, or .h5ad "
                "with obsm['spatial'] (full-resolution px). Without it: bare slide - tissue is detected (Otsu) and "
                "spots are laid on it at the training spot spacing (needs the slide's mpp or --mpp)"),
            out: Path = typer.Option(..., "--out", help="output .h5ad (scanpy/squidpy-ready: uns['spatial'])"),
            mpp: Optional[float] = typer.Option(None, "--mpp", help="microns per full-resolution pixel (overrides the "
                                                "slide's metadata; needed for a bare JPEG; a HEST-1k wsis/<id>.tif "
                                                "takes pixel_size_um_estimated from ../metadata/<id>.json)"),
            grid_origin: Optional[str] = typer.Option(None, "--grid-origin", help="bare slide: X,Y full-resolution px "
                                                      "of one grid spot (default: tissue's top-left corner)"),
            min_tissue: float = typer.Option(0.5, "--min-tissue", help="bare slide: keep a grid spot when this share "
                                             "of its disc is tissue"),
            maps: Optional[Path] = typer.Option(None, "--maps", help="folder for PNG maps of --genes and of the "
                                                "uncertainty over the slide thumbnail"),
            genes: Optional[str] = typer.Option(None, "--genes", help="comma-separated genes for --maps (default: "
                                                "the 4 most variable predictions)"),
            spatialdata: Optional[Path] = typer.Option(
                None, "--spatialdata", help="also write the prediction as a SpatialData store OUT.zarr (slide image, "
                "spot circles, table) for napari-spatialdata; needs stgen[spatialdata]"),
            shard: str = typer.Option("0/1", "--shard", help="several slides (--image FOLDER or LIST.txt): take slides "
                                      "K, K+N, ... of K/N, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"),
            samples: Optional[int] = typer.Option(None, "--samples", help="samples averaged (default: the run's; HINGE "
                                                  "10, FLAG 10, alternating between a FLAG ensemble's members)"),
            steps: Optional[int] = typer.Option(None, "--steps", help="HINGE: unmasking steps K <= T (default 5); "
                                                "FLAG: steps of the run's sampler order (default Euler, 5)"),
            batch_size: Optional[int] = typer.Option(None, "--batch-size", help="HINGE: spots x samples per sampler "
                                                     "batch (default 64); FLAG: spots per DiT chunk (default all)"),
            device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: cuda when available)"),
            precision: Optional[str] = typer.Option(None, "--precision", help="32-true | bf16-mixed | 16-mixed (default: as trained)"),
            seed: int = typer.Option(0, "--seed"), cache: Optional[Path] = CacheOpt, quiet: bool = QuietOpt) -> None:
    """Predict spot-level expression for an H&E slide (at given spots, or on a bare slide) and write an AnnData."""
    from stgen.workflows.predict import predict as _predict

    origin = None
    if grid_origin is not None:
        try:
            origin = tuple(float(v) for v in grid_origin.split(","))
            assert len(origin) == 2
        except (ValueError, AssertionError):
            _run(_raise, f"--grid-origin must be X,Y in full-resolution pixels, got {grid_origin!r}")
    gene_list = [g.strip() for g in genes.split(",") if g.strip()] if genes else None
    if image is not None and (image.is_dir() or image.suffix == ".txt"):  # several slides -> --out is a folder of <stem>.h5ad
        from stgen.workflows.predict import predict_slides

        if spots is not None:
            _run(_raise, "--spots predicts one slide: with a folder or list of slides, predict bare slides")
        if spatialdata is not None:
            _run(_raise, "--spatialdata writes one slide's store: predict a single --image")
        try:
            k, n = (int(v) for v in shard.split("/"))
        except ValueError:
            k, n = -1, -1
        status = _run(predict_slides, model, image, out, shard=(k, n), seed=seed, progress=not quiet,
                      samples=samples, steps=steps, cache_dir=cache, batch_size=batch_size, device=device,
                      precision=precision, mpp=mpp, min_tissue=min_tissue, maps_dir=maps, genes=gene_list)
        failed = {s_: v for s_, v in status.items() if v.startswith("failed")}
        counts = {v: sum(1 for x in status.values() if x == v) for v in ("done", "skipped")}
        typer.echo(f"{counts['done']} slide(s) predicted, {counts['skipped']} already current, {len(failed)} failed "
                   f"-> {out}")
        for s_, v in failed.items():
            typer.echo(f"error: {s_}: {v.removeprefix('failed: ')}", err=True)
        if failed:
            raise typer.Exit(code=2)
        return
    a = _run(_predict, model, image, spots, out, samples=samples, steps=steps, cache_dir=cache, seed=seed,
             progress=not quiet, batch_size=batch_size, device=device, precision=precision, mpp=mpp,
             grid_origin=origin, min_tissue=min_tissue, maps_dir=maps, genes=gene_list, spatialdata_out=spatialdata)
    where = "grid spots on the detected tissue" if spots is None else "spots"
    typer.echo(f"predicted {a.n_obs} {where} x {a.n_vars} genes ({a.uns['stgen']['units']}) -> {out}"
               + (f"; maps -> {maps}" if maps else "") + (f"; SpatialData -> {spatialdata}" if spatialdata else ""))


@app.command()
def evaluate(pred: Path = typer.Option(..., "--pred", help="prediction .h5ad from `stgen predict`"),
             counts: Path = typer.Option(..., "--counts", help="true counts: Her2ST .tsv.gz or .h5ad of raw counts"),
             out: Path = typer.Option(..., "--out", help="metrics .json"),
             downstream_dir: Optional[Path] = typer.Option(
                 None, "--downstream-dir", help="also run the downstream checks (Leiden domains ARI/NMI, DEG "
                 "top-20/50 overlap) into the JSON's 'downstream'; morans_scatter.png, coexpression.png go into DIR"),
             ) -> None:
    """PCC-50, PCC-200, MSE, MAE, GSC, SSC, RVD, SSIM and per-gene r (SSC/SSIM on the prediction's
    obsm['spatial'])."""
    from stgen.workflows.evaluate import evaluate_prediction

    m = _run(evaluate_prediction, pred, counts, out, downstream_dir=downstream_dir)
    keys = ("pcc50", "pcc200", "mse", "mae", "gsc", "ssc", "rvd", "ssim", "n_spots", "n_genes")
    summary = {k: m[k] for k in keys}
    if "downstream" in m:
        summary["downstream"] = {k: m["downstream"][k] for k in ("ari", "nmi", "deg_top20", "deg_top50")}
    typer.echo(json.dumps(summary))


@app.command()
def benchmark(out: Path = typer.Option(..., "--out", help="REPORT_DIR"),
              models: str = typer.Option("hinge,ridge", "--models", help="'all' or comma-separated, of "
                                         + ", ".join(MODELS)),
              sections: Optional[str] = typer.Option(None, "--sections", help="comma-separated held-out sections (default: all imaged)"),
              seeds: int = typer.Option(1, "--seeds", help="sampling seeds 0..N-1 per generative model ("
                                        + ", ".join(GENERATIVE) + ") and fold: metrics averaged over seeds, plus their sd "
                                        "(FLAG H.5)"),
              data: Optional[Path] = DataOpt, config: Optional[Path] = ConfigOpt, cache: Optional[Path] = CacheOpt,
              quiet: bool = QuietOpt) -> None:
    """Leave-one-section-out over every imaged section; metrics.csv, report.md and PNG maps."""
    from stgen.workflows.benchmark import run_benchmark

    cfg = _run(StgenConfig.load, config)
    secs = [s.strip() for s in sections.split(",")] if sections else None
    _run(run_benchmark, _data(data), out, models, cfg, sections=secs, cache_dir=cache, progress=not quiet, seeds=seeds)
    typer.echo(f"report -> {out / 'report.md'}")


@app.command()
def ablate(test_section: Optional[str] = typer.Option(
               None, "--test-section", help="held-out section(s), comma-separated, e.g. C2 or C2,C5 (mean + per-section rows)"),
           out: Optional[Path] = typer.Option(None, "--out", help="OUT_DIR (runs/, preds/, ablation.csv|md|png)"),
           variants: Optional[str] = typer.Option(
               None, "--variants", help="comma-separated variant names or groups (backbone, objective, conditioning, "
               "schedule); fragments such as nocurr, lora, zeta=2 work; default: all (see --list)"),
           list_: bool = typer.Option(False, "--list", help="print the ablation registry and exit"),
           data: Optional[Path] = DataOpt, config: Optional[Path] = ConfigOpt, cache: Optional[Path] = CacheOpt,
           quiet: bool = QuietOpt) -> None:
    """HINGE ablations (paper Tables S2-S4): fit, predict and score every variant on held-out section(s)."""
    from stgen.workflows.ablation import all_variants, run_ablation

    if list_:
        for group, name, override in all_variants():
            typer.echo(f"{group:13s} {name:24s} {json.dumps(override, sort_keys=True)}")
        return
    if not test_section or out is None:
        _run(_raise, "stgen ablate needs --test-section and --out (or --list)")
    cfg = _run(StgenConfig.load, config)
    secs = [s.strip() for s in test_section.split(",") if s.strip()]
    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    _run(run_ablation, _data(data), secs, out, names, cfg, cache_dir=cache, progress=not quiet)
    typer.echo(f"ablation table -> {out / 'ablation.md'}")


@app.command()
def steps(model: Path = typer.Option(..., "--model", help="HINGE RUN_DIR written by `stgen fit`"),
          out: Path = typer.Option(..., "--out", help="OUT_DIR (stepwise.csv, budget.csv, PNGs, summary.md)"),
          section: Optional[str] = typer.Option(None, "--section", help="section to score (default: the run's held-out one)"),
          ks: str = typer.Option("1,2,5,10,25,50", "--ks", help="inference budgets K of the sweep"),
          samples: Optional[int] = typer.Option(None, "--samples", help="samples averaged (default: the run's)"),
          repeats: int = typer.Option(1, "--repeats", help="timed repeats per K (median reported)"),
          seed: int = typer.Option(0, "--seed"), data: Optional[Path] = DataOpt, cache: Optional[Path] = CacheOpt,
          quiet: bool = QuietOpt) -> None:
    """Step-wise analysis (HINGE Fig. S7): metrics of x0_hat(t) along a full T-step run, and metrics vs K."""
    from stgen.workflows.analysis import run_step_analysis

    try:
        budgets = [int(k) for k in ks.split(",") if k.strip()]
    except ValueError:
        budgets = _run(_raise, f"--ks must be comma-separated integers, got {ks!r}")
    summary = _run(run_step_analysis, model, data, section, out, samples=samples, seed=seed, ks=budgets,
                   repeats=repeats, cache_dir=cache, progress=not quiet)
    typer.echo(f"step analysis of {summary.get('section', section)} -> {out / 'summary.md'}")


@app.command()
def horizon(test_section: str = typer.Option(..., "--test-section", help="held-out section, e.g. C2"),
            out: Path = typer.Option(..., "--out", help="OUT_DIR (runs/T<T>/, horizon.csv|md|png)"),
            ts: str = typer.Option("10,25,50,100", "--Ts", help="masking horizons T, one HINGE fit each"),
            k: int = typer.Option(5, "--steps", help="inference budget K = min(steps, T); 0 = full run K = T"),
            samples: Optional[int] = typer.Option(None, "--samples", help="samples averaged (default: the config's)"),
            seed: int = typer.Option(0, "--seed"), data: Optional[Path] = DataOpt, config: Optional[Path] = ConfigOpt,
            cache: Optional[Path] = CacheOpt, quiet: bool = QuietOpt) -> None:
    """Masking-horizon sweep (HINGE Fig. S8): metrics vs T, one fit per T (re-used when its config matches)."""
    from stgen.workflows.analysis import run_horizon_analysis

    try:
        horizons = [int(t) for t in ts.split(",") if t.strip()]
    except ValueError:
        horizons = _run(_raise, f"--Ts must be comma-separated integers, got {ts!r}")
    if k < 0:
        _run(_raise, f"--steps must be >= 0, got {k}")
    df = _run(run_horizon_analysis, _data(data), test_section, out, horizons, cfg=_run(StgenConfig.load, config),
              steps=k or None, samples=samples, seed=seed, cache_dir=cache, progress=not quiet)
    typer.echo(df[[c for c in ("T", "K", "pcc50", "pcc200", "mse", "gsc", "ssc", "rvd") if c in df.columns]]
               .to_string(index=False))
    typer.echo(f"-> {out / 'horizon.md'}")


convert_app = typer.Typer(no_args_is_help=True, help="Convert released foundation-model checkpoints for use as HINGE backbones.")
app.add_typer(convert_app, name="convert")


@convert_app.command("cellfm")
def convert_cellfm(ckpt: Path = typer.Argument(..., help="MindSpore CellFM checkpoint (.ckpt)"),
                   out: Path = typer.Option(..., "--out", help="BACKBONE.safetensors to write (+ BACKBONE.json sidecar)"),
                   preset: str = typer.Option("CellFM-800M", "--preset", help="CellFM-800M | CellFM-80M"),
                   vocab: Optional[Path] = typer.Option(None, "--vocab", help="gene table whose row order gives token ids "
                                                        "(default: ../shared/vocab/cellfm/expand_gene_info.csv)"),
                   key_prefix: str = typer.Option("", "--key-prefix", help="prefix stripped from checkpoint names"),
                   dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | keep")) -> None:
    """Read a MindSpore CellFM .ckpt (no MindSpore needed) and write safetensors + vocabulary sidecar."""
    from stgen.backbones.cellfm_convert import convert_cellfm as _convert

    if not ckpt.is_file():
        _run(_raise, f"checkpoint {ckpt} does not exist")
    path = _run(_convert, ckpt, out, preset, vocab_csv=vocab, key_prefix=key_prefix,
                dtype=None if dtype == "keep" else dtype)
    typer.echo(f"converted {ckpt} -> {path} (+ {path.with_suffix('.json').name}); use it with "
               f"`stgen fit --backbone cellfm:{path}`")


@app.command()
def models() -> None:
    """List the built-in models shipped with stgen (use the name as `stgen predict --model NAME`): what each was
    trained on, its panel size and its model's five-fold Her2ST benchmark numbers."""
    from stgen.workflows.zoo import describe

    rows = _run(describe)
    if not rows:
        typer.echo("this installation ships no built-in models (rebuild them: bash scripts/build_zoo.sh)")
        return
    for r in rows:
        b = r.get("benchmark") or {}
        nums = ", ".join(f"{k.upper().replace('PCC', 'PCC-')} {b[k]:.3f}" for k in ("pcc50", "gsc", "ssc") if k in b)
        typer.echo(f"{r['name']}: {r['model']}, {r['panel_size']} genes, trained on {', '.join(r['sections'])} "
                   f"({r['n_spots']} spots; {r['trained_on']}); weights {r['dtype']}; five-fold benchmark: {nums}")


def _raise(msg: str) -> None:
    from stgen.errors import InputError

    raise InputError(msg)


def main() -> None:  # pragma: no cover
    app(sys.argv[1:])


if __name__ == "__main__":  # python -m stgen.cli
    main()
