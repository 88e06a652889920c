#!/usr/bin/env bash
# Rebuild the model zoo shipped in the package (src/stgen/zoo): the embedded backbone pre-trained on the 30
# expression-only Her2ST sections, and HINGE, STFlow and ridge trained with default settings on all five imaged
# sections (../shared/data/her2st or $STGEN_DATA). Pass --force-backbone to pre-train the backbone again even
# when it is cached. Commit the result only when a default changes.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
PYTHONUNBUFFERED=1 .venv/bin/python -m stgen.workflows.zoo build --work runs/zoo "$@"
.venv/bin/stgen models
