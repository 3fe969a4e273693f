"""Shared benchmark helpers: environment, machine description, cached benchmark datasets, summary line."""

from __future__ import annotations

import hashlib
import io
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Before anything imports open_clip / deepspeed: no hub retries, no accelerator probing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GALAXALIGN_BENCH_CACHE", "/tmp/galaxalign-bench"))
# DeepSpeed JIT-builds its CPU shared-memory all-reduce op into TORCH_EXTENSIONS_DIR (default
# ~/.cache/torch_extensions/py311_cu132, shared by every venv of the same Python and torch). Two venvs
# on one host rebuilt it in turn (30-65 s per DeepSpeed init, seen in its .ninja_log), and one rank
# aborted with glibc "malloc(): unaligned tcache chunk" during that churn. One dir per venv.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    str(
        Path.home()
        / ".cache"
        / "torch_extensions_by_venv"
        / hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]
    ),
)
REAL_GALAXIES = Path(
    os.environ.get("GALAXALIGN_REAL_GALAXIES", REPO.parent / "shared" / "data" / "real-galaxies")
).resolve()

# Real survey pixels, replicated: 64 px GalaxyMNIST (GalaxyMNIST schema) and 256 px Galaxy10 DECaLS.
DATASETS = {
    "64": ("galaxymnist_40_64px.npz", "galaxymnist", "labels"),
    "256": ("galaxy10_decals_100.npz", "galaxy10", "ans"),
}


def machine() -> dict[str, Any]:
    """nproc, CPU model, RAM and library versions: printed at the top of every benchmark."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    info = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(ram_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    for mod in ("deepspeed", "ray", "open_clip"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version string is informational only
            info[mod] = "n/a"
    return info


def load_average() -> str:
    """1/5/15-min load: these hosts are shared, so a load above nproc means the figures are contended."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def print_machine() -> None:
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine().items()), flush=True)
    print(f"load average (1/5/15 min) at start: {load_average()}", flush=True)


def summary(name: str, value: float) -> None:
    """The one machine-readable last line every benchmark ends with."""
    print(f"{name}: {value:.4f}", flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    """median [min-max] of a list of rates, for the printed tables."""
    if not xs:
        return "n/a"
    return f"{median(xs):.3g} [{min(xs):.3g}-{max(xs):.3g}]"


def ratio(num: list[float], den: list[float]) -> float:
    """Ratio of medians; nan when either side has no samples."""
    if not num or not den:
        return float("nan")
    return median(num) / median(den)


def finite_positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t0


def real_images(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 images and (N,) labels of one real-galaxy sample ('64' or '256').

    The sample lives beside the checkout on the project's machines; elsewhere (a bare clone) the built-in
    synthetic galaxies of the same size stand in, and the benchmark says so: its figures are then not
    comparable with benchmarks/RESULTS.md.
    """
    fname, schema, _ = DATASETS[kind]
    if not (REAL_GALAXIES / fname).exists():
        from galaxalign_dist.data.synthetic import generate

        print(f"note: {REAL_GALAXIES / fname} not found: synthetic {kind} px galaxies stand in", flush=True)
        return generate(schema, 100, seed=0, size=int(kind))
    with np.load(REAL_GALAXIES / fname) as d:
        return np.asarray(d["images"]), np.asarray(d["labels"]).astype(np.int64)


def replicated(kind: str, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`rows` images cycled from the real sample, each copy rotated by k*90 deg / flipped.

    Copies differ in bytes (no two identical PNGs in a row group) but keep the real pixel statistics,
    so PNG decode cost is that of real survey cutouts.
    """
    images, labels = real_images(kind)
    rng = np.random.default_rng(seed)
    idx = np.arange(rows) % len(images)
    out = np.empty((rows, *images.shape[1:]), np.uint8)
    for i, j in enumerate(idx):
        img = np.rot90(images[j], k=int(rng.integers(4)))
        out[i] = img[:, ::-1] if rng.random() < 0.5 else img
    return out, labels[idx]


def dataset(kind: str, rows: int, rows_per_file: int | None = None, image_format: str | None = None) -> Path:
    """A prepared shard directory (cached under CACHE) built by `prepare` from replicated real images.

    rows_per_file: smaller Parquet files than prepare's default ~128 MB rotation (one Ray Data read
    task, and so one transform task, per file). image_format: prepare's --image-format (default: its default).
    """
    import h5py

    from galaxalign_dist.data import shards
    from galaxalign_dist.data.options import DEFAULT_IMAGE_FORMAT
    from galaxalign_dist.data.prepare import prepare

    fmt = image_format or DEFAULT_IMAGE_FORMAT
    out = CACHE / (f"data-{kind}px-{rows}-{fmt}" + ("" if rows_per_file is None else f"-f{rows_per_file}"))
    if (out / shards.METADATA_FILE).exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    _, schema, label_key = DATASETS[kind]
    images, labels = replicated(kind, rows)
    h5 = CACHE / f"{schema}-{kind}px-{rows}.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("images", data=images)
        f.create_dataset(label_key, data=labels)
    prepare(
        f"{schema}:{h5}", out, overwrite=True, progress=False, rows_per_file=rows_per_file, image_format=fmt
    )
    h5.unlink()
    return out


def png_bytes(images: np.ndarray) -> list[bytes]:
    """PNG-encode like `prepare` does (compress_level=1), for in-memory batches."""
    from PIL import Image

    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out
