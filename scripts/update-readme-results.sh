#!/usr/bin/env bash
# Copy a study's results page (RESULTS/tables/results.md, written by the workflow's rule
# results_md) into the README's generated block, between <!-- results:begin --> and
# <!-- results:end -->. Run it after the default study:
#   bash scripts/study.sh && bash scripts/update-readme-results.sh results
# With --check: only check that the README's block is exactly as generated.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "--check" ]; then
    exec "$PY" -m locnet.report --check --readme README.md
fi
exec "$PY" -m locnet.report --readme README.md "${1:-results}/tables/results.md"
