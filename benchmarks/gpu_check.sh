#!/usr/bin/env bash
# The GPU check, one command (at most ~8 minutes), for a bare machine with one NVIDIA GPU (the device tool's
# H200: Python 3.12, torch 2.11, torchvision 0.26, timm, pytest; no network; no Ray, DeepSpeed or open_clip).
#
#   bash benchmarks/gpu_check.sh [--out FILE.json] [options of benchmarks/gpu_check.py]
#   bash benchmarks/gpu_check.sh --dry [--out FILE.json]     # CPU, tiny model, 1 step: the script's own test
#
# On the GPU machine the missing packages come as wheels in .whl/ (made here by benchmarks/gpu_wheels.sh and
# carried along); they are installed with --no-index --no-deps into /tmp/site. Ray is not needed: the check
# runs DeepSpeed engines directly (one process, world size 1) through the project's own build_engine and
# train_step. It runs: `pytest -m gpu`, device-side augmentation throughput, and the stage-2 training step
# of ViT-B/16-sized towers in bf16 at a global batch of 256 under ZeRO 0/1/2 with and without torch.compile,
# plus a plain-PyTorch loop of the same model. The JSON summary goes to --out, else $OUT/gpu_check.json, else
# /tmp/gpu_check.json. Exit status: 0 when every section passed (skipped gpu tests are not failures).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
for arg in "$@"; do
    case "$arg" in
        --dry) dry=1 ;;
        -h | --help)
            sed -n '2,15p' "$0"
            exit 0
            ;;
    esac
done

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ "$dry" = 1 ]; then
    # This repo's venv holds every package; DeepSpeed on its CPU accelerator.
    PY="${PYTHON:-}"
    if [ -z "$PY" ]; then
        if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
    fi
    export DS_ACCELERATOR=cpu
else
    PY="${PYTHON:-python3}"
    export DS_ACCELERATOR=cuda
    if ! "$PY" -c "import deepspeed, open_clip" 2>/dev/null; then
        if ! ls .whl/*.whl >/dev/null 2>&1; then
            echo "gpu_check: DeepSpeed/open_clip are not installed and there is no .whl/ here." >&2
            echo "  Make the wheels where pip works (bash benchmarks/gpu_wheels.sh) and carry .whl along." >&2
            exit 3
        fi
        site="${GPU_CHECK_SITE:-/tmp/site}"
        echo "gpu_check: installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" .whl/*.whl || {
            echo "gpu_check: pip could not install .whl/*.whl" >&2
            exit 3
        }
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true
fi
# The package itself from the source tree (nothing to install).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import sys, torch; print('gpu_check: python', sys.version.split()[0], 'torch', torch.__version__)"

exec "$PY" benchmarks/gpu_check.py "$@"
