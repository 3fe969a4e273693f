"""Smoke tests of the benchmarks: each --quick run ends with its `name: value` line, value positive and finite."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SUMMARY = re.compile(r"^([a-z0-9_]+): ([-+0-9.eEnaif]+)$")


def _run(script: str, tmp_path: Path, *args: str, timeout: int = 540) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "GALAXALIGN_BENCH_CACHE": str(tmp_path / "cache"),  # datasets built here, not in /tmp
    }
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("script", "name"),
    [
        ("overhead.py", "overhead_ratio"),
        ("data_throughput.py", "data_ratio"),
        ("zero_memory.py", "zero3_shard_ratio"),
        ("serve_load.py", "serve_rps"),
    ],
)
def test_quick_mode_ends_with_summary_line(script: str, name: str, tmp_path: Path) -> None:
    proc = _run(script, tmp_path, "--quick")
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    match = SUMMARY.match(lines[-1])
    assert match, f"{script}: last line is not `name: value`: {lines[-1]!r}"
    assert match.group(1) == name
    value = float(match.group(2))
    assert math.isfinite(value) and value > 0, f"{script}: {name} = {value}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_gpu_benchmark_explains_missing_cuda(tmp_path: Path) -> None:
    proc = _run("gpu_train.py", tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "CUDA is not available" in proc.stderr
