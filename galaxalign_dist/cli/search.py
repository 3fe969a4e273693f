"""`galaxalign search`: the nearest galaxies to an image file, a catalogue id or a text, from a FAISS index."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "find the k galaxies nearest to an image file, a catalogue id (--id) or a text (--text) in an index"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", nargs="?", help="query image file (JPEG/PNG/WebP)")
    p.add_argument("--id", dest="gid", help="query by a catalogue id in the index (more like this one)")
    p.add_argument(
        "--text", help='query by text through the text tower, e.g. "a barred spiral galaxy with tight arms"'
    )
    p.add_argument("--index", required=True, help="index directory (galaxalign index --out)")
    p.add_argument("-k", type=int, default=10, help="results to return (default 10)")
    p.add_argument("--model", help="exported model (default: the one the index was built with)")
    p.add_argument("--data", help="catalogue for thumbnails (default: the one the index was built from)")
    p.add_argument("--nprobe", type=int, help="IVF lists probed (default: the value index.json records)")
    p.add_argument("--grid", help="also save a picture grid (query + results) to this PNG")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from galaxalign_dist.evaluation.index import load_index
    from galaxalign_dist.evaluation.index_embeddings import read_source, stored_vector
    from galaxalign_dist.evaluation.search_service import top_k

    given = [x for x in (args.image, args.gid, args.text) if x]
    if len(given) != 1:
        raise ValueError("give exactly one query: an IMAGE file, --id ID or --text TEXT")
    if args.k < 1:
        raise ValueError(f"-k must be positive, got {args.k}")
    if args.image and not Path(args.image).is_file():
        raise FileNotFoundError(f"query image not found: {args.image}")
    if not Path(args.index).is_dir():
        raise FileNotFoundError(
            f"index directory {args.index} does not exist (build it with `galaxalign index`)"
        )
    source = read_source(args.index)
    index = None
    if args.gid:
        index = load_index(args.index)
        self_pos = index.position(args.gid)
        query, title = stored_vector(index, self_pos)[None, :], args.gid
    else:
        bundle = _bundle(args, source)
        if args.text:
            query, title = bundle.embed_texts([args.text]), args.text
        else:
            query, title = _embed_image(bundle, Path(args.image)), Path(args.image).name
        index = load_index(args.index)
        if query.shape[1] != index.dim:
            raise ValueError(
                f"index {args.index} holds {index.dim}-d embeddings but model {bundle.path} makes "
                f"{query.shape[1]}-d ones; search with the model the index was built with (--model)"
            )
        self_pos = -1
    pos, scores = top_k(index, query, args.k, exclude=self_pos, nprobe=args.nprobe)
    records = index.records(np.asarray(pos, dtype=np.int64))
    _print_table(records, [float(s) for s in scores])
    if args.grid:
        _save_grid(args, index, records, [float(s) for s in scores], title, self_pos, source)
    return 0


def _bundle(args: argparse.Namespace, source: dict[str, Any]) -> Any:
    from galaxalign_dist.evaluation.bundle import load_bundle

    model_dir = args.model or source.get("model")
    if not model_dir:
        raise ValueError(
            f"--model is required: {args.index} does not name the model the index was built with"
        )
    return load_bundle(model_dir)


def _embed_image(bundle: Any, image: Path) -> Any:
    from galaxalign_dist.evaluation.search_service import QueryError, check_image

    blob = image.read_bytes()
    try:
        check_image(blob)  # Pillow first: torchvision's PNG decoder segfaulted on a corrupt pixel stream
    except QueryError as e:
        raise ValueError(f"query image {image}: image does not decode ({e})") from None
    try:
        return bundle.embed_images([blob])
    except ValueError as e:  # the transform names the row ("query-0"); the user knows the file
        raise ValueError(f"query image {image}: {str(e).removeprefix('row id query-0: ')}") from None


def _print_table(records: list[dict], scores: list[float]) -> None:
    labelled = any(r.get("class_name") for r in records)
    head = f"{'rank':>4}  {'score':>7}  {'id':<28}" + ("  class" if labelled else "")
    print(head)
    for rank, (r, s) in enumerate(zip(records, scores, strict=True), 1):
        line = f"{rank:>4}  {s:7.4f}  {str(r['id']):<28}"
        if labelled:
            line += f"  {r.get('class_name') or ''}"
        print(line.rstrip())


def _save_grid(args, index, records, scores, title, self_pos, source) -> None:  # noqa: ANN001
    import numpy as np
    from PIL import Image

    from galaxalign_dist.evaluation import figures
    from galaxalign_dist.evaluation.index_embeddings import thumbnails_of
    from galaxalign_dist.evaluation.search_service import thumbnails

    data = args.data or source.get("data")
    if not data:
        raise ValueError(
            f"--grid needs the catalogue the index was built from: pass --data (not in {args.index})"
        )
    thumbs = thumbnails(index, records, data)
    if args.image:
        query = np.asarray(Image.open(args.image).convert("RGB").resize((64, 64)))
    elif self_pos >= 0 and "source" in index.table.column_names:
        query = thumbnails_of(index.records(np.array([self_pos])), data)[0]
    else:
        query = np.full((64, 64, 3), 255, np.uint8)  # a text query: its words are the title
    figures.retrieval_png(query[None], thumbs[None], np.array([scores]), args.grid, titles=[title[:60]])
    print(f"saved {args.grid}")
