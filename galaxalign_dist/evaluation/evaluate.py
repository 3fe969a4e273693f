"""Evaluation of an exported model: stream a prepared dataset through the towers, score heads and retrieval, draw figures."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from galaxalign_dist.data import shards
from galaxalign_dist.data.reader import iter_batches
from galaxalign_dist.data.transform import TripletTransform
from galaxalign_dist.evaluation import figures, metrics
from galaxalign_dist.train.export import load_config, load_model
from galaxalign_dist.train.model import TriModalCLIP, build_tokenizer, image_size

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    ids: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int
    image: np.ndarray  # (N, D) L2-normalised
    symbol: np.ndarray  # (N, D)
    text: np.ndarray  # (N, D): each row's caption embedding


@torch.no_grad()
def embed(
    model: TriModalCLIP,
    tokenizer,  # noqa: ANN001
    data_dir: str | Path,
    split: str,
    batch_size: int = 128,
    max_rows: int | None = None,
    progress: bool = True,
) -> Embeddings:
    """Embed every row of a split (eval transforms, no augmentation), streaming in bounded memory."""
    transform = TripletTransform(
        image_size=_model_image_size(model), train=False, tokenizer=tokenizer, keep_ids=True
    )
    out: dict[str, list] = {k: [] for k in ("ids", "labels", "image", "symbol", "text")}
    n = 0
    it = iter_batches(data_dir, split, batch_size, transform)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"embed {split}", unit="batch", leave=False)
    for batch in it:
        out["ids"].append(np.asarray(batch["id"]))
        out["labels"].append(batch["label"].numpy())
        out["image"].append(model.encode_image(batch["image"]).numpy())
        out["symbol"].append(model.encode_symbol(batch["symbol"]).numpy())
        out["text"].append(model.encode_text(batch["tokens"]).numpy())
        n += len(batch["label"])
        if max_rows and n >= max_rows:
            break
    if n == 0:
        raise ValueError(f"{data_dir}: split {split!r} has no rows to embed")
    cat = {k: np.concatenate(v)[:max_rows] if max_rows else np.concatenate(v) for k, v in out.items()}
    return Embeddings(**cat)


def _model_image_size(model: TriModalCLIP) -> int:
    size = model.preprocess_cfg.get("size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def save_embeddings(emb: Embeddings, path: str | Path, split: str) -> None:
    """id, label, split and the three modalities' embeddings as fixed-size-list float32 columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def col(x: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), x.shape[1])

    table = pa.table(
        {
            "id": pa.array(emb.ids.astype(str)),
            "label": pa.array(emb.labels.astype(np.int32)),
            "split": pa.array([split] * len(emb.ids)),
            "image_embedding": col(emb.image),
            "symbol_embedding": col(emb.symbol),
            "text_embedding": col(emb.text),
        }
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def thumbnails(data_dir: str | Path, split: str, ids: np.ndarray, size: int = 64) -> np.ndarray:
    """Decoded thumbnails (N, size, size, 3) for figures, in the order of `ids`."""
    wanted = {str(i): k for k, i in enumerate(ids)}
    thumbs = np.zeros((len(ids), size, size, 3), np.uint8)
    for batch in shards.dataset(data_dir, split).to_batches(columns=["id", "image"]):
        for i, data in zip(batch.column("id").to_pylist(), batch.column("image").to_pylist(), strict=True):
            if i in wanted:
                img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size))
                thumbs[wanted[i]] = np.asarray(img)
    return thumbs


def evaluate_model(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    split: str = "test",
    train_split: str = "train",
    max_train_rows: int = 20000,
    max_test_rows: int | None = None,
    make_figures: bool = True,
) -> dict[str, Any]:
    """metrics.json (heads, mAP@5, mAP) + confusion matrix, t-SNE, PCA grid and retrieval figures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(model_dir)
    cfg = load_config(model_dir)
    tokenizer = build_tokenizer(cfg.model)
    meta = shards.read_metadata(data_dir)
    class_names = list(meta["class_names"])
    num_classes = len(class_names)
    with torch.no_grad():
        class_text = model.encode_text(tokenizer(list(meta["captions"]))).numpy()
    test = embed(model, tokenizer, data_dir, split, max_rows=max_test_rows)
    train = None
    if shards.split_files(data_dir, train_split):
        train = embed(model, tokenizer, data_dir, train_split, max_rows=max_train_rows)
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
    )
    result.update(
        model=str(model_dir),
        data=str(data_dir),
        split=split,
        class_names=class_names,
        image_size=image_size(cfg.model),
    )
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
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
