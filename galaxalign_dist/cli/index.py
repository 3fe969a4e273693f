"""`galaxalign index`: a FAISS index of sharded embeddings, streamed, with its measured recall@10."""

from __future__ import annotations

import argparse
from pathlib import Path

from galaxalign_dist.cli.embed import add_embed_arguments, report, run_embedding

HELP = "build a FAISS index of `galaxalign embed` output (Flat when small, IVF with 6-bit codes beyond) for top-k search"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "embeddings",
        help="a `galaxalign embed` output directory (or an exported model, with --data: embeds first)",
    )
    p.add_argument("--out", required=True, help="index directory to write")
    p.add_argument(
        "--data", help="with a MODEL as first argument: embed this catalogue into OUT/embeddings first"
    )
    p.add_argument("--modality", default="image", choices=["image", "text", "symbol"], help="what to index")
    p.add_argument(
        "--factory",
        default="auto",
        help='faiss index_factory string ("Flat", "IVF4096,PQ256", "HNSW32") or auto: Flat up to 512 MiB '
        "of vectors, IVF{4 sqrt(N)},SQ6 beyond",
    )
    p.add_argument("--nprobe", type=int, help="IVF lists probed (default: the least reaching recall@10 0.95)")
    add_embed_arguments(p)  # --split, --overwrite, ... (the embedding flags apply with --data only)


def run(args: argparse.Namespace) -> int:
    from galaxalign_dist.evaluation.index_embeddings import index_embeddings

    embeddings = args.embeddings
    if args.data:
        embeddings = str(Path(args.out) / "embeddings")
        report(run_embedding(args, args.embeddings, args.data, embeddings))
    elif (Path(args.embeddings) / "model.safetensors").exists():
        raise ValueError(
            f"{args.embeddings} is an exported model: pass --data DIR to embed a catalogue first"
        )
    meta = index_embeddings(
        embeddings,
        args.out,
        modality=args.modality,
        splits=None if args.data else args.split,
        factory=args.factory,
        nprobe=args.nprobe,
        overwrite=args.overwrite or bool(args.data),
        progress=not args.no_progress,
    )
    probe = f", nprobe {meta['nprobe']}" if meta.get("nprobe") and meta["factory"] != "Flat" else ""
    print(
        f"indexed {meta['count']:,} {args.modality} embeddings ({meta['dim']}-d, {meta['factory']}{probe}) in "
        f"{args.out}: recall@10 {meta['recall_at_10']:.3f}, {meta['bytes'] / 2**20:.1f} MiB "
        f"({meta['bytes_ratio']:.3f} of exact)"
    )
    return 0
