"""`galaxalign export`: consolidate ZeRO shards into safetensors loadable without DeepSpeed or Ray."""

from __future__ import annotations

import argparse

HELP = "consolidate a training checkpoint into plain fp32 safetensors (+ config)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint directory (e.g. RUN/checkpoint_...)")
    p.add_argument("--out", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    from galaxalign_dist.train.export import export

    out = export(args.checkpoint, args.out)
    print(f"exported to {out}; load with galaxalign_dist.load_model({str(out)!r})")
    return 0
