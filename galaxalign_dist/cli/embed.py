"""`galaxalign embed`: stream a prepared dataset through an exported model into an embeddings Parquet file."""

from __future__ import annotations

import argparse

HELP = "write id, label and image/symbol/text embeddings of a dataset split to Parquet"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an exported model directory")
    p.add_argument("--data", required=True, help="a prepared dataset directory")
    p.add_argument("--out", required=True, help="output .parquet file")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=128)


def run(args: argparse.Namespace) -> int:
    from galaxalign_dist.evaluation.bundle import load_bundle
    from galaxalign_dist.evaluation.embed import embed, save_embeddings

    emb = embed(load_bundle(args.model), args.data, args.split, args.batch_size)
    save_embeddings(emb, args.out, args.split)
    print(f"wrote {len(emb.ids)} rows x {emb.image.shape[1]}-d embeddings to {args.out}")
    return 0
