#!/usr/bin/env bash
# Issue #9's GPU checks in one prepared script, for the device machine (one H100, no network, 10 minutes a call).
#
#   here:    bash benchmarks/device_wheels.sh              (once: the wheels the machine lacks, into .whl/)
#   there:   bash benchmarks/device_check.sh PHASE...      (run with carry [".whl"]; results land in $OUT)
#
# Phases (each under its own timeout; worst cases add up to 580 s for the default, inside a call's 600 s):
#   tests     pytest -m gpu: bf16 training, cached latents, batched generation, CUDA graphs around validation and
#             with gradient accumulation, no wait for the GPU between the bar's draws
#   compiled  train_speed.py with model.compile=true, compile_mode=reduce-overhead (CUDA graphs): HW b2, UNet-only
#             r4 b2 and b8, likeness against the plain recipe in the same process; then 25 prompts x 30 steps
#   speed     the three settings eager (model.compile=false), likeness against the plain recipe
#   e2e       a whole 2000-step HW run with validation every 100 steps, compiled
# Default: tests compiled. Then, while the machine is warm and device time is left, speed or e2e in a second call.
# The first benchmark phase writes SD1.5 with random weights to /tmp (up to 110 s). The JSON files are rewritten
# after every run, so a phase cut off by its timeout keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "no wheels in .whl/: run benchmarks/device_wheels.sh here and carry .whl"; exit 1; }
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, peft, huggingface_hub, safetensors, lightning as L
for m in (torch, diffusers, transformers, peft, huggingface_hub, safetensors, L): print(m.__name__, m.__version__)"
model=/tmp/sd15-random  # written by the first benchmark phase, reused by the later ones
# DEVICE_CHECK_ARGS adds benchmark options, e.g. "--device cpu --resolution 64 --steps 1" to try this script on a CPU.
read -ra extra <<<"${DEVICE_CHECK_ARGS:-}"
speed=(python3 benchmarks/train_speed.py --model-dir "$model" --settings hw,unet-r4-b2,unet-r4-b8 --async-steps 10
  "${extra[@]}")
compiled=(--likeness-option model.compile=true --likeness-option model.compile_mode=reduce-overhead)
read -ra phases <<<"${*:-tests compiled}"
for p in "${phases[@]}"; do
  [[ $p =~ ^(tests|compiled|speed|e2e)$ ]] || { echo "unknown phase $p: tests, compiled, speed or e2e"; exit 2; }
done
for p in "${phases[@]}"; do
  echo "=== $p $(date +%T)"
  if [[ $p != tests && ! -f $model/model_index.json ]]; then
    timeout 110 python3 benchmarks/train_speed.py --model-dir "$model" --settings none "${extra[@]}" 2>&1 | tail -3
  fi
  case $p in
    # Only the files holding gpu tests: the others import what the machine lacks (jsonargparse, deepface).
    tests) timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider $(grep -lE "from devices import|mark\.gpu" tests/test_*.py) \
      2>&1 | tee "$OUT/tests.log" ;;
    speed) timeout 200 "${speed[@]}" --json "$OUT/speed.json" 2>&1 | tee "$OUT/speed.log" ;;
    compiled) timeout 290 "${speed[@]}" "${compiled[@]}" --generation --json "$OUT/compiled.json" 2>&1 \
      | tee "$OUT/compiled.log" ;;
    e2e) timeout 420 python3 benchmarks/train_speed.py --model-dir "$model" --settings none --end-to-end \
      "${compiled[@]}" "${extra[@]}" --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" ;;
  esac
done
echo "=== done $(date +%T)"
