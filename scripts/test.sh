#!/usr/bin/env bash
# Run the test suite: unit tests, the whole tiny study, and (as root) the SLURM test.
# Extra arguments go to pytest, e.g. -m "not slurm" or -k pyramid.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-venv.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python -m pytest "$@"
