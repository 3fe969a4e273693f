"""Catalogue tables as users write them (pandas 2/3, polars, DuckDB, CSV), checked and normalised once, at the edge.

Writers disagree on Arrow types for the same data: pandas 3 and polars store strings as large_string,
pandas categoricals come back dictionary-encoded, Arrow-native tools may write string_view, ids may be
integers, vote fractions float32 or float64. The readers (sources.CatalogSource, gzdesi_source) check
each column's *kind* when they open a catalogue -- one line naming the file, the column and what was
found -- and cast every batch they read to one type per role, so nothing downstream sees the variety.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

TEXT, INTEGER, NUMBER = "text", "integer", "number"  # kinds a role may accept
KIND_NAMES = {TEXT: "strings", INTEGER: "integers", NUMBER: "numbers"}


class CatalogueError(ValueError):
    """A catalogue the reader cannot use: a ValueError, so the CLI reports it in one line (exit 2)."""


def kind(t: pa.DataType) -> str:
    """The kind of an Arrow type: text, integer, number (float/decimal), null, or the type's own name."""
    if pa.types.is_dictionary(t):
        return kind(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return TEXT
    if pa.types.is_integer(t):
        return INTEGER
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return NUMBER
    return "null" if pa.types.is_null(t) else str(t)


def check_kind(origin: str, schema: pa.Schema, column: str, accepted: tuple[str, ...], role: str) -> None:
    """CatalogueError unless `column` holds one of the `accepted` kinds (an all-null column passes)."""
    found = schema.field(column).type
    if kind(found) in (*accepted, "null") or (NUMBER in accepted and kind(found) == INTEGER):
        return
    want = " or ".join(KIND_NAMES[k] for k in accepted)
    raise CatalogueError(f"catalogue {origin}: column {column!r} ({role}) holds {found}, expected {want}")


def as_text(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Any string-like or integer column as plain `string` (dictionary-decoded; ints in decimal)."""
    if pa.types.is_dictionary(column.type):
        column = pc.cast(column, column.type.value_type)
    return column if column.type == pa.string() else pc.cast(column, pa.string())


def as_float(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A numeric column as float64 (float32 fractions and integer vote counts alike)."""
    return column if column.type == pa.float64() else pc.cast(column, pa.float64())


def normalise(batch: pa.RecordBatch, text: list[str], numbers: list[str]) -> pa.RecordBatch:
    """`batch` with the `text` columns as string and the `numbers` columns as float64 (others as read)."""
    cols = {name: batch.column(name) for name in batch.schema.names}
    for name in text:
        cols[name] = as_text(cols[name])
    for name in numbers:
        cols[name] = as_float(cols[name])
    return pa.RecordBatch.from_pydict(cols)


def open_parquet(path: Path, origin: str | None = None) -> pq.ParquetFile:
    """The file's footer, or one line saying it is not a Parquet file."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CatalogueError(f"catalogue {origin or path}: not a readable Parquet file ({e})") from None


def csv_header(path: Path) -> list[str]:
    """Column names of a CSV catalogue (its first line)."""
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def csv_to_parquet(path: Path, dest: Path, columns: list[str], text: list[str], numbers: list[str]) -> int:
    """Stream `columns` of a CSV catalogue into a Parquet file, typed by role; returns the rows written.

    Text columns are read as strings (ids keep leading zeros), number columns as float64 (empty = null);
    a value that does not parse is one line naming the file, the column and the row.
    """
    header = csv_header(path)
    types = {c: pa.string() for c in text} | {c: pa.float64() for c in numbers}
    convert = pacsv.ConvertOptions(column_types=types, include_columns=columns)
    rows = 0
    try:
        with pacsv.open_csv(path, convert_options=convert) as reader:
            with pq.ParquetWriter(dest, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch, row_group_size=65_536)
                    rows += batch.num_rows
    except pa.ArrowInvalid as e:
        raise CatalogueError(f"catalogue {path}: {_csv_message(path, str(e), header)}") from None
    return rows


def _csv_message(path: Path, message: str, header: list[str]) -> str:
    """pyarrow's 'In CSV column #5: CSV conversion error to double: invalid value ...' with the column's
    name and, for a number that does not parse, its row (pyarrow's streaming reader names none)."""
    message = " ".join(message.split())
    m = re.search(r"In CSV column #(\d+): (.*)", message)
    if not m:
        return message
    col, what = int(m[1]), m[2]
    name = header[col] if col < len(header) else f"#{col}"
    row = _first_non_number(path, col) if "conversion error to double" in what else None
    return f"column {name!r}" + (f", row {row}" if row is not None else "") + f": {what}"


def _first_non_number(path: Path, col: int) -> int | None:
    """The row (0-based, header excluded, as every prepare message counts) of the first non-empty value
    in column `col` that is not a number."""
    with open(path, newline="") as f:
        for i, values in enumerate(csv.reader(f), start=-1):
            if i < 0 or col >= len(values) or not values[col].strip():
                continue
            try:
                float(values[col])
            except ValueError:
                return i
    return None
