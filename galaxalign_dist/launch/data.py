"""Ray Data pipelines: Parquet shards -> decode to uint8 in Ray Data tasks -> per-worker batches (augmented on the device)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import ray
import ray.data

from galaxalign_dist.config import Config
from galaxalign_dist.data import shards
from galaxalign_dist.data.decode import COLUMNS, canvas_size
from galaxalign_dist.train.model import build_decode, image_size


def quiet_data_context() -> None:
    # Ray Data's progress bars flood job logs (one line per refresh); our loop has its own bar.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def canvas(cfg: Config, meta: dict[str, Any]) -> int:
    """The uint8 square the data side decodes every training image to (data/decode.py)."""
    return canvas_size(meta.get("image_size"), image_size(cfg.model))


def train_dataset(cfg: Config, meta: dict[str, Any]) -> ray.data.Dataset:
    """Streamed, never materialised: read and decode tasks run while workers train."""
    # The filesystem shards.py resolved (local, or from an s3:// / gs:// URI with its query options)
    # travels with the paths, so read tasks on every node open the files the same way.
    # shuffle="files": a new file order every epoch.
    fs, files = shards.split_paths(cfg.data.path, cfg.data.train_split)
    ds = ray.data.read_parquet(files, filesystem=fs, columns=COLUMNS, shuffle="files")
    # Decode in Ray Data tasks (not on the training worker) so it overlaps compute; only uint8 pixels, token
    # ids and spec strings cross the object store. Augmentation happens on the worker's device.
    return ds.map_batches(
        build_decode(cfg, canvas(cfg, meta)), batch_format="numpy", batch_size=cfg.micro_batch_size
    )


def shard_batches(shard: ray.data.DataIterator, cfg: Config) -> Callable[[int], Iterable[dict[str, Any]]]:
    """A worker's batches for one epoch: micro batches of its Ray Data shard, locally shuffled.

    drop_last + Ray's equal split: every rank yields the same number of batches, which ZeRO's
    collectives and ray.train.report (a barrier) both need.
    """
    shuffle = cfg.data.shuffle_buffer if cfg.data.augment else None

    def epoch_batches(epoch: int) -> Iterable[dict[str, Any]]:
        # numpy, not torch batches: the symbol specs are strings (the device side looks them up in its bank).
        return shard.iter_batches(
            batch_size=cfg.micro_batch_size,
            drop_last=True,
            local_shuffle_buffer_size=shuffle,
            batch_format="numpy",
        )

    return epoch_batches
