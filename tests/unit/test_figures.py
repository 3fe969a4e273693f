"""Tests for galaxalign_dist.evaluation.figures: each figure writes a PNG that PIL opens, at a sensible size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

from galaxalign_dist.evaluation.figures import (
    confusion_matrix_png,
    embedding_map_png,
    pca_grid_png,
    retrieval_png,
)

CLASSES = ["round", "cigar", "edge-on", "spiral"]


def _clustered(n: int = 120, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    return rng.standard_normal((len(CLASSES), d))[labels] * 3 + rng.standard_normal((n, d)), labels


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _check_png(path: Path, min_px: int = 300) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_px and max(im.size) < 5000
        assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas


def test_confusion_matrix_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 100)
    y_pred = np.where(rng.random(100) < 0.7, y_true, rng.integers(0, 4, 100))
    _check_png(confusion_matrix_png(y_true, y_pred, CLASSES, tmp_path / "sub" / "cm.png"))


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_embedding_map_png(tmp_path: Path, method: str) -> None:
    emb, labels = _clustered()
    # One OpenMP thread: t-SNE's spinning worker threads slow ~30x when other jobs share the cores.
    with threadpool_limits(1):
        _check_png(
            embedding_map_png(emb, labels, CLASSES, tmp_path / "map.png", method=method, max_points=80)
        )


def test_embedding_map_rejects_unknown_method(tmp_path: Path) -> None:
    emb, labels = _clustered()
    with pytest.raises(ValueError, match="umap"):
        embedding_map_png(emb, labels, CLASSES, tmp_path / "map.png", method="umap")


def test_pca_grid_png(tmp_path: Path) -> None:
    emb, _ = _clustered()
    _check_png(pca_grid_png(emb, _images(len(emb)), tmp_path / "grid.png", grid=6, thumb=32))


def test_retrieval_png(tmp_path: Path) -> None:
    q, k = 3, 5
    rng = np.random.default_rng(0)
    path = retrieval_png(
        _images(q),
        _images(q * k, seed=1).reshape(q, k, 32, 32, 3),
        np.sort(rng.random((q, k)), axis=1)[:, ::-1],
        tmp_path / "ret.png",
        titles=[f"q{i}" for i in range(q)],
        query_labels=np.array([0, 1, 2]),
        result_labels=rng.integers(0, 4, (q, k)),
        class_names=CLASSES,
    )
    _check_png(path)
    with pytest.raises(ValueError, match="shapes disagree"):
        retrieval_png(_images(2), _images(15).reshape(3, 5, 32, 32, 3), np.zeros((3, 5)), tmp_path / "x.png")
