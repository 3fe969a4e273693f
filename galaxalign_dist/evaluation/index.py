"""FAISS inner-product index over normalised embeddings: build, save, load and top-k search of catalogues."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is not news

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
META_FILE = "index.json"


@dataclass
class LoadedIndex:
    """A FAISS index with its row table (ids.parquet); row i of the table is FAISS vector i.

    The table stays in Arrow (a few bytes per id): ``ids`` and the other numpy views are built on first use.
    """

    index: faiss.Index
    table: pa.Table  # id, and label / class_name / split / shard / shard_row / source / source_row when known
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @functools.cached_property
    def ids(self) -> np.ndarray:  # (N,) object array of str
        return self.table.column("id").to_numpy(zero_copy_only=False)

    @property
    def labels(self) -> np.ndarray | None:  # (N,) int, when given at build time
        return self.table.column("label").to_numpy() if "label" in self.table.column_names else None

    @property
    def rows(self) -> np.ndarray | None:  # (N,) int, pointer back into the source catalogue
        return self.table.column("row").to_numpy() if "row" in self.table.column_names else None

    def position(self, gid: str) -> int:
        """The FAISS row of catalogue id `gid` (ValueError naming it when absent)."""
        hits = pc.indices_nonzero(pc.equal(self.table.column("id"), pa.scalar(str(gid)))).to_numpy()
        if not len(hits):
            raise ValueError(
                f"id {gid!r} is not in index {self.meta.get('path', '')} ({self.table.num_rows} ids)"
            )
        return int(hits[0])

    def records(self, positions: np.ndarray) -> list[dict]:
        """The table's rows at FAISS positions (id, label, class_name, source, ...), in order."""
        return self.table.take(pa.array(np.asarray(positions, dtype=np.int64))).to_pylist()


def _normalized(batch: np.ndarray) -> np.ndarray:
    # faiss.normalize_L2 works in place on a float32 C-contiguous copy, leaving the caller's array intact.
    out = np.ascontiguousarray(batch, dtype=np.float32).copy()
    faiss.normalize_L2(out)
    return out


# Exact search up to this many bytes of float32 vectors (262,144 x 512-d, 524,288 x 256-d): measured by
# benchmarks/embed_scale.py, one query against 512 MiB takes ~40-70 ms on one core of the development VM
# and the index is what the vectors are. Beyond it an IVF index of 6-bit codes answers in a few ms at 1/5 the bytes.
FLAT_MAX_BYTES = 512 * 2**20
TARGET_RECALL = 0.95  # nprobe is raised until recall@10 on held-out queries reaches this
RECALL_K = 10


def choose_factory(n: int, dim: int) -> str:
    """``Flat`` up to FLAT_MAX_BYTES of vectors; beyond, ``IVF{nlist},SQ6``.

    nlist ~ 4 sqrt(n) (FAISS's guideline, a power of two in [64, 65536]); each residual stored as 6-bit
    scalar codes: 0.2 of the exact bytes with the ids. Measured on clustered 256-d vectors
    (benchmarks/embed_scale.py, 2026-12-02): recall@10 0.958 at 1M (0.971 at 200k), built in 24 s.
    Product quantization at dim/2 bytes (1/8) plateaued at recall 0.92 at 1M whatever nprobe (0.945
    at 200k; OPQ did not help) and took 6x longer to train.
    """
    if n * dim * 4 <= FLAT_MAX_BYTES:
        return "Flat"
    nlist = int(np.clip(2 ** round(np.log2(4 * np.sqrt(n))), 64, 65536))
    return f"IVF{nlist},SQ6"


def _make(dim: int, factory: str) -> faiss.Index:
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:  # faiss reports a bad factory string as a C++ exception
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise ValueError(
            f"--factory {factory!r}: not a faiss index_factory string for {dim}-d vectors ({msg})"
        ) from None
    if hasattr(index, "do_polysemous_training"):
        # On by default for IVF-PQ: a simulated-annealing pass over the codes (minutes at 1M) that only
        # Hamming-filtered search (polysemous_ht) uses, which search does not.
        index.do_polysemous_training = False
    return index


def _train_size(index: faiss.Index, n: int) -> int:
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except (RuntimeError, AttributeError):
        nlist = 0
    # ~50 points per IVF list (FAISS warns below 39); PQ/SQ codebooks need a few 10k whatever nlist.
    return min(n, max(50 * nlist, 20_000), 2_000_000)


Batches = Callable[[], Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]]


def _gather(batches: Batches, positions: np.ndarray, dim: int) -> np.ndarray:
    """Rows at sorted global `positions` from one streamed pass."""
    out, offset, j = np.empty((len(positions), dim), np.float32), 0, 0
    for emb, _ in batches():
        stop = offset + len(emb)
        hi = np.searchsorted(positions, stop)
        if hi > j:
            out[j:hi] = emb[positions[j:hi] - offset]
            j = hi
        offset = stop
    return out


def _merge_top(best: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray], k: int):  # noqa: ANN202
    s, i = np.concatenate([best[0], new[0]], axis=1), np.concatenate([best[1], new[1]], axis=1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


def _recall(exact: np.ndarray, approx: np.ndarray, self_pos: np.ndarray, k: int) -> float:
    """Mean |approx top-k ∩ exact top-k| / k, each query's own entry dropped from both lists."""
    hits = []
    for e, a, p in zip(exact, approx, self_pos, strict=True):
        e, a = [x for x in e if x != p and x >= 0][:k], [x for x in a if x != p and x >= 0][:k]
        hits.append(len(set(e) & set(a)) / max(1, len(e)))
    return float(np.mean(hits)) if hits else 1.0


def build_stream(
    batches: Batches,
    n: int,
    dim: int,
    out_dir: str | Path,
    factory: str = "auto",
    *,
    nprobe: int | None = None,
    target_recall: float = TARGET_RECALL,
    n_queries: int = 1000,
    max_train: int | None = None,
    seed: int = 0,
    extra_meta: dict | None = None,
    progress: bool = False,
) -> dict:
    """Build an inner-product index over `n` vectors that ``batches()`` streams (called twice: one pass
    gathers the training sample and the recall queries, one adds); memory holds the index, the sample
    and one batch. Vectors are L2-normalised. Writes index.faiss, ids.parquet (the batches' columns,
    row i = FAISS vector i) and index.json with the factory, nprobe and recall@10 against exact search.

    Recall queries are vectors outside the training sample; each query's own entry is dropped from the
    exact and the approximate top-k (as retrieval evaluation excludes the query). IVF indexes get the
    smallest power-of-two nprobe reaching `target_recall` unless `nprobe` is given.
    """
    t0 = time.perf_counter()
    factory = choose_factory(n, dim) if factory == "auto" else factory
    index = _make(dim, factory)
    exact_index = isinstance(index, faiss.IndexFlat)
    rng = np.random.default_rng(seed)
    n_train = 0 if index.is_trained else (min(n, max_train) if max_train else _train_size(index, n))
    n_q = 0 if exact_index else min(n_queries, max(1, n // 10))
    held_out = n - n_train >= n_q
    perm = rng.permutation(n)
    train_pos = np.sort(perm[:n_train])
    query_pos = np.sort(perm[n_train : n_train + n_q] if held_out else perm[:n_q])
    if n_train or n_q:
        gathered = _gather(batches, np.union1d(train_pos, query_pos), dim)
        where = {p: i for i, p in enumerate(np.union1d(train_pos, query_pos))}
        xt = _normalized(gathered[[where[p] for p in train_pos]]) if n_train else None
        xq = _normalized(gathered[[where[p] for p in query_pos]])
        del gathered
    if n_train:
        log.info("training %s on %d of %d vectors", factory, n_train, n)
        index.train(xt)
        del xt
    t_train = time.perf_counter() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k1 = RECALL_K + 1
    best = (np.full((n_q, 0), -np.inf, np.float32), np.zeros((n_q, 0), np.int64))
    writer, offset = None, 0
    from tqdm.auto import tqdm

    with tqdm(total=n, unit="vec", desc="index", disable=not progress) as bar:
        for emb, columns in batches():
            xb = _normalized(emb)
            index.add(xb)
            if n_q:
                s, i = faiss.knn(xq, xb, min(k1, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
                best = _merge_top(best, (s, np.where(i >= 0, i + offset, -1)), k1)
            table = pa.table(columns)
            if writer is None:
                writer = pq.ParquetWriter(out / IDS_FILE, table.schema)
            writer.write_table(table)
            offset += len(xb)
            bar.update(len(xb))
    if writer is not None:
        writer.close()
    if offset != n:
        raise ValueError(f"expected {n} vectors, the stream gave {offset}")
    t_add = time.perf_counter() - t0 - t_train
    recall = {"k": RECALL_K, "queries": n_q, "held_out": bool(held_out), "exact": exact_index}
    chosen, rec = None, 1.0
    if n_q:
        ivf = _ivf(index)
        tries = [nprobe] if nprobe or ivf is None else [2**j for j in range(int(np.log2(ivf.nlist)) + 1)]
        by = {}
        for npb in tries:
            if ivf is not None:
                ivf.nprobe = npb
            q0 = time.perf_counter()
            _, approx = index.search(xq, k1)
            by[str(npb)] = {"recall": round(_recall(best[1], approx, query_pos, RECALL_K), 4),
                            "ms_per_query": round((time.perf_counter() - q0) * 1e3 / n_q, 4)}  # fmt: skip
            chosen, rec = npb, by[str(npb)]["recall"]
            if ivf is None or rec >= target_recall:
                break
        recall["by_nprobe" if ivf is not None else "measured"] = by
        if rec < target_recall:
            log.warning("%s reaches recall@10 %.3f < %.2f (nprobe %s)", factory, rec, target_recall, chosen)
    faiss.write_index(index, str(out / INDEX_FILE))
    nbytes = (out / INDEX_FILE).stat().st_size
    meta = {
        "dim": dim, "count": n, "factory": factory, "metric": "inner_product", "normalised": True,
        "nprobe": chosen, "recall_at_10": rec, "recall": recall, "bytes": nbytes,
        "bytes_ratio": round(nbytes / max(1, n * dim * 4), 4),
        "seconds": {"train": round(t_train, 2), "add": round(t_add, 2), "total": round(time.perf_counter() - t0, 2)},
        **(extra_meta or {}),
    }  # fmt: skip
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _ivf(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def build_index(
    emb: np.ndarray,
    ids: list[str] | np.ndarray,
    out_dir: str | Path,
    factory: str = "Flat",
    labels: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    batch_size: int = 65536,
    max_train: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> Path:
    """Build an index of an in-memory (or memmap) array ``emb`` (N, D): see :func:`build_stream`.

    ``factory`` is a faiss.index_factory string ("Flat", "IVF1024,Flat", "HNSW32", "IVF256,PQ16"...) or
    "auto" (:func:`choose_factory`). ids.parquet holds id, [label], [row].
    """
    n, dim = emb.shape
    ids = np.asarray(ids).astype(str)
    if ids.shape != (n,):
        raise ValueError(f"ids has shape {ids.shape}, expected ({n},) to match emb")
    for name, col in (("labels", labels), ("rows", rows)):
        if col is not None and len(col) != n:
            raise ValueError(f"{name} has {len(col)} entries, expected {n}")

    def batches() -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            cols = {"id": ids[sl]}
            if labels is not None:
                cols["label"] = np.asarray(labels[sl], dtype=np.int64)
            if rows is not None:
                cols["row"] = np.asarray(rows[sl], dtype=np.int64)
            yield np.asarray(emb[sl], dtype=np.float32), cols

    build_stream(batches, n, dim, out_dir, factory, max_train=max_train, seed=seed, **kwargs)
    return Path(out_dir)


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
    ivf = _ivf(index)
    if ivf is not None and meta.get("nprobe"):
        ivf.nprobe = int(meta["nprobe"])  # the value build_stream chose for its recall target
    meta["path"] = str(d)
    return LoadedIndex(index=index, table=table, meta=meta)


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
