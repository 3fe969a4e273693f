"""Triplet transform in one process: data/decode.py then data/preprocess.py on the CPU, as numpy arrays.

The training pipeline splits these two halves across Ray Data and the worker's device; evaluation, embedding,
search and tests run both here, through the same code.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from galaxalign_dist.data.decode import COLUMNS, DecodeTransform
from galaxalign_dist.data.preprocess import DevicePreprocess

TRANSFORM_COLUMNS = COLUMNS


class TripletTransform:
    """Batch transform for `iter_batches` and `map_batches(batch_format="numpy")`: stored rows -> model inputs.

    Input: dict of numpy arrays with `image` (encoded bytes), `symbol` (spec), `text`, `label` and `id`.
    Output: `image`/`symbol` float32 (B, 3, S, S) normalised, `tokens` int64 (B, ctx), `label` int64 (B,),
    and `id` if keep_ids. Images are decoded to a `canvas`-pixel square (default S) first. Train
    augmentation (data/warp.py) is drawn from (seed, epoch, row id), so a row's augmentation is
    reproducible whatever the batching; with epoch=None each call draws fresh entropy instead (a pipeline
    reusing one instance for every epoch then still sees new views). set_epoch(e) reproduces epoch e.
    """

    def __init__(
        self,
        image_size: int,
        train: bool,
        tokenizer: Callable[[list[str]], torch.Tensor],
        mean: tuple[float, ...] = OPENAI_DATASET_MEAN,
        std: tuple[float, ...] = OPENAI_DATASET_STD,
        seed: int = 0,
        on_bad_image: str = "error",
        keep_ids: bool = False,
        epoch: int | None = None,
        canvas: int | None = None,
    ) -> None:
        self.image_size, self.train, self.epoch = image_size, train, epoch
        self.decoder = DecodeTransform(canvas or image_size, tokenizer, on_bad_image, keep_ids)
        self.device = DevicePreprocess(image_size, seed, mean=mean, std=std)

    @property
    def n_bad(self) -> int:
        """Rows dropped by this instance for undecodable images (on_bad_image="skip")."""
        return self.decoder.n_bad

    def set_epoch(self, epoch: int | None) -> None:
        self.epoch = epoch

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["device"] = DevicePreprocess(self.image_size, self.device.seed, mean=self.device.mean,
                                           std=self.device.std)  # fmt: skip  # an empty symbol bank
        return state

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = self.decoder(batch)
        epoch = None
        if self.train:
            epoch = self.epoch if self.epoch is not None else secrets.randbits(62)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small tensors; the training process owns the cores
        try:
            ready = self.device(decoded, epoch)
        finally:
            torch.set_num_threads(threads)
        s = self.image_size
        out = {
            "image": ready["image"].numpy(),
            "symbol": ready["symbol"].numpy() if "symbol" in ready else np.zeros((0, 3, s, s), np.float32),
            "tokens": ready["tokens"].numpy(),
            "label": ready["label"].numpy(),
        }
        if "id" in decoded:
            out["id"] = decoded["id"]
        return out
