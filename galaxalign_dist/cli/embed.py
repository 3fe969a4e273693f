"""`galaxalign embed`: a catalogue through an exported model into resumable Parquet shards of embeddings (Ray Data)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "embed a prepared dataset or a folder of images into Parquet shards (Ray Data; resumable)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an exported model directory")
    p.add_argument(
        "--data", required=True, help="a prepared dataset (directory or URI) or a folder of images"
    )
    p.add_argument("--out", required=True, help="output directory (rerun the same command to resume it)")
    add_embed_arguments(p)


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    """The embedding job's flags (shared with `galaxalign index MODEL --data`)."""
    p.add_argument(
        "--split", action="append", help="split(s) to embed (default: every split; 'all' for a folder)"
    )
    p.add_argument(
        "--modalities",
        default="image,text,symbol",
        help="towers to run, comma-separated (default image,text,symbol; a folder of images: image)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored embedding type")
    p.add_argument("--batch-size", type=int, default=128, help="rows per model call (default 128)")
    p.add_argument("--rows-per-shard", type=int, default=10_000, help="rows per output shard (default 10000)")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip rows whose image does not decode (counted, listed)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an output made with other settings")
    p.add_argument("--local", action="store_true", help="run in this process without Ray (small catalogues)")
    p.add_argument("--actors", type=int, help="model replicas (default: one per GPU, else one per CPU)")
    p.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="CPUs per actor (CPU actors: torch threads)"
    )
    p.add_argument(
        "--gpus-per-actor", type=float, help="GPUs per actor (default 1 when the cluster has GPUs; 0: CPU)"
    )
    p.add_argument(
        "--decode",
        default="auto",
        choices=["auto", "tasks", "actor"],
        help="where images are decoded: Ray Data tasks (default with GPUs) or the actor (default on CPU)",
    )
    p.add_argument("--amp", action="store_true", help="bf16 autocast on GPU actors")
    p.add_argument(
        "--no-verify-checksums", action="store_true", help="on a rerun, check sizes and footers only"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_embedding(args: argparse.Namespace, model: str, data: str, out: str) -> dict[str, Any]:
    from galaxalign_dist.evaluation.embed_job import EmbedOptions

    opts = EmbedOptions(
        modalities=[m.strip() for m in args.modalities.split(",") if m.strip()],
        splits=args.split,
        dtype=args.dtype,
        batch_size=args.batch_size,
        rows_per_shard=args.rows_per_shard,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        verify_checksums=not args.no_verify_checksums,
        amp=args.amp,
        progress=not args.no_progress,
    )
    if args.local:
        from galaxalign_dist.evaluation.embed_job import embed_local

        return embed_local(model, data, out, opts)
    from galaxalign_dist.launch.embed import embed_catalogue

    return embed_catalogue(
        model,
        data,
        out,
        opts,
        num_actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        decode=args.decode,
    )


def report(summary: dict[str, Any]) -> None:
    rate = f", {summary['rows_per_s']:,.0f} rows/s" if summary.get("rows_per_s") else ""
    print(
        f"{summary['out']}: {summary['rows']:,} rows in {summary['shards']} shards "
        f"({summary['shards_written']} written, {summary['shards_reused']} verified and kept{rate})"
    )
    if summary["skipped_rows"]:
        print(
            f"skipped {summary['skipped_rows']} rows whose image does not decode (listed in "
            f"{summary['out']}/embeddings.json)",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    report(run_embedding(args, args.model, args.data, args.out))
    return 0
