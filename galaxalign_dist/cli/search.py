"""`galaxalign search`: the nearest galaxies to an image in a FAISS index, with ids, scores and a picture grid."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "find the k most similar galaxies to an image file in an index built by `galaxalign index`"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="query image file (JPEG/PNG)")
    p.add_argument("--index", required=True, help="index directory (galaxalign index --out)")
    p.add_argument("-k", type=int, default=10, help="results to return (default 10)")
    p.add_argument("--model", help="exported model (default: the one the index was built with)")
    p.add_argument("--grid", help="also save a picture grid (query + results) to this PNG")


def run(args: argparse.Namespace) -> int:
    from galaxalign_dist.cli.index import SOURCE_FILE
    from galaxalign_dist.evaluation.bundle import load_bundle
    from galaxalign_dist.evaluation.index import load_index, search_arrays

    image = Path(args.image)
    if not image.is_file():
        raise FileNotFoundError(f"query image not found: {image}")
    if not Path(args.index).is_dir():
        raise FileNotFoundError(
            f"index directory {args.index} does not exist (build it with `galaxalign index`)"
        )
    source_path = Path(args.index) / SOURCE_FILE
    source = json.loads(source_path.read_text()) if source_path.exists() else {}
    model_dir = args.model or source.get("model")
    if not model_dir:
        raise ValueError(
            f"--model is required: {source_path} does not name the model the index was built with"
        )
    bundle = load_bundle(model_dir)
    try:
        query = bundle.embed_images([image.read_bytes()])
    except ValueError as e:  # the transform names the row ("query-0"); the user knows the file
        raise ValueError(f"query image {image}: {str(e).removeprefix('row id query-0: ')}") from None
    index = load_index(args.index)
    if query.shape[1] != index.dim:
        raise ValueError(
            f"index {args.index} holds {index.dim}-d embeddings but model {model_dir} makes "
            f"{query.shape[1]}-d ones; search with the model the index was built with (--model)"
        )
    scores, pos = search_arrays(index, query, k=args.k)
    hits = [(str(index.ids[p]), float(s)) for p, s in zip(pos[0], scores[0], strict=True) if p >= 0]
    print(f"{'rank':>4}  {'score':>7}  id")
    for rank, (gid, score) in enumerate(hits, 1):
        print(f"{rank:>4}  {score:7.4f}  {gid}")
    if args.grid:
        _save_grid(args.grid, image, hits, source.get("data"))
    return 0


def _save_grid(path: str, image: Path, hits: list[tuple[str, float]], data_dir: str | None) -> None:
    import numpy as np
    from PIL import Image

    from galaxalign_dist.evaluation import figures
    from galaxalign_dist.evaluation.embed import thumbnails

    if not data_dir:
        raise ValueError("--grid needs the dataset the index was built from (missing in source.json)")
    from galaxalign_dist.data import shards

    ids = np.array([h[0] for h in hits])
    thumbs = np.zeros((len(ids), 64, 64, 3), np.uint8)
    for split in shards.read_metadata(data_dir)["splits"]:
        found = thumbnails(data_dir, split, ids)
        thumbs = np.where(found.any(axis=(1, 2, 3), keepdims=True), found, thumbs)
    query = np.asarray(Image.open(image).convert("RGB").resize((64, 64)))
    scores = np.array([[h[1] for h in hits]])
    figures.retrieval_png(query[None], thumbs[None], scores, path, titles=[image.name])
    print(f"saved {path}")
