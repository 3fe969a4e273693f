"""Triplet transform: image bytes, symbol spec and caption -> model-ready tensors (Ray Data or in process)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode

from galaxalign_dist.data.splits import stable_hash
from galaxalign_dist.data.symbols import render_symbol

log = logging.getLogger(__name__)

# Train crops keep 80-100% of the area. The aspect ratio is fixed at 1: a stretched round galaxy
# looks like an in-between or cigar one, and axis ratio is exactly what separates those classes.
CROP_SCALE = (0.8, 1.0)
TRANSFORM_COLUMNS = ["id", "image", "label", "text", "symbol"]


def _row_hash(row_id: Any) -> int:
    """Stable 63-bit hash of a row id (Python's hash() is salted per process); unseeded, so a row's
    augmentation stream does not change with the split seed."""
    return stable_hash(str(row_id)) >> 1


class TripletTransform:
    """Batch transform for Ray Data `map_batches(batch_format="numpy")` and `iter_batches`.

    Input: dict of numpy arrays with `image` (encoded bytes), `symbol` (spec), `text`, `label`
    and `id`. Output: `image`/`symbol` float32 (B, 3, S, S) normalised, `tokens` int64 (B, ctx),
    `label` int64 (B,), and `id` if keep_ids. Train augmentation (rotation by any angle, flips,
    mild square crop; symbols drawn with augment=True) draws from a generator seeded by
    (seed, epoch, row id), so a row's augmentation is reproducible whatever the batching.
    With epoch=None (the default) each call draws fresh entropy instead: a pipeline that reuses
    one instance for every epoch (Ray Data map_batches) then still sees new views each epoch,
    which a fixed epoch would silently repeat. Call set_epoch(e) (iter_batches does) to reproduce.
    """

    def __init__(
        self,
        image_size: int,
        train: bool,
        tokenizer: Callable[[list[str]], torch.Tensor],
        mean: tuple[float, ...] = OPENAI_DATASET_MEAN,
        std: tuple[float, ...] = OPENAI_DATASET_STD,
        symbol_size: int | None = None,
        seed: int = 0,
        on_bad_image: str = "error",
        keep_ids: bool = False,
        epoch: int | None = None,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.image_size, self.train, self.tokenizer = image_size, train, tokenizer
        self.mean, self.std = tuple(mean), tuple(std)
        self.symbol_size = symbol_size or image_size
        self.seed, self.epoch, self.on_bad_image, self.keep_ids = seed, epoch, on_bad_image, keep_ids
        self.n_bad = 0  # rows dropped by this instance (per Ray task/actor; the warnings carry the ids)
        self._tokens: dict[str, torch.Tensor] = {}  # caption -> tokens: a dataset has few captions
        self._symbols: dict[str, torch.Tensor] = {}  # eval only: un-augmented symbols per spec

    def set_epoch(self, epoch: int | None) -> None:
        self.epoch = epoch

    def __getstate__(self) -> dict[str, Any]:
        # Ship the instance to Ray workers without its caches (rebuilt lazily there).
        return {**self.__dict__, "_tokens": {}, "_symbols": {}}

    def _rng(self, row_id: Any, call_entropy: int) -> np.random.Generator:
        epoch = self.epoch if self.epoch is not None else call_entropy
        return np.random.default_rng([self.seed, epoch, _row_hash(row_id)])

    def _image(self, data: bytes, rng: np.random.Generator | None) -> torch.Tensor:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        s = self.image_size
        if rng is None:  # eval: open_clip's image_transform(is_train=False): shortest side, centre crop
            img = F.resize(img, s, interpolation=InterpolationMode.BICUBIC, antialias=True)
            return F.center_crop(img, [s, s])
        # Galaxies have no preferred orientation: any rotation and either flip is a valid view.
        img = F.rotate(img, float(rng.uniform(-180.0, 180.0)), interpolation=InterpolationMode.BILINEAR)
        h, w = img.shape[-2:]
        side = max(1, round(np.sqrt(rng.uniform(*CROP_SCALE)) * min(h, w)))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        img = F.resized_crop(img, top, left, side, side, [s, s], InterpolationMode.BICUBIC, antialias=True)
        if rng.random() < 0.5:
            img = F.horizontal_flip(img)
        if rng.random() < 0.5:
            img = F.vertical_flip(img)
        return img

    def _symbol(self, spec: str, rng: np.random.Generator | None) -> torch.Tensor:
        if rng is None and spec in self._symbols:
            return self._symbols[spec]
        arr = render_symbol(spec, size=self.symbol_size, rng=rng, augment=rng is not None)
        sym = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        if self.symbol_size != self.image_size:
            sym = F.resize(
                sym, [self.image_size] * 2, interpolation=InterpolationMode.BICUBIC, antialias=True
            )
        if rng is None:
            self._symbols[spec] = sym
        return sym

    def _normalise(self, x: torch.Tensor) -> np.ndarray:
        """uint8 (B, 3, S, S) -> float32 normalised with the CLIP pre-training mean/std."""
        x = x.float().div_(255.0)
        return F.normalize(x, list(self.mean), list(self.std)).numpy()

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        new = sorted({t for t in texts if t not in self._tokens})
        if new:
            self._tokens.update(zip(new, self.tokenizer(new), strict=True))
        return torch.stack([self._tokens[t] for t in texts]) if texts else torch.zeros(0, 0, dtype=torch.long)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Per-sample ops on small tensors: intra-op threads only add sync cost (measured 3.4x slower
        # with 2 threads on 2 cores), and they fight the training process for the same cores.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._transform(batch)
        finally:
            torch.set_num_threads(threads)

    def _transform(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image"])
        ids = batch["id"] if "id" in batch else None
        if self.train and ids is None:
            raise ValueError("TripletTransform(train=True) needs the `id` column to seed augmentation")
        images, symbols, keep, bad = [], [], [], []
        call_entropy = secrets.randbits(62) if self.epoch is None else 0
        for i in range(n):
            row_id = ids[i] if ids is not None else i
            rng = self._rng(row_id, call_entropy) if self.train else None
            try:
                images.append(self._image(batch["image"][i], rng))
            except (RuntimeError, ValueError, TypeError) as e:
                if self.on_bad_image == "error":
                    raise ValueError(f"row id {row_id}: image does not decode ({e})") from None
                bad.append(str(row_id))
                continue
            symbols.append(self._symbol(str(batch["symbol"][i]), rng))
            keep.append(i)
        if bad:
            self.n_bad += len(bad)
            log.warning(
                "skipped %d rows with undecodable images (%d so far here): ids %s", len(bad), self.n_bad, bad
            )
        s = self.image_size
        empty = np.zeros((0, 3, s, s), np.float32)
        out = {
            "image": self._normalise(torch.stack(images)) if images else empty,
            "symbol": self._normalise(torch.stack(symbols)) if symbols else empty.copy(),
            "tokens": self._tokenize([str(batch["text"][i]) for i in keep]).numpy().astype(np.int64),
            "label": np.asarray(batch["label"])[keep].astype(np.int64),
        }
        if not keep:
            out["tokens"] = np.zeros((0, self._tokenize(["x"]).shape[1]), np.int64)
        if self.keep_ids and ids is not None:
            out["id"] = np.asarray(ids, dtype=object)[keep]
        return out
