#!/usr/bin/env bash
# The main job on the embedded default data (Her2ST in ../shared/data/her2st, or $STGEN_DATA):
# find the expression backbone (the one shipped with stgen for this corpus and config; PRETRAIN=force
# pre-trains it again, about 20-50 minutes on 2 cores), train HINGE and the ridge baseline on every imaged
# section except C2, generate expression for the unseen C2, score it, and draw marker maps.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SECTION=${SECTION:-C2}
OUT=${OUT:-reports/$SECTION}
DATA=${STGEN_DATA:-$(.venv/bin/python -c "from stgen.workflows.paths import default_data_dir; print(default_data_dir())")}
IMG=$(ls "$DATA"/ST-imgs/*/"$SECTION"/*.jpg | head -1)
export PYTHONUNBUFFERED=1
.venv/bin/stgen pretrain --data "$DATA" $([ "${PRETRAIN:-}" = force ] && echo --force)
for m in hinge ridge; do
  .venv/bin/stgen fit --data "$DATA" --test-section "$SECTION" --model $m --out "$OUT/runs/$m/$SECTION"
  .venv/bin/stgen predict --model "$OUT/runs/$m/$SECTION" --image "$IMG" \
      --spots "$DATA/ST-spotfiles/${SECTION}_selection.tsv" --out "$OUT/preds/$m/$SECTION.h5ad"
  .venv/bin/stgen evaluate --pred "$OUT/preds/$m/$SECTION.h5ad" --counts "$DATA/ST-cnts/$SECTION.tsv.gz" \
      --out "$OUT/metrics_${m}_$SECTION.json"
done
# report.md, metrics.csv, marker maps (ERBB2, FASN, GNAS) and gene-gene correlation heatmaps;
# re-uses the runs fitted above (same configuration hash), so nothing is trained twice.
.venv/bin/stgen benchmark --data "$DATA" --sections "$SECTION" --out "$OUT"
