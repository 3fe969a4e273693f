"""`galaxalign synthetic`: draw a contact sheet of procedural synthetic galaxies, one row per class."""

from __future__ import annotations

import argparse

HELP = "draw synthetic galaxy images (the built-in dataset), one row per class, to a PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--schema", default="galaxymnist", help="galaxymnist or galaxy10")
    p.add_argument("--per-class", type=int, default=8, help="images per class (row)")
    p.add_argument("--size", type=int, default=96, help="image size in pixels (>= 8)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (sample i depends only on seed and i)")
    p.add_argument(
        "--real",
        default=None,
        help="optional .npz with real `images` and `labels` of the same schema, shown left of each row",
    )


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from galaxalign_dist.data.schemas import get_schema
    from galaxalign_dist.data.synthetic import synthetic_sheet

    schema = get_schema(args.schema)
    if args.size < 8:
        raise ValueError(f"--size must be >= 8, got {args.size}")
    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    real = None
    if args.real:
        with np.load(args.real) as z:
            if "images" not in z or "labels" not in z:
                raise ValueError(f"{args.real}: needs arrays 'images' and 'labels', has {sorted(z.files)}")
            real = (z["images"], z["labels"])
        images, labels = real
        if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
            raise ValueError(
                f"{args.real}: 'images' must be uint8 (N, H, W, 3) or (N, H, W), not {images.dtype} {images.shape}"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"{args.real}: 'labels' has shape {labels.shape}, expected ({len(images)},) as 'images'"
            )
    synthetic_sheet(schema, args.out, per_class=args.per_class, size=args.size, seed=args.seed, real=real)
    print(f"wrote {args.out} ({schema.num_classes} classes x {args.per_class} images)")
    return 0
