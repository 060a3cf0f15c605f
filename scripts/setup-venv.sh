#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the pinned packages and locnet into it.
# Idempotent: re-running is a no-op unless the lock file or pyproject.toml changed.
# GPU machines (a working nvidia-smi, or LOCNET_GPU=1) get the CUDA build of TensorFlow.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

find_python() {
    for cand in "${PYTHON:-}" python3.11 python3; do
        [ -n "$cand" ] || continue
        if command -v "$cand" >/dev/null 2>&1 &&
           "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            echo "$cand"; return 0
        fi
    done
    echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

if bash scripts/has-gpu.sh; then
    lock=requirements/gpu.txt
else
    lock=requirements/cpu.txt
fi

stamp=.venv/.locnet-installed
want="$(cat "$lock" pyproject.toml | sha256sum | cut -c1-16) $lock"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

if [ ! -x .venv/bin/python ]; then
    py=$(find_python)
    echo "creating .venv with $($py --version)" >&2
    "$py" -m venv .venv
fi
echo "installing pinned packages from $lock (first run: a few minutes)" >&2
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r "$lock"
.venv/bin/python -m pip install --quiet --no-deps -e .
echo "$want" > "$stamp"
