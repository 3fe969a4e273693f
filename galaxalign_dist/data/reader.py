"""Single-process streaming of a prepared split: rank-sliced, shuffled row groups in bounded memory; no Ray."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from galaxalign_dist.data import shards
from galaxalign_dist.data.transform import TRANSFORM_COLUMNS


def to_numpy(table: pa.Table | pa.RecordBatch) -> dict[str, np.ndarray]:
    """Arrow rows -> the dict of numpy arrays Ray Data's numpy batch format gives (binary/str as object)."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _rank_range(total: int, rank: int, world_size: int, drop_last: bool) -> tuple[int, int]:
    """Contiguous slice of the (shuffled) global row order owned by `rank`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if drop_last:  # every rank gets exactly floor(total / world_size) rows: equal batch counts
        per = total // world_size
        return rank * per, (rank + 1) * per
    return rank * total // world_size, (rank + 1) * total // world_size


def iter_batches(
    data_dir: str | Path,
    split: str,
    batch_size: int,
    transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    columns: list[str] | None = None,
    shuffle_buffer: int = 2048,
) -> Iterator[dict[str, Any]]:
    """Stream one split in batches, reading one Parquet row group at a time (bounded memory).

    Ranks own disjoint, contiguous slices of the global row order (which together cover every
    row; with drop_last all ranks get the same number of full batches). Shuffling permutes the
    row-group order with (seed, epoch), identically on all ranks, then rows within a buffer of
    ~shuffle_buffer rows. With a transform, numeric outputs are torch tensors; without one the
    batch is the raw columns as numpy arrays.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if columns is None and transform is not None:
        columns = TRANSFORM_COLUMNS
    if transform is not None and hasattr(transform, "set_epoch"):
        transform.set_epoch(epoch)
    groups = [
        rg for frag in shards.dataset(data_dir, split).get_fragments() for rg in frag.split_by_row_group()
    ]
    sizes = [rg.row_groups[0].num_rows for rg in groups]
    order = (
        np.random.default_rng([seed, epoch]).permutation(len(groups)) if shuffle else np.arange(len(groups))
    )
    start, stop = _rank_range(sum(sizes), rank, world_size, drop_last)
    local_rng = np.random.default_rng([seed, epoch, rank, 1])
    buffer: list[pa.Table] = []
    buffered, offset = 0, 0
    for g in order:
        lo, hi = max(start, offset), min(stop, offset + sizes[g])
        offset += sizes[g]
        if lo >= hi:
            continue
        table = _read_group(groups[g], columns).slice(lo - (offset - sizes[g]), hi - lo)
        buffer.append(table)
        buffered += table.num_rows
        if buffered >= (shuffle_buffer if shuffle else batch_size):
            rows = pa.concat_tables(buffer)
            if shuffle:
                rows = rows.take(local_rng.permutation(rows.num_rows))
            full = rows.num_rows - rows.num_rows % batch_size
            for b in range(0, full, batch_size):
                yield _emit(rows.slice(b, batch_size), transform)
            buffer, buffered = [rows.slice(full)], rows.num_rows - full
    if buffered:
        rows = pa.concat_tables(buffer)
        if shuffle:
            rows = rows.take(local_rng.permutation(rows.num_rows))
        for b in range(0, rows.num_rows, batch_size):
            part = rows.slice(b, batch_size)
            if part.num_rows == batch_size or not drop_last:
                yield _emit(part, transform)


def _read_group(group: Any, columns: list[str] | None) -> pa.Table:
    """One row group of a shard; a damaged file fails naming it (Arrow's own message may not)."""
    try:
        return group.to_table(columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{group.path}: damaged Parquet shard, cannot read its rows ({e})") from None


def _emit(rows: pa.Table, transform: Callable | None) -> dict[str, Any]:
    batch = to_numpy(rows)
    if transform is None:
        return batch
    out = transform(batch)
    return {
        k: torch.from_numpy(v) if isinstance(v, np.ndarray) and v.dtype != object else v
        for k, v in out.items()
    }
