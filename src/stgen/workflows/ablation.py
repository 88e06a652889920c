"""The HINGE ablations as switches of the real model, and ``stgen ablate``.

:data:`ABLATIONS` is the single registry of the paper's ablation rows (HINGE
Supp. Tables S2/S3 "Ablations on Her2ST / Kidney" and Table S4 "Masking
schedules"), grouped as in the paper. Each variant is a small override of the
``hinge`` section of the configuration (:class:`stgen.models.hinge.config.HingeConfig`
field -> value), applied on top of the base configuration (defaults, or the
``--config`` file); an empty override is HINGE itself. The switches are
implemented in :mod:`stgen.models.hinge.network` (``adaptation``, ``objective``),
:mod:`stgen.nn.softadaln` (``soft_norm``, ``identity_init``, ``gate``),
:mod:`stgen.nn.lora`, :mod:`stgen.sampling.gaussian`, :mod:`stgen.sampling.masking` and
:mod:`stgen.training.trainer` (``mask_ratio``, ``curriculum_epochs``).

Not covered: the histology-encoder rows of Tables S2/S3 (ResNet-50, UNI, CONCH,
UNI + CONCH) - they change the feature extractor, not the HINGE model.

:func:`run_ablation` (``stgen ablate``) fits every variant with
:func:`stgen.workflows.fit.fit` (re-using ``runs/<section>/<variant>`` when its
configuration hash matches; variants whose resolved configuration is identical,
e.g. ``HINGE`` / ``Mask-Diff (HINGE)`` / ``SoftAdaLN (Full)``, are fitted once),
predicts each held-out section (re-using ``preds/<section>/<variant>.h5ad``
when it came from the current fit, see
:func:`stgen.workflows.predict.prediction_is_current`), scores it with
:func:`stgen.workflows.evaluate.score_prediction` and writes into OUT:

* ``ablation.csv`` - one row per (section, variant) plus, with several
  sections, a ``mean`` row per variant: PCC-50, PCC-200, MSE, MAE, GSC, SSC
  (spatial structural correlation, FLAG App. C.2), RVD (relative variance
  distance, Stem; lower is better), fit and predict time (a re-used
  prediction keeps the time stored when it was made), trainable parameters,
  config hash, run directory, override;
* ``ablation.md`` - the paper-style grouped table (mean over sections; best
  value per column within each group in bold), per-section tables and the
  variant definitions;
* ``ablation.png`` - bar charts of the metrics per variant.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Sequence
import pandas as pd
from tqdm.auto import tqdm
from stgen.models.hinge.config import HingeConfig
from stgen.workflows.config import StgenConfig
from stgen.errors import InputError
from stgen.utils.io import atomic_path


# group -> paper row name -> override of HingeConfig fields (empty = HINGE default)
ABLATIONS: dict[str, dict[str, dict]] = {
    # Tables S2/S3, "backbone adaptation" rows
    "backbone": {
        "Scratch": {"adaptation": "scratch"},
        "Decoder-Tune": {"adaptation": "decoder_tune"},
        "Backbone-LoRA": {"adaptation": "lora"},  # rank: hinge.lora_rank (default 8)
        "HINGE": {},
    },
    # Tables S2/S3, "objective" rows
    "objective": {
        "Gauss-Diff": {"objective": "gauss"},
        "Mask-Diff (NoCurr)": {"curriculum_epochs": 0},
        "Mask-Diff (RandMask)": {"mask_ratio": "uniform"},
        "Mask-Diff (HINGE)": {},
    },
    # Tables S2/S3, "conditioning" rows
    "conditioning": {
        "Hist-Affine-LN": {"soft_norm": False, "identity_init": False, "gate": False},
        "SoftAdaLN (NoSoftNorm)": {"soft_norm": False},
        "SoftAdaLN (NoIdInit)": {"identity_init": False},
        "SoftAdaLN (Full)": {},
    },
    # Table S4, masking schedules alpha_bar(t)
    "schedule": {
        "Linear (zeta=1)": {"schedule": "linear", "zeta": None},
        "Cosine": {"schedule": "cosine", "zeta": None},
        "zeta=0.5": {"schedule": "power", "zeta": 0.5},
        "zeta=2": {"schedule": "power", "zeta": 2.0},
        "zeta=log_T G": {"schedule": "power", "zeta": None},
    },
}

GROUP_TITLES = {"backbone": "Backbone adaptation", "objective": "Objective", "conditioning": "Conditioning",
                "schedule": "Masking schedule"}
METRICS = ("pcc50", "pcc200", "mse", "mae", "gsc", "ssc", "rvd")
METRIC_LABELS = {"pcc50": "PCC-50 ↑", "pcc200": "PCC-200 ↑", "mse": "MSE ↓", "mae": "MAE ↓", "gsc": "GSC ↑",
                 "ssc": "SSC ↑", "rvd": "RVD ↓"}
HIGHER_IS_BETTER = {"pcc50": True, "pcc200": True, "mse": False, "mae": False, "gsc": True, "ssc": True, "rvd": False}


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", s.lower())


def all_variants() -> list[tuple[str, str, dict]]:
    """``(group, name, override)`` for every registry row, in paper order."""
    return [(g, name, dict(ov)) for g, rows in ABLATIONS.items() for name, ov in rows.items()]


def resolve_variants(spec: Sequence[str] | None = None) -> list[tuple[str, str, dict]]:
    """Select registry rows by name.

    ``spec`` items may be a group (``backbone``, ``objective``, ``conditioning``,
    ``schedule``, ``all``), an exact row name (``Mask-Diff (NoCurr)``), or any
    case-/punctuation-insensitive fragment that names exactly one row
    (``nocurr``, ``lora``, ``linear``, ``zeta=2``). ``None`` or empty = all rows.
    Rows come back in registry (paper) order.
    Raises InputError naming an unknown or ambiguous item.
    """
    rows = all_variants()
    if not spec:
        return rows
    chosen: list[tuple[str, str, dict]] = []
    for item in spec:
        key = _norm(item)
        if not key:
            continue
        if key == "all":
            hits = rows
        elif key in ABLATIONS:
            hits = [r for r in rows if r[0] == key]
        else:
            hits = [r for r in rows if _norm(r[1]) == key] or [r for r in rows if key in _norm(r[1])]
            if len(hits) > 1:
                raise InputError(f"ablation variant {item!r} is ambiguous: {[r[1] for r in hits]}")
        if not hits:
            raise InputError(f"unknown ablation variant {item!r}; groups: {list(ABLATIONS)}; "
                             f"variants: {[r[1] for r in rows]}")
        chosen += [r for r in hits if r[1] not in {c[1] for c in chosen}]
    order = {r[1]: i for i, r in enumerate(rows)}
    return sorted(chosen, key=lambda r: order[r[1]])  # paper order, whatever the order asked


def apply_override(cfg: StgenConfig, override: dict, name: str = "override") -> StgenConfig:
    """A deep copy of ``cfg`` with ``override`` (HingeConfig field -> value) applied to ``cfg.hinge``.

    Raises InputError naming an unknown field or an invalid value (unknown
    adaptation/objective/schedule/mask_ratio, LoRA rank < 1).
    """
    known = {f.name for f in dataclasses.fields(HingeConfig)}
    bad = sorted(set(override) - known)
    if bad:
        raise InputError(f"ablation {name!r}: unknown hinge field(s) {bad}; known: {sorted(known)}")
    out = copy.deepcopy(cfg)
    for k, v in override.items():
        setattr(out.hinge, k, v)
    validate_hinge_config(out.hinge, name)
    return out


def validate_hinge_config(h: HingeConfig, name: str = "hinge") -> None:
    """Check the ablation-relevant fields of ``h`` without training (InputError naming the value)."""
    from stgen.sampling.masking import MaskSchedule
    from stgen.models.hinge.training import MASK_RATIOS

    try:
        h.__post_init__()  # re-validates the fields the override set
        MaskSchedule(2, h.T, h.schedule, h.zeta)
    except InputError as e:
        raise InputError(f"{name}: {e}") from e
    if h.mask_ratio not in MASK_RATIOS:
        raise InputError(f"{name}: unknown hinge.mask_ratio {h.mask_ratio!r}; choose one of {MASK_RATIOS}")
    if h.curriculum_epochs < 0:
        raise InputError(f"{name}: hinge.curriculum_epochs must be >= 0, got {h.curriculum_epochs}")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("=", "")).strip("-")


def run_ablation(
    data_dir: str | Path,
    test_sections: Sequence[str],
    out: str | Path,
    variants: Sequence[str] | None = None,
    cfg: StgenConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Fit, predict and score every selected variant on every held-out section.

    Parameters
    ----------
    data_dir : Her2ST folder (ST-cnts/, ST-spotfiles/, ST-imgs/).
    test_sections : held-out section(s); each gets its own fits (trained on
        every other imaged section, as :func:`stgen.workflows.fit.fit` does).
    out : output folder (``runs/``, ``preds/``, ``ablation.csv|md|png``).
    variants : names/groups for :func:`resolve_variants` (default: all rows).
    cfg : base configuration the overrides apply to (default: defaults).

    Returns the table written to ``ablation.csv``. Every variant's config is
    validated before the first (long) fit.
    """
    from stgen.workflows.benchmark import _fit_or_reuse
    from stgen.data.her2st import list_sections
    from stgen.workflows.rundir import config_hash
    from stgen.workflows.paths import image_for_section
    from stgen.workflows.evaluate import load_truth, score_prediction
    from stgen.workflows.predict import predict_or_reuse

    cfg = cfg or StgenConfig()
    data_dir, out = Path(data_dir), Path(out)
    sections = [s for s in dict.fromkeys(test_sections) if s]
    if not sections:
        raise InputError("no test section given to ablate")
    imaged = list_sections(data_dir, imaged_only=True)
    bad = [s for s in sections if s not in imaged]
    if bad:
        raise InputError(f"test section(s) {bad} have no image in {data_dir}; available: {imaged}")
    chosen = resolve_variants(variants)
    cfgs = {name: apply_override(cfg, ov, name) for _, name, ov in chosen}
    rows: list[dict] = []
    jobs = [(s, v) for s in sections for v in chosen]
    done: dict[tuple[str, str], dict] = {}  # (section, config hash) -> scored row of the first variant
    truths: dict[tuple[str, str], object] = {}
    bar = tqdm(jobs, desc="ablation", unit="variant", disable=not progress)
    for section, (group, name, override) in bar:
        bar.set_postfix_str(f"{section}: {name}")
        vcfg = cfgs[name]
        h = config_hash(vcfg, "hinge", section)
        base = {"group": group, "variant": name, "section": section,
                "override": json.dumps(override, sort_keys=True), "config_hash": h}
        if (section, h) in done:  # same resolved config as an earlier row (e.g. HINGE == SoftAdaLN (Full))
            rows.append({**done[(section, h)], **base})
            continue
        run_dir = out / "runs" / section / _slug(name)
        t0 = time.time()
        meta = _fit_or_reuse(data_dir, section, "hinge", run_dir, vcfg, cache_dir, progress)
        fit_s = meta.get("timings", {}).get("fit_total_s", round(time.time() - t0, 1))
        pred_path = out / "preds" / section / f"{_slug(name)}.h5ad"
        # same fit, same sampler settings: the stored prediction (and its stored predict time) is re-used
        pred, predict_s = predict_or_reuse(run_dir, image_for_section(data_dir, section),
                                           data_dir / "ST-spotfiles" / f"{section}_selection.tsv", pred_path,
                                           cache_dir=cache_dir, progress=progress)
        units = pred.uns["stgen"]["units"]
        counts = data_dir / "ST-cnts" / f"{section}.tsv.gz"
        if (section, units) not in truths:
            truths[(section, units)] = load_truth(counts, units)
        m = score_prediction(pred, truths[(section, units)], f"{pred_path} vs {counts}").metrics
        row = {**base, **{k: float(m[k]) for k in METRICS}, "n_spots": m["n_spots"], "n_genes": m["n_genes"],
               "fit_s": fit_s, "predict_s": predict_s,
               "n_trainable": meta.get("hinge", {}).get("n_trainable"), "run_dir": str(run_dir)}
        done[(section, h)] = row
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(sections) > 1:
        df = pd.concat([df, section_means(df)], ignore_index=True)
    write_ablation_report(df, out, sections)
    return df


def section_means(df: pd.DataFrame) -> pd.DataFrame:
    """One ``section == "mean"`` row per variant: metrics and timings averaged over sections."""
    per = df[df.section != "mean"]
    agg = {c: "mean" for c in (*METRICS, "fit_s", "predict_s") if c in per.columns}
    agg.update({c: "first" for c in ("override", "n_trainable") if c in per.columns})
    mean = per.groupby(["group", "variant"], sort=False).agg(agg).reset_index()
    mean.insert(2, "section", "mean")
    return mean


def _fmt(v: float) -> str:
    return "n/a" if pd.isna(v) else f"{v:.4f}"


def markdown_table(df: pd.DataFrame) -> list[str]:
    """Paper-style table (one row per variant, grouped), best value per column in each group in bold."""
    cols = [m for m in METRICS if m in df.columns]
    lines = ["| Group | Variant | " + " | ".join(METRIC_LABELS[m] for m in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for group, sub in df.groupby("group", sort=False):
        best = {}
        for m in cols:
            vals = sub[m].dropna()
            best[m] = (vals.max() if HIGHER_IS_BETTER[m] else vals.min()) if len(vals) else None
        for i, (_, r) in enumerate(sub.iterrows()):
            cells = []
            for m in cols:
                s = _fmt(r[m])
                cells.append(f"**{s}**" if best[m] is not None and not pd.isna(r[m]) and
                             _fmt(r[m]) == _fmt(best[m]) and len(sub) > 1 else s)
            title = GROUP_TITLES.get(group, group) if i == 0 else ""
            lines.append(f"| {title} | {r['variant']} | " + " | ".join(cells) + " |")
    return lines


def write_ablation_report(df: pd.DataFrame, out: str | Path, sections: Sequence[str]) -> None:
    """Write ``ablation.csv``, ``ablation.md`` and ``ablation.png`` into ``out`` (atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "ablation.csv") as tmp:
        df.to_csv(tmp, index=False)
    multi = len(sections) > 1
    main = df[df.section == "mean"] if multi else df
    lines = ["# HINGE ablations (HINGE Supp. Tables S2-S4)", "",
             f"Held-out section(s): {', '.join(sections)}" + (" - the main table is the mean over sections." if multi
                                                            else "."),
             "Each variant is a named override of the base configuration (definitions below); best value per "
             "column within each group in **bold**. GSC = Pearson r between the upper triangles of the predicted "
             "and true gene-gene correlation matrices; SSC = Pearson r between the per-gene Moran's I of prediction "
             "and truth on the 8-NN spot graph (FLAG App. C.2); RVD = mean over genes of "
             "(var_pred - var_true)^2 / var_true^2 (Stem; lower is better).", ""]
    lines += markdown_table(main)
    if multi:
        for s in sections:
            lines += ["", f"## Section {s}", ""] + markdown_table(df[df.section == s])
    lines += ["", "## Variant definitions (overrides of the `hinge` config section)", "",
              "| Variant | Override |", "|---|---|"]
    for _, r in main.iterrows():
        lines.append(f"| {r['variant']} | `{r['override']}` |")
    lines += ["", "Bars: `ablation.png`; per-row numbers, timings and run directories: `ablation.csv`.", ""]
    with atomic_path(out / "ablation.md") as tmp:
        tmp.write_text("\n".join(lines))
    plot_ablation(main, out / "ablation.png",
                  title=f"HINGE ablations, {'mean over ' if multi else ''}section(s) {', '.join(sections)}")


def plot_ablation(df: pd.DataFrame, out_png: str | Path, title: str = "HINGE ablations") -> None:
    """Horizontal bars of every metric per variant (rows in table order, coloured by group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [m for m in METRICS if m in df.columns]
    if df.empty or not cols:
        raise InputError("ablation table has no rows/metrics to plot")
    labels = list(df["variant"])
    groups = list(df["group"])
    palette = dict(zip(dict.fromkeys(groups), plt.get_cmap("tab10").colors))
    y = list(range(len(labels)))[::-1]
    fig, axes = plt.subplots(1, len(cols), figsize=(2.6 * len(cols) + 2.5, 0.32 * len(labels) + 1.5), sharey=True)
    axes = [axes] if len(cols) == 1 else list(axes)
    for ax, m in zip(axes, cols):
        ax.barh(y, df[m].to_numpy(dtype=float), color=[palette[g] for g in groups])
        ax.set_title(METRIC_LABELS[m], fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.axvline(0.0, color="0.4", linewidth=0.6)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels, fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
    fig.legend(handles, [GROUP_TITLES.get(g, g) for g in palette], loc="lower center", ncol=len(palette),
               fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    try:
        with atomic_path(out_png, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)


__all__ = ["ABLATIONS", "all_variants", "resolve_variants", "apply_override", "run_ablation",
           "write_ablation_report", "markdown_table", "plot_ablation"]
