#!/usr/bin/env bash
# Run the test suite: unit tests, the whole tiny study, and (as root) the SLURM test.
# Extra arguments go to pytest, e.g. -m "not slurm" or -k pyramid.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-venv.sh
export PATH="$PWD/.venv/bin:$PATH"
# The layer and model tests also run under the PyTorch and JAX backends (tests/test_backends.py)
# to keep the model code backend-neutral (JAX is what the GPU benchmark runs on machines without
# TensorFlow). CI installs the CPU builds for that; elsewhere set LOCNET_TEST_BACKENDS=1
# (PyPI's default torch wheel is a multi-GB CUDA build). Neither changes a pinned package.
if [ "${CI:-}" = true ] || [ "${LOCNET_TEST_BACKENDS:-${LOCNET_TEST_TORCH:-}}" = 1 ]; then
    for pkg in torch==2.13.0 jax==0.10.2; do
        if ! python -c "import ${pkg%%=*}" >/dev/null 2>&1; then
            echo "installing $pkg for the backend tests" >&2
            python -m pip install --quiet "$pkg"
        fi
    done
fi
exec python -m pytest "$@"
