#!/usr/bin/env bash
# Does the paper's own Loc-Net recipe learn when it gets many more steps? The faithful
# configuration (ReLU maps and units, no map prior, no shifts) of locnet_single and
# multiscale_e2e_noise, seed 0 each, at 10x the default study's 25 epochs, on the default
# study's cohort, side by side on one GPU. Sized to end within 8 minutes on an H100.
#
#   bash benchmarks/faithful_gpu.sh OUTDIR [EPOCHS=250] [RESULTS]
#
# Without RESULTS it first builds the cohort (benchmarks/device_cohort.py, the same files as
# the workflow's). On a machine without TensorFlow carry the wheels of
# benchmarks/gpu-requirements.txt in .whl/ (benchmarks/README.md, "Accelerator targets"): they
# are installed to /tmp/site when keras is missing. Rows go to OUTDIR/faithful_gpu.jsonl in
# map_prior.py's format; each run's log (one line per epoch) to OUTDIR/<method>.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:?usage: faithful_gpu.sh OUTDIR [EPOCHS] [RESULTS]}
epochs=${2:-250}
res=${3:-}
limit=${FAITHFUL_LIMIT_S:-420}   # per run; a run cut here leaves its per-epoch log
mkdir -p "$out"
if ! python3 -c "import keras" >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export KERAS_BACKEND=${KERAS_BACKEND:-jax} XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true) > "$out/device.txt"
start=$(date +%s)
if [ -z "$res" ]; then
    res=/tmp/faithful_res
    python3 benchmarks/device_cohort.py --out "$res" --workers "$(nproc)" > "$out/cohort.log" 2>&1
fi
echo "cohort ready after $(( $(date +%s) - start )) s" | tee -a "$out/device.txt"
faithful=(--set map_supervision.weight=0 --set unet.activation=relu
          --set training.augment_shift_mm=0)
for m in locnet_single multiscale_e2e_noise; do
    timeout "$limit" python3 benchmarks/map_prior.py --results "$res" --method "$m" --seed 0 \
        --epochs "$epochs" --threads 4 "${faithful[@]}" --set "methods.$m.out_activation=relu" \
        --label "faithful, $epochs epochs, $KERAS_BACKEND on GPU" \
        --out "$out/faithful_gpu.jsonl" > "$out/$m.log" 2>&1 &
done
status=0
wait -n || status=$?
wait -n || status=$?
echo "done after $(( $(date +%s) - start )) s, exit $status" | tee -a "$out/device.txt"
exit "$status"
