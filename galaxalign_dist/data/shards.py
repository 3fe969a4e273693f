"""Writing prepared datasets: the rotating Parquet shard writer, atomic output directories, subsets.

The format (columns, metadata file) is in format.py; readers of local paths and URIs are in store.py.
Both are re-exported here, where callers have always found them. Output is written to ``OUT.tmp-XXXX``
and renamed to ``OUT`` only when complete, so a failed or interrupted prepare never leaves a dataset
that looks complete. Row groups hold ``row_group_rows`` rows (default 256) so a reader streams a
dataset in bounded memory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from galaxalign_dist.data.format import (
    ARROW_SCHEMA,
    FORMAT_VERSION,
    LEGACY_METADATA_FILE,
    METADATA_FILE,
    METADATA_FILES,
    SPLITS,
    arrow_schema,
    dataset_metadata,
    schema_from_metadata,
)
from galaxalign_dist.data.options import DEFAULT_FILE_BYTES, DEFAULT_ROW_GROUP_ROWS
from galaxalign_dist.data.splits import id_hash
from galaxalign_dist.data.store import (
    _fs_and_path,
    _shown,
    check_split_files,
    dataset,
    is_prepared,
    read_metadata,
    split_files,
    split_paths,
    split_rows,
)
from galaxalign_dist.paths import is_uri

__all__ = [  # the names callers import from here (format.py and store.py names included)
    "ARROW_SCHEMA", "DEFAULT_FILE_BYTES", "DEFAULT_ROW_GROUP_ROWS", "DICTIONARY_COLUMNS", "FORMAT_VERSION",
    "LEGACY_METADATA_FILE", "METADATA_FILE", "METADATA_FILES", "SPLITS", "OutputExistsError", "ShardWriter",
    "_fs_and_path", "_shown", "arrow_schema", "atomic_output_dir", "check_local_output", "check_output_dir",
    "check_split_files", "dataset", "dataset_metadata", "is_prepared", "read_metadata", "schema_from_metadata",
    "split_files", "split_paths", "split_rows", "write_metadata", "write_subset",
]  # fmt: skip

# Images are already compressed (PNG/JPEG): compressing them again costs CPU for ~nothing,
# while the few distinct class_name/text/symbol strings shrink to almost nothing as dictionaries.
DICTIONARY_COLUMNS = ["class_name", "text", "symbol"]


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


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    """Write the dataset's metadata file (last: its presence marks the dataset complete)."""
    path = Path(directory) / METADATA_FILE
    path.write_text(json.dumps(metadata, indent=2, sort_keys=False) + "\n")
    (Path(directory) / LEGACY_METADATA_FILE).unlink(missing_ok=True)  # one metadata file, never two


def check_local_output(out: str | Path) -> None:
    """Writers need a local (or shared-filesystem) directory: refuse a URI with what to do instead."""
    if is_uri(out):
        raise ValueError(
            f"cannot write a dataset to {out}: prepare writes a local or shared-filesystem directory, not "
            "object storage; prepare locally, copy the directory (e.g. `aws s3 sync DIR s3://bucket/prefix`, "
            "`gcloud storage rsync -r DIR gs://bucket/prefix`) and set data.path to the URI"
        )


def write_subset(
    src: str | Path, dst: str | Path, split: str, fraction: float, seed: int = 0
) -> dict[str, Any]:
    """A copy of dataset `src` whose `split` keeps a stratified `fraction` of rows (other splits whole).

    Per class, the rows kept are those with the smallest seeded hash of their id, so a smaller
    fraction is always a subset of a larger one and the choice does not depend on file order.
    Only the id and label columns are held in memory; rows stream from file to file. `src` may be a
    URI (see read_metadata); `dst` is a local directory.
    """
    check_local_output(dst)
    meta = read_metadata(src)
    table = dataset(src, split).to_table(columns=["id", "label"])
    ids = table.column("id").to_pylist()
    labels = table.column("label").to_numpy()
    keys = np.array([id_hash(seed, i) for i in ids], np.uint64)  # the split's hash (splits.py)
    keep: set[str] = set()
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n = max(1, math.ceil(fraction * len(rows)))  # every class keeps at least one example
        keep.update(ids[r] for r in rows[np.argsort(keys[rows], kind="stable")[:n]])
    wanted = pa.array(sorted(keep), pa.string())
    with atomic_output_dir(Path(dst)) as tmp:
        sub = {**meta, "splits": {}}
        for name, info in meta["splits"].items():
            writer = ShardWriter(tmp / name, dataset(src, name).schema)
            for batch in dataset(src, name).to_batches():
                writer.write(batch.filter(pc.is_in(batch.column("id"), wanted)) if name == split else batch)
            writer.close()
            # File names are the writer's, not the source's (gzdesi names a file after its shard).
            kept = info if name != split else {}  # the subset's other counts are recomputed below
            sub["splits"][name] = {**kept, "rows": writer.num_rows, "files": [p.name for p in writer.files]}
        files = [tmp / split / f for f in sub["splits"][split]["files"]]
        counts = pads.dataset(files, format="parquet").to_table(columns=["label"]).column("label").to_numpy()
        keys_by_index = {c["index"]: c["key"] for c in meta["classes"]}
        sub["splits"][split]["per_class"] = {
            keys_by_index[int(k)]: int(v) for k, v in zip(*np.unique(counts, return_counts=True), strict=True)
        }
        sub["subset_of"] = {"source": str(src), "split": split, "fraction": fraction, "seed": seed}
        write_metadata(tmp, sub)
    return sub
