"""Test-wide settings: offline hub, CPU DeepSpeed, and shared helpers."""

from __future__ import annotations

import os

# Set before anything imports open_clip / deepspeed: no hub retries, no accelerator probing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "real-galaxies")
# Real survey images (a few MB of Galaxy10 DECaLS, GalaxyMNIST and Galaxy Zoo samples; provenance and the
# papers to cite in their README) live beside the checkout on the project's machines, not in the repository.
# Tests that need real pixels skip, saying so, where they are absent (a bare clone); the rest make their data.
REAL_GALAXIES = os.path.abspath(os.environ.get("GALAXALIGN_REAL_GALAXIES", REAL))


from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from galaxalign_dist.launch.train import free_port  # noqa: E402, F401 - tests import it from here


def real_path(*parts: str) -> Path:
    """A file of the real-galaxy sample, or skip the calling test with the reason."""
    path = Path(REAL_GALAXIES, *parts)
    if not path.exists():
        pytest.skip(f"needs the real-galaxy sample: {path} not found (set GALAXALIGN_REAL_GALAXIES)")
    return path


def galaxy_jpegs(n: int, directory: Path) -> list[Path]:
    """n JPEG files of galaxies: real 424 px Galaxy Zoo cutouts when the sample is there, else synthetic
    galaxies (data/synthetic.py) written into `directory` (for tests of readers, not of real pixels)."""
    real = sorted(Path(REAL_GALAXIES, "gz-kaggle-spirals", "images").glob("*/*/*.jpg"))
    if len(real) >= n:
        return real[:n]
    from galaxalign_dist.data.images import encode
    from galaxalign_dist.data.synthetic import generate

    images, _ = generate("galaxymnist", n, size=128, seed=0)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(directory / f"synthetic-{i:05d}.jpg")
        paths[-1].write_bytes(encode(img, "jpeg"))
    return paths


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
