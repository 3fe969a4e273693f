"""`galaxalign index`: embed a dataset with an exported model and build a FAISS index for top-k search."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "build a FAISS inner-product index of galaxy image embeddings for top-k retrieval"
SOURCE_FILE = "source.json"  # which model and dataset the index was built from (used by `search`)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an exported model directory")
    p.add_argument("--data", required=True, help="a prepared dataset directory")
    p.add_argument("--out", required=True, help="index directory to write")
    p.add_argument("--split", action="append", help="split(s) to index (default: every split)")
    p.add_argument(
        "--factory", default="Flat", help='faiss index_factory string: "Flat", "IVF4096,Flat", "HNSW32"'
    )
    p.add_argument("--batch-size", type=int, default=128)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from galaxalign_dist.data import shards
    from galaxalign_dist.evaluation.bundle import load_bundle
    from galaxalign_dist.evaluation.embed import embed
    from galaxalign_dist.evaluation.index import build_index
    from galaxalign_dist.paths import absolute

    meta = shards.read_metadata(args.data)
    splits = args.split or list(meta["splits"])
    bundle = load_bundle(args.model)
    parts = [embed(bundle, args.data, s, args.batch_size) for s in splits]
    emb = np.concatenate([p.image for p in parts])
    ids = np.concatenate([p.ids for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    out = build_index(emb, ids, args.out, factory=args.factory, labels=labels)
    source = {
        "model": str(Path(args.model).resolve()),
        "data": absolute(args.data),
        "splits": splits,
    }
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    print(f"indexed {len(ids)} galaxies ({emb.shape[1]}-d, {args.factory}) in {out}")
    return 0
