"""Ray Data pipelines: Parquet shards -> decode to uint8 in Ray Data tasks -> per-worker batches (augmented on the device)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray
import ray.data

from galaxalign_dist.config import Config
from galaxalign_dist.data import shards
from galaxalign_dist.data.decode import COLUMNS, canvas_size
from galaxalign_dist.launch.prefetch import EpochPrefetcher
from galaxalign_dist.train.model import build_decode, image_size


def quiet_data_context() -> None:
    # Ray Data's progress bars flood job logs (one line per refresh); our loop has its own bar.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


@contextlib.contextmanager
def parquet_reader_v1() -> Iterator[None]:
    """Datasets created inside read Parquet with Ray Data's file-fragment reader, not its V2 default.

    Why, measured on a 1,609-row file (7 row groups) with 2 CPUs, per epoch after the first: V2 lists the
    files again in a separate task every epoch (0.6-1.1 s) and reads a file as one block, so one task
    decodes the whole file; this reader splits a file into blocks (ROWS_PER_DECODE_TASK) that decode in
    parallel, and the first batch reached a plain iterator in 0.3-0.4 s instead of 1.4-1.5 s.
    """
    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = before


def canvas(cfg: Config, meta: dict[str, Any]) -> int:
    """The uint8 square the data side decodes every training image to (data/decode.py)."""
    return canvas_size(meta.get("image_size"), image_size(cfg.model))


# Rows per read block, so per decode task. Ray Data's own choice cuts blocks of >= 1 MiB of *encoded* bytes
# (~35 JPEG rows at 256 px: 47 tasks for 1,609 rows), and each task then pays more in scheduling and in
# unpickling its transform than the 25 ms it decodes. Measured per epoch after the first (1,609 rows, 2 CPUs,
# one streaming_split consumer): 47 blocks 2.0-2.2 s, 16 blocks 1.5 s, 8 blocks 1.4-1.5 s.
ROWS_PER_DECODE_TASK = 256


def decoded_bytes(cfg: Config, meta: dict[str, Any]) -> int:
    """Bytes of the decoded training split: rows x the uint8 canvas (3 channels)."""
    return shards.split_rows(meta, cfg.data.train_split) * 3 * canvas(cfg, meta) ** 2


def streamed(cfg: Config, meta: dict[str, Any]) -> bool:
    """True when every epoch reads and decodes the split again (over data.cache_decoded_gb decoded)."""
    return decoded_bytes(cfg, meta) > cfg.data.cache_decoded_gb * 1e9


# The Ray Train dataset names of the train split. A streamed split is handed to the workers twice, so even
# epochs run on one streaming split and odd epochs on the other, and the next epoch's execution can start
# while this one's last batches train (launch/prefetch.py); one streaming split allows one epoch at a time.
TRAIN = ("train", "train_odd_epochs")


def train_names(cfg: Config, meta: dict[str, Any]) -> tuple[str, ...]:
    """The names of TRAIN the split goes under: both when it streams, else the first."""
    return TRAIN if streamed(cfg, meta) else TRAIN[:1]


def train_dataset(cfg: Config, meta: dict[str, Any]) -> ray.data.Dataset:
    """Read and decode in Ray Data tasks while workers train; splits up to data.cache_decoded_gb decoded once."""
    # The filesystem shards.py resolved (local, or from an s3:// / gs:// URI with its query options)
    # travels with the paths, so read tasks on every node open the files the same way.
    # shuffle="files": a new file order every epoch (streamed sets).
    fs, files = shards.split_paths(cfg.data.path, cfg.data.train_split)
    blocks = max(1, -(-shards.split_rows(meta, cfg.data.train_split) // ROWS_PER_DECODE_TASK))
    with parquet_reader_v1():
        ds = ray.data.read_parquet(
            files, filesystem=fs, columns=COLUMNS, shuffle="files", override_num_blocks=blocks
        )
    # Decode in Ray Data tasks (not on the training worker) so it overlaps compute; only uint8 pixels, token
    # ids and spec strings cross the object store. Augmentation happens on the worker's device.
    ds = ds.map_batches(
        build_decode(cfg, canvas(cfg, meta)), batch_format="numpy", batch_size=cfg.micro_batch_size
    )
    # Decoding is epoch-independent (augmentation runs on the device), so a split that fits (the default 1 GB
    # is well under the object store's default share, 30% of RAM) is decoded once: that spares every epoch
    # Ray Data's read-and-decode start-up. A catalogue streams.
    return ds if streamed(cfg, meta) else ds.materialize()


def train_datasets(cfg: Config, meta: dict[str, Any]) -> dict[str, ray.data.Dataset]:
    """The `datasets` of the TorchTrainer: the train split under TRAIN's names (both, when it streams)."""
    ds = train_dataset(cfg, meta)
    return dict.fromkeys(train_names(cfg, meta), ds)


def steps_per_epoch(cfg: Config, meta: dict[str, Any], world: int) -> int:
    """Micro batches per rank per epoch: Ray's equal split of the train split, then drop_last."""
    return (shards.split_rows(meta, cfg.data.train_split) // world) // cfg.micro_batch_size


def epoch_batches(cfg: Config, meta: dict[str, Any]) -> Callable[[int], Iterable[dict[str, Any]]]:
    """In a Ray Train worker: epoch -> this worker's micro batches of its train shard(s), locally shuffled.

    drop_last + Ray's equal split: every rank yields the same number of batches, which ZeRO's
    collectives and ray.train.report (a barrier) both need.
    """
    import ray.train

    its = [ray.train.get_dataset_shard(name) for name in train_names(cfg, meta)]
    shuffle = cfg.data.shuffle_buffer if cfg.data.augment else None

    def open_epoch(epoch: int) -> Iterable[dict[str, Any]]:
        # numpy, not torch batches: the symbol specs are strings (the device side looks them up in its bank).
        return its[epoch % len(its)].iter_batches(
            batch_size=cfg.micro_batch_size,
            drop_last=True,
            local_shuffle_buffer_size=shuffle,
            batch_format="numpy",
        )

    if len(its) == 1:
        return open_epoch  # decoded once: an epoch's first batch is there at once (0.04 s in the demo)
    last = cfg.stages.stage1_epochs + cfg.stages.stage2_epochs - 1
    steps = steps_per_epoch(cfg, meta, ray.train.get_context().get_world_size())
    return EpochPrefetcher(open_epoch, last_epoch=last, steps_per_epoch=steps)
