"""`galaxalign prepare SOURCE --out DIR`: convert a dataset into Parquet shards (see docs/data_format.md)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from typing import Any

log = logging.getLogger(__name__)

HELP = "convert Galaxy10 / GalaxyMNIST / a catalogue / an image folder / synthetic data into Parquet shards"

SOURCE_HELP = """SOURCE is one of:
  galaxy10:FILE.h5              Galaxy10 DECaLS HDF5 (images, ans[, ra, dec, redshift, pxscale])
  galaxymnist:DIR               GalaxyMNIST train_dataset.hdf5[.gz] + test_dataset.hdf5[.gz] (published split)
  galaxymnist:FILE.hdf5[.gz]    one GalaxyMNIST file (hash split)
  catalog:FILE.parquet|csv      table with id, image path and label columns (images under --image-root)
  folder:DIR                    one sub-folder per class, optionally under train/ and test/
  synthetic:galaxymnist|galaxy10  procedurally drawn galaxies (--n, --seed, --size)
  gzdesi:CATALOGUE.parquet|csv  Galaxy Zoo DESI vote fractions, images {brickid}/{brickid}_{objid}.jpg
                                under --image-root (or a file_loc column); resumable: rerun to continue"""

# Flags come from the option dataclasses (galaxalign_dist/data/options.py), one argument group each.
GROUP_TITLES = {
    "": "options (any SOURCE unless noted)",
    "catalog": "catalogue columns",
    "gzdesi": "Galaxy Zoo DESI (gzdesi:, see docs/gzdesi.md and docs/gzdesi_scale.md)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from galaxalign_dist.data.options import field_types, option_fields

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = SOURCE_HELP
    p.add_argument("source", metavar="SOURCE", help="FORM:PATH, see below")
    p.add_argument(
        "--out", required=True, help="output dataset directory (written atomically; gzdesi: resumable)"
    )
    groups = {g: p.add_argument_group(title) for g, title in GROUP_TITLES.items()}
    types = {g: field_types(g) for g in groups}
    for group, f in option_fields():
        if f.metadata["cli"]:
            _add_flag(groups[group], f, types[group][f.name])


def _add_flag(group: argparse._ArgumentGroup, f: dataclasses.Field, hint: Any) -> None:
    """One flag for an option field; its default is None ("not given"), the dataclass holds the real one."""
    from galaxalign_dist.data.options import flag

    kw: dict[str, Any] = {"dest": f.name, "default": None, "help": f.metadata["help"]}
    kinds = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
    literal = next((t for t in kinds if typing.get_origin(t) is typing.Literal), None)
    if literal is not None:
        kw["choices"] = list(typing.get_args(literal))
    elif bool in kinds:  # a switch: --skip-bad sets True; --no-progress sets progress (default True) False
        kw["action"] = "store_false" if f.default is True else "store_true"
    else:
        kw["type"] = float if f.metadata["unit"] != 1 or float in kinds else int if int in kinds else str
        kw["metavar"] = flag(f).removeprefix("--").upper().replace("-", "_")
    group.add_argument(flag(f), **kw)


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, by field name (flags left out are not passed on)."""
    from galaxalign_dist.data.options import option_fields

    values = {}
    for _, f in option_fields():
        value = getattr(args, f.name, None)
        if value is not None:
            unit = f.metadata["unit"]
            values[f.name] = int(value * unit) if unit != 1 else value
    return values


def run(args: argparse.Namespace) -> int:
    from galaxalign_dist.data.options import GZDESI, PrepareOptions
    from galaxalign_dist.data.prepare import prepare
    from galaxalign_dist.data.sources import parse_source

    opts = PrepareOptions.from_flat(**options_from_args(args))
    form, _ = parse_source(args.source)
    runner = None
    if form == GZDESI:  # the launch layer picks Ray or local processes; the data layer never imports Ray
        from galaxalign_dist.launch.gzdesi import choose_runner

        runner = choose_runner(opts.gzdesi)
    try:
        meta = prepare(args.source, args.out, opts, runner=runner)
    except (OSError, ValueError, KeyboardInterrupt):
        raise  # the user's to fix (main prints one line, exit 2), or an interrupt
    except Exception as e:  # noqa: BLE001 - a bug or an environment problem: one line, traceback at -v
        log.debug("prepare %s failed", args.source, exc_info=True)
        resume = "; rerun the same command to resume after the finished shards" if form == GZDESI else ""
        message = " ".join(f"{type(e).__name__}: {e}".split())
        print(f"galaxalign prepare: error: unexpected failure: {message} (rerun with -v for the traceback{resume})",
              file=sys.stderr)  # fmt: skip
        return 1
    if meta.get("complete") is False:  # --max-shards: a time-boxed part of a gzdesi conversion
        shards = meta["shards"]
        print(f"wrote {args.out}: {shards['done']} of {shards['total']} shards; rerun to continue")
        return 0
    splits = ", ".join(f"{s} {m['rows']}" for s, m in meta["splits"].items())
    skipped = f", skipped {meta['skipped']['count']}" if meta["skipped"]["count"] else ""
    if "gzdesi" in meta:  # galaxies that fit no class (by reason in _metadata.json and the log)
        skipped += f", excluded {meta['gzdesi']['excluded_count']}"
    print(f"wrote {args.out}: {meta['num_rows']} rows ({splits}{skipped}), schema {meta['schema']}")
    return 0
