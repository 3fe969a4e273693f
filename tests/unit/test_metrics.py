"""Tests for galaxalign_dist.evaluation.metrics: heads vs sklearn, chunked retrieval mAP vs a dense sklearn reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, f1_score

from galaxalign_dist.evaluation.metrics import (
    classification_report,
    evaluate_embeddings,
    fused_prototypes,
    l2_normalize,
    linear_probe,
    retrieval_map,
    symbol_prototypes,
    zero_shot,
)


def _tie_free_embeddings(n: int, d: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random embeddings whose per-query scores are >= 1e-6 apart, so float32 rounding in any BLAS
    path cannot reorder them (and sklearn, which groups ties, sees none). Returns emb, labels, scores."""
    for s in range(seed, seed + 1000):
        rng = np.random.default_rng(s)
        emb = l2_normalize(rng.standard_normal((n, d)))
        scores = emb.astype(np.float64) @ emb.T.astype(np.float64)
        np.fill_diagonal(scores, np.inf)
        if n < 3 or np.diff(np.sort(scores, axis=1)[:, :-1], axis=1).min() > 1e-6:
            return emb, rng.integers(0, c, n), scores
    raise AssertionError("no tie-free sample found")


def _dense_reference(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float, int]:
    """Per-query sklearn AP over the other N-1 items and a direct AP@k, averaged over queries with R > 0."""
    aps, apks = [], []
    for i in range(len(labels)):
        others = np.arange(len(labels)) != i
        rel = labels[others] == labels[i]
        if not rel.any():
            continue
        aps.append(average_precision_score(rel, scores[i, others]))
        top = rel[np.argsort(-scores[i, others], kind="stable")][:k]
        prec = np.cumsum(top) / np.arange(1, len(top) + 1)
        apks.append(float((prec * top).sum() / min(k, rel.sum())))
    return float(np.mean(aps)), float(np.mean(apks)), len(aps)


@pytest.mark.parametrize(
    ("n", "d", "c", "block_size"),
    [(2, 4, 1, 1), (37, 8, 3, 1), (60, 4, 5, 7), (97, 16, 10, 1024), (120, 4, 2, 33), (64, 8, 4, 64)],
)
def test_chunked_map_equals_sklearn(n: int, d: int, c: int, block_size: int) -> None:
    emb, labels, scores = _tie_free_embeddings(n, d, c, seed=n)
    result = retrieval_map(emb, labels, k=5, block_size=block_size)
    ref_map, ref_map5, n_valid = _dense_reference(scores, labels, k=5)
    assert result["map"] == pytest.approx(ref_map, abs=1e-9)
    assert result["map_at_5"] == pytest.approx(ref_map5, abs=1e-9)
    assert result["n_queries"] == n_valid
    assert result["n_skipped"] == n - n_valid


def test_block_size_and_threads_do_not_change_result() -> None:
    emb, labels, _ = _tie_free_embeddings(90, 8, 3, seed=1)
    base = retrieval_map(emb, labels, block_size=90)
    for bs, threads in [(1, 1), (13, 2), (89, 3)]:
        assert retrieval_map(emb, labels, block_size=bs, num_threads=threads) == base


def test_map_at_5_hand_computed() -> None:
    # Unit vectors at these angles: each query ranks the others by angular distance (all distinct).
    angles = np.deg2rad([0, 1, 3, 7, 15, 31, 63])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.array([0, 1, 0, 1, 0, 1, 0])  # R = 3 for class 0, 2 for class 1
    # Relevance of the top 5 per query, worked out from the angles; AP@5 = sum P@i*rel_i / min(5, R):
    # q0 01010 -> (1/2+2/4)/3   q1 00101 -> (1/3+2/5)/2   q2 01010 -> 1/3   q3 01001 -> (1/2+2/5)/2
    # q4 01010 -> 1/3           q5 01010 -> (1/2+2/4)/2   q6 01010 -> 1/3
    ap5 = [1 / 3, 11 / 30, 1 / 3, 9 / 20, 1 / 3, 1 / 2, 1 / 3]
    # Full ranking: class-0 queries hit at ranks 2,4,6 -> 1/2; q1 ranks 3,5; q3 ranks 2,5; q5 ranks 2,4.
    ap = [1 / 2, 11 / 30, 1 / 2, 9 / 20, 1 / 2, 1 / 2, 1 / 2]
    result = retrieval_map(emb, labels, k=5)
    assert result["map_at_5"] == pytest.approx(np.mean(ap5), abs=1e-12)
    assert result["map"] == pytest.approx(np.mean(ap), abs=1e-12)


def test_query_excluded_and_singleton_class_skipped() -> None:
    # q0 (A, 0 deg) ranks item2 (B, 10 deg) above item1 (A, 90 deg): AP 1/2. Counting itself at rank 1
    # would give (1 + 2/3)/2. q1 (A) also ranks B first: 1/2. q2 is alone in B: skipped, not scored 0 or 1.
    angles = np.deg2rad([0, 90, 10])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    result = retrieval_map(emb, np.array([0, 0, 1]), k=5)
    assert result == {"map_at_5": 0.5, "map": 0.5, "n_queries": 2, "n_skipped": 1}


def test_ties_rank_by_index() -> None:
    # All scores equal: rankings follow item index. q0: B A B -> 1/2; q1: A A B -> 1/3; q2: A B B -> 1;
    # q3: A B A -> 1/2.
    result = retrieval_map(np.ones((4, 3)), np.array([0, 1, 0, 1]), k=5)
    assert result["map"] == pytest.approx((1 / 2 + 1 / 3 + 1 + 1 / 2) / 4, abs=1e-12)


def test_perfect_separation_gives_one() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 25)
    emb = np.eye(8)[labels] + 0.01 * rng.standard_normal((100, 8))
    result = retrieval_map(emb, labels, block_size=16)
    assert result["map"] == pytest.approx(1.0) and result["map_at_5"] == pytest.approx(1.0)


def test_normalisation_is_applied() -> None:
    emb, labels, scores = _tie_free_embeddings(50, 4, 3, seed=7)
    scaled = emb * np.random.default_rng(0).uniform(0.1, 10, (50, 1))  # norms would reorder raw dots
    assert retrieval_map(scaled, labels)["map"] == pytest.approx(_dense_reference(scores, labels, 5)[0])


def test_classification_report_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 5, 200), rng.integers(0, 4, 200)  # class 4 never predicted
    report = classification_report(y_true, y_pred, num_classes=6)  # class 5 absent entirely
    assert report["accuracy"] == accuracy_score(y_true, y_pred)
    assert report["f1_macro"] == f1_score(y_true, y_pred, average="macro", labels=range(6), zero_division=0)
    assert report["f1_macro"] < f1_score(y_true, y_pred, average="macro", zero_division=0)


def test_zero_shot_uses_cosine_not_dot() -> None:
    classes = np.array([[10.0, 0.0], [0.0, 1.0]])  # a long class-0 vector must not win by norm
    images = np.array([[0.3, 1.0], [1.0, 0.2]])
    np.testing.assert_array_equal(zero_shot(images, classes), [1, 0])


def test_symbol_prototypes_and_fused_definition() -> None:
    sym = np.array([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    proto = symbol_prototypes(sym, np.array([0, 0, 1]), num_classes=2)
    np.testing.assert_allclose(proto, [[np.sqrt(0.5), np.sqrt(0.5)], [0.0, 1.0]], atol=1e-6)
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        symbol_prototypes(sym, np.array([0, 0, 1]), num_classes=3)
    # fused = normalize(normalize(text) + normalize(symbol)): the norms of the inputs do not matter.
    fused = fused_prototypes(np.array([[3.0, 0.0]]), np.array([[0.0, 0.5]]))
    np.testing.assert_allclose(fused, [[np.sqrt(0.5), np.sqrt(0.5)]], atol=1e-6)


def test_linear_probe_beats_chance() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 16)) * 3
    y_train, y_test = rng.integers(0, 4, 200), rng.integers(0, 4, 100)
    x_train = centres[y_train] + rng.standard_normal((200, 16))
    x_test = centres[y_test] + rng.standard_normal((100, 16))
    assert accuracy_score(y_test, linear_probe(x_train, y_train, x_test)) > 0.9


def test_evaluate_embeddings_shape_and_best_head() -> None:
    rng = np.random.default_rng(0)
    c, d = 3, 8
    y_train, y_test = np.repeat(np.arange(c), 20), np.repeat(np.arange(c), 10)
    centres = l2_normalize(rng.standard_normal((c, d)))
    x_train = centres[y_train] + 0.3 * rng.standard_normal((60, d))
    x_test = centres[y_test] + 0.3 * rng.standard_normal((30, d))
    text = rng.standard_normal((c, d))  # uninformative captions: the text head is near chance
    sym = centres + 0.05 * rng.standard_normal((c, d))
    out = evaluate_embeddings(
        x_test, y_test, text, sym, num_classes=c, train_image=x_train, train_labels=y_train
    )
    assert set(out) == {
        "accuracy", "f1_macro", "best_head", "head_selection", "map_at_5", "map", "heads", "n_test", "n_train"
    }  # fmt: skip
    assert set(out["heads"]) == {"text", "symbol", "fused", "linear_probe"}
    best = out["best_head"]  # chosen on held-out train rows (tests/unit/test_head_selection.py)
    assert out["f1_macro"] == out["heads"][best]["f1_macro"]
    assert out["heads"]["fused"] == classification_report(
        y_test, zero_shot(x_test, fused_prototypes(text, sym)), c
    )
    assert out["map"] == retrieval_map(x_test, y_test)["map"]
    assert (out["n_test"], out["n_train"]) == (30, 60)

    no_train = evaluate_embeddings(x_test, y_test, text, None, num_classes=c)
    assert no_train["heads"]["linear_probe"] is None and no_train["heads"]["symbol"] is None
    assert no_train["best_head"] == "text" and no_train["n_train"] == 0
