"""Entry point of the `galaxalign` console script: dispatches to one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (subcommand, module under galaxalign_dist.cli). Each module defines HELP, add_arguments(parser)
# and run(args) -> int, and imports heavy libraries (torch, ray, deepspeed) inside run() so that
# `galaxalign --help` stays instant.
COMMANDS: list[tuple[str, str]] = [
    ("prepare", "prepare"),
    ("symbols", "symbols"),
    ("synthetic", "synthetic"),
    ("train", "train"),
    ("demo", "demo"),
    ("export", "export"),
    ("embed", "embed"),
    ("eval", "evaluate"),
    ("index", "index"),
    ("search", "search"),
    ("serve", "serve"),
    ("ablate", "ablate"),
    ("fewshot", "fewshot"),
    ("tune", "tune"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="galaxalign",
        description="GalaxAlign at cluster scale: tri-modal CLIP (galaxy images, symbols, text) "
        "trained with DeepSpeed ZeRO under Ray Train.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS:
        module = importlib.import_module(f"galaxalign_dist.cli.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args._run(args) or 0)
    except (OSError, ValueError) as e:
        # Input problems (bad config key, missing file, bad row, a bucket we may not read) are the
        # user's to fix: one line, even when a library's message spans several (YAML marks, torch's
        # state_dict report).
        message = " ".join(str(e).split())
        print(f"galaxalign {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
