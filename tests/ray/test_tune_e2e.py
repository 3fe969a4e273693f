"""The smoke Tune search in-process on a local Ray: 4 trials (one forced to fail), outputs, and nothing left reserved."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from galaxalign_dist import config
from galaxalign_dist.launch.tune_run import run_search
from galaxalign_dist.launch.tune_space import load_spec

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# A pretrained checkpoint that does not exist: the trial passes every pre-Ray check (it is a valid string for
# model.pretrained) and fails inside the Ray Train workers, so TorchTrainer.fit() raises in the trial driver.
MISSING_WEIGHTS = "/nonexistent/galaxalign-weights.pt"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # run_search starts the local Ray itself (with its dashboard: Train V2 frees a stopped run's placement
    # group through the State API it serves); the test then inspects that instance.
    yield ray
    ray.shutdown()


def _released(ray, timeout_s: float = 90.0) -> tuple[bool, dict]:
    """Wait until every placement group is REMOVED and all CPUs are free again."""
    from ray.util import placement_group_table

    deadline = time.monotonic() + timeout_s
    while True:
        table = placement_group_table()
        live = {pg_id: pg["state"] for pg_id, pg in table.items() if pg["state"] != "REMOVED"}
        free = ray.available_resources().get("CPU", 0.0)
        total = ray.cluster_resources().get("CPU", 0.0)
        if not live and abs(free - total) < 1e-6:
            return True, {}
        if time.monotonic() > deadline:
            return False, {"live_placement_groups": live, "free_cpu": free, "total_cpu": total}
        time.sleep(1.0)


@pytest.mark.timeout(900)
def test_smoke_search_end_to_end(ray_local, tmp_path):
    from galaxalign_dist.launch.train import build_trainer, check

    spec = load_spec(
        ROOT / "tune" / "smoke_cpu.yaml",
        {
            "data.path": str(tmp_path / "data"),
            # Four trials as a grid whose last point fails at run time; the other keys are still sampled.
            "space.model.pretrained": f"grid(['none', 'none', 'none', '{MISSING_WEIGHTS}'])",
            "num_samples": 1,
        },
    )
    out = tmp_path / "search"
    t0 = time.perf_counter()
    outcome = run_search(spec, str(out))
    wall = time.perf_counter() - t0
    print(f"smoke search: {wall:.0f} s")  # noqa: T201 - shown with pytest -s, quoted in docs/tune.md
    rows = outcome["rows"]
    # Nothing leaked, whatever happened to the trials (the ASHA-stopped one included): every placement
    # group removed, every CPU free again.
    ok, details = _released(ray_local)
    assert ok, details

    # Every trial is in the table; only the forced one failed, with its error; the others reported val_f1.
    assert len(rows) == 4, rows
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["model.pretrained"] == MISSING_WEIGHTS, rows
    assert failed[0]["error"], failed[0]
    finished = [r for r in rows if r["status"] != "failed"]
    assert all(r["val_f1"] is not None for r in finished), finished
    assert any(r["status"] == "completed" for r in finished), finished
    values = [r["val_f1"] for r in finished]
    assert values == sorted(values, reverse=True)  # sorted by the metric, best first
    assert rows[-1]["status"] == "failed"  # no metric: last

    # Files: CSV + Markdown table with params/status/error, the plot, a ready-to-train best config.
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {"trial", "status", "val_f1", "error", "optim.lr.image", "stages.stage1_epochs"} <= set(table[0])
    assert "failed" in (out / "results.md").read_text()
    assert (out / "metric_vs_params.png").stat().st_size > 1000
    best_cfg = config.load(out / "best_config.yaml")
    best = outcome["best"]
    assert best_cfg.optim.lr.image == pytest.approx(best["optim.lr.image"])
    assert best_cfg.stages.stage1_epochs == best["stages.stage1_epochs"]
    assert best_cfg.model.pretrained == "none"
    check(best_cfg)  # config, model and dataset all valid for `galaxalign train --config best_config.yaml`
    build_trainer(best_cfg)  # and a TorchTrainer builds from it

    # Each finished trial has its own run: config, TensorBoard events, metrics, a checkpoint with state.json.
    for row in finished:
        run = Path(row["run_dir"])
        assert (run / "config.yaml").exists() and list((run / "tensorboard").glob("events.out.tfevents.*"))
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert history[-1]["epoch_index"] == row["epochs"]
        states = list(run.glob("checkpoint_*/state.json"))
        assert states, f"no checkpoint in {run}"
    # Tune's own per-trial results (progress.csv / result.json) are kept under out/tune.
    assert len(list((out / "tune").glob("trial_*/result.json"))) == 4
