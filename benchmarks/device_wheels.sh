#!/usr/bin/env bash
# Here, before a GPU session's first device call: fetch into .whl/ (git-ignored) the wheels that the GPU machine
# lacks. It has torch, lightning, transformers, peft, safetensors, scikit-image and pytest, but not diffusers
# (nor diffusers' importlib_metadata). The versions are this project's; the machine is Python 3.12, x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$tag"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "diffusers==0.42.1" "importlib_metadata==8.7.0"
ls -la .whl && du -sh .whl
