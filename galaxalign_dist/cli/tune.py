"""`galaxalign tune`: a Ray Tune search over run-config fields, one Ray Train run per trial."""

from __future__ import annotations

import argparse

HELP = "search hyperparameters (temperature, per-tower lrs, stage-1 epochs) with Ray Tune"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="search-space YAML, e.g. tune/smoke_cpu.yaml")
    p.add_argument(
        "--out",
        help="search output: trials' runs, results.csv/.md, best_config.yaml, plot (local, NFS or s3://); "
        "default runs/tune/<space name>",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config field for every trial (pins it if searched), e.g. --set data.path=/data/g10; or a "
        "search key: num_samples=8, scheduler.type=fifo, search.seed=1, space.optim.lr.image='loguniform(1e-6, 1e-4)'",
    )
    p.add_argument(
        "--check", action="store_true", help="only validate the space, base config and data; start nothing"
    )


def run(args: argparse.Namespace) -> int:
    from galaxalign_dist.launch.tune_space import load_base, load_spec, sample_point

    spec = load_spec(args.config, args.overrides)  # a typo'd key fails here, before Ray starts
    if args.check:
        from galaxalign_dist.launch.train import check

        sample = sample_point(spec)
        check(load_base(spec.base_config, spec.overrides))
        print(
            f"search space OK: {len(spec.space)} searched keys, {spec.num_samples} samples, {spec.scheduler} on {spec.metric}"
        )
        print(f"a sampled point builds a valid run config: {sample}")
        return 0
    from galaxalign_dist.launch.tune_run import run_search

    outcome = run_search(spec, args.out)
    rows, best, out = outcome["rows"], outcome["best"], outcome["out"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "failed", "no result")}
    print()
    print(f"search finished in {outcome['wall_s']:.0f} s: {len(rows)} trials {counts}")
    print(f"  results:      {out}/results.md  (and results.csv)")
    print(f"  plot:         {out}/metric_vs_params.png")
    print(f"  trials' runs: {out}/trials/<trial>/  (tensorboard --logdir {out}/trials)")
    if best is None:
        print(f"  no trial reported {spec.metric}; see the error column of results.md")
        return 1
    print(
        f"  best:         {best['trial']} {spec.metric}={best[spec.metric]:.4f} {[best[k] for k in spec.space]}"
    )
    print(f"  train it:     galaxalign train --config {out}/best_config.yaml")
    return 0
