"""Ray Tune orchestration: one Ray Train run per trial, the Tuner with its scheduler and search algorithm."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from galaxalign_dist import config as config_mod
from galaxalign_dist.config import Config, ConfigError
from galaxalign_dist.launch.tune_report import collect_rows, write_summary
from galaxalign_dist.launch.tune_space import (
    TIME_ATTR,
    SearchSpec,
    check_spec,
    config_at,
    load_base,
    max_total_epochs,
)
from galaxalign_dist.paths import RunPaths, absolute, is_uri

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- one trial


def trial_config(base: dict[str, Any], point: dict[str, Any], trial_name: str, runs_dir: str) -> Config:
    """base + sampled point, with the trial's own run name and storage under the search's output."""
    return config_at(base, {**point, "run.name": trial_name, "run.out_dir": runs_dir})


def run_trial(point: dict[str, Any], base: dict[str, Any] | None = None, runs_dir: str = "") -> None:
    """What each Tune trial runs (a Train V2 driver function): build this trial's run and fit it.

    Any exception here (a bad sampled value, a worker crash, OOM surfacing as a TrainingFailedError from
    fit()) fails this trial only: Tune records the error and goes on with the others.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from galaxalign_dist.launch.train import build_trainer, check

    assert base is not None
    # The driver checked the base dict; the sampled point makes a new config, checked in trial_config.
    cfg = trial_config(base, point, f"trial_{ray.tune.get_context().get_trial_id()}", runs_dir)
    check(cfg)  # the dataset exists (the driver prepared it); re-checks batch size against it per trial
    paths = RunPaths.of(cfg)
    if paths.local:
        cfg.save(paths.config_file)
    # TuneReportCallback forwards each ray.train.report (rank 0's metrics) to this trial's Tune session.
    build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()  # raises if the run failed


# ----------------------------------------------------------------------------- the search


def default_out(spec: SearchSpec) -> str:
    return f"runs/tune/{spec.name}"


def _pinned_paths(base_cfg: Config) -> dict[str, Any]:
    """Trials run in other processes (other nodes, the trial's own directory): local paths made absolute.

    A pretrained checkpoint is pinned only when it is a local file: otherwise it is an open_clip tag.
    """
    pinned: dict[str, Any] = {"data.path": absolute(base_cfg.data.path)}
    pretrained = base_cfg.model.pretrained
    if pretrained not in ("", "none") and Path(pretrained).exists():
        pinned["model.pretrained"] = absolute(pretrained)
    return pinned


def _search_algorithm(spec: SearchSpec) -> Any:
    from ray.tune.search import BasicVariantGenerator

    points = spec.points_to_evaluate or None
    if spec.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=spec.seed, points_to_evaluate=points)
    # BasicVariantGenerator is not a Searcher: Tune ignores TuneConfig.max_concurrent_trials for it (with
    # only a warning), and on a small host unlimited concurrent trials starve each other's workers.
    return BasicVariantGenerator(
        random_state=spec.seed, points_to_evaluate=points, max_concurrent=spec.max_concurrent_trials
    )


def _scheduler(spec: SearchSpec, base_cfg: Config) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler != "asha":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        max_t=spec.max_t or max_total_epochs(spec, base_cfg),
        grace_period=spec.grace_period,
        reduction_factor=spec.reduction_factor,
    )


def run_search(spec: SearchSpec, out: str | None = None) -> dict[str, Any]:
    """Run the search; writes results.csv/.md, best_config.yaml and metric_vs_params.png into `out`.

    Returns {"rows": [...], "best": row or None, "out": out, "wall_s": seconds}.
    """
    from ray import tune

    from galaxalign_dist.launch.train import check, init_ray

    t0 = time.perf_counter()
    check_spec(spec)
    out = absolute(out or default_out(spec))
    base_cfg = load_base(spec.base_config, spec.overrides)
    check(base_cfg)  # prepares a synthetic dataset once, here, instead of racing in concurrent trials
    pinned = _pinned_paths(base_cfg)
    spec = copy.deepcopy(spec)
    spec.overrides = {**spec.overrides, **pinned}  # search.yaml records the paths the trials used
    base = config_mod.apply_overrides(base_cfg.to_dict(), pinned)  # only paths change: still checked
    # Object storage: the summary files are written locally, then uploaded next to the trials.
    stage_dir = tempfile.mkdtemp(prefix="galaxalign-tune-") if is_uri(out) else out
    Path(stage_dir).mkdir(parents=True, exist_ok=True)
    (Path(stage_dir) / "search.yaml").write_text(spec.to_yaml())

    init_ray()
    check_capacity(spec, base_cfg)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, runs_dir=f"{out}/trials"), spec.resources_per_trial
    )
    tuner = tune.Tuner(
        trainable,
        param_space={k: s.to_tune() for k, s in spec.space.items()},
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=_search_algorithm(spec),
            scheduler=_scheduler(spec, base_cfg),
            num_samples=spec.num_samples,
            # A Searcher (Optuna) gets a ConcurrencyLimiter from this; the random generator gets it above.
            max_concurrent_trials=spec.max_concurrent_trials if spec.algorithm == "optuna" else None,
            trial_name_creator=lambda t: f"trial_{t.trial_id}",
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=out,
            # A failed trial is final (no retry) and never stops the others.
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=1,
        ),
    )
    grid = tuner.fit()
    rows = collect_rows(grid, spec, base, f"{out}/trials")
    best = write_summary(rows, spec, base, base_cfg, Path(stage_dir))
    if stage_dir != out:
        import pyarrow.fs

        pyarrow.fs.copy_files(stage_dir, out)  # object storage: publish the summary next to the trials
    return {"rows": rows, "best": best, "out": out, "wall_s": time.perf_counter() - t0}


def check_capacity(spec: SearchSpec, base_cfg: Config) -> None:
    """Refuse (local Ray) or warn (a cluster, which may autoscale) when concurrent trials cannot all run.

    Each trial holds its driver's reservation plus its workers'; Ray Data's read/transform tasks then need
    one whole free CPU each. Without it the trials' workers wait for batches forever (seen on 2 cores:
    0.01 + 2 x 0.5 CPUs reserved left 0.99 free, and Ray Data never started a task).
    """
    import ray

    e = base_cfg.engine
    trial_cpu = spec.resources_per_trial.get("cpu", 0.0) + e.num_workers * e.cpus_per_worker
    trial_gpu = spec.resources_per_trial.get("gpu", 0.0) + (
        e.num_workers * e.gpus_per_worker if e.use_gpu else 0
    )
    n = spec.max_concurrent_trials
    total = ray.cluster_resources()
    problems = []
    if total.get("CPU", 0.0) < n * trial_cpu + 1.0:
        problems.append(
            f"{n} concurrent trial(s) x {trial_cpu:g} CPUs (driver + {e.num_workers} workers x "
            f"{e.cpus_per_worker:g}) + 1 CPU for Ray Data tasks > the cluster's {total.get('CPU', 0.0):g} CPUs; "
            "lower max_concurrent_trials or engine.cpus_per_worker (e.g. --set engine.cpus_per_worker=0.25)"
        )
    if trial_gpu and total.get("GPU", 0.0) < trial_gpu:
        problems.append(f"a trial needs {trial_gpu:g} GPUs, the cluster has {total.get('GPU', 0.0):g}")
    if not problems:
        return
    msg = "trials would wait forever: " + "; ".join(problems)
    if os.environ.get("RAY_ADDRESS"):
        log.warning("%s (continuing: an autoscaler may still add nodes)", msg)
    else:
        raise ConfigError(msg)
