"""Benchmark `galaxalign embed` / `index` at catalogue scale: memory vs rows, Ray vs one process, IVF recall.

Run: .venv/bin/python benchmarks/embed_scale.py [--quick] [--rows 20000 200000] [--ivf-n 1000000]

1. Memory: the Ray Data job (tiny model, 64 px real-galaxy PNGs, modalities image,text,symbol) embeds a
   small and a 10x larger synthetic catalogue, each in a fresh driver process. A sampler thread adds up the
   resident set of the driver and every Ray worker process (ray::*: read tasks, the model actors) every
   0.2 s; the peak of that sum is the figure (Ray's own daemons, raylet/GCS/dashboard, are not counted;
   shared object-store pages are counted in every process that maps them, so the sum overstates).
   `embed_rss_ratio` = peak at the larger size / peak at the smaller (flat memory gives ~1; target < 1.3).
2. Throughput: the larger catalogue through the plain single-process loop (`embed --local`: read,
   decode, the same model, torch using every core) and through the Ray job on the same cores (Ray started
   with num_cpus = nproc, one CPU actor per core). `embed_ratio` = Ray rows/s over loop rows/s, each the
   whole job (first batch and actor start-up included; starting Ray itself is reported apart); rows per
   CPU-second of all processes (driver + workers) are printed too, as wall time is noisy on a shared
   host (target >= 0.9).
3. Index: `ivf_n` clustered 256-d vectors (1000 centres, each with a 16-d random linear subspace, plus small
   isotropic noise, L2-normalised: low intrinsic dimension as CLIP embeddings have), indexed by the
   factory `galaxalign index` picks by size. `ivf_recall_at_10` = recall@10 against exact search on 1000
   fresh queries from the same distribution; `ivf_bytes_ratio` = index bytes / exact (Flat) bytes.
   Exact single-query latency at the Flat limit (FLAT_MAX_BYTES) is printed: what sets that limit.
4. Extrapolation to Galaxy Zoo DESI (8.7M galaxies) on one stated GPU node, from the decode rate measured
   here on real 424 px JPEGs at ViT-B/16's 224 px input and stated GPU assumptions.
Ends with `embed_rss_ratio`, `embed_ratio`, `ivf_recall_at_10`, `ivf_bytes_ratio` lines (the last is the
summary line the smoke test reads).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (sets HF_HUB_OFFLINE before any heavy import)
import numpy as np  # noqa: E402

ROOT = common.CACHE / "embed_scale"
GZ_DESI_ROWS = 8_700_000
VITB16_GFLOP = (
    35.13  # open_clip model_profile.csv: ViT-B/16 image tower forward at 224 px (docs/design anchors)
)


# ----------------------------------------------------------------------------- inputs


def make_dataset(rows: int, rows_per_file: int) -> Path:
    """A prepared dataset of `rows` galaxies (real 64 px GalaxyMNIST pixels, replicated) written directly."""
    import pyarrow as pa

    from galaxalign_dist.data import shards
    from galaxalign_dist.data.schemas import get_schema

    out = ROOT / f"data-{rows}-f{rows_per_file}"
    if shards.is_prepared(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    images, labels = common.replicated("64", 320)  # 320 distinct PNGs (rotated/flipped real cutouts)
    pngs = common.png_bytes(images)
    schema = get_schema("galaxymnist")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = shards.ShardWriter(tmp / "train", rows_per_file=rows_per_file, file_bytes=2**62)
    for lo in range(0, rows, 10_000):
        idx = np.arange(lo, min(rows, lo + 10_000))
        lab = labels[idx % len(pngs)]
        cls = [schema.classes[int(c)] for c in lab]
        writer.write(pa.table({
            "id": [f"g{i:08d}" for i in idx], "image": pa.array([pngs[i % len(pngs)] for i in idx], pa.binary()),
            "label": pa.array(lab, pa.int32()), "class_name": [c.name for c in cls],
            "text": [c.caption for c in cls], "symbol": [c.symbol for c in cls],
        }))  # fmt: skip
    writer.close()
    per_class = {c.key: int(np.sum(labels[np.arange(rows) % len(pngs)] == c.index)) for c in schema.classes}
    meta = shards.dataset_metadata(
        schema, source="benchmark", source_description="replicated galaxymnist_40_64px", columns=list(shards.ARROW_SCHEMA.names),
        image_size=[64, 64], image_formats={"PNG": rows}, split_method="none", seed=0, test_fraction=0.0,
        splits={"train": {"rows": rows, "files": [p.name for p in writer.files], "per_class": per_class}},
        skipped={"count": 0, "rows": [], "listed": 0},
    )  # fmt: skip
    shards.write_metadata(tmp, meta)
    os.replace(tmp, out)
    return out


def make_model() -> Path:
    sys.path.insert(0, str(common.REPO / "tests"))
    from embed_helpers import export_tiny

    out = ROOT / "model"
    if not (out / "export.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        export_tiny(out)
    return out


# ----------------------------------------------------------------------------- one job per child process


class Sampler(threading.Thread):
    """Peak of (driver + Ray worker processes) resident memory, and their CPU seconds, sampled every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.me, self.peak, self.peak_driver, self.cpu, self.stop = psutil.Process(), 0, 0, {}, False

    def processes(self) -> list:
        procs = [self.me]
        for p in self.me.children(recursive=True):
            try:
                if p.name().startswith("ray::") or "default_worker.py" in " ".join(p.cmdline()[:3]):
                    procs.append(p)
            except Exception:  # noqa: BLE001 - a process that just exited
                continue
        return procs

    def run(self) -> None:
        while not self.stop:
            total = 0
            for p in self.processes():
                try:
                    rss, t = p.memory_info().rss, p.cpu_times()
                except Exception:  # noqa: BLE001
                    continue
                total += rss
                self.cpu[p.pid] = t.user + t.system
                if p.pid == self.me.pid:
                    self.peak_driver = max(self.peak_driver, rss)
            self.peak = max(self.peak, total)
            time.sleep(0.2)


def child(mode: str, data: str, model: str, out: str, rows_per_shard: int) -> None:
    """One embedding job in this fresh process; prints its figures as JSON."""
    import torch

    from galaxalign_dist.evaluation.embed_job import EmbedOptions, embed_local

    opts = EmbedOptions(batch_size=256, rows_per_shard=rows_per_shard, progress=False, overwrite=True)
    nproc = os.cpu_count() or 1
    sampler = Sampler()
    sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "local":
        torch.set_num_threads(nproc)
        summary = embed_local(model, data, out, opts)
    else:
        import ray

        from galaxalign_dist.launch.embed import embed_catalogue

        ray.init(num_cpus=nproc, include_dashboard=False, log_to_driver=False)
        summary = embed_catalogue(model, data, out, opts, num_actors=nproc, cpus_per_actor=1.0)
    wall = time.perf_counter() - t0
    sampler.stop = True
    sampler.join()
    cpu = sum(sampler.cpu.values()) if mode == "ray" else time.process_time() - c0
    print(json.dumps({
        "mode": mode, "rows": summary["rows"], "job_s": summary["seconds"], "wall_s": wall, "cpu_s": cpu,
        "rows_per_s": summary["steady_rows_per_s"], "peak_gb": sampler.peak / 2**30,
        "driver_peak_gb": sampler.peak_driver / 2**30, "actors": summary.get("actors", 0),
    }))  # fmt: skip
    if mode == "ray":
        ray.shutdown()


def run_child(mode: str, data: Path, model: Path, rows_per_shard: int) -> dict:
    out = ROOT / f"out-{mode}-{data.name}"
    cmd = [sys.executable, __file__, "--child", mode, str(data), str(model), str(out), str(rows_per_shard)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    shutil.rmtree(out, ignore_errors=True)
    if res.returncode:
        raise SystemExit(f"{mode} child failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- index


def clustered(n: int, dim: int, seed: int, k: int = 1000, latent: int = 16) -> np.ndarray:
    centres = np.random.default_rng(0).standard_normal((k, dim)).astype(np.float32)
    basis = np.random.default_rng(1).standard_normal((k, latent, dim)).astype(np.float32) * (
        0.6 / np.sqrt(latent)
    )
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, 100_000):
        m = min(n, lo + 100_000) - lo
        c = rng.integers(0, k, m)
        x = centres[c] + rng.standard_normal((m, dim), dtype=np.float32) * (0.05 * np.sqrt(dim) / 3)
        z = rng.standard_normal((m, latent), dtype=np.float32)
        for j in np.unique(c):
            sel = c == j
            x[sel] += z[sel] @ basis[j]
        out[lo : lo + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def index_figures(n: int, dim: int) -> dict:
    import faiss

    from galaxalign_dist.evaluation.index import FLAT_MAX_BYTES, build_index, choose_factory, load_index

    t0 = time.perf_counter()
    xb, xq = clustered(n, dim, seed=2), clustered(1000, dim, seed=3)
    gen_s = time.perf_counter() - t0
    flat = faiss.IndexFlatIP(dim)
    flat.add(xb)
    _, truth = flat.search(xq, 10)
    factory = choose_factory(n, dim)
    out = ROOT / f"index-{n}-{dim}"
    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = time.process_time(), time.perf_counter()
    build_index(xb, np.array([f"g{i}" for i in range(n)]), out, factory=factory)
    build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    meta = json.loads((out / "index.json").read_text())
    loaded = load_index(out)
    t0 = time.perf_counter()
    _, got = loaded.index.search(xq, 10)
    ms = (time.perf_counter() - t0) * 1e3 / len(xq)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got, strict=True)]))
    # Exact single-query latency at the Flat limit, 512-d (the size where `index` switches to IVF).
    n_flat = FLAT_MAX_BYTES // (512 * 4)
    big = faiss.IndexFlatIP(512)
    big.add(np.random.default_rng(4).standard_normal((n_flat, 512), dtype=np.float32))
    q = np.random.default_rng(5).standard_normal((20, 512), dtype=np.float32)
    t0 = time.perf_counter()
    for row in q:
        big.search(row[None], 10)
    flat_ms = (time.perf_counter() - t0) * 1e3 / len(q)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "n": n, "dim": dim, "factory": factory, "nprobe": meta["nprobe"], "recall_built": meta["recall_at_10"],
        "recall_fresh": recall, "bytes": meta["bytes"], "bytes_ratio": meta["bytes"] / (n * dim * 4),
        "by_nprobe": meta["recall"].get("by_nprobe"), "build_s": build_s, "build_cpu_s": build_cpu,
        "gen_s": gen_s, "ivf_ms_per_query": ms, "flat_limit_rows_512d": n_flat, "flat_limit_ms_per_query": flat_ms,
    }  # fmt: skip


# ----------------------------------------------------------------------------- extrapolation


def jpeg_decode_rate(n: int) -> float:
    """Rows per CPU-second of the eval transform on real 424 px Galaxy Zoo JPEGs at ViT-B/16's 224 px."""
    import torch

    from galaxalign_dist import config as config_mod
    from galaxalign_dist.evaluation.embed_batch import RowPixels

    torch.set_num_threads(1)
    files = sorted((common.REAL_GALAXIES / "gz-kaggle-spirals").glob("images/*/*/*.jpg"))[:n]
    blobs = np.array([f.read_bytes() for f in files], dtype=object)
    cfg = config_mod.load("galaxy10_vitb16")
    pixels = RowPixels(cfg)
    batch = {"id": np.array([f.stem for f in files], dtype=object), "image": blobs,
             "source": np.array([""] * len(files), dtype=object), "source_row": np.zeros(len(files), np.int64)}  # fmt: skip
    pixels(
        dict(
            batch,
            id=batch["id"][:8],
            image=blobs[:8],
            source=batch["source"][:8],
            source_row=batch["source_row"][:8],
        )
    )
    c0 = time.process_time()
    pixels(batch)
    return len(files) / (time.process_time() - c0)


def extrapolate(decode_per_core: float, rss: dict) -> None:
    # Stated node: 8 x H100 80 GB, 96 cores (e.g. AWS p5.48xlarge has 192 vCPUs = 96 cores), NVMe-backed
    # object store; ViT-B/16 image tower in bf16 at 40% of the 989 TFLOP/s dense peak (NeMo reports 39% MFU
    # for CLIP training on A100; inference has no backward and large batches). Text and symbol towers run
    # once per distinct caption/spec (cached), so they cost ~nothing per row.
    gpus, cores, mfu, peak_tflops = 8, 96, 0.40, 989
    gpu_rate = gpus * mfu * peak_tflops * 1e12 / (VITB16_GFLOP * 1e9)
    decode_rate = (cores - gpus) * decode_per_core  # one core per GPU actor, the rest decode
    rate = min(gpu_rate, decode_rate)
    hours = GZ_DESI_ROWS / rate / 3600
    f32 = GZ_DESI_ROWS * 3 * 512 * 4
    print(
        f"\nextrapolation, {GZ_DESI_ROWS / 1e6:.1f}M galaxies (ViT-B/16, 512-d, image+text+symbol) on one node of "
        f"{gpus} x H100 + {cores} cores (assumed: {mfu:.0%} of {peak_tflops} TFLOP/s bf16 per GPU, "
        f"{VITB16_GFLOP} GFLOP per image):\n"
        f"  GPUs {gpu_rate:,.0f} images/s; decode {decode_per_core:,.0f} rows per core-second (measured here, "
        f"424 px JPEG -> 224 px) x {cores - gpus} cores = {decode_rate:,.0f} rows/s\n"
        f"  -> {rate:,.0f} rows/s ({'decode' if decode_rate < gpu_rate else 'GPU'}-bound): {hours:.1f} h wall; "
        f"with --decode tasks the GPUs wait on JPEG decode unless the node has ~{gpu_rate / decode_per_core:,.0f} cores\n"
        f"  output {f32 / 1e9:.0f} GB float32 ({f32 / 2e9:.0f} GB with --dtype float16), {GZ_DESI_ROWS // 10_000} shards "
        f"of 10,000 rows\n"
        f"  driver + workers memory: flat in catalogue size (measured ratio {rss['ratio']:.2f} for 10x the rows); "
        f"per 10k-row unit in flight the driver holds {10_000 * 3 * 512 * 4 / 2**20:.0f} MiB, ~2 units per actor\n"
        f"  index: {GZ_DESI_ROWS * 512 * 4 / 1e9:.1f} GB exact; IVF16384,SQ6 {GZ_DESI_ROWS * 392 / 1e9:.1f} GB "
        "(384 B codes + 8 B id per galaxy); training sample 819k x 512-d = 1.7 GB on the driver",
        flush=True,
    )


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs=2, default=[20_000, 200_000], metavar=("SMALL", "LARGE"))
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--ivf-n", type=int, default=1_000_000)
    p.add_argument("--ivf-dim", type=int, default=256)
    p.add_argument("--jpegs", type=int, default=400, help="real JPEGs timed for the extrapolation")
    p.add_argument("--quick", action="store_true", help="small sizes (the smoke test)")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, data, model, out, rps = args.child
        child(mode, data, model, out, int(rps))
        return
    if args.quick:
        args.rows, args.rows_per_shard, args.ivf_n, args.ivf_dim, args.jpegs = (
            [1_000, 3_000],
            500,
            60_000,
            64,
            40,
        )
    common.print_machine()
    ROOT.mkdir(parents=True, exist_ok=True)
    model = make_model()
    small, large = (make_dataset(n, args.rows_per_shard) for n in args.rows)

    ray_small = run_child("ray", small, model, args.rows_per_shard)
    ray_large = run_child("ray", large, model, args.rows_per_shard)
    # The loop on the same rows as the large Ray job: both rates are whole jobs (the first batch included),
    # long enough that the actors' start-up is a small part of the Ray job's time.
    local = run_child("local", large, model, args.rows_per_shard)
    print(
        "\n| run | rows | job s | rows/s | CPU s (all processes) | rows per CPU-s | peak RSS GB (driver+workers) | driver GB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in (
        ("Ray Data job", ray_small),
        ("Ray Data job", ray_large),
        ("single process (--local)", local),
    ):
        print(f"| {name} | {r['rows']:,} | {r['job_s']:.1f} | {r['rows'] / r['job_s']:,.0f} | {r['cpu_s']:.1f} | "
              f"{r['rows'] / r['cpu_s']:,.0f} | {r['peak_gb']:.2f} | {r['driver_peak_gb']:.2f} |", flush=True)  # fmt: skip
    print(f"Ray start-up (outside job s): {ray_large['wall_s'] - ray_large['job_s']:.1f} s; job rows/s = rows / job s; "
          f"steady rows/s (after the first batch) Ray {ray_large['rows_per_s']:,.0f}, loop {local['rows_per_s']:,.0f}")  # fmt: skip

    idx = index_figures(args.ivf_n, args.ivf_dim)
    print(f"\nindex of {idx['n']:,} clustered {idx['dim']}-d vectors: {idx['factory']}, nprobe {idx['nprobe']} "
          f"(recall by nprobe on held-out catalogue queries: {idx['by_nprobe']}); built in {idx['build_s']:.0f} s "
          f"({idx['build_cpu_s']:.0f} CPU s, data generated in {idx['gen_s']:.0f} s); {idx['ivf_ms_per_query']:.2f} ms "
          f"per query batched; recall@10 on 1000 fresh queries {idx['recall_fresh']:.4f} (index.json: "
          f"{idx['recall_built']:.4f}); {idx['bytes'] / 2**20:.0f} MiB = {idx['bytes_ratio']:.3f} of exact")  # fmt: skip
    print(f"exact search at the Flat limit ({idx['flat_limit_rows_512d']:,} x 512-d = 512 MiB): "
          f"{idx['flat_limit_ms_per_query']:.1f} ms per single query", flush=True)  # fmt: skip

    rss = {"ratio": ray_large["peak_gb"] / ray_small["peak_gb"]}
    extrapolate(jpeg_decode_rate(args.jpegs), rss)
    print(f"load average (1/5/15 min) at end: {common.load_average()}")
    print(f"embed_rss_ratio: {rss['ratio']:.4f}")
    print(f"embed_ratio: {(ray_large['rows'] / ray_large['job_s']) / (local['rows'] / local['job_s']):.4f}")
    print(f"ivf_recall_at_10: {idx['recall_fresh']:.4f}")
    common.summary("ivf_bytes_ratio", idx["bytes_ratio"])


if __name__ == "__main__":
    main()
