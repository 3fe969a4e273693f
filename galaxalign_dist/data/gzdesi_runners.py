"""How `gzdesi:` shards are run: one after another, or in local processes (Ray: launch/gzdesi.py)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Protocol

from galaxalign_dist.data.gzdesi_convert import ShardJob, convert_shard

Done = Callable[[dict[str, Any]], None]  # called with each finished shard's manifest, in the caller's process
Progress = Callable[[int], None]  # catalogue rows processed since the last call


class Runner(Protocol):
    """Converts shards `todo` of `job` (convert_shard), reporting each manifest to `done` and rows to `progress`.

    An exception from any shard ends the run (shards still running are cancelled where possible);
    shards finished before it keep their manifests, so a rerun resumes after them.
    """

    def __call__(self, job: ShardJob, todo: list[int], done: Done, progress: Progress) -> None: ...


def serial_runner(job: ShardJob, todo: list[int], done: Done, progress: Progress) -> None:
    """Every shard in this process, in order (progress per catalogue batch)."""
    for k in todo:
        done(convert_shard(job, k, progress=progress))


def process_runner(workers: int) -> Runner:
    """Up to `workers` shards at once in local processes."""

    def run(job: ShardJob, todo: list[int], done: Done, progress: Progress) -> None:
        # spawn, not fork: the parent may hold threads (tqdm, Arrow's pools) that a fork would copy mid-lock.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending = {pool.submit(convert_shard, job, k) for k in todo}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        manifest = f.result()
                        done(manifest)
                        progress(manifest["rows_in"])
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise

    return run


def local_runner(workers: int | None) -> Runner:
    """Serial for one worker (the default), else a process pool."""
    return process_runner(workers) if workers is not None and workers > 1 else serial_runner
