"""A search-space YAML -> a checked SearchSpec: every key a run-config field, every sampled value a valid config."""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from galaxalign_dist import config as config_mod
from galaxalign_dist.config import Config, ConfigError
from galaxalign_dist.launch.tune_samplers import Sampler, parse_sampler

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
# What the per-worker loop reports each epoch that is worth optimising (validation runs every epoch
# by default; `loss` is the training loss, always reported).
METRICS = ("val_f1", "val_accuracy", "val_map", "val_map_at_5", "loss")
TIME_ATTR = "epoch_index"  # global epoch across both stages: monotonic, one report per epoch
# Set per trial by the search itself: a sampled or fixed value would be overwritten.
PER_TRIAL_KEYS = ("run.name", "run.out_dir")


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
        asha = {
            "grace_period": self.grace_period,
            "max_t": self.max_t,
            "reduction_factor": self.reduction_factor,
        }
        data = {
            "base_config": self.base_config,
            "overrides": self.overrides,
            "space": {k: s.text for k, s in self.space.items()},
            "search": {"algorithm": self.algorithm, "seed": self.seed},
            "scheduler": {
                "type": self.scheduler,
                "metric": self.metric,
                "mode": self.mode,
                **(asha if self.scheduler == "asha" else {}),
            },
            "num_samples": self.num_samples,
            "max_concurrent_trials": self.max_concurrent_trials,
            "resources_per_trial": self.resources_per_trial,
            **({"points_to_evaluate": self.points_to_evaluate} if self.points_to_evaluate else {}),
        }
        return yaml.safe_dump(data, sort_keys=False)


def load_base(base_config: str, overrides: dict[str, Any]) -> Config:
    """The base run config, checked: a packaged name or a path, relative paths taken from the current directory."""
    return config_mod.load(base_config, overrides)


def config_at(base: dict[str, Any], point: dict[str, Any]) -> Config:
    """The base run config (a dict checked where it was loaded) at `point`: a new config, so checked here."""
    cfg = config_mod.from_dict(config_mod.apply_overrides(base, point), validate=False)
    config_mod.check(cfg)
    return cfg


# ----------------------------------------------------------------------------- parsing


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
        if head in ("space", "overrides", "search", "scheduler", "resources_per_trial") and rest:
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
    """Read and check a search-space YAML (plus `--set` pairs); nothing starts, every problem names its key."""
    p = Path(path)
    raw = config_mod.read_yaml_mapping(p, "search-space file")
    if sets:
        pairs = dict(config_mod.parse_override(s) for s in sets) if isinstance(sets, list) else sets
        raw = _apply_sets(raw, pairs)
    return spec_from_dict(raw, name=p.stem)


def _int(where: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return value


def spec_from_dict(raw: dict[str, Any], name: str = "search") -> SearchSpec:
    """A search-space mapping (as read from YAML) -> a checked SearchSpec."""
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
    check_spec(spec)
    return spec


# ----------------------------------------------------------------------------- checks


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


def _check_settings(spec: SearchSpec) -> None:
    """The search's own settings: algorithm, scheduler, metric, resources, the points to try first."""
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
            # Tune rejects 0; the driver only waits on fit(), so a sliver of a CPU is enough (docs/tune.md).
            raise ConfigError(f"resources_per_trial.{res}: must be > 0 (use 0.01 for the driver's CPU)")
    for i, point in enumerate(spec.points_to_evaluate):
        if not isinstance(point, dict):
            raise ConfigError(f"points_to_evaluate[{i}]: expected a mapping of searched keys to values")
        for key in point:
            if key not in spec.space:
                raise ConfigError(f"points_to_evaluate[{i}].{key}: not a searched key (see space:)")


def _config_or_error(base: dict[str, Any], point: dict[str, Any], what: str) -> Config:
    try:
        return config_at(base, point)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None


def check_spec(spec: SearchSpec) -> Config:
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
    _check_settings(spec)

    base_cfg = load_base(spec.base_config, spec.overrides)
    base = base_cfg.to_dict()
    # Every option of choice/grid and both ends of each range, one key at a time: a bad value fails here
    # with its key, not hours later inside a trial.
    for key, sampler in spec.space.items():
        for value in sampler.probe_values():
            _config_or_error(base, {key: value}, f"space.{key}: {sampler.text}: value {value!r}")
    for i, point in enumerate(spec.points_to_evaluate):
        _config_or_error(base, point, f"points_to_evaluate[{i}]")
    sample = sample_point(spec)
    cfg = _config_or_error(base, sample, f"sampled point {sample}")

    # Each epoch's report must carry the metric, or the scheduler cannot rank trials (and Tune errors).
    every = base_cfg.run.eval_every_epochs
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


# ----------------------------------------------------------------------------- epochs and samples


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
