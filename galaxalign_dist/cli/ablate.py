"""`galaxalign ablate`: the paper's ablation variants on one dataset and seed, as a Table-4-style table."""

from __future__ import annotations

import argparse

from galaxalign_dist.cli._common import add_config_arguments, load_config

HELP = "train + evaluate CLIP-only, v1, v2, v3, Scratch, GalaxAlign and class-aware variants; write a table"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, default="demo_cpu")
    p.add_argument("--out", required=True, help="output directory (table, per-variant configs, exports)")
    p.add_argument("--variants", help="comma-separated subset (default: all)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from galaxalign_dist.launch.experiments import ablate

    names = [v.strip() for v in args.variants.split(",")] if args.variants else None
    ablate(cfg, args.out, names)
    print(open(f"{args.out}/ablation.md").read())
    return 0
