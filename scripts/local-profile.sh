#!/usr/bin/env bash
# Print the Snakemake options of the local profile that suits this machine (scripts/study.sh
# uses them). The test for a GPU is scripts/has-gpu.sh, which setup-venv.sh uses for the
# TensorFlow build: a working nvidia-smi, or LOCNET_GPU=1 (LOCNET_GPU=0 means no GPU).
#   with a GPU:    --workflow-profile profiles/default --resources gpu=1  (one GPU job at a time)
#   without one:   --workflow-profile profiles/cpu  (no GPU limit; one thread per training and
#                  prediction job, so the cores train several models side by side)
set -euo pipefail
if bash "$(dirname "${BASH_SOURCE[0]}")/has-gpu.sh"; then
    echo "--workflow-profile profiles/default --resources gpu=1"
else
    echo "--workflow-profile profiles/cpu"
fi
