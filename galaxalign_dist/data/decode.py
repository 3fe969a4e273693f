"""Data side of the triplet pipeline: stored images -> uint8 at a fixed canvas, captions -> cached tokens.

This is all the CPU work a training row costs before the worker (Ray Data tasks run it, or the
single-process reader): no augmentation, no symbol drawing, no float32 images. The worker finishes the
row on its device (data/preprocess.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from galaxalign_dist.data.images import decode
from galaxalign_dist.data.splits import stable_hash

log = logging.getLogger(__name__)

COLUMNS = ["id", "image", "label", "text", "symbol"]  # what the pipeline reads of a shard
# A stored image at most this much larger than the model's input is shipped as is (the device warp crops
# and scales it); a larger one is resized on the data side to PRE_RESIZE x the input, so a 424 px JPEG
# for a 64 px model does not cross the object store at full size.
MAX_CANVAS_RATIO, PRE_RESIZE = 1.5, 1.12


def canvas_size(stored: list[int] | tuple[int, int] | None, image_size: int) -> int:
    """Side of the uint8 square every image of a dataset is decoded to (`stored`: metadata's image_size)."""
    if stored and stored[0] == stored[1] and stored[0] <= MAX_CANVAS_RATIO * image_size:
        return int(stored[0])
    return round(PRE_RESIZE * image_size)


def row_keys(ids: np.ndarray) -> np.ndarray:
    """int64 key of each row id: seeds its augmentation (data/warp.py) without shipping strings as tensors."""
    return np.array([stable_hash(str(i)) >> 1 for i in ids], dtype=np.int64)


class DecodeTransform:
    """Batch transform for Ray Data `map_batches(batch_format="numpy")` and the single-process reader.

    In: `id`, `image` (stored bytes), `label`, `text` (caption), `symbol` (spec). Out: `image` uint8
    (B, C, C, 3), channels last, at the canvas C (shortest side resized with antialiasing and centre-cropped
    only when a stored image is not C x C), `key` int64 (augmentation seed), `tokens` int64 (B, L), `label` int64,
    `symbol` the spec strings, and `id` when keep_ids. Rows whose image does not decode raise, naming the
    row id, or (on_bad_image="skip") are dropped and counted in the log.
    """

    def __init__(
        self,
        canvas: int,
        tokenizer: Callable[[list[str]], torch.Tensor],
        on_bad_image: str = "error",
        keep_ids: bool = False,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.canvas, self.tokenizer, self.on_bad_image, self.keep_ids = (
            canvas,
            tokenizer,
            on_bad_image,
            keep_ids,
        )
        self.n_bad = 0  # rows dropped by this instance (per Ray task/actor; the warnings carry the ids)
        self._tokens: dict[str, torch.Tensor] = {}  # caption -> tokens: a dataset has few captions

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": {}}  # ship to Ray workers without the cache

    def _image(self, data: bytes) -> torch.Tensor:
        img = decode(data)
        c = self.canvas
        if img.shape[1:] != (c, c):
            img = F.resize(img, c, interpolation=InterpolationMode.BICUBIC, antialias=True)
            img = F.center_crop(img, [c, c])
        # Channels last, the decoders' own memory layout (decode() returns a (3, H, W) view of it): the batch
        # is then one plain copy per image; a (B, 3, C, C) batch costs a strided gather (measured at 256 px:
        # 0.12 against 0.02 ms per row, a fifth of the data side's CPU).
        return img.permute(1, 2, 0)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        new = sorted({t for t in texts if t not in self._tokens})
        if new:
            self._tokens.update(zip(new, self.tokenizer(new), strict=True))
        if not texts:
            return torch.zeros((0, self.tokenizer(["x"]).shape[1]), dtype=torch.long)
        return torch.stack([self._tokens[t] for t in texts])

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Per-image decodes of small tensors: intra-op threads only add sync cost, and they fight the
        # training process for the same cores.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._decode(batch)
        finally:
            torch.set_num_threads(threads)

    def _decode(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image"])
        ids = batch["id"] if "id" in batch else np.array([str(i) for i in range(n)], dtype=object)
        images, keep, bad = [], [], []
        for i in range(n):
            try:
                images.append(self._image(batch["image"][i]))
            except (RuntimeError, ValueError, TypeError) as e:
                if self.on_bad_image == "error":
                    raise ValueError(f"row id {ids[i]}: image does not decode ({e})") from None
                bad.append(str(ids[i]))
                continue
            keep.append(i)
        if bad:
            self.n_bad += len(bad)
            log.warning(
                "skipped %d rows with undecodable images (%d so far here): ids %s", len(bad), self.n_bad, bad
            )
        c = self.canvas
        out = {
            "image": torch.stack(images).numpy() if images else np.zeros((0, c, c, 3), np.uint8),
            "key": row_keys(np.asarray(ids, dtype=object)[keep]),
            "tokens": self.tokenize([str(batch["text"][i]) for i in keep]).numpy().astype(np.int64),
            "label": np.asarray(batch["label"])[keep].astype(np.int64),
            "symbol": np.array([str(batch["symbol"][i]) for i in keep], dtype=object),
        }
        if self.keep_ids:
            out["id"] = np.asarray(ids, dtype=object)[keep]
        return out
