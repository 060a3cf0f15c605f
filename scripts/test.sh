#!/usr/bin/env bash
# Run the test suite: unit tests, the whole tiny study, and (as root) the SLURM test.
# Extra arguments go to pytest, e.g. -m "not slurm" or -k pyramid.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-venv.sh
export PATH="$PWD/.venv/bin:$PATH"
# The layer and model tests also run under the PyTorch backend (tests/test_backends.py) to
# keep the model code backend-neutral. CI installs the CPU build of torch for that; elsewhere
# set LOCNET_TEST_TORCH=1 (PyPI's default torch wheel is a multi-GB CUDA build).
if { [ "${CI:-}" = true ] || [ "${LOCNET_TEST_TORCH:-}" = 1 ]; } &&
   ! python -c "import torch" >/dev/null 2>&1; then
    echo "installing torch==2.13.0 for the backend tests" >&2
    python -m pip install --quiet torch==2.13.0
fi
exec python -m pytest "$@"
