"""`galaxalign train`: check the config and data, then train with Ray Train + DeepSpeed."""

from __future__ import annotations

import argparse

from galaxalign_dist.cli._common import add_config_arguments, load_config

HELP = "train GalaxAlign (stage 1 -> stage 2) with DeepSpeed ZeRO under Ray Train"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--name", help="run name (run.name)")
    p.add_argument("--out-dir", help="storage for runs: local dir, NFS, s3:// (run.out_dir)")
    p.add_argument("--check", action="store_true", help="only validate config and data, start nothing")


def run(args: argparse.Namespace) -> int:
    extra = {k: v for k, v in (("run.name", args.name), ("run.out_dir", args.out_dir)) if v}
    cfg = load_config(args, extra)  # a bad config fails here, before Ray starts
    from galaxalign_dist.launch.train import check, fit
    from galaxalign_dist.paths import RunPaths

    if args.check:
        meta = check(cfg)
        rows = {split: info["rows"] for split, info in meta["splits"].items()}
        print(
            f"config and data OK: rows {rows}; micro batch {cfg.micro_batch_size}, negatives per loss {cfg.negatives_per_loss}"
        )
        return 0
    result = fit(cfg)
    print(f"run directory:   {RunPaths.of(cfg).run_dir}")
    print(f"checkpoint:      {result.checkpoint.path if result.checkpoint else None}")
    print(f"tensorboard:     tensorboard --logdir {RunPaths.of(cfg).tensorboard}")
    shown = {k: round(v, 4) for k, v in (result.metrics or {}).items() if isinstance(v, float)}
    print(f"final metrics:   {shown}")
    return 0
