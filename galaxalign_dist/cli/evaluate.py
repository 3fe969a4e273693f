"""`galaxalign eval`: classification heads, similarity search and figures for an exported model."""

from __future__ import annotations

import argparse
import json

HELP = "evaluate an exported model on a prepared dataset: metrics.json + figures"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an exported model directory (galaxalign export / demo's export/)")
    p.add_argument("--data", required=True, help="a prepared dataset directory")
    p.add_argument("--out", required=True, help="output directory for metrics.json and figures")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--train-split", default="train", help="split for the linear probe and symbol prototypes")
    p.add_argument("--max-train-rows", type=int, default=20000, help="rows of the train split to embed")
    p.add_argument("--no-figures", action="store_true", help="metrics only")
    p.add_argument("--embeddings", help="read a `galaxalign embed` output instead of embedding --data again")


def run(args: argparse.Namespace) -> int:
    from galaxalign_dist.evaluation.evaluate import evaluate_model

    metrics = evaluate_model(
        args.model,
        args.data,
        args.out,
        split=args.split,
        train_split=args.train_split,
        max_train_rows=args.max_train_rows,
        make_figures=not args.no_figures,
        embeddings=args.embeddings,
    )
    keys = ("accuracy", "f1_macro", "best_head", "map_at_5", "map", "n_test")
    print(json.dumps({k: metrics[k] for k in keys}, indent=2))
    print(f"wrote {args.out}/metrics.json")
    return 0
