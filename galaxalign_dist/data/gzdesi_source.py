"""`gzdesi:` catalogue reader: picks and checks the columns a mapping needs, reads row ranges normalised."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from galaxalign_dist.data import gzdesi
from galaxalign_dist.data.catalog_io import (
    INTEGER,
    NUMBER,
    TEXT,
    CatalogueError,
    check_kind,
    normalise,
    open_parquet,
)
from galaxalign_dist.data.options import PrepareOptions
from galaxalign_dist.data.schemas import get_schema
from galaxalign_dist.data.sources import CATALOG_EXTRAS

READ_BATCH_ROWS = 16_384  # catalogue rows mapped at once: ~6 MB of float64 fractions
ID_COLUMNS = ("dr8_id", "id_str")
PATH_COLUMN = "file_loc"  # galaxy-datasets catalogues carry each image's path here
BRICK_COLUMNS = ("brickid", "objid")  # dr8_id = {brickid}_{objid}, built from these when absent
BUILT_ID = "dr8_id"
LAYOUT_ID = re.compile(r"\d+_\d+")  # ids the {brickid}/{brickid}_{objid}.jpg layout can place
LAYOUT = "{brickid}/{brickid}_{objid}.jpg"
LAYOUT_SAMPLE_ROWS = 1024


@dataclass(frozen=True)
class Columns:
    """Which catalogue columns the conversion reads, by role."""

    id: str | None  # None: ids are {brickid}_{objid}, built from BRICK_COLUMNS
    path: str | None  # None: images at LAYOUT under the image root
    extras: tuple[str, ...]  # copied to the shards as float64 (ra, dec, redshift)
    numbers: tuple[str, ...]  # what gzdesi.map_batch reads: fractions (and vote totals with min_votes)

    @property
    def text(self) -> list[str]:
        return [c for c in (self.id, self.path) if c] + ([] if self.id else list(BRICK_COLUMNS))

    @property
    def read(self) -> list[str]:
        return list(dict.fromkeys([*self.text, *self.extras, *self.numbers]))


def pick_columns(
    names: list[str], opts: PrepareOptions, mapping: gzdesi.GZDesiMapping, origin: str
) -> Columns:
    """The columns to read, or one error naming every missing one (checked before any work)."""
    gzdesi.check_columns(names, mapping, origin)
    wanted_id, wanted_path = opts.catalog.id_column, opts.catalog.path_column
    for col in filter(None, (wanted_id, wanted_path)):
        if col not in names:
            raise gzdesi.MissingColumnsError(f"catalogue {origin} has no column {col!r}")
    id_col = wanted_id or next((c for c in ID_COLUMNS if c in names), None)
    if id_col is None and not all(c in names for c in BRICK_COLUMNS):
        raise gzdesi.MissingColumnsError(
            f"Galaxy Zoo DESI catalogue {origin} has no id column {list(ID_COLUMNS)} (nor brickid and objid "
            "to build dr8_id from)"
        )
    path_col = wanted_path or (PATH_COLUMN if PATH_COLUMN in names else None)
    extras = tuple(c for c in CATALOG_EXTRAS if c in names)
    return Columns(id_col, path_col, extras, tuple(gzdesi.required_columns(mapping)))


class GZDesiSource:
    """A GZ DESI catalogue (Parquet) read in row ranges, `READ_BATCH_ROWS` rows at a time, normalised.

    Only the columns the mapping needs (plus id, `file_loc`, ra/dec/redshift) are read, so memory does
    not depend on the catalogue's size. Every batch read has string ids (column `id_col`), string paths
    and float64 fractions and extras, whatever types the catalogue's writer chose (catalog_io.py).
    `origin` is the catalogue the user named (a CSV catalogue is read from its staged Parquet copy).
    """

    def __init__(
        self,
        path: str | Path,
        opts: PrepareOptions,
        mapping: gzdesi.GZDesiMapping,
        origin: Path | None = None,
    ) -> None:
        self.path, self.opts, self.mapping = Path(path), opts, mapping
        self.origin = origin or self.path
        where = str(self.origin)
        if not self.path.is_file():
            raise FileNotFoundError(f"Galaxy Zoo DESI catalogue {where} does not exist")
        if self.path.suffix.lower() not in (".parquet", ".pq"):
            raise ValueError(f"gzdesi:{where}: expected a .parquet or .csv catalogue")
        self.file = open_parquet(self.path, where)  # reads the footer only
        schema = self.file.schema_arrow
        self.columns = cols = pick_columns(schema.names, opts, mapping, where)
        for c in cols.text:
            check_kind(
                where,
                schema,
                c,
                (TEXT,) if c == cols.path else (TEXT, INTEGER),
                "id" if c != cols.path else "image path",
            )
        for c in (*cols.numbers, *cols.extras):
            check_kind(
                where, schema, c, (NUMBER,), "vote fraction" if c in cols.numbers else "copied as float64"
            )
        self.id_col = cols.id or BUILT_ID
        self.root = Path(opts.image_root) if opts.image_root else self.origin.parent
        self.schema = get_schema(mapping.schema)
        self.extras = list(cols.extras)
        self.extra_fields = [pa.field(c, pa.float64()) for c in self.extras]
        rows = self.file.metadata.num_rows
        self.total = min(rows, opts.n) if opts.n is not None else rows
        if not cols.path:
            self._check_layout()
        layout = f"{cols.path!r} column" if cols.path else LAYOUT
        self.description = f"{where} (images under {self.root}, {layout}; {mapping.schema})"

    def _check_layout(self) -> None:
        """Without a path column, ids must be {brickid}_{objid}: checked on the first rows, before any work."""
        if self.file.num_row_groups == 0:
            return
        batch = next(self.file.iter_batches(LAYOUT_SAMPLE_ROWS, [0], self.columns.text), None)
        if batch is None:
            return
        ids = self._ids(normalise(batch, self.columns.text, [])).to_pylist()
        bad = next((i for i, v in enumerate(ids) if v is not None and not LAYOUT_ID.fullmatch(v)), None)
        if bad is not None:
            what = f"column {self.columns.id!r}" if self.columns.id else "brickid/objid"
            raise CatalogueError(
                f"catalogue {self.origin}: {what} row {bad} holds {ids[bad]!r}, not {{brickid}}_{{objid}}: images "
                f"are found at {LAYOUT} under --image-root; pass --path-column for a column of image paths"
            )

    def _ids(self, batch: pa.RecordBatch) -> pa.Array:
        if self.columns.id:
            return batch.column(self.columns.id)
        brick, obj = (batch.column(c) for c in BRICK_COLUMNS)
        return pc.binary_join_element_wise(brick, obj, "_")

    def read(
        self, start: int, stop: int, batch_rows: int = READ_BATCH_ROWS
    ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(first catalogue row, normalised batch) for rows [start, stop), reading only the row groups that hold them."""
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        groups = [g for g in range(len(sizes)) if bounds[g] < stop and bounds[g + 1] > start]
        if not groups:
            return
        pos = int(bounds[groups[0]])
        cols = self.columns
        # use_threads=False: one shard task = one core (parallelism comes from running shards at once).
        for batch in self.file.iter_batches(batch_rows, groups, cols.read, use_threads=False):
            lo, hi = max(start, pos), min(stop, pos + batch.num_rows)
            if lo < hi:
                part = normalise(batch.slice(lo - pos, hi - lo), cols.text, [*cols.extras, *cols.numbers])
                if not cols.id:
                    part = part.append_column(BUILT_ID, self._ids(part))
                yield lo, part
            pos += batch.num_rows
            if pos >= stop:
                break

    def image_paths(self, batch: pa.RecordBatch, idx: np.ndarray) -> list[Path | None]:
        """Image file of rows `idx` of `batch`: the path column under the root (absolute replaces it), else LAYOUT."""
        take = pa.array(idx, pa.int64())
        if self.columns.path:
            rel = batch.column(self.columns.path).take(take).to_pylist()
        else:
            rel = gzdesi.image_relpath(batch.column(self.id_col).take(take)).to_pylist()
        return [self.root / r if r else None for r in rel]
