#!/usr/bin/env bash
# Run the whole study (default: config.yaml, the synthetic cohort) end to end.
# Extra arguments go to snakemake, e.g. --configfile config/paper.yaml, -n, --report.
#
# The local profile follows the machine (scripts/local-profile.sh): with a GPU, profiles/default/
# and `--resources gpu=1` (one GPU job at a time); without one, profiles/cpu/ (no GPU limit, one
# thread per training and prediction job, so the cores train several models side by side).
# LOCNET_CORES caps the cores (default: all).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-venv.sh
export PATH="$PWD/.venv/bin:$PATH"
read -ra profile < <(bash scripts/local-profile.sh)
echo "study.sh: ${profile[*]}" >&2
# Snakemake reads each --configfile before the workflow and names neither file nor line for a
# YAML error: check them here first, with the locnet of this checkout
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" python -m locnet.config "$@" || exit 2
exec snakemake "${profile[@]}" --cores "${LOCNET_CORES:-all}" "$@"
