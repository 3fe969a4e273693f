"""Parquet shard format of a prepared dataset: Arrow schema, rotating shard writer, atomic output, readers.

A prepared dataset is a directory::

    OUT/metadata.json               written last: its presence marks the dataset complete
    OUT/train/part-00000.parquet    one row per galaxy, files rotated at ~128 MB
    OUT/test/part-00000.parquet

Columns (see docs/data_format.md): ``id`` string, ``image`` binary (encoded PNG for pixel
arrays, the original JPEG/PNG bytes for image files), ``label`` int32, ``class_name`` string,
``text`` string (the caption), ``symbol`` string (symbol spec, see schemas.py), plus optional
extra columns (``ra``, ``dec``, ...). Row groups hold ``row_group_rows`` rows (default 256) so a
reader streams a dataset in bounded memory. Output is written to ``OUT.tmp-XXXX`` and renamed
to ``OUT`` only when complete, so a failed or interrupted prepare never leaves a dataset that
looks complete.

Readers (read_metadata, split_files, check_split_files, dataset) take a local path or a URI that
pyarrow opens (``s3://``, ``gs://``, ``file://``, ...: ``pyarrow.fs.FileSystem.from_uri``, credentials
from the environment); writers take local paths only (prepare locally, then copy to object storage).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from galaxalign_dist.data.schemas import ClassSchema, GalaxyClass
from galaxalign_dist.paths import is_uri

FORMAT_VERSION = 1
SPLITS = ("train", "test")
METADATA_FILE = "metadata.json"

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

# Images are already compressed (PNG/JPEG): compressing them again costs CPU for ~nothing,
# while the few distinct class_name/text/symbol strings shrink to almost nothing as dictionaries.
DICTIONARY_COLUMNS = ["class_name", "text", "symbol"]
DEFAULT_FILE_BYTES = 128 * 2**20
DEFAULT_ROW_GROUP_ROWS = 256


def arrow_schema(extra_fields: list[pa.Field] | None = None) -> pa.Schema:
    """The shard schema with optional extra columns appended (always nullable)."""
    schema = ARROW_SCHEMA
    for f in extra_fields or []:
        if f.name in schema.names:
            raise ValueError(f"extra column {f.name!r} clashes with a required column")
        schema = schema.append(f.with_nullable(True))
    return schema


class ShardWriter:
    """Writes one split's rows as ``part-NNNNN.parquet`` files of bounded size and row-group length.

    A new file starts when the current one holds ``file_bytes`` of image data or
    ``rows_per_file`` rows; rows are buffered and flushed as row groups of ``row_group_rows``.
    """

    def __init__(
        self,
        split_dir: Path,
        schema: pa.Schema = ARROW_SCHEMA,
        *,
        rows_per_file: int | None = None,
        file_bytes: int = DEFAULT_FILE_BYTES,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    ) -> None:
        if row_group_rows < 1 or (rows_per_file is not None and rows_per_file < 1) or file_bytes < 1:
            raise ValueError("rows_per_file, file_bytes and row_group_rows must be positive")
        self.split_dir = Path(split_dir)
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.file_bytes = file_bytes
        self.row_group_rows = row_group_rows
        self.files: list[Path] = []
        self.num_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0
        self._file_bytes = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        """Append rows (columns in any order; missing extra columns become nulls)."""
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        table = _conform(table, self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def close(self) -> None:
        """Flush buffered rows and close the current file."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self._pending)
        group, rest = table.slice(0, n), table.slice(n)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        while group.num_rows:
            # Cut the group where the current file reaches its row cap, so no file exceeds it.
            writer = self._open()
            room = group.num_rows
            if self.rows_per_file is not None:
                room = min(room, self.rows_per_file - self._file_rows)
            piece, group = group.slice(0, room), group.slice(room)
            writer.write_table(piece, row_group_size=piece.num_rows)
            self.num_rows += piece.num_rows
            self._file_rows += piece.num_rows
            piece_bytes = piece.column("image").nbytes
            self._file_bytes += piece_bytes
            full_rows = self.rows_per_file is not None and self._file_rows >= self.rows_per_file
            # Close before the next row group of similar size would take the file past file_bytes.
            if full_rows or self._file_bytes + piece_bytes > self.file_bytes:
                writer.close()
                self._writer = None

    def _open(self) -> pq.ParquetWriter:
        if self._writer is None:
            self.split_dir.mkdir(parents=True, exist_ok=True)
            path = self.split_dir / f"part-{len(self.files):05d}.parquet"
            dict_cols = [c for c in DICTIONARY_COLUMNS if c in self.schema.names]
            self._writer = pq.ParquetWriter(
                path,
                self.schema,
                compression={n: ("none" if n == "image" else "zstd") for n in self.schema.names},
                use_dictionary=dict_cols,
            )
            self.files.append(path)
            self._file_rows = self._file_bytes = 0
        return self._writer


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder/cast columns to `schema`, filling absent nullable columns with nulls."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        elif f.nullable:
            cols.append(pa.nulls(table.num_rows, f.type))
        else:
            raise ValueError(f"rows lack required column {f.name!r}")
    unknown = set(table.column_names) - set(schema.names)
    if unknown:
        raise ValueError(f"rows have columns not in the shard schema: {sorted(unknown)}")
    return pa.Table.from_arrays(cols, schema=schema)


class OutputExistsError(FileExistsError, ValueError):
    """The output directory exists; a ValueError too, so the CLI reports it as one line (exit 2)."""


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output directory unless `overwrite` (checked before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output directory {out} exists and is not empty (pass --overwrite to replace it)"
        )


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh ``OUT.tmp-XXXX`` directory; rename it to `out` only if the block succeeds.

    On any exception the temporary directory is removed, so nothing that looks like a complete
    dataset is left behind; an interrupted process leaves only an ``OUT.tmp-*`` directory.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        check_output_dir(out, overwrite)  # something may have appeared while we worked
        if out.exists():
            # Move the old directory aside first so `out` is never half old, half new.
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    """The common keys of metadata.json (docs/data_format.md), for every writer of prepared datasets."""
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


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    path = Path(directory) / METADATA_FILE
    path.write_text(json.dumps(metadata, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------- local paths and URIs


def check_local_output(out: str | Path) -> None:
    """Writers need a local (or shared-filesystem) directory: refuse a URI with what to do instead."""
    if is_uri(out):
        raise ValueError(
            f"cannot write a dataset to {out}: prepare writes a local or shared-filesystem directory, not "
            "object storage; prepare locally, copy the directory (e.g. `aws s3 sync DIR s3://bucket/prefix`, "
            "`gcloud storage rsync -r DIR gs://bucket/prefix`) and set data.path to the URI"
        )


def _fs_and_path(directory: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding `directory` and its path inside it.

    A URI goes through ``pyarrow.fs.FileSystem.from_uri`` (credentials and region from the environment,
    as pyarrow and Ray resolve them); anything else is a local path on the LocalFileSystem.
    """
    if not is_uri(directory):
        return pafs.LocalFileSystem(), str(Path(directory))
    try:
        fs, path = pafs.FileSystem.from_uri(str(directory))
    except (pa.ArrowException, ValueError) as e:
        raise ValueError(f"{directory}: not a URI pyarrow can open ({e})") from None
    return fs, path.rstrip("/") or path


def _join(path: str, *parts: str) -> str:
    """`parts` below a filesystem path (pyarrow paths always use '/')."""
    return "/".join([path.rstrip("/"), *parts])


def _shown(directory: str | Path, *parts: str) -> str:
    """How messages and split_files name a path below `directory`: a local path as pathlib writes it,
    a URI with `parts` appended to its path (its query, e.g. ``?region=...``, kept)."""
    if not is_uri(directory):
        return str(Path(directory, *parts))
    u = urlsplit(str(directory))
    return urlunsplit(u._replace(path=_join(u.path, *parts)))


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------- readers


def is_prepared(directory: str | Path) -> bool:
    """Whether `directory` (a local path or URI) holds a ``metadata.json``, i.e. a finished prepare."""
    fs, root = _fs_and_path(directory)
    return fs.get_file_info(_join(root, METADATA_FILE)).type != pafs.FileType.NotFound


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """Load ``metadata.json`` of a prepared dataset, with a clear error if it is missing or invalid."""
    fs, root = _fs_and_path(directory)
    path = _shown(directory, METADATA_FILE)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        hint = "prepare it locally and copy it there" if is_uri(directory) else "run `galaxalign prepare`"
        raise FileNotFoundError(f"dataset directory {_shown(directory)} does not exist ({hint})")
    if fs.get_file_info(_join(root, METADATA_FILE)).type != pafs.FileType.File:
        raise FileNotFoundError(
            f"{_shown(directory)} is not a prepared dataset: no {METADATA_FILE} (run `galaxalign prepare`; "
            "a *.tmp-* directory is an unfinished prepare)"
        )
    with fs.open_input_stream(_join(root, METADATA_FILE)) as f:
        raw = f.read()
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in ("format_version", "schema", "classes", "splits") if k not in meta]
    if not isinstance(meta, dict) or missing:
        raise ValueError(f"{path} is not a galaxalign dataset metadata file (missing {missing})")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {meta['format_version']} is newer than this galaxalign_dist "
            f"supports ({FORMAT_VERSION}); upgrade galaxalign_dist"
        )
    return meta


def schema_from_metadata(meta: dict[str, Any]) -> ClassSchema:
    """The ClassSchema a dataset was prepared with (also for generic `--schema auto` datasets)."""
    classes = tuple(GalaxyClass(c["index"], c["key"], c["name"], c["symbol"]) for c in meta["classes"])
    return ClassSchema(meta["schema"], classes)


def split_paths(directory: str | Path, split: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem holding a dataset and one split's Parquet files as sorted paths inside it
    (empty if the split has no rows): what pyarrow.dataset and ray.data.read_parquet take together."""
    meta = read_metadata(directory)
    if split not in meta["splits"]:
        raise ValueError(f"unknown split {split!r}; dataset {directory} has {sorted(meta['splits'])}")
    fs, root = _fs_and_path(directory)
    found = fs.get_file_info(pafs.FileSelector(_join(root, split), allow_not_found=True))
    paths = [
        i.path for i in found if i.type == pafs.FileType.File and fnmatchcase(i.base_name, "part-*.parquet")
    ]
    return fs, sorted(paths, key=_basename)


def split_files(directory: str | Path, split: str) -> list[str]:
    """Sorted Parquet files of one split (empty if the split has no rows): local paths, or URIs below
    a URI `directory`."""
    _, paths = split_paths(directory, split)
    return [_shown(directory, split, _basename(p)) for p in paths]


def check_split_files(directory: str | Path, split: str, meta: dict[str, Any] | None = None) -> int:
    """Open every Parquet footer of a split (no row data): the files metadata.json lists must exist,
    be Parquet, hold the required columns and add up to its row count. Returns the rows; ValueError
    naming the file otherwise. Cheap enough to run before a cluster is started for a training run
    (footers are read a few at a time, which hides object-storage latency). `meta`: the dataset's
    metadata.json when the caller has already read it."""
    meta = meta if meta is not None else read_metadata(directory)
    info = meta["splits"].get(split)
    if info is None:
        raise ValueError(f"unknown split {split!r}; dataset {directory} has {sorted(meta['splits'])}")
    listed = info.get("files")  # written by every prepare; older/hand-made metadata: what is on disk
    names = listed if listed is not None else [_basename(p) for p in split_paths(directory, split)[1]]
    fs, root = _fs_and_path(directory)

    def footer_rows(name: str) -> int:
        path, shown = _join(root, split, name), _shown(directory, split, name)
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"{shown}: shard listed in {METADATA_FILE} is missing")
        try:
            footer = pq.read_metadata(path, filesystem=fs)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{shown}: not a readable Parquet shard ({e})") from None
        missing = [c for c in ARROW_SCHEMA.names if c not in footer.schema.names]
        if missing:
            raise ValueError(f"{shown}: shard lacks required columns {missing}")
        return footer.num_rows

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(names)))) as pool:
        rows = sum(pool.map(footer_rows, names))  # the first bad file in listed order raises
    if rows != info["rows"]:
        raise ValueError(
            f"{_shown(directory, split)}: shards hold {rows} rows, {METADATA_FILE} says {info['rows']}"
        )
    return rows


def dataset(directory: str | Path, split: str) -> pads.Dataset:
    """A pyarrow Dataset over one split's shards (nothing is read until scanned)."""
    fs, paths = split_paths(directory, split)
    if not paths:
        return pads.dataset([], schema=ARROW_SCHEMA, format="parquet")
    return pads.dataset(paths, filesystem=fs, format="parquet")


def write_subset(
    src: str | Path, dst: str | Path, split: str, fraction: float, seed: int = 0
) -> dict[str, Any]:
    """A copy of dataset `src` whose `split` keeps a stratified `fraction` of rows (other splits whole).

    Per class, the rows kept are those with the smallest seeded hash of their id, so a smaller
    fraction is always a subset of a larger one and the choice does not depend on file order.
    Only the id and label columns are held in memory; rows stream from file to file. `src` may be a
    URI (see read_metadata); `dst` is a local directory.
    """
    import hashlib
    import math

    import numpy as np
    import pyarrow.compute as pc

    check_local_output(dst)
    meta = read_metadata(src)
    table = dataset(src, split).to_table(columns=["id", "label"])
    ids = table.column("id").to_pylist()
    labels = table.column("label").to_numpy()
    keys = np.array(
        [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") for i in ids]
    )
    keep: set[str] = set()
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n = max(1, math.ceil(fraction * len(rows)))  # every class keeps at least one example
        keep.update(ids[r] for r in rows[np.argsort(keys[rows], kind="stable")[:n]])
    wanted = pa.array(sorted(keep), pa.string())
    with atomic_output_dir(Path(dst)) as tmp:
        for name in meta["splits"]:
            writer = ShardWriter(tmp / name, dataset(src, name).schema)
            for batch in dataset(src, name).to_batches():
                writer.write(batch.filter(pc.is_in(batch.column("id"), wanted)) if name == split else batch)
            writer.close()
        files = sorted((tmp / split).glob("part-*.parquet"))  # no metadata.json yet: read the files
        counts = pads.dataset(files, format="parquet").to_table(columns=["label"]).column("label").to_numpy()
        sub = dict(meta)
        sub["splits"] = {**meta["splits"]}
        keys_by_index = {c["index"]: c["key"] for c in meta["classes"]}
        sub["splits"][split] = {
            "rows": int(len(counts)),
            "files": [p.name for p in files],
            "per_class": {
                keys_by_index[int(k)]: int(v)
                for k, v in zip(*np.unique(counts, return_counts=True), strict=True)
            },
        }
        sub["subset_of"] = {"source": str(src), "split": split, "fraction": fraction, "seed": seed}
        write_metadata(tmp, sub)
    return sub
