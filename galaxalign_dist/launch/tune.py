"""Ray Tune searches: a search-space YAML -> checked samplers -> one Ray Train run per trial -> table, best config, plot."""

from __future__ import annotations

import ast
import copy
import csv
import difflib
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from galaxalign_dist import config as config_mod
from galaxalign_dist.config import Config, ConfigError

log = logging.getLogger(__name__)

TOP_LEVEL = (
    "base_config",
    "overrides",
    "space",
    "search",
    "scheduler",
    "num_samples",
    "max_concurrent_trials",
    "resources_per_trial",
    "points_to_evaluate",
)
SAMPLERS = ("loguniform", "uniform", "randint", "choice", "grid")
# What the per-worker loop reports each epoch that is worth optimising (validation runs every epoch
# by default; `loss` is the training loss, always reported).
METRICS = ("val_f1", "val_accuracy", "val_map", "val_map_at_5", "loss")
TIME_ATTR = "epoch_index"  # global epoch across both stages: monotonic, one report per epoch
# Set per trial by the search itself: a sampled or fixed value would be overwritten.
PER_TRIAL_KEYS = ("run.name", "run.out_dir")
RESULT_FILES = ("results.csv", "results.md", "best_config.yaml", "metric_vs_params.png")


# ----------------------------------------------------------------------------- samplers


@dataclass(frozen=True)
class Sampler:
    """One parsed `kind(args)` entry of `space:`; `text` is what the user wrote (for messages and tables)."""

    kind: str
    args: tuple[Any, ...]
    text: str

    @property
    def values(self) -> list[Any]:
        return list(self.args[0]) if self.kind in ("choice", "grid") else []

    @property
    def categorical(self) -> bool:
        return self.kind in ("choice", "grid")

    def to_tune(self) -> Any:
        """The ray.tune domain (or grid_search dict) this sampler stands for."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "randint":
            return tune.randint(*self.args)  # Ray's convention: lo <= x < hi
        if self.kind == "choice":
            return tune.choice(self.values)
        return tune.grid_search(self.values)

    def probe_values(self) -> list[Any]:
        """Values that exercise the range in validation: ends of a range (just inside an open end), or every option."""
        if self.categorical:
            return self.values
        lo, hi = self.args[0], self.args[1]
        if self.kind == "randint":
            return [lo, hi - 1]
        # Continuous samplers never return `hi` itself; probe just below so an exclusive config bound
        # such as loss.init_temperature < 1 is not reported for a value that cannot occur.
        return [float(lo), float(hi) - (float(hi) - float(lo)) * 1e-9]


_CALL = re.compile(r"\s*([A-Za-z_]\w*)\s*\((.*)\)\s*", re.S)


def parse_sampler(key: str, text: Any) -> Sampler:
    """`loguniform(1e-5, 1e-3)` -> Sampler; arguments are Python literals read with ast.literal_eval (no eval)."""
    where = f"space.{key}"
    if not isinstance(text, str):
        raise ConfigError(
            f"{where}: expected a sampler such as loguniform(1e-5, 1e-3) or choice([1, 2]), got {text!r} "
            "(fixed values go under `overrides:`)"
        )
    m = _CALL.fullmatch(text)
    if not m:
        raise ConfigError(f"{where}: {text!r} is not a sampler call; use one of {', '.join(SAMPLERS)}")
    kind, body = m.group(1), m.group(2)
    if kind not in SAMPLERS:
        raise ConfigError(f"{where}: unknown sampler {kind!r}; use one of {', '.join(SAMPLERS)}")
    try:
        args = ast.literal_eval(f"({body},)") if body.strip() else ()
    except (ValueError, SyntaxError):
        raise ConfigError(f"{where}: cannot read the arguments of {text!r} (Python literals only)") from None
    if kind in ("choice", "grid"):
        if len(args) != 1 or not isinstance(args[0], (list, tuple)) or not args[0]:
            raise ConfigError(f"{where}: {kind} takes one non-empty list, e.g. {kind}([1, 2])")
        return Sampler(kind, (list(args[0]),), text.strip())
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}: {kind} takes two numbers (low, high), got {text!r}")
    lo, hi = args
    if not lo < hi:
        raise ConfigError(f"{where}: {kind} needs low < high, got {text!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {text!r}")
    if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ConfigError(f"{where}: randint takes integers (low inclusive, high exclusive), got {text!r}")
    return Sampler(kind, (lo, hi), text.strip())


# ----------------------------------------------------------------------------- the search spec


@dataclass
class SearchSpec:
    """A search-space YAML, parsed and checked; see tune/*.yaml and docs/tune.md."""

    name: str
    base_config: str
    overrides: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Sampler] = field(default_factory=dict)
    algorithm: str = "random"  # random | optuna
    seed: int = 0
    scheduler: str = "fifo"  # fifo | asha
    metric: str = "val_f1"
    mode: str = "max"
    grace_period: int = 1
    max_t: int = 0  # 0 = the longest trial's total epochs
    reduction_factor: float = 2.0
    num_samples: int = 1
    max_concurrent_trials: int = 1
    resources_per_trial: dict[str, float] = field(default_factory=lambda: {"cpu": 0.01})
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)

    def base_dict(self) -> dict[str, Any]:
        """The run config every trial starts from (base + fixed overrides) as a plain dict."""
        return load_base(self.base_config, self.overrides).to_dict()

    def to_yaml(self) -> str:
        data = {
            "base_config": self.base_config,
            "overrides": self.overrides,
            "space": {k: s.text for k, s in self.space.items()},
            "search": {"algorithm": self.algorithm, "seed": self.seed},
            "scheduler": {
                "type": self.scheduler,
                "metric": self.metric,
                "mode": self.mode,
                **(
                    {
                        "grace_period": self.grace_period,
                        "max_t": self.max_t,
                        "reduction_factor": self.reduction_factor,
                    }
                    if self.scheduler == "asha"
                    else {}
                ),
            },
            "num_samples": self.num_samples,
            "max_concurrent_trials": self.max_concurrent_trials,
            "resources_per_trial": self.resources_per_trial,
            **({"points_to_evaluate": self.points_to_evaluate} if self.points_to_evaluate else {}),
        }
        return yaml.safe_dump(data, sort_keys=False)


def load_base(base_config: str, overrides: dict[str, Any]) -> Config:
    """The base run config: a packaged name or a path, relative paths taken from the current directory."""
    return config_mod.load(base_config, overrides)


def _section(raw: dict[str, Any], name: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping, got {value!r}")
    for key in value:
        if key not in allowed:
            raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(allowed)})")
    return value


def _apply_sets(raw: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    """`--set` on a search: search keys (num_samples, scheduler.type, space.X, ...) or run-config keys.

    A run-config key also pins it: if it was searched, it leaves the space (e.g. `--set stages.stage1_epochs=1`).
    """
    raw = copy.deepcopy(raw)
    for dotted, value in sets.items():
        head, _, rest = dotted.partition(".")
        if head in ("space", "overrides") and rest:
            raw.setdefault(head, {})
            raw[head][rest] = value
        elif head in ("search", "scheduler", "resources_per_trial") and rest:
            raw.setdefault(head, {})
            raw[head][rest] = value
        elif head in TOP_LEVEL and not rest:
            raw[head] = value
        else:
            raw.setdefault("overrides", {})
            raw["overrides"][dotted] = value
            (raw.get("space") or {}).pop(dotted, None)
    return raw


def load_spec(path: str | Path, sets: list[str] | dict[str, Any] | None = None) -> SearchSpec:
    """Read and validate a search-space YAML (plus `--set` pairs); nothing starts, every problem names its key."""
    p = Path(path)
    raw = config_mod.read_yaml_mapping(p, "search-space file")
    if sets:
        pairs = dict(config_mod.parse_override(s) for s in sets) if isinstance(sets, list) else sets
        raw = _apply_sets(raw, pairs)
    return spec_from_dict(raw, name=p.stem)


def spec_from_dict(raw: dict[str, Any], name: str = "search") -> SearchSpec:
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(
                f"{key}: unknown top-level key of a search space (known: {', '.join(TOP_LEVEL)})"
            )
    if "base_config" not in raw:
        raise ConfigError("base_config: missing (a packaged config name such as demo_cpu, or a YAML path)")
    overrides = raw.get("overrides") or {}
    space_raw = raw.get("space") or {}
    for sec, val in (("overrides", overrides), ("space", space_raw)):
        if not isinstance(val, dict):
            raise ConfigError(f"{sec}: expected a mapping of dotted config keys, got {val!r}")
    if not space_raw:
        raise ConfigError("space: empty; name at least one dotted config key to search")
    search = _section(raw, "search", ("algorithm", "seed"))
    sched = _section(
        raw, "scheduler", ("type", "metric", "mode", "grace_period", "max_t", "reduction_factor")
    )
    resources = _section(raw, "resources_per_trial", ("cpu", "gpu", "memory"))

    def _int(where: str, value: Any, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{where}: expected an integer >= {minimum}, got {value!r}")
        return value

    spec = SearchSpec(
        name=name,
        base_config=str(raw["base_config"]),
        overrides={str(k): v for k, v in overrides.items()},
        space={str(k): parse_sampler(str(k), v) for k, v in space_raw.items()},
        algorithm=str(search.get("algorithm", "random")),
        seed=_int("search.seed", search.get("seed", 0), 0),
        scheduler=str(sched.get("type", "fifo")),
        metric=str(sched.get("metric", "val_f1")),
        mode=str(sched.get("mode", "max")),
        grace_period=_int("scheduler.grace_period", sched.get("grace_period", 1), 1),
        max_t=_int("scheduler.max_t", sched.get("max_t", 0), 0),
        reduction_factor=float(sched.get("reduction_factor", 2)),
        num_samples=_int("num_samples", raw.get("num_samples", 1), 1),
        max_concurrent_trials=_int("max_concurrent_trials", raw.get("max_concurrent_trials", 1), 1),
        resources_per_trial={str(k): float(v) for k, v in (resources or {"cpu": 0.01}).items()},
        points_to_evaluate=list(raw.get("points_to_evaluate") or []),
    )
    validate_spec(spec)
    return spec


def _key_check(where: str, key: str, known: dict[str, Any]) -> None:
    if key not in known:
        close = difflib.get_close_matches(key, list(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{where}.{key}: not a run-config field{hint}")


def _type_check(key: str, sampler: Sampler, tp: Any) -> None:
    if tp is int and sampler.kind in ("loguniform", "uniform"):
        raise ConfigError(
            f"space.{key}: is an integer field; {sampler.kind} draws floats, use randint, choice or grid"
        )
    if tp in (str, bool) and not sampler.categorical:
        raise ConfigError(f"space.{key}: is a {tp.__name__} field; use choice([...]) or grid([...])")


def validate_spec(spec: SearchSpec) -> Config:
    """Check every key and sampler against the Config, then build one sampled trial Config; returns it."""
    known = config_mod.flat_keys()
    for key in spec.overrides:
        _key_check("overrides", key, known)
    for key, sampler in spec.space.items():
        _key_check("space", key, known)
        if key in PER_TRIAL_KEYS:
            raise ConfigError(
                f"space.{key}: set per trial by the search (unique name, under --out); not searchable"
            )
        if key in spec.overrides:
            raise ConfigError(f"space.{key}: also fixed under overrides; keep one")
        _type_check(key, sampler, known[key])
    if spec.algorithm not in ("random", "optuna"):
        raise ConfigError(f"search.algorithm: {spec.algorithm!r} is not one of random, optuna")
    if spec.algorithm == "optuna" and any(s.kind == "grid" for s in spec.space.values()):
        raise ConfigError(
            "space: grid([...]) needs search.algorithm: random (Optuna samples; use choice([...]))"
        )
    if spec.scheduler not in ("fifo", "asha"):
        raise ConfigError(f"scheduler.type: {spec.scheduler!r} is not one of fifo, asha")
    if spec.metric not in METRICS:
        raise ConfigError(f"scheduler.metric: {spec.metric!r} is not one of {', '.join(METRICS)}")
    if spec.mode not in ("max", "min"):
        raise ConfigError(f"scheduler.mode: {spec.mode!r} is not one of max, min")
    if spec.reduction_factor <= 1:
        raise ConfigError(f"scheduler.reduction_factor: must be > 1, got {spec.reduction_factor}")
    for res, amount in spec.resources_per_trial.items():
        if not amount > 0:
            # Tune rejects 0; the driver only waits on fit(), so a sliver of a CPU is enough (DESIGN.md).
            raise ConfigError(f"resources_per_trial.{res}: must be > 0 (use 0.01 for the driver's CPU)")
    for i, point in enumerate(spec.points_to_evaluate):
        if not isinstance(point, dict):
            raise ConfigError(f"points_to_evaluate[{i}]: expected a mapping of searched keys to values")
        for key in point:
            if key not in spec.space:
                raise ConfigError(f"points_to_evaluate[{i}].{key}: not a searched key (see space:)")

    base_cfg = load_base(spec.base_config, spec.overrides)
    base = base_cfg.to_dict()
    # Every option of choice/grid and both ends of each range, one key at a time: a bad value fails here
    # with its key, not hours later inside a trial.
    for key, sampler in spec.space.items():
        for value in sampler.probe_values():
            _build_checked(base, {key: value}, f"space.{key}: {sampler.text}: value {value!r}")
    for i, point in enumerate(spec.points_to_evaluate):
        _build_checked(base, point, f"points_to_evaluate[{i}]")
    sample = sample_point(spec)
    cfg = _build_checked(base, sample, f"sampled point {sample}")

    # Each epoch's report must carry the metric, or the scheduler cannot rank trials (and Tune errors).
    every = config_mod.from_dict(base).run.eval_every_epochs
    if spec.metric.startswith("val_") and spec.scheduler == "asha" and every != 1:
        raise ConfigError(
            f"run.eval_every_epochs: ASHA ranks trials on {spec.metric} every epoch; set it to 1 (is {every})"
        )
    if spec.scheduler == "asha":
        stage1 = max_stage1_epochs(spec, base_cfg)
        if spec.grace_period < stage1:
            # Stage boundaries: ASHA may only stop a trial after its (searched) warm-up stage is over.
            raise ConfigError(
                f"scheduler.grace_period: {spec.grace_period} < the longest stage 1 ({stage1} epochs); ASHA "
                "would stop trials during their warm-up and so favour short warm-ups. Set grace_period >= "
                f"{stage1} (see docs/tune.md, 'Stages and ASHA')"
            )
        if spec.max_t and spec.max_t < spec.grace_period:
            raise ConfigError(f"scheduler.max_t: {spec.max_t} < grace_period {spec.grace_period}")
    return cfg


def _build_checked(base: dict[str, Any], point: dict[str, Any], what: str) -> Config:
    try:
        return config_mod.from_dict(config_mod.apply_overrides(base, point))
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None


def max_stage1_epochs(spec: SearchSpec, base_cfg: Config) -> int:
    return _max_over(spec, "stages.stage1_epochs", base_cfg.stages.stage1_epochs)


def max_total_epochs(spec: SearchSpec, base_cfg: Config) -> int:
    s = base_cfg.stages
    return _max_over(spec, "stages.stage1_epochs", s.stage1_epochs) + _max_over(
        spec, "stages.stage2_epochs", s.stage2_epochs
    )


def _max_over(spec: SearchSpec, key: str, default: int) -> int:
    sampler = spec.space.get(key)
    if sampler is None:
        return int(default)
    return int(max(sampler.probe_values()))


def sample_point(spec: SearchSpec) -> dict[str, Any]:
    """One point of the space (grid: its first value), drawn with the search seed without starting Ray."""
    import numpy as np

    rng = np.random.RandomState(spec.seed)
    point: dict[str, Any] = {}
    for key, sampler in spec.space.items():
        if sampler.kind == "grid":
            point[key] = sampler.values[0]
        else:
            point[key] = sampler.to_tune().sample(random_state=rng)
    return {k: v.item() if hasattr(v, "item") else v for k, v in point.items()}


# ----------------------------------------------------------------------------- one trial


def trial_config(base: dict[str, Any], point: dict[str, Any], trial_name: str, runs_dir: str) -> Config:
    """base + sampled point, with the trial's own run name and storage under the search's output."""
    data = config_mod.apply_overrides(base, {**point, "run.name": trial_name, "run.out_dir": runs_dir})
    return config_mod.from_dict(data)


def _trial(point: dict[str, Any], base: dict[str, Any] | None = None, runs_dir: str = "") -> None:
    """What each Tune trial runs (a Train V2 driver function): build this trial's run and fit it.

    Any exception here (a bad sampled value, a worker crash, OOM surfacing as a TrainingFailedError from
    fit()) fails this trial only: Tune records the error and goes on with the others.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from galaxalign_dist.launch.train import build_trainer, check, run_dir

    assert base is not None
    name = f"trial_{ray.tune.get_context().get_trial_id()}"
    cfg = trial_config(base, point, name, runs_dir)
    check(cfg)  # the dataset exists (the driver prepared it); re-checks batch size against it per trial
    if "://" not in run_dir(cfg):
        Path(run_dir(cfg)).mkdir(parents=True, exist_ok=True)
        cfg.save(Path(run_dir(cfg)) / "config.yaml")
    # TuneReportCallback forwards each ray.train.report (rank 0's metrics) to this trial's Tune session.
    build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()  # raises if the run failed


# ----------------------------------------------------------------------------- the search


def _absolute_paths(overrides: dict[str, Any], base_cfg: Config) -> dict[str, Any]:
    """Trials run in other processes (other nodes, another cwd): pin relative local paths to absolute ones."""
    out = dict(overrides)
    if "://" not in base_cfg.data.path:
        out["data.path"] = str(Path(base_cfg.data.path).resolve())
    pretrained = base_cfg.model.pretrained
    if pretrained not in ("", "none") and Path(pretrained).exists():
        out["model.pretrained"] = str(Path(pretrained).resolve())
    return out


def default_out(spec: SearchSpec) -> str:
    return f"runs/tune/{spec.name}"


def _storage(out: str) -> str:
    return out if "://" in out else str(Path(out).resolve())


def run_search(spec: SearchSpec, out: str | None = None) -> dict[str, Any]:
    """Run the search; writes results.csv/.md, best_config.yaml and metric_vs_params.png into `out`.

    Returns {"rows": [...], "best": row or None, "out": out, "wall_s": seconds}.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from galaxalign_dist.launch.train import check, init_ray

    t0 = time.perf_counter()
    validate_spec(spec)
    out = _storage(out or default_out(spec))
    base_cfg = load_base(spec.base_config, spec.overrides)
    check(base_cfg)  # prepares a synthetic dataset once, here, instead of racing in concurrent trials
    spec = copy.deepcopy(spec)
    spec.overrides = _absolute_paths(spec.overrides, base_cfg)
    base = spec.base_dict()
    stage_dir = out if "://" not in out else tempfile.mkdtemp(prefix="galaxalign-tune-")
    Path(stage_dir).mkdir(parents=True, exist_ok=True)
    (Path(stage_dir) / "search.yaml").write_text(spec.to_yaml())

    if spec.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg: Any = OptunaSearch(seed=spec.seed, points_to_evaluate=spec.points_to_evaluate or None)
    else:
        # BasicVariantGenerator is not a Searcher: Tune ignores TuneConfig.max_concurrent_trials for it (with
        # only a warning), and on a small host unlimited concurrent trials starve each other's workers.
        search_alg = BasicVariantGenerator(
            random_state=spec.seed,
            points_to_evaluate=spec.points_to_evaluate or None,
            max_concurrent=spec.max_concurrent_trials,
        )
    if spec.scheduler == "asha":
        scheduler: Any = ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=spec.max_t or max_total_epochs(spec, base_cfg),
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()

    init_ray()
    check_capacity(spec, base_cfg)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, runs_dir=f"{out}/trials"), spec.resources_per_trial
    )
    tuner = tune.Tuner(
        trainable,
        param_space={k: s.to_tune() for k, s in spec.space.items()},
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=search_alg,
            scheduler=scheduler,
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


def collect_rows(grid: Any, spec: SearchSpec, base: dict[str, Any], runs_dir: str) -> list[dict[str, Any]]:
    """One row per trial: sampled params, final and best metric, status, error, where its run lives."""
    rows = []
    for result in grid:
        point = {k: (result.config or {}).get(k) for k in spec.space}
        metrics = result.metrics or {}
        trial = Path(str(result.path)).name
        total = sum(
            int(point.get(k) if point.get(k) is not None else base["stages"][k.split(".")[1]])
            for k in ("stages.stage1_epochs", "stages.stage2_epochs")
        )
        history = result.metrics_dataframe
        best_value = None
        if history is not None and spec.metric in getattr(history, "columns", []):
            series = history[spec.metric].dropna()
            if len(series):
                best_value = float(series.max() if spec.mode == "max" else series.min())
        epochs = int(metrics.get(TIME_ATTR, 0) or 0)
        if result.error is not None:
            status = "failed"
        elif epochs == 0:
            status = "no result"  # interrupted (Ctrl-C, time budget) before its first epoch ended
        elif epochs < total:
            status = "stopped"  # by the scheduler (ASHA), before its last epoch
        else:
            status = "completed"
        error = error_summary(result.error) if result.error is not None else ""
        value = metrics.get(spec.metric)
        rows.append(
            {
                "trial": trial,
                "status": status,
                spec.metric: float(value) if isinstance(value, (int, float)) else None,
                f"best_{spec.metric}": best_value,
                "epochs": epochs,
                "total_epochs": total,
                **point,
                "run_dir": f"{runs_dir}/{trial}",
                "error": error,
            }
        )
    return sort_rows(rows, spec.metric, spec.mode)


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b[^:]*:")


def error_summary(error: BaseException, limit: int = 300) -> str:
    """One line for the table: the innermost `SomeError: message` of Ray's wrapped traceback text."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if _EXC_LINE.match(lines[i]):
            text = lines[i]
            if text.endswith(":") and i + 1 < len(lines):
                text += " " + lines[i + 1]  # Ray puts the message on the next line
            if i + 2 < len(lines):
                # Ray truncates workers' tracebacks; their last line is usually the cause (e.g. OOM kills).
                text = f"{text[: limit // 2]} ... {lines[-1][-(limit // 2) :]}"
            return text[:limit]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:limit]


def sort_rows(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Best first by the metric at each trial's last reported epoch; trials without it (failed) last."""

    def key(row: dict[str, Any]) -> tuple[int, float]:
        v = row.get(metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return (1, 0.0)
        return (0, -v if mode == "max" else v)

    return sorted(rows, key=key)


# ----------------------------------------------------------------------------- outputs


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_summary(
    rows: list[dict[str, Any]], spec: SearchSpec, base: dict[str, Any], base_cfg: Config, out: Path
) -> dict[str, Any] | None:
    """results.csv, results.md, best_config.yaml and metric_vs_params.png; returns the best row."""
    out.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else ["trial", "status", spec.metric, *spec.space, "error"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    md_cols = [c for c in columns if c != "run_dir"]
    lines = [
        f"# Search `{spec.name}`: {spec.metric} ({spec.mode}), {spec.scheduler} scheduler, {spec.algorithm} search",
        "",
        "| " + " | ".join(md_cols) + " |",
        "|" + "---|" * len(md_cols),
    ]
    for row in rows:
        cells = [_fmt(row.get(c)).replace("|", "\\|").replace("\n", " ") for c in md_cols]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    best = next((r for r in rows if r.get(spec.metric) is not None and r["status"] != "failed"), None)
    if best is not None:
        point = {k: best[k] for k in spec.space}
        # Ready to train: the trial's config, but named and stored like the base run, not inside the search.
        cfg = config_mod.from_dict(
            config_mod.apply_overrides(
                base,
                {
                    **point,
                    "run.name": f"{base_cfg.run.name}-tuned",
                    "run.out_dir": base_cfg.run.out_dir,
                },
            )
        )
        header = (
            f"# Best trial of search '{spec.name}': {best['trial']}, {spec.metric}={_fmt(best[spec.metric])} "
            f"(last epoch, {best['status']}).\n"
            f"# Searched values: {point}\n"
            f"# Train it:  galaxalign train --config {out / 'best_config.yaml'}\n"
        )
        (out / "best_config.yaml").write_text(header + cfg.to_yaml())
    plot_metric_vs_params(rows, spec, out / "metric_vs_params.png")
    return best


def _option_index(options: list[Any], value: Any) -> int:
    """Position of a drawn value among choice/grid options (CSV round trips turn 1 into 1.0 or '1')."""
    for i, option in enumerate(options):
        if option == value or str(option) == str(value):
            return i
    return -1


def plot_metric_vs_params(rows: list[dict[str, Any]], spec: SearchSpec, path: Path) -> None:
    """One panel per searched key: the metric of each finished trial against the value it drew."""
    import matplotlib

    matplotlib.use("Agg")  # headless: cluster heads and CI have no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    keys = list(spec.space)
    n = len(keys)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    done = [r for r in rows if r.get(spec.metric) is not None]
    best = done[0] if done else None
    for ax, key in zip(axes.flat, keys, strict=False):
        sampler = spec.space[key]
        xs = [r[key] for r in done]
        ys = [r[spec.metric] for r in done]
        colors = ["tab:orange" if r["status"] == "stopped" else "tab:blue" for r in done]
        if sampler.categorical:
            labels = [str(v) for v in dict.fromkeys(sampler.values)]
            options = list(dict.fromkeys(sampler.values))
            xs = [_option_index(options, x) for x in xs]
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            if sampler.kind == "loguniform":
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor log labels overlap
            lo, hi = sampler.args
            pad = (hi / lo) ** 0.05 if sampler.kind == "loguniform" else (hi - lo) * 0.05
            # The whole sampled range, so where the trials landed inside it is visible.
            ax.set_xlim(lo / pad, hi * pad) if sampler.kind == "loguniform" else ax.set_xlim(
                lo - pad, hi + pad
            )
        ax.scatter(xs, ys, c=colors, s=30)
        if best is not None:
            bx = (
                _option_index(list(dict.fromkeys(sampler.values)), best[key])
                if sampler.categorical
                else best[key]
            )
            ax.scatter([bx], [best[spec.metric]], marker="*", s=180, c="tab:red", label="best")
        ax.set_xlabel(f"{key}\n{sampler.text}", fontsize=8)
        ax.set_ylabel(spec.metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    failed = sum(r["status"] == "failed" for r in rows)
    fig.suptitle(
        f"{spec.name}: {spec.metric} at each trial's last epoch "
        f"({len(done)} trials; blue completed, orange stopped early; {failed} failed not shown)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
