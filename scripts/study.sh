#!/usr/bin/env bash
# Run the whole study (default: config.yaml, the synthetic cohort) end to end.
# Extra arguments go to snakemake, e.g. --configfile config/paper.yaml, -n, --report.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-venv.sh
export PATH="$PWD/.venv/bin:$PATH"
exec snakemake --cores "${LOCNET_CORES:-all}" --resources gpu=1 "$@"
