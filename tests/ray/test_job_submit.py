"""A real local Ray head and `ray job submit` through cluster/submit.sh: the CPU demo training and the smoke search."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from galaxalign_dist import config

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: ray, galaxalign


def _session_processes(sid: int) -> list:
    """Every process of the head we started: its session (set by start_new_session) and their descendants."""
    import psutil

    procs = {}
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == sid:
                procs[p.pid] = p
    for p in list(procs.values()):
        with contextlib.suppress(psutil.Error):
            for child in p.children(recursive=True):  # job drivers run in their own session
                procs[child.pid] = child
    procs.pop(os.getpid(), None)
    return list(procs.values())


def _stop_head(sid: int) -> None:
    """Stop only this head's processes, by id. (`ray stop` would kill every Ray on the machine, including
    other test sessions' clusters or a user's own.)"""
    import psutil

    procs = _session_processes(sid)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    # Short temp dir: Ray's unix socket paths under it must stay below ~107 characters.
    temp = tempfile.mkdtemp(prefix="ga-ray-", dir="/tmp")
    gcs, dashboard = free_port(), free_port()
    env = {
        **os.environ,
        # Jobs inherit the head's environment: the venv's galaxalign on PATH, offline hub, CPU DeepSpeed.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"), "start", "--head",
        "--num-cpus", "4",  # 4 logical CPUs on 2 cores: Train workers (0.5 each) leave room for Ray Data tasks
        "--node-ip-address", "127.0.0.1",
        "--port", str(gcs),
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard),
        "--include-dashboard", "true",
        "--temp-dir", temp,
        "--disable-usage-stats",
        # Other Ray instances on this host hold the default ports of these (the job agent's 52365, the
        # client server's 10001): a head that cannot bind them cannot accept jobs.
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
    ]  # fmt: skip
    # Its own session: teardown then finds exactly this head's processes by session id.
    starter = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = starter.communicate(timeout=120)
        assert starter.returncode == 0, out.decode()[-3000:]
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        _stop_head(starter.pid)
        shutil.rmtree(temp, ignore_errors=True)


def _submit(head: dict, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**head["env"], "RAY_ADDRESS": head["address"]}
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(ROOT / "cluster" / "submit.sh"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(f"submit.sh {args[0]}: {time.perf_counter() - t0:.0f} s")  # noqa: T201 - wall time, shown with -s
    return proc


@pytest.mark.timeout(1500)
def test_submit_train_and_tune_jobs(ray_head, tmp_path):
    data = tmp_path / "data"
    # (a) the CPU demo training, small: 1 epoch per stage on 800 synthetic galaxies.
    train = _submit(
        ray_head,
        "train", "demo_cpu",
        "--set", f"data.path={data}",
        "--set", "data.prepare_n=800",
        "--set", "data.batch_size=32",
        "--set", "stages.stage1_epochs=1",
        "--set", "stages.stage2_epochs=1",
        "--set", "run.eval_max_rows=160",
        "--set", "logging.progress=false",
        "--out-dir", str(tmp_path / "runs"),
        "--name", "job-train",
        timeout=700,
    )  # fmt: skip
    log = train.stdout + train.stderr
    assert train.returncode == 0, log[-6000:]
    assert "submitting Ray job galaxalign-train-" in log and "ray job logs --address" in log
    assert "succeeded" in log
    run = tmp_path / "runs" / "job-train"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(h["stage"], h["epoch"]) for h in history] == [(1, 1), (2, 1)]
    assert "val_f1" in history[-1]
    states = sorted(run.glob("checkpoint_*/state.json"))
    assert states and json.loads(states[-1].read_text())["stage"] == 2

    # (b) the smoke search (reuses the dataset prepared by the training job).
    search = tmp_path / "search"
    tune = _submit(
        ray_head,
        "tune", "tune/smoke_cpu.yaml",
        "--out", str(search),
        "--set", f"data.path={data}",
        "--set", "data.prepare_n=800",
        "--set", "num_samples=1",  # the submit path, not the search (tests/ray/test_tune_e2e.py)
        timeout=700,
    )  # fmt: skip
    log = tune.stdout + tune.stderr
    assert tune.returncode == 0, log[-6000:]
    best = yaml.safe_load((search / "best_config.yaml").read_text())
    assert config.from_dict(best).run.name.endswith("-tuned")
    assert (search / "results.csv").exists() and (search / "metric_vs_params.png").exists()
    progress = list((search / "tune").glob("trial_*/progress.csv"))
    assert len(progress) == 1 and all("val_f1" in p.read_text().splitlines()[0] for p in progress)


@pytest.mark.timeout(300)
def test_failed_job_returns_nonzero(ray_head, tmp_path):
    # A config error inside the job (the dataset dir has no data and no source to prepare it from).
    proc = _submit(
        ray_head,
        "train", "demo_cpu",
        "--set", f"data.path={tmp_path / 'empty'}",
        "--set", "data.prepare_source=",
        timeout=240,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "did not succeed (FAILED)" in proc.stderr, proc.stderr[-3000:]  # the job's status, read back
