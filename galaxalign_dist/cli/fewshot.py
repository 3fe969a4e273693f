"""`galaxalign fewshot`: train on stratified fractions of the training set and plot F1 against fraction."""

from __future__ import annotations

import argparse

from galaxalign_dist.cli._common import add_config_arguments, load_config

HELP = "data-fraction curve: F1 after training on stratified fractions of the train split"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, default="demo_cpu")
    p.add_argument("--out", required=True, help="output directory (table, plot, subsets)")
    p.add_argument("--fractions", default="0.01,0.1,0.5,1.0", help="comma-separated, in (0, 1]")


def run(args: argparse.Namespace) -> int:
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        raise ValueError(f"--fractions: expected comma-separated numbers, got {args.fractions!r}") from None
    cfg = load_config(args)
    from galaxalign_dist.launch.experiments import fewshot

    fewshot(cfg, args.out, fractions)
    print(open(f"{args.out}/fewshot.md").read())
    print(f"plot: {args.out}/fewshot.png")
    return 0
