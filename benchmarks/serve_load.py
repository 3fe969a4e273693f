"""Load test of `galaxalign serve` on loopback, bounded in requests and time, against the same queries in-process.

Run: .venv/bin/python benchmarks/serve_load.py [--quick] [--requests 2000] [--concurrency 16] [--max-seconds 300]
                                                [--rows 2000] [--model EXPORT --index DIR] [--replicas 1]

1. A catalogue (without --model/--index): `rows` synthetic galaxies, the tiny model at a seeded random init,
   embedded in one process and indexed (Flat), cached under GALAXALIGN_BENCH_CACHE.
2. A local Ray (num_cpus = max(4, nproc): the model replica 1 CPU, index 0.5, ingress 0.25) and the app bound
   to 127.0.0.1 on a free port (never another interface); waits for /api/ready.
3. `requests` HTTP requests from `concurrency` client threads (keep-alive connections), cycling one fixed
   mix: a third text queries (10 descriptions), a third by catalogue id, a third image uploads (PNG bytes of
   catalogue galaxies), k=10. It stops at the count or after max-seconds, whichever comes first. An error is
   any answer other than 200 or a failed connection (target: 0).
4. The same queries in-process, one after another: search_service's QueryEncoder + IndexService, the code
   the deployments run, without HTTP, JSON or Ray (the same upload check included).
Prints `name: value` lines: serve p50/p99 latency (ms), requests/s, errors; in-process p50/p99 and
queries/s; the last line is serve_rps. The client threads share the machine with the server: on a 2-core
host they take part of its CPU, so the figures are a floor.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (sets HF_HUB_OFFLINE before any heavy import)
import numpy as np  # noqa: E402

TEXTS = [
    "a smooth round galaxy",
    "a smooth cigar-shaped galaxy",
    "an edge-on disk galaxy",
    "an unbarred spiral galaxy",
    "a barred spiral galaxy with tight arms",
    "a merging pair of galaxies",
    "a bright elliptical galaxy with a faint halo",
    "a loose spiral with open arms",
    "a thin edge-on disk with a dust lane",
    "a small faint blob",
]


def make_world(rows: int) -> tuple[Path, Path, Path]:
    """(data, model, index) of `rows` synthetic galaxies, built once per size under the benchmark cache."""
    sys.path.insert(0, str(common.REPO / "tests"))
    from embed_helpers import export_tiny

    from galaxalign_dist.data.prepare import prepare
    from galaxalign_dist.evaluation.embed_job import EmbedOptions, embed_local
    from galaxalign_dist.evaluation.index_embeddings import index_embeddings

    root = common.CACHE / f"serve-{rows}"
    if not (root / "index" / "index.json").exists():
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        prepare("synthetic:galaxymnist", root / "data", n=rows, progress=False)
        export_tiny(root / "model")
        embed_local(root / "model", root / "data", root / "emb", EmbedOptions(batch_size=256, progress=False))
        index_embeddings(root / "emb", root / "index", progress=False)
    return root / "data", root / "model", root / "index"


def query_mix(index_dir: Path, data: Path | None, n_each: int = 20) -> list[tuple[str, str | bytes]]:
    """Text, id and image queries interleaved: ("text", words), ("id", gid), ("image", PNG bytes)."""
    from galaxalign_dist.evaluation.search_service import IndexService

    service = IndexService(index_dir, str(data) if data else None)
    cards = service.sample(2 * n_each, seed=0)
    from galaxalign_dist.evaluation.index_embeddings import thumbnails_of

    records = service.index.records(np.array([service.index.position(c["id"]) for c in cards[n_each:]]))
    from galaxalign_dist.data.images import encode_png

    images = [encode_png(t) for t in thumbnails_of(records, service.data, 64)]
    out: list[tuple[str, str | bytes]] = []
    for i in range(n_each):
        out += [("text", TEXTS[i % len(TEXTS)]), ("id", cards[i]["id"]), ("image", images[i])]
    return out


def _send(conn: http.client.HTTPConnection, kind: str, value: str | bytes) -> int:
    if kind == "text":
        conn.request("GET", f"/api/search/text?k=10&q={quote(str(value))}")
    elif kind == "id":
        conn.request("GET", f"/api/search/id?k=10&id={quote(str(value))}")
    else:
        conn.request("POST", "/api/search/image?k=10", body=value, headers={"Content-Type": "image/png"})
    response = conn.getresponse()
    response.read()
    return response.status


def load(port: int, queries: list, n: int, concurrency: int, max_seconds: float) -> dict:
    """Send up to n requests from `concurrency` threads, stopping at n or max_seconds; latencies and errors."""
    counter, lock = itertools.count(), threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                i = next(counter)
            if i >= n:
                break
            kind, value = queries[i % len(queries)]
            t0 = time.perf_counter()
            try:
                status = _send(conn, kind, value)
            except (OSError, http.client.HTTPException) as e:
                status, conn = -1, http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                errors.append(f"{kind}: {type(e).__name__}: {e}")
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if status not in (200, -1):
                    errors.append(f"{kind}: HTTP {status}")
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"seconds": time.perf_counter() - t0, "latencies": latencies, "errors": errors}


def _info(port: int) -> dict:
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/api/info")
    return json.loads(conn.getresponse().read())


def in_process(model: Path, index: Path, queries: list, n: int, max_seconds: float) -> dict:
    """The same queries through the code the deployments run, in this process, one after another."""
    import torch

    from galaxalign_dist.evaluation.search_service import IndexService, QueryEncoder, check_image

    torch.set_num_threads(1)  # as the model replica (1 CPU)
    encoder, service = QueryEncoder(model), IndexService(index)
    latencies, deadline, t_start = [], time.monotonic() + max_seconds, time.perf_counter()
    for i in range(n):
        if time.monotonic() > deadline:
            break
        kind, value = queries[i % len(queries)]
        t0 = time.perf_counter()
        if kind == "text":
            service.search(encoder.texts([str(value)])[0], 10)
        elif kind == "id":
            vector, pos = service.vector_of(str(value))
            service.search(vector, 10, exclude=pos)
        else:
            check_image(bytes(value))
            service.search(encoder.images([bytes(value)])[0], 10)
        latencies.append(time.perf_counter() - t0)
    return {"seconds": time.perf_counter() - t_start, "latencies": latencies}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument(
        "--max-seconds", type=float, default=300.0, help="stop the load (and the in-process run) after"
    )
    p.add_argument("--rows", type=int, default=2000, help="synthetic catalogue size without --model/--index")
    p.add_argument("--model", help="an export (with --index: serve these instead of a synthetic catalogue)")
    p.add_argument("--index", help="an index directory (galaxalign index --out)")
    p.add_argument("--data", help="the catalogue of --index (default: the one it was built from)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument(
        "--quick", action="store_true", help="200 requests, 8 threads, 500 galaxies (the smoke run)"
    )
    args = p.parse_args()
    if args.quick:
        args.requests, args.concurrency, args.rows, args.max_seconds = 200, 8, 500, 120.0
    common.print_machine()
    if args.model and args.index:
        model, index, data = Path(args.model), Path(args.index), Path(args.data) if args.data else None
    else:
        data, model, index = make_world(args.rows)
    queries = query_mix(index, data)

    import ray

    from galaxalign_dist.launch import serve_app
    from galaxalign_dist.launch.train import free_port

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        t0 = time.perf_counter()
        serve_app.start(
            str(model), str(index), str(data) if data else None, port=port, replicas=args.replicas
        )
        print(f"serve start-up (deployments ready): {time.perf_counter() - t0:.1f} s", flush=True)
        load(
            port, queries, min(60, args.requests), args.concurrency, 60
        )  # warm-up: first batches, allocators
        res = load(port, queries, args.requests, args.concurrency, args.max_seconds)
        batching = _info(port)["model"]["batching"]  # warm-up included
    finally:
        serve_app.stop()
        ray.shutdown()
    local = in_process(model, index, queries, args.requests, args.max_seconds)

    def ms(xs: list[float], q: float) -> float:
        return float(np.percentile(np.array(xs) * 1e3, q)) if xs else float("nan")

    for e in sorted(set(res["errors"]))[:10]:
        print(f"error seen: {e}", flush=True)
    n = len(res["latencies"])
    print(f"catalogue: {index} ({len(queries)} distinct queries: text, id, image; k=10)")
    print(f"serve_requests: {n}")
    print(f"serve_concurrency: {args.concurrency}")
    print(f"serve_seconds: {res['seconds']:.2f}")
    print(f"serve_p50_ms: {ms(res['latencies'], 50):.2f}")
    print(f"serve_p99_ms: {ms(res['latencies'], 99):.2f}")
    print(f"serve_errors: {len(res['errors'])}")
    print(f"inprocess_queries: {len(local['latencies'])}")
    print(f"inprocess_p50_ms: {ms(local['latencies'], 50):.2f}")
    print(f"inprocess_p99_ms: {ms(local['latencies'], 99):.2f}")
    print(f"inprocess_qps: {len(local['latencies']) / local['seconds']:.2f}")
    for kind, b in batching.items():
        print(f"serve_{kind}_per_batch: {b['items'] / max(1, b['batches']):.2f}  (largest {b['largest']})")
    print(f"load average (1/5/15 min) at end: {common.load_average()}")
    common.summary("serve_rps", n / res["seconds"])


if __name__ == "__main__":
    main()
