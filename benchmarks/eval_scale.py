"""Benchmark evaluation at catalogue scale: chunked retrieval mAP time/peak memory and FAISS top-10 throughput.

Run: .venv/bin/python benchmarks/eval_scale.py [--dim 128] [--threads 1] [--sizes 10000 50000 100000]

Peak memory is measured per size in a fresh child process, so one size's high-water mark cannot hide
another's: the child builds its embeddings, records its resident set (VmRSS), runs retrieval_map, and
reports the peak resident set (getrusage ru_maxrss, which covers numpy arrays, BLAS and sort scratch
alike, unlike tracemalloc). "growth" = peak - baseline = memory the mAP computation itself needed.
"cpu s" is process CPU time (BLAS threads included): on a shared machine it varies less than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

NUM_CLASSES = 10


def _embeddings(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    # Class-clustered random embeddings so mAP is neither 0.1 (chance) nor 1.0.
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    centres = rng.standard_normal((NUM_CLASSES, dim)).astype(np.float32)
    emb = centres[labels] * 0.3 + rng.standard_normal((n, dim), dtype=np.float32)
    return emb, labels


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _map_worker(n: int, dim: int, block_size: int, threads: int) -> dict:
    from galaxalign_dist.evaluation.metrics import retrieval_map

    emb, labels = _embeddings(n, dim)
    base = _rss_gb()
    t0, c0 = time.perf_counter(), time.process_time()
    result = retrieval_map(emb, labels, k=5, block_size=block_size, num_threads=threads)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: kB -> GiB
    return {
        "n": n,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "base_gb": base,
        "peak_gb": peak,
        "growth_gb": peak - base,
        **result,
    }


def _run_map(n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(n), "--dim", str(args.dim)]
    cmd += ["--block-size", str(args.block_size), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _faiss_throughput(n: int, dim: int, k: int = 10, n_queries: int = 10000) -> dict:
    import tempfile

    from galaxalign_dist.evaluation.index import build_index, load_index, search_arrays

    emb, _ = _embeddings(n, dim)
    queries, _ = _embeddings(n_queries, dim, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_index(emb, [f"gal_{i}" for i in range(n)], tmp, factory="Flat")
        build_s = time.perf_counter() - t0
        loaded = load_index(tmp)
    search_arrays(loaded, queries[:100], k=k)  # warm-up: thread pool start, page-in of the index
    t0, c0 = time.perf_counter(), time.process_time()
    search_arrays(loaded, queries, k=k)
    batch_s, batch_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    for q in queries[:200]:  # one query per call: the interactive-lookup case
        search_arrays(loaded, q, k=k)
    single_s = (time.perf_counter() - t0) / 200
    return {
        "build_s": build_s,
        "batch_qps": n_queries / batch_s,
        "batch_qps_cpu": n_queries / batch_cpu,
        "single_ms": single_s * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # internal: one mAP run
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_map_worker(args.worker, args.dim, args.block_size, args.threads)))
        return

    # Wall times on a shared 2-core box swing with other jobs: print the load so readers can judge.
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (1 min) at start")
    print(
        f"retrieval_map: D={args.dim}, {NUM_CLASSES} classes, block_size={args.block_size}, threads={args.threads}"
    )
    print(
        f"{'N':>8} {'wall s':>8} {'cpu s':>7} {'q/s':>7} {'base GB':>8} {'peak GB':>8} {'growth GB':>9} {'mAP':>7} {'mAP@5':>7}"
    )
    results = {}
    for n in args.sizes:
        r = results[n] = _run_map(n, args)
        print(
            f"{n:>8} {r['seconds']:>8.1f} {r['cpu_seconds']:>7.1f} {n / r['seconds']:>7.0f} {r['base_gb']:>8.3f} {r['peak_gb']:>8.3f} "
            f"{r['growth_gb']:>9.3f} {r['map']:>7.4f} {r['map_at_5']:>7.4f}"
        )
    n_faiss = max(args.sizes)
    f = _faiss_throughput(n_faiss, args.dim)
    print(
        f"faiss Flat IP, N={n_faiss}, D={args.dim}, top-10: build {f['build_s']:.2f} s, "
        f"batched {f['batch_qps']:.0f} queries/s ({f['batch_qps_cpu']:.0f} per CPU-second), single-query {f['single_ms']:.2f} ms"
    )
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) at end")
    if 100_000 in results:
        print(f"map_100k_peak_gb: {results[100_000]['growth_gb']:.3f}")


if __name__ == "__main__":
    main()
