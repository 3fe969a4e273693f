"""The prepared-dataset format: shard columns, metadata file names and keys, format version.

A prepared dataset is a directory::

    OUT/_metadata.json              written last: its presence marks the dataset complete
    OUT/train/part-00000.parquet    one row per galaxy, files rotated at ~128 MB
    OUT/test/part-00000.parquet

The metadata file's name starts with ``_`` so that readers of Parquet directories (pyarrow.dataset,
pandas.read_parquet, Spark, DuckDB's ``read_parquet('DIR/**')``) skip it: ``pyarrow.dataset.dataset(OUT)``
reads every split as one table. Datasets written before carry ``metadata.json``, which is still read.

Columns (see docs/data_format.md): ``id`` string, ``image`` binary (encoded PNG for pixel
arrays, the original JPEG/PNG bytes for image files), ``label`` int32, ``class_name`` string,
``text`` string (the caption), ``symbol`` string (symbol spec, see schemas.py), plus optional
extra columns (``ra``, ``dec``, ...).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from galaxalign_dist.data.schemas import ClassSchema, GalaxyClass

FORMAT_VERSION = 1
SPLITS = ("train", "test")
METADATA_FILE = "_metadata.json"
LEGACY_METADATA_FILE = "metadata.json"  # the name before 2026-12; read, never written
METADATA_FILES = (METADATA_FILE, LEGACY_METADATA_FILE)  # in the order readers look for them

ARROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("symbol", pa.string(), nullable=False),
    ]
)


def arrow_schema(extra_fields: list[pa.Field] | None = None) -> pa.Schema:
    """The shard schema with optional extra columns appended (always nullable)."""
    schema = ARROW_SCHEMA
    for f in extra_fields or []:
        if f.name in schema.names:
            raise ValueError(f"extra column {f.name!r} clashes with a required column")
        schema = schema.append(f.with_nullable(True))
    return schema


def dataset_metadata(
    schema: ClassSchema,
    *,
    source: str,
    source_description: str,
    columns: list[str],
    image_size: list[int] | None,
    image_formats: dict[str, int],
    split_method: str,
    seed: int,
    test_fraction: float,
    splits: dict[str, dict[str, Any]],
    skipped: dict[str, Any],
) -> dict[str, Any]:
    """The common keys of _metadata.json (docs/data_format.md), for every writer of prepared datasets."""
    return {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "source_description": source_description,
        "schema": schema.name,
        "classes": [
            {"index": c.index, "key": c.key, "name": c.name, "caption": c.caption, "symbol": c.symbol}
            for c in schema.classes
        ],
        "class_names": schema.class_names,
        "captions": schema.captions,
        "symbols": [c.symbol for c in schema.classes],
        "columns": columns,
        "image_size": image_size,  # [H, W]; None if sizes vary
        "image_formats": image_formats,
        "split_method": split_method,
        "seed": seed,
        "test_fraction": test_fraction,
        "num_rows": sum(s["rows"] for s in splits.values()),
        "splits": splits,
        "skipped": skipped,
    }


def schema_from_metadata(meta: dict[str, Any]) -> ClassSchema:
    """The ClassSchema a dataset was prepared with (also for generic `--schema auto` datasets)."""
    classes = tuple(GalaxyClass(c["index"], c["key"], c["name"], c["symbol"]) for c in meta["classes"])
    return ClassSchema(meta["schema"], classes)
