#!/usr/bin/env bash
# Issue #9's GPU checks in one prepared script, for the device machine (one H100, no network, 10 minutes a call).
#
#   here:    bash benchmarks/device_wheels.sh              (once: the wheels the machine lacks, into .whl/)
#   there:   bash benchmarks/device_check.sh PHASE...      (run with carry [".whl"]; results land in $OUT)
#
# Phases (each cut off by its own timeout, so the next still runs and the call ends inside its 10 minutes):
#   tests     pytest -m gpu: bf16 training, cached latents, batched generation, CUDA graphs around validation
#   compiled  train_speed.py with model.compile=true, compile_mode=reduce-overhead (CUDA graphs): HW b2, UNet-only
#             r4 b2 and b8, likeness against the plain recipe in the same process; then 25 prompts x 30 steps
#   speed     the same, eager (what model.compile=false gives)
#   e2e       a whole 2000-step HW run with validation every 100 steps, compiled
# Default: tests compiled (about 8 minutes with the machine's start). Then, if device time is left, speed or e2e in
# a second call while the machine is warm. A phase that runs the benchmark first writes SD1.5 with random weights.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "no wheels in .whl/: run benchmarks/device_wheels.sh here and carry .whl"; exit 1; }
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, peft, lightning as L; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', \
L.__version__)"
model=/tmp/sd15-random  # written by the first benchmark phase, reused by the later ones
speed=(python3 benchmarks/train_speed.py --model-dir "$model" --settings hw,unet-r4-b2,unet-r4-b8)
compiled=(--likeness-option model.compile=true --likeness-option model.compile_mode=reduce-overhead)
for phase in "${@:-tests compiled}"; do
  for p in $phase; do
    echo "=== $p $(date +%T)"
    if [[ $p != tests && ! -f $model/model_index.json ]]; then
      timeout 150 python3 benchmarks/train_speed.py --model-dir "$model" --settings none 2>&1 | tail -3
    fi
    case $p in
      tests) timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" ;;
      speed) timeout 220 "${speed[@]}" --json "$OUT/speed.json" 2>&1 | tee "$OUT/speed.log" ;;
      compiled) timeout 360 "${speed[@]}" "${compiled[@]}" --generation --json "$OUT/compiled.json" 2>&1 \
        | tee "$OUT/compiled.log" ;;
      e2e) timeout 420 python3 benchmarks/train_speed.py --model-dir "$model" --settings none --end-to-end \
        "${compiled[@]}" --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" ;;
      *) echo "unknown phase $p: tests, speed, compiled or e2e"; exit 2 ;;
    esac
  done
done
echo "=== done $(date +%T)"
