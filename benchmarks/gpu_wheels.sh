#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_check.sh installs on the GPU machine into .whl/ (git-ignored), here, where
# pip reaches the registry. The machine (Python 3.12, x86-64, torch 2.11, torchvision 0.26) already holds
# every other dependency (/work/.library/device/KINDS.md's package list): DeepSpeed's einops, msgpack, ninja,
# numpy, packaging, psutil, py-cpuinfo, tqdm; open_clip's huggingface-hub, regex, safetensors, timm;
# typing-extensions. Missing there, so carried: the ones below. Ray is not carried (too big, not needed).
#
#   bash benchmarks/gpu_wheels.sh     # then: the device run names .whl in `carry`
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
rm -rf .whl
mkdir -p .whl

# Same versions as this repo's venv (pip list there), one version of each: two would stop the install.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    open_clip_torch==3.3.0 \
    ftfy==6.3.1 \
    wcwidth==0.9.4 \
    pydantic==2.14.4 \
    pydantic-core==2.50.5 \
    annotated-types==0.8.0 \
    typing-inspection==0.4.5 \
    hjson==3.1.0

# DeepSpeed publishes an sdist only: build its pure-Python wheel (no ops are compiled at install; the check
# uses torch's AdamW and compiles nothing of DeepSpeed's).
"$PY" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl

ls -l .whl
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "total: $((total / 1024)) KiB in $(ls .whl/*.whl | wc -l) wheels"
if [ "$total" -gt $((50 * 1024 * 1024)) ]; then
    echo "gpu_wheels: over 50 MiB, more than a device call should carry" >&2
    exit 1
fi
