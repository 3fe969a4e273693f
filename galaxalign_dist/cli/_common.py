"""Shared CLI options: --config, --set overrides and the ScalingConfig shortcuts."""

from __future__ import annotations

import argparse

from galaxalign_dist import config as config_mod


def add_config_arguments(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument(
        "--config",
        default=default,
        help="YAML run config: a file, or a packaged name (" + ", ".join(config_mod.list_packaged()) + ")",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted path, e.g. --set engine.zero_stage=3 (repeatable)",
    )
    p.add_argument("--num-workers", type=int, help="Ray Train workers (engine.num_workers)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker (engine.use_gpu)")


def load_config(args: argparse.Namespace, extra: dict | None = None) -> config_mod.Config:
    """The run config from --config/--set and flag shortcuts; errors name the dotted key."""
    pairs = dict(config_mod.parse_override(o) for o in args.overrides)
    if args.num_workers is not None:
        pairs["engine.num_workers"] = args.num_workers
    if args.use_gpu:
        pairs["engine.use_gpu"] = True
    pairs.update(extra or {})
    return config_mod.load(args.config, pairs)
