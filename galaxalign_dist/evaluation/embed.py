"""Embeddings of a prepared split through an exported model: streamed in bounded memory, saved as Parquet."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from galaxalign_dist.data import shards
from galaxalign_dist.data.reader import iter_batches
from galaxalign_dist.evaluation.bundle import Bundle


@dataclass
class Embeddings:
    ids: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int
    image: np.ndarray  # (N, D) L2-normalised
    symbol: np.ndarray  # (N, D)
    text: np.ndarray  # (N, D): each row's caption embedding


@torch.no_grad()
def embed(
    bundle: Bundle,
    data_dir: str | Path,
    split: str,
    batch_size: int = 128,
    max_rows: int | None = None,
    progress: bool = True,
) -> Embeddings:
    """Embed every row of a split (eval transforms, no augmentation), streaming in bounded memory."""
    model, transform = bundle.model, bundle.transform(keep_ids=True)
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
