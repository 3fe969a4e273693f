"""Tests for galaxalign_dist.evaluation.index: exact top-k against numpy brute force, saved ids, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from galaxalign_dist.evaluation.index import build_index, load_index, search, search_arrays
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
    assert meta == {"dim": 32, "count": 500, "factory": "Flat", "metric": "inner_product", "normalised": True}

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
