"""`galaxalign symbols`: a contact sheet of the schematic symbol of each class and of the parts."""

from __future__ import annotations

import argparse

HELP = "draw the schematic galaxy symbols (one row per class or part, with augmented variants) to a PNG"

# Standalone parts shown after the classes, so each drawing element can be checked on its own.
PARTS = [
    ("disk", "face-on disk"),
    ("disk+bulge:big", "disk with big bulge"),
    ("disk+bar:strong", "strong bar"),
    ("disk+bar:weak", "weak bar"),
    ("disk+arms:tight", "tight arms"),
    ("disk+arms:medium", "medium arms"),
    ("disk+arms:loose", "loose arms"),
    ("disk+bulge:small+arms:medium+arms3", "three arms"),
    ("merger", "merger without tails"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--schema", default="all", help="galaxymnist, galaxy10 or all (all also draws the parts)")
    p.add_argument("--size", type=int, default=96, help="tile size in pixels (>= 8)")
    p.add_argument(
        "--variants", type=int, default=4, help="augmented copies per row, after the canonical one"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentations")


def specs_for(schema: str) -> list[tuple[str, str]]:
    """(spec, title) rows: each distinct class symbol once (titled with every class that uses it)."""
    from galaxalign_dist.data.schemas import SCHEMAS, get_schema

    schemas = list(SCHEMAS.values()) if schema == "all" else [get_schema(schema)]
    titles: dict[str, list[str]] = {}
    for s in schemas:
        for c in s.classes:
            titles.setdefault(c.symbol, []).append(f"{s.name}: {c.name}")
    rows = [(spec, "\n".join(t)) for spec, t in titles.items()]
    if schema == "all":
        rows += [(spec, f"part: {title}") for spec, title in PARTS if spec not in titles]
    return rows


def run(args: argparse.Namespace) -> int:
    from galaxalign_dist.data.symbols import MIN_SIZE, symbol_sheet

    if args.size < MIN_SIZE:
        raise ValueError(f"--size must be >= {MIN_SIZE}, got {args.size}")
    if args.variants < 0:
        raise ValueError(f"--variants must be >= 0, got {args.variants}")
    rows = specs_for(args.schema)
    symbol_sheet(rows, args.out, size=args.size, variants=args.variants, seed=args.seed)
    print(f"wrote {args.out} ({len(rows)} symbols x {1 + args.variants} drawings)")
    return 0
