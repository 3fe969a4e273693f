"""benchmarks/gpu_check.sh cannot rot: its --dry mode runs the whole check on CPU (tiny model, one step), and
the pieces a GPU run depends on (the FLOP count behind MFU, the wheel list) are checked here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _gpu_check(*args: str, timeout: int) -> subprocess.CompletedProcess:
    """benchmarks/gpu_check.sh with these arguments, run as a user would, with this venv's python."""
    return subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), *args],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(900)
def test_dry_run_writes_a_complete_summary(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _gpu_check("--dry", "--out", str(out), timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["ok"] is True and s["dry"] is True
    assert s["machine"]["deepspeed"] and s["machine"]["open_clip"]
    # pytest -m gpu ran; without CUDA its tests skip, which is not a failure.
    assert s["gpu_tests"]["ok"] and s["gpu_tests"]["failures"] == s["gpu_tests"]["errors"] == 0
    aug = s["augmentation"]
    for key in ("train_warp_img_per_s", "eval_resize_crop_img_per_s", "symbols_bank_warp_img_per_s"):
        assert aug[key] > 0
    assert s["flops_per_sample"]["train_gflop"] > 0
    rows = {r["name"]: r for r in s["train"]}
    assert set(rows) == {"zero1-eager", "plain-eager", "zero2-compile", "plain-compile"}
    for r in rows.values():
        assert r["ok"] is True and r["samples_per_s"] > 0 and r["loss_last"] > 0, r
    assert s["train_summary"]["ours_over_plain_eager"] > 0
    assert s["train_summary"]["ours_over_plain_compiled"] > 0
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu_check_best_samples_per_s: ")


@pytest.mark.timeout(300)
def test_without_cuda_the_full_check_says_so(tmp_path):
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("checks the no-CUDA message")
    out = tmp_path / "gpu_check.json"
    proc = _gpu_check("--skip-tests", "--out", str(out), timeout=280)
    assert proc.returncode == 1
    assert "CUDA is not available" in proc.stderr
    assert json.loads(out.read_text())["ok"] is False


@pytest.mark.timeout(300)
def test_flop_count_matches_open_clips_profile_of_vit_b_16():
    """The MFU numerator: FlopCounterMode on the meta device gives open_clip's published forward GFLOP per
    sample for ViT-B-16 (model_profile.csv: image 35.13, text 5.96) and ~3x forward for a stage-2 step."""
    sys.path.insert(0, str(BENCH))
    import gpu_check

    flops = gpu_check.train_flops_per_sample(
        gpu_check.run_config("vit-b-16-random", 256, 0, False, True, "inductor")
    )
    assert flops["fwd_gflop_image"] == pytest.approx(35.13, rel=0.01)
    assert flops["fwd_gflop_text"] == pytest.approx(5.96, rel=0.01)
    assert flops["train_gflop"] == pytest.approx(gpu_check.ANCHOR_TRAIN_GFLOP, rel=0.02)


def test_wheels_are_the_versions_this_venv_runs():
    """gpu_wheels.sh pins what the GPU machine gets; they must be what the tests here ran against."""
    text = (BENCH / "gpu_wheels.sh").read_text()
    pins = dict(re.findall(r"^\s+([A-Za-z0-9_.-]+)==([0-9][^\s\\]*)", text, flags=re.M))
    pins.update(re.findall(r"pip wheel .* ([A-Za-z0-9_.-]+)==([0-9][^\s]*) -w", text))
    assert {"deepspeed", "open_clip_torch", "pydantic", "pydantic-core", "hjson", "ftfy"} <= set(pins)
    for name, version in pins.items():
        assert metadata.version(name) == version, name
