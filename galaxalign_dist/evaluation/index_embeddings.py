"""FAISS indexes of `galaxalign embed` outputs: streamed build from the shards, query vectors, thumbnails of hits."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from galaxalign_dist.data.shards import OutputExistsError
from galaxalign_dist.evaluation.catalogue import fetch_images
from galaxalign_dist.evaluation.embed_store import matrix, open_embeddings
from galaxalign_dist.evaluation.index import IDS_FILE, INDEX_FILE, META_FILE, LoadedIndex, build_stream

SOURCE_FILE = "source.json"  # model, data and embeddings an index was built from (read by `search`)
ROW_COLUMNS = ("id", "label", "class_name", "source", "source_row")  # copied into ids.parquet when present


def index_embeddings(
    embeddings: str | Path,
    out: str | Path,
    *,
    modality: str = "image",
    splits: list[str] | None = None,
    factory: str = "auto",
    nprobe: int | None = None,
    batch_rows: int = 65_536,
    overwrite: bool = False,
    progress: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Index one modality of a sharded embeddings output, streaming its shards (two passes).

    The index is built in OUT.tmp-XXXX and renamed to OUT when complete. Rows without that modality
    (a catalogue row with no caption) are not indexed. ids.parquet also records, per vector, the split,
    the embeddings shard and row (search by id reads the exact vector from there) and the catalogue
    source and row (thumbnails).
    """
    emb = open_embeddings(embeddings)
    if modality not in emb.meta["modalities"]:
        raise ValueError(
            f"embeddings {emb.path} hold {emb.meta['modalities']}, not {modality!r} (--modality)"
        )
    col = f"{modality}_embedding"
    files = emb.files(splits)
    n = _count_valid(files, col)
    if not n:
        raise ValueError(
            f"embeddings {emb.path}: no rows with a {modality} embedding in {splits or 'any split'}"
        )
    out = Path(out)
    _check_index_out(out, overwrite)

    def batches() -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        for split, path in files:
            pf = pq.ParquetFile(path)
            cols = [c for c in (*ROW_COLUMNS, col) if c in pf.schema_arrow.names]
            start = 0
            for rb in pf.iter_batches(batch_rows, columns=cols):
                valid = rb.column(col).is_valid().to_numpy(zero_copy_only=False)
                rows = np.arange(start, start + rb.num_rows)[valid]
                start += rb.num_rows
                rb = rb.filter(pa.array(valid))
                if not rb.num_rows:
                    continue
                meta_cols = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in cols if c != col}
                meta_cols.update(split=np.full(rb.num_rows, split, dtype=object),
                                 shard=np.full(rb.num_rows, path.name, dtype=object), shard_row=rows)  # fmt: skip
                yield matrix(rb.column(col)), meta_cols

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        extra = {
            "modality": modality,
            "embeddings": str(emb.path.resolve()),
            "splits": sorted({s for s, _ in files}),
            "model": emb.meta.get("model"),
            "data": emb.meta.get("data"),
        }
        meta = build_stream(
            batches, n, emb.dim, tmp, factory, nprobe=nprobe, extra_meta=extra, progress=progress, **kwargs
        )
        source = {
            "model": emb.meta.get("model"),
            "data": emb.meta.get("data"),
            "embeddings": str(emb.path.resolve()),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        (out / META_FILE).unlink(missing_ok=True)  # the old index is incomplete from here on
        for name in (INDEX_FILE, IDS_FILE, SOURCE_FILE, META_FILE):  # index.json last: marks it complete
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _check_index_out(out: Path, overwrite: bool) -> None:
    """OUT may exist (e.g. holding the embeddings of `index MODEL --data`), but not hold another index."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory")
    found = [n for n in (META_FILE, INDEX_FILE, IDS_FILE) if (out / n).exists()]
    if found and not overwrite:
        raise OutputExistsError(f"{out} already holds an index ({found[0]}); pass --overwrite to replace it")


def _count_valid(files: list[tuple[str, Path]], col: str) -> int:
    n = 0
    for _, path in files:
        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{path}: not a readable embeddings shard ({e})") from None
        if col not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {col!r}")
        md = pf.metadata
        # The null count of the list column, from the footer statistics of its one leaf (no data read).
        nulls = 0
        for g in range(md.num_row_groups):
            group = md.row_group(g)
            leaf = next(
                group.column(i)
                for i in range(group.num_columns)
                if group.column(i).path_in_schema.startswith(col + ".")
            )
            stats = leaf.statistics
            if stats is None or not stats.has_null_count:
                nulls = pq.read_table(path, columns=[col]).column(col).null_count
                break
            nulls += stats.null_count  # a null list is one null leaf entry (no null elements are written)
        n += md.num_rows - nulls
    return n


def read_source(index_dir: str | Path) -> dict[str, Any]:
    path = Path(index_dir) / SOURCE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def stored_vector(index: LoadedIndex, position: int) -> np.ndarray:
    """The exact stored embedding of FAISS row `position` (from the embeddings shard), else the index's
    own reconstruction (exact for Flat, approximate for PQ)."""
    rec = index.records([position])[0]
    emb_dir, modality = index.meta.get("embeddings"), index.meta.get("modality", "image")
    if emb_dir and rec.get("shard") and rec.get("split"):
        path = Path(emb_dir) / rec["split"] / rec["shard"]
        try:
            pf = pq.ParquetFile(path)
            start = 0
            for g in range(pf.num_row_groups):
                rows = pf.metadata.row_group(g).num_rows
                if rec["shard_row"] < start + rows:
                    col = pf.read_row_group(g, columns=[f"{modality}_embedding"]).column(0)
                    return matrix(col.slice(rec["shard_row"] - start, 1))[0]
                start += rows
        except (OSError, pa.ArrowException):
            pass
    ivf = _direct_map(index)
    return ivf.reconstruct(int(position)) if ivf is not None else index.index.reconstruct(int(position))


def _direct_map(index: LoadedIndex) -> Any:
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index.index)
    except (RuntimeError, AttributeError):
        return None
    ivf.make_direct_map()  # IVF indexes reconstruct by id only with a direct map
    return index.index


def thumbnails_of(records: list[dict], data: str | None, size: int = 64) -> np.ndarray:
    """(N, size, size, 3) uint8 pictures of index rows from their catalogue (grey where unreadable)."""
    import io

    from PIL import Image

    thumbs = np.full((len(records), size, size, 3), 127, np.uint8)
    if not data:
        return thumbs
    refs = [(str(r.get("source") or ""), int(r.get("source_row") or 0)) for r in records]
    for i, blob in enumerate(fetch_images(data, refs)):
        if blob:
            try:
                thumbs[i] = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB").resize((size, size)))
            except OSError:
                continue
    return thumbs
