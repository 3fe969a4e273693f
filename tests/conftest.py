"""Test-wide settings: offline hub, CPU DeepSpeed, and shared helpers."""

from __future__ import annotations

import os

# Set before anything imports open_clip / deepspeed: no hub retries, no accelerator probing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "real-galaxies")
REAL_GALAXIES = os.path.abspath(os.environ.get("GALAXALIGN_REAL_GALAXIES", REAL))


import pytest  # noqa: E402

from galaxalign_dist.launch.train import free_port  # noqa: E402, F401 - tests import it from here


@pytest.fixture(scope="session")
def single_rank_group():
    """One gloo rank in the test process for in-process DeepSpeed runs.

    Session-wide: DeepSpeed caches the process group it first sees, so a group destroyed and
    re-created by another test module would leave it holding a dead one.
    """
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
