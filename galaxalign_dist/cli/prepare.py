"""`galaxalign prepare SOURCE --out DIR`: convert a dataset into Parquet shards (see docs/data_format.md)."""

from __future__ import annotations

import argparse

HELP = "convert Galaxy10 / GalaxyMNIST / a catalogue / an image folder / synthetic data into Parquet shards"

SOURCE_HELP = """SOURCE is one of:
  galaxy10:FILE.h5              Galaxy10 DECaLS HDF5 (images, ans[, ra, dec, redshift, pxscale])
  galaxymnist:DIR               GalaxyMNIST train_dataset.hdf5[.gz] + test_dataset.hdf5[.gz] (published split)
  galaxymnist:FILE.hdf5[.gz]    one GalaxyMNIST file (hash split)
  catalog:FILE.parquet|csv      table with id, image path and label columns (images under --image-root)
  folder:DIR                    one sub-folder per class, optionally under train/ and test/
  synthetic:galaxymnist|galaxy10  procedurally drawn galaxies (--n, --seed, --size)
  gzdesi:CATALOGUE.parquet      Galaxy Zoo DESI vote fractions, images {brickid}/{brickid}_{objid}.jpg
                                under --image-root (or a file_loc column); resumable: rerun to continue"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = SOURCE_HELP
    p.add_argument("source", metavar="SOURCE", help="FORM:PATH, see below")
    p.add_argument(
        "--out", required=True, help="output dataset directory (written atomically; gzdesi: resumable)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument(
        "--image-root", help="catalog: directory image paths are relative to (default: the catalogue's)"
    )
    p.add_argument(
        "--schema",
        help="class schema: galaxy10, galaxymnist, or auto (classes = the data's sorted label values; "
        "default for catalog/folder)",
    )
    p.add_argument(
        "--n", type=int, help="synthetic: rows to draw (default 1000); others: keep the first N rows"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of the hash split")
    p.add_argument("--size", type=int, help="synthetic: image size in pixels (default 64)")
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="test share for sources without a published split (seeded hash of the id; default 0.2)",
    )
    p.add_argument(
        "--skip-bad", action="store_true", help="skip (count and list) unreadable or missing images"
    )
    g = p.add_argument_group("catalogue columns")
    g.add_argument("--id-column", help="default: first of id_str, id, galaxy_id, dr8_id, iauname")
    g.add_argument("--path-column", help="default: first of file_loc, path, filename, file")
    g.add_argument("--label-column", help="class index, key or name; default: label, else class")
    g.add_argument("--split-column", help="train/test(/validation) per row; default: split if present")
    g.add_argument("--class-names", help="--schema auto: KEY=NAME,... e.g. 'spirals=spiral galaxy'")
    g.add_argument(
        "--class-symbols", help="--schema auto: KEY=SPEC,... e.g. 'spirals=disk+arms,non_spirals=round'"
    )
    s = p.add_argument_group("shard layout")
    s.add_argument(
        "--rows-per-file", type=int, help="cap rows per Parquet file (default: none, ~128 MB files)"
    )
    s.add_argument("--file-mb", type=float, default=128, help="start a new file after this many MB of images")
    s.add_argument("--row-group-rows", type=int, default=256, help="rows per Parquet row group")
    z = p.add_argument_group("Galaxy Zoo DESI (gzdesi:, see docs/gzdesi.md and docs/gzdesi_scale.md)")
    z.add_argument("--gz-schema", choices=["galaxy10", "galaxymnist"], help="default galaxy10")
    z.add_argument("--caption-mode", choices=["class", "rich"], help="class (default) or rich")
    z.add_argument("--symbol-mode", choices=["class", "rich"], help="class (default) or rich")
    z.add_argument(
        "--on-uncertain",
        choices=["exclude", "label"],
        help="galaxies fitting no class: drop (default) or keep as label -1",
    )
    z.add_argument("--rows-per-shard", type=int, help="catalogue rows per shard (default 10000)")
    z.add_argument("--workers", type=int, help="shards converted at once (Ray tasks if Ray is installed)")
    z.add_argument("--ray", action="store_true", help="shards as Ray tasks (RAY_ADDRESS=auto: a cluster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from galaxalign_dist.data.prepare import prepare

    meta = prepare(
        args.source,
        args.out,
        image_root=args.image_root,
        schema=args.schema,
        n=args.n,
        seed=args.seed,
        size=args.size,
        test_fraction=args.test_fraction,
        skip_bad=args.skip_bad,
        rows_per_file=args.rows_per_file,
        file_bytes=int(args.file_mb * 2**20),
        row_group_rows=args.row_group_rows,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        id_column=args.id_column,
        path_column=args.path_column,
        label_column=args.label_column,
        split_column=args.split_column,
        class_names=args.class_names,
        class_symbols=args.class_symbols,
        gz_schema=args.gz_schema,
        caption_mode=args.caption_mode,
        symbol_mode=args.symbol_mode,
        on_uncertain=args.on_uncertain,
        rows_per_shard=args.rows_per_shard,
        workers=args.workers,
        use_ray=args.ray or None,
    )
    splits = ", ".join(f"{s} {m['rows']}" for s, m in meta["splits"].items())
    skipped = f", skipped {meta['skipped']['count']}" if meta["skipped"]["count"] else ""
    if "gzdesi" in meta:  # galaxies that fit no class (by reason in metadata.json and the log)
        skipped += f", excluded {meta['gzdesi']['excluded_count']}"
    print(f"wrote {args.out}: {meta['num_rows']} rows ({splits}{skipped}), schema {meta['schema']}")
    return 0
