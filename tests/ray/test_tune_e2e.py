"""Tune searches on a local Ray: the best row is the best trial, ASHA stops a bad trial, failures stay alone, Optuna runs."""

from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from galaxalign_dist import config
from galaxalign_dist.launch.tune_run import run_search
from galaxalign_dist.launch.tune_space import SearchSpec, load_spec

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "tune" / "smoke_cpu.yaml"
# The grid search's three trials, run in this order (one at a time). Only the image tower learns (the other
# learning rates and the temperature are pinned), and every trial starts from the same seeded model. lr 0
# trains nothing: its loss stays at the untrained value while the first trial's falls (2e-3 is the top of the
# smoke space's range), so ASHA (grace period 1, reduction factor 2) stops it at epoch 1 of 2. lr 1e12 blows
# the weights up within a few steps: the epoch's loss is NaN, the workers raise (run.stop_on_nan) before the
# first report, and the trial fails.
GOOD_LR, DEAD_LR, NAN_LR = 2.0e-3, 0.0, 1.0e12


@dataclass
class Search:
    spec: SearchSpec
    out: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    released: tuple[bool, dict[str, Any]]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # run_search starts the local Ray itself (with its dashboard: Train V2 frees a stopped run's placement
    # group through the State API it serves); the tests then inspect that instance and reuse it.
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One synthetic dataset for both searches: the first search prepares it, the second finds it."""
    return tmp_path_factory.mktemp("tune-data") / "data"


def _released(ray, timeout_s: float = 90.0) -> tuple[bool, dict[str, Any]]:
    """Wait until every placement group is REMOVED and all CPUs are free again."""
    from ray.util import placement_group_table

    deadline = time.monotonic() + timeout_s
    while True:
        live = {i: pg["state"] for i, pg in placement_group_table().items() if pg["state"] != "REMOVED"}
        free = ray.available_resources().get("CPU", 0.0)
        total = ray.cluster_resources().get("CPU", 0.0)
        if not live and abs(free - total) < 1e-6:
            return True, {}
        if time.monotonic() > deadline:
            return False, {"live_placement_groups": live, "free_cpu": free, "total_cpu": total}
        time.sleep(1.0)


def _search(ray, spec: SearchSpec, out: Path, what: str) -> Search:
    t0 = time.perf_counter()
    outcome = run_search(spec, str(out))
    print(f"{what}: {time.perf_counter() - t0:.0f} s")  # noqa: T201 - shown with pytest -s, quoted in docs/tune.md
    return Search(spec, out, outcome["rows"], outcome["best"], _released(ray))


@pytest.fixture(scope="module")
def grid_search(ray_local, data_dir, tmp_path_factory) -> Search:
    spec = load_spec(
        SMOKE,
        {
            "data.path": str(data_dir),
            "stages.stage1_epochs": 0,
            "stages.stage2_epochs": 2,
            "optim.lr.text": 0.0,
            "optim.lr.symbol": 0.0,
            "optim.lr.temperature": 0.0,
            "run.max_failures": 0,  # the failing trial is not restarted by Ray Train: it fails at once
            # The untrained loss depends on the temperature: pinned, only learning separates the trials.
            "loss.init_temperature": 0.07,
            "space.optim.lr.image": f"grid([{GOOD_LR}, {DEAD_LR}, {NAN_LR}])",
            # The training loss, not val_f1: a model that learns nothing could still draw a lucky F1.
            "scheduler.metric": "loss",
            "scheduler.mode": "min",
            "scheduler.max_t": 2,
            "num_samples": 1,
        },
    )
    return _search(
        ray_local, spec, tmp_path_factory.mktemp("grid") / "search", "grid search (ASHA, 3 trials)"
    )


# ----------------------------------------------------------------------------- independent of the table


def _trial_records(out: Path, metric: str) -> dict[str, dict[str, Any]]:
    """Per trial, from its own files: the epochs Tune received (result.json) and the metric it logged then."""
    records = {}
    for result_json in sorted((out / "tune").glob("trial_*/result.json")):
        trial = result_json.parent.name
        reports = [json.loads(line) for line in result_json.read_text().splitlines() if line.strip()]
        epochs = reports[-1]["epoch_index"] if reports else 0
        value = None
        if epochs:
            # The trial's own log (rank 0's metrics.jsonl), at the last epoch Tune saw: a stopped trial may
            # have logged one more epoch before the stop reached it.
            log = (out / "trials" / trial / "metrics.jsonl").read_text().splitlines()
            logged = {h["epoch_index"]: h for h in map(json.loads, log)}
            value = logged[epochs][metric]
            assert value == pytest.approx(reports[-1][metric]), trial
        records[trial] = {"epochs": epochs, "value": value, "reports": len(reports)}
    return records


def _get(cfg: config.Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _assert_best_row_is_best_trial(s: Search) -> str:
    """The table's first row and best_config.yaml are the best trial by its own metric; returns that trial."""
    metric, records = s.spec.metric, _trial_records(s.out, s.spec.metric)
    assert set(records) == {r["trial"] for r in s.rows}
    for row in s.rows:
        assert row["epochs"] == records[row["trial"]]["epochs"], row
        expected = records[row["trial"]]["value"]
        assert row[metric] == (None if expected is None else pytest.approx(expected)), row
    finished = {r["trial"] for r in s.rows if r["status"] != "failed"}
    scored = {t: r["value"] for t, r in records.items() if t in finished and r["value"] is not None}
    best = (max if s.spec.mode == "max" else min)(scored, key=scored.__getitem__)
    assert s.rows[0]["trial"] == best and s.best is not None and s.best["trial"] == best, (scored, s.rows)
    with open(s.out / "results.csv") as f:
        assert next(csv.DictReader(f))["trial"] == best

    # best_config.yaml holds the values that trial ran with (its own config.yaml), ready to train.
    tuned = config.load(s.out / "best_config.yaml")
    ran = config.load(s.out / "trials" / best / "config.yaml")
    for key in s.spec.space:
        assert _get(tuned, key) == pytest.approx(_get(ran, key)), key
    assert tuned.run.name.endswith("-tuned") and tuned.stages == ran.stages
    return best


# ----------------------------------------------------------------------------- grid search + ASHA


def test_grid_search_leaves_nothing_reserved(grid_search):
    # Whatever happened to the trials (stopped by ASHA, failed in the workers), every placement group is
    # removed and every CPU free again.
    ok, details = grid_search.released
    assert ok, details


def test_best_row_is_the_best_trial(grid_search):
    best = _assert_best_row_is_best_trial(grid_search)
    assert grid_search.rows[0]["optim.lr.image"] == GOOD_LR, (best, grid_search.rows)


def test_asha_stops_the_trial_that_learns_nothing(grid_search):
    by_lr = {r["optim.lr.image"]: r for r in grid_search.rows}
    records = _trial_records(grid_search.out, "loss")
    good, dead = by_lr[GOOD_LR], by_lr[DEAD_LR]
    assert good["status"] == "completed" and good["epochs"] == good["total_epochs"] == 2, good
    # Stopped by the scheduler at the first rung: no error, one report of the two epochs it was given.
    assert dead["status"] == "stopped" and not dead["error"], dead
    assert dead["epochs"] == 1 and dead["total_epochs"] == 2, dead
    assert records[dead["trial"]]["reports"] == 1
    assert dead["loss"] > good["loss"]


def test_a_failing_trial_fails_alone(grid_search):
    rows = grid_search.rows
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["optim.lr.image"] for r in failed] == [NAN_LR], rows
    assert re.search(r"loss is (nan|-?inf)", failed[0]["error"]), failed[0]
    assert failed[0]["loss"] is None and failed[0]["epochs"] == 0
    assert rows[-1] is failed[0]  # no metric: ranked last
    assert "failed" in (grid_search.out / "results.md").read_text()


def test_outputs_and_trial_runs(grid_search):
    from galaxalign_dist.launch.train import build_trainer, check

    out = grid_search.out
    with open(out / "results.csv") as f:
        header = set(next(csv.DictReader(f)))
    assert {"trial", "status", "loss", "best_loss", "epochs", "error", "optim.lr.image"} <= header
    assert (out / "metric_vs_params.png").stat().st_size > 1000
    best_cfg = config.load(out / "best_config.yaml")
    check(best_cfg)  # config, model and dataset all valid for `galaxalign train --config best_config.yaml`
    build_trainer(best_cfg)  # and a TorchTrainer builds from it
    # Each trial that reported has its own run: config, TensorBoard events, metrics, a checkpoint.
    for row in grid_search.rows:
        if row["status"] == "failed":
            continue
        run = Path(row["run_dir"])
        assert (run / "config.yaml").exists() and list((run / "tensorboard").glob("events.out.tfevents.*"))
        assert list(run.glob("checkpoint_*/state.json")), f"no checkpoint in {run}"
    # Tune's own per-trial results (progress.csv / result.json) are kept under out/tune.
    assert len(list((out / "tune").glob("trial_*/result.json"))) == 3


# ----------------------------------------------------------------------------- Optuna


def _optuna_draws(spec: SearchSpec, n: int) -> list[dict[str, Any]]:
    """The first n points Optuna's TPE sampler, seeded with search.seed, proposes for this space.

    TPE samples its first 10 trials at random (n_startup_trials), so these do not depend on the results.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists: dict[str, Any] = {}
    for key, s in spec.space.items():
        if s.kind == "choice":
            dists[key] = optuna.distributions.CategoricalDistribution(s.values)
        elif s.kind == "randint":
            dists[key] = optuna.distributions.IntDistribution(s.args[0], s.args[1] - 1)
        else:
            dists[key] = optuna.distributions.FloatDistribution(*s.args, log=s.kind == "loguniform")
    direction = "maximize" if spec.mode == "max" else "minimize"
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=spec.seed), direction=direction)
    return [study.ask(dists).params for _ in range(n)]


def test_optuna_search_end_to_end(ray_local, data_dir, tmp_path):
    # The smoke space as the GPU spaces search it: Optuna (TPE) proposing, ASHA on val_f1.
    spec = load_spec(
        SMOKE,
        {"data.path": str(data_dir), "search.algorithm": "optuna", "num_samples": 2},
    )
    s = _search(ray_local, spec, tmp_path / "search", "optuna search (2 trials)")
    ok, details = s.released
    assert ok, details
    assert len(s.rows) == 2 and all(r["status"] in ("completed", "stopped") for r in s.rows), s.rows
    assert all(r["val_f1"] is not None for r in s.rows), s.rows

    # Each trial ran a point Optuna proposed: the search was Optuna's, not Tune's random generator. (Its
    # trial ids are random, so the order the trials ran in is not recorded; compare as a set.)
    proposed = _optuna_draws(spec, 2)
    ran = [{k: r[k] for k in spec.space} for r in s.rows]
    for point in ran:
        assert any(point == pytest.approx(p) for p in proposed), (point, proposed)
    assert ran[0] != ran[1]
    assert "algorithm: optuna" in (s.out / "search.yaml").read_text()
    _assert_best_row_is_best_trial(s)
