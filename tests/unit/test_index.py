"""Tests for galaxalign_dist.evaluation.index: exact top-k against numpy brute force, saved ids, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from galaxalign_dist.evaluation.index import build_index, choose_factory, load_index, search, search_arrays
from galaxalign_dist.evaluation.metrics import l2_normalize


def _data(n: int = 500, d: int = 32, q: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, d)).astype(np.float32) * rng.uniform(0.5, 2, (n, 1)).astype(np.float32)
    return emb, rng.standard_normal((q, d)).astype(np.float32), [f"gal_{i:05d}" for i in range(n)]


def _brute_force(emb: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = l2_normalize(queries).astype(np.float64) @ l2_normalize(emb).T.astype(np.float64)
    top = np.argsort(-scores, axis=1)[:, :k]
    return top, np.take_along_axis(scores, top, axis=1)


def test_flat_search_is_exact_and_ids_round_trip(tmp_path: Path) -> None:
    emb, queries, ids = _data()
    labels = np.arange(len(ids)) % 7
    out = build_index(
        emb, ids, tmp_path / "idx", labels=labels, rows=np.arange(len(ids)) + 1000, batch_size=64
    )
    assert {p.name for p in out.iterdir()} == {"index.faiss", "ids.parquet", "index.json"}
    meta = json.loads((out / "index.json").read_text())
    want = {"dim": 32, "count": 500, "factory": "Flat", "metric": "inner_product", "normalised": True}
    assert {k: meta[k] for k in want} == want
    assert meta["recall_at_10"] == 1.0 and meta["recall"]["exact"]  # Flat is exact search: nothing to measure

    loaded = load_index(out)
    assert list(loaded.ids) == ids
    np.testing.assert_array_equal(loaded.labels, labels)
    np.testing.assert_array_equal(loaded.rows, np.arange(500) + 1000)

    top, top_scores = _brute_force(emb, queries, k=10)
    results = search(out, queries, k=10)
    assert len(results) == 20
    for res, want, want_scores in zip(results, top, top_scores, strict=True):
        assert [i for i, _ in res] == [ids[j] for j in want]
        np.testing.assert_allclose([s for _, s in res], want_scores, atol=1e-5)


def test_ivf_with_all_lists_probed_is_exact(tmp_path: Path) -> None:
    emb, queries, ids = _data(seed=1)
    out = build_index(emb, ids, tmp_path, factory="IVF4,Flat")
    _, pos = search_arrays(load_index(out), queries, k=5, nprobe=4)
    np.testing.assert_array_equal(pos, _brute_force(emb, queries, 5)[0])


def test_hnsw_factory_finds_most_neighbours(tmp_path: Path) -> None:
    emb, queries, ids = _data(seed=2)
    _, pos = search_arrays(build_index(emb, ids, tmp_path, factory="HNSW32"), queries, k=10)
    truth = _brute_force(emb, queries, 10)[0]
    recall = np.mean([len(set(p) & set(t)) / 10 for p, t in zip(pos, truth, strict=True)])
    assert recall > 0.9


def test_k_larger_than_index_returns_all(tmp_path: Path) -> None:
    emb, queries, ids = _data(n=3)
    results = search(build_index(emb, ids, tmp_path), queries[:1], k=10)
    assert sorted(i for i, _ in results[0]) == ids


def test_dim_mismatch_and_missing_file_errors(tmp_path: Path) -> None:
    emb, queries, ids = _data()
    out = build_index(emb, ids, tmp_path)
    with pytest.raises(ValueError, match=r"query dim mismatch.*index dim is 32"):
        search(out, queries[:, :16])
    with pytest.raises(ValueError, match="ids has shape"):
        build_index(emb, ids[:-1], tmp_path / "bad")
    (out / "ids.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="ids.parquet"):
        load_index(out)


def test_factory_by_size():
    assert choose_factory(1_000, 512) == "Flat"
    assert choose_factory(262_144, 512) == "Flat"  # 512 MiB of float32 vectors: the exact-search limit
    assert choose_factory(262_145, 512) == "IVF2048,SQ6"
    assert choose_factory(1_000_000, 256) == "IVF4096,SQ6"
    assert choose_factory(8_700_000, 512) == "IVF16384,SQ6"  # Galaxy Zoo DESI


def _clustered(n: int, d: int, seed: int, k: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).standard_normal((k, d)).astype(np.float32)
    return centres[rng.integers(0, k, n)] + 0.4 * rng.standard_normal((n, d)).astype(np.float32)


def _fresh_recall(out: Path, emb: np.ndarray) -> float:
    """recall@10 of the saved index (its stored nprobe) on new queries from the same distribution."""
    queries = _clustered(300, emb.shape[1], seed=5)
    _, pos = search_arrays(load_index(out), queries, k=10)
    truth = _brute_force(emb, queries, 10)[0]
    return float(np.mean([len(set(p) & set(t)) / 10 for p, t in zip(pos, truth, strict=True)]))


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,PQ16"])
def test_ivf_recall_is_measured_on_held_out_queries_and_nprobe_tuned(tmp_path: Path, factory: str) -> None:
    emb = _clustered(20_000, 32, seed=0)
    ids = [f"g{i}" for i in range(len(emb))]
    out = build_index(emb, ids, tmp_path, factory=factory, batch_size=3000, max_train=10_000)
    meta = json.loads((out / "index.json").read_text())
    by = meta["recall"]["by_nprobe"]
    assert meta["recall"]["held_out"] and meta["recall"]["queries"] == 1000
    # Powers of two until the target: the chosen nprobe is the first to reach 0.95 (or all lists).
    assert list(by) == [str(2**j) for j in range(len(by))] and str(meta["nprobe"]) == list(by)[-1]
    recalls = [v["recall"] for v in by.values()]
    assert all(r < 0.95 for r in recalls[:-1]) and meta["recall_at_10"] == recalls[-1]
    if factory.endswith("Flat"):
        assert (
            meta["recall_at_10"] >= 0.95 and meta["nprobe"] < 64
        )  # exact within lists: the target is reached
    # The stored nprobe is used on load, and the reported recall is what new queries see.
    assert load_index(out).index.nprobe == meta["nprobe"]
    assert abs(_fresh_recall(out, emb) - meta["recall_at_10"]) < 0.06


def test_bad_factory_string_is_a_value_error(tmp_path: Path) -> None:
    emb, _, ids = _data()
    with pytest.raises(ValueError, match="--factory 'IVFx': not a faiss index_factory string for 32-d"):
        build_index(emb, ids, tmp_path, factory="IVFx")
