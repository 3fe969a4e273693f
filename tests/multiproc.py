"""Run a function on N gloo ranks in fresh processes (as DeepSpeed and the loss see them) and collect results."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from galaxalign_dist.launch.train import free_port


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], *args: Any, world: int = 2) -> list[Any]:
    """fn(rank, *args) on `world` spawned processes; returns the per-rank results in rank order.

    fn must be importable (a module-level function) and return picklable values. A rank that dies (a
    signal, an exception) makes this raise torch.multiprocessing's ProcessExitedException/ProcessRaisedException.
    """
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            _entry, args=(world, free_port(), fn, args, out), nprocs=world, start_method="spawn"
        )
        return [out[r] for r in range(world)]
