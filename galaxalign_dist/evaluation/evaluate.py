"""Evaluation of an exported model: stream a prepared dataset through the towers, score heads and retrieval, draw figures."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from galaxalign_dist.data import shards
from galaxalign_dist.evaluation import figures, metrics
from galaxalign_dist.evaluation.bundle import load_bundle
from galaxalign_dist.evaluation.embed import Embeddings, embed, save_embeddings, thumbnails

log = logging.getLogger(__name__)


def evaluate_model(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    split: str = "test",
    train_split: str = "train",
    max_train_rows: int = 20000,
    max_test_rows: int | None = None,
    make_figures: bool = True,
    embeddings: str | Path | None = None,
) -> dict[str, Any]:
    """metrics.json (heads, mAP@5, mAP), prototypes.npz + confusion matrix, t-SNE, PCA grid and retrieval figures.

    The reported head (``best_head``) is chosen on held-out train rows, never on ``split``
    (metrics.select_head); every head's figures on ``split`` are in metrics.json's ``heads``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(model_dir)
    meta = shards.read_metadata(data_dir)
    class_names = list(meta["class_names"])
    num_classes = len(class_names)
    with torch.no_grad():
        class_text = bundle.embed_texts(list(meta["captions"]))
    if embeddings is not None:  # the sharded output of `galaxalign embed`: read, not re-embedded
        from galaxalign_dist.evaluation.embed_store import stored_for_eval

        test, train = stored_for_eval(embeddings, bundle, split, train_split, max_test_rows, max_train_rows)
    else:
        test = embed(bundle, data_dir, split, max_rows=max_test_rows)
        train = None
        if shards.split_files(data_dir, train_split):
            train = embed(bundle, data_dir, train_split, max_rows=max_train_rows)
    # Symbol prototypes come from the train split: building them from test rows would use test labels.
    proto = metrics.symbol_prototypes(train.symbol, train.labels, num_classes) if train is not None else None
    result = metrics.evaluate_embeddings(
        test.image,
        test.labels,
        class_text,
        proto,
        num_classes,
        train_image=None if train is None else train.image,
        train_labels=None if train is None else train.labels,
        train_symbol=None if train is None else train.symbol,
    )
    result.update(
        model=str(model_dir),
        data=str(data_dir),
        split=split,
        class_names=class_names,
        image_size=bundle.image_size,
    )
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    # The class embeddings the prototype heads scored against (C, D each), for reuse and inspection.
    protos = {"text": class_text} if proto is None else {"text": class_text, "symbol": proto}
    np.savez(out_dir / "prototypes.npz", **protos)
    save_embeddings(test, out_dir / f"embeddings_{split}.parquet", split)
    if make_figures:
        pred = _best_head_predictions(result["best_head"], test, train, class_text, proto)
        _figures(out_dir, data_dir, split, test, pred, class_names)
    log.info(
        "%s: accuracy %.4f, F1 %.4f (%s head), mAP@5 %.4f, mAP %.4f on %d rows",
        split,
        result["accuracy"],
        result["f1_macro"],
        result["best_head"],
        result["map_at_5"],
        result["map"],
        result["n_test"],
    )
    return result


def _best_head_predictions(head, test, train, class_text, proto):  # noqa: ANN001, ANN202
    if head == "linear_probe":
        return metrics.linear_probe(train.image, train.labels, test.image)
    class_emb = {"text": class_text, "symbol": proto}.get(head)
    if head == "fused":
        class_emb = metrics.fused_prototypes(class_text, proto)
    return metrics.zero_shot(test.image, class_emb)


def _figures(out_dir: Path, data_dir, split, test: Embeddings, pred, class_names) -> None:  # noqa: ANN001
    figures.confusion_matrix_png(test.labels, pred, class_names, out_dir / "confusion_matrix.png")
    figures.embedding_map_png(test.image, test.labels, class_names, out_dir / "tsne.png")
    # Thumbnails for at most a few thousand rows: figures need pictures, not the whole split.
    keep = np.arange(min(len(test.ids), 2000))
    thumbs = thumbnails(data_dir, split, test.ids[keep])
    figures.pca_grid_png(test.image[keep], thumbs, out_dir / "pca_grid.png")
    queries = _queries_per_class(test.labels[keep], per_class=2)
    scores = test.image[keep][queries] @ test.image[keep].T  # (Q, N), N <= 2000
    scores[np.arange(len(queries)), queries] = -np.inf  # the query never retrieves itself
    top = np.argsort(-scores, axis=1)[:, :5]
    figures.retrieval_png(
        thumbs[queries],
        thumbs[top],
        np.take_along_axis(scores, top, axis=1),
        out_dir / "retrieval.png",
        query_labels=test.labels[keep][queries],
        result_labels=test.labels[keep][top],
        titles=[class_names[test.labels[keep][q]] for q in queries],
    )


def _queries_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
