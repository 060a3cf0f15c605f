#!/usr/bin/env bash
# Regenerate requirements/*.txt from the current .venv after changing pyproject.toml:
#   .venv/bin/pip install -e '.[cpu,test]' && bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
body=$(.venv/bin/pip freeze --exclude-editable | grep -v '^locnet')
{ echo "# Exact versions of every package (direct and transitive) for CPU machines."
  echo "# Regenerate with scripts/lock.sh after changing pyproject.toml."
  echo "$body"; } > requirements/cpu.txt
{ echo "# Exact versions for NVIDIA GPU machines: the CPU lock with the CUDA build of TensorFlow."
  echo "# Regenerate with scripts/lock.sh after changing pyproject.toml."
  echo "$body" | sed 's/^tensorflow_cpu==/tensorflow[and-cuda]==/'; } > requirements/gpu.txt
{ echo "# Conda environment for 'snakemake --sdm conda' and for users who prefer conda."
  echo "# Same pins as requirements/cpu.txt (generated from it by scripts/lock.sh)."
  echo "name: locnet"; echo "channels: [conda-forge]"; echo "dependencies:"
  echo "  - python=3.11"; echo "  - pip"; echo "  - pip:"
  echo "$body" | sed 's/^/      - /'; } > envs/locnet.yaml
