#!/usr/bin/env bash
# Exit 0 when this machine is to be treated as a GPU machine: LOCNET_GPU=1, or a working
# nvidia-smi unless LOCNET_GPU=0. One test for both scripts that ask: setup-venv.sh (which
# TensorFlow build to install) and local-profile.sh (which Snakemake profile to run).
[ "${LOCNET_GPU:-}" = 1 ] || { [ "${LOCNET_GPU:-}" != 0 ] && nvidia-smi >/dev/null 2>&1; }
