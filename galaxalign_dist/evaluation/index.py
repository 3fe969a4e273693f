"""FAISS inner-product index over normalised embeddings: build, save, load and top-k search of catalogues."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
META_FILE = "index.json"


@dataclass
class LoadedIndex:
    """A FAISS index with its id table; row i of ``ids`` is FAISS vector i."""

    index: faiss.Index
    ids: np.ndarray  # (N,) str
    labels: np.ndarray | None  # (N,) int, when given at build time
    rows: np.ndarray | None  # (N,) int, pointer back into the source catalogue
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])


def _normalized(batch: np.ndarray) -> np.ndarray:
    # faiss.normalize_L2 works in place on a float32 C-contiguous copy, leaving the caller's array intact.
    out = np.ascontiguousarray(batch, dtype=np.float32).copy()
    faiss.normalize_L2(out)
    return out


def build_index(
    emb: np.ndarray,
    ids: list[str] | np.ndarray,
    out_dir: str | Path,
    factory: str = "Flat",
    labels: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    batch_size: int = 65536,
    max_train: int = 262144,
    seed: int = 0,
) -> Path:
    """Build an inner-product index on L2-normalised ``emb`` (N, D) and write it to ``out_dir``.

    ``factory`` is a faiss.index_factory string ("Flat", "IVF1024,Flat", "HNSW32", "IVF256,PQ16"...);
    indexes that need training are trained on a random sample of at most ``max_train`` rows.
    Vectors are normalised and added ``batch_size`` rows at a time, so ``emb`` may be a memmap
    larger than RAM. Writes index.faiss, ids.parquet (id, [label], [row]) and index.json.
    """
    n, dim = emb.shape
    ids = np.asarray(ids).astype(str)
    if ids.shape != (n,):
        raise ValueError(f"ids has shape {ids.shape}, expected ({n},) to match emb")
    for name, col in (("labels", labels), ("rows", rows)):
        if col is not None and len(col) != n:
            raise ValueError(f"{name} has {len(col)} entries, expected {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        # A sorted random sample keeps memmap reads sequential.
        sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, max_train), replace=False))
        log.info("training %s on %d of %d vectors", factory, len(sample), n)
        index.train(_normalized(emb[sample]))
    for start in range(0, n, batch_size):
        index.add(_normalized(emb[start : start + batch_size]))

    faiss.write_index(index, str(out / INDEX_FILE))
    columns = {"id": pa.array(ids, type=pa.string())}
    if labels is not None:
        columns["label"] = pa.array(np.asarray(labels, dtype=np.int64))
    if rows is not None:
        columns["row"] = pa.array(np.asarray(rows, dtype=np.int64))
    pq.write_table(pa.table(columns), out / IDS_FILE)
    meta = {"dim": dim, "count": n, "factory": factory, "metric": "inner_product", "normalised": True}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_index(index_dir: str | Path) -> LoadedIndex:
    """Load a directory written by :func:`build_index`; raises naming any missing or inconsistent file."""
    d = Path(index_dir)
    for name in (META_FILE, INDEX_FILE, IDS_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"index directory {d} is missing {name} (expected from build_index)")
    meta = json.loads((d / META_FILE).read_text())
    index = faiss.read_index(str(d / INDEX_FILE))
    table = pq.read_table(d / IDS_FILE)
    if index.d != meta["dim"] or index.ntotal != meta["count"] or table.num_rows != meta["count"]:
        raise ValueError(
            f"{d}: inconsistent files: {INDEX_FILE} has dim={index.d} count={index.ntotal}, "
            f"{IDS_FILE} has {table.num_rows} rows, {META_FILE} says dim={meta['dim']} count={meta['count']}"
        )
    names = table.column_names
    return LoadedIndex(
        index=index,
        ids=table.column("id").to_numpy(zero_copy_only=False),  # (N,) object array of str
        labels=table.column("label").to_numpy() if "label" in names else None,
        rows=table.column("row").to_numpy() if "row" in names else None,
        meta=meta,
    )


def search_arrays(
    index: str | Path | LoadedIndex, queries: np.ndarray, k: int = 10, nprobe: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores (Q, k) float32, positions (Q, k) int64; -1 where fewer than k results) for queries."""
    loaded = index if isinstance(index, LoadedIndex) else load_index(index)
    queries = np.asarray(queries)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[1] != loaded.dim:
        raise ValueError(f"query dim mismatch: queries have shape {queries.shape}, index dim is {loaded.dim}")
    if nprobe is not None:
        # Only IVF indexes have nprobe; ParameterSpace raises a clear faiss error otherwise.
        faiss.ParameterSpace().set_index_parameter(loaded.index, "nprobe", nprobe)
    return loaded.index.search(_normalized(queries), k)


def search(
    index: str | Path | LoadedIndex, queries: np.ndarray, k: int = 10, nprobe: int | None = None
) -> list[list[tuple[str, float]]]:
    """Top-k (id, cosine score) per query, best first. ``index`` is a directory or a :class:`LoadedIndex`
    (pass the latter to avoid re-reading the files on every call)."""
    loaded = index if isinstance(index, LoadedIndex) else load_index(index)
    scores, pos = search_arrays(loaded, queries, k=k, nprobe=nprobe)
    return [
        [(str(loaded.ids[p]), float(s)) for s, p in zip(srow, prow, strict=True) if p >= 0]
        for srow, prow in zip(scores, pos, strict=True)
    ]
