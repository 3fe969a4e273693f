"""Benchmark `prepare gzdesi:` at catalogue scale: peak RSS and rows/s per core for 100k vs 1M rows.

Run: .venv/bin/python benchmarks/catalog_scale.py [--sizes 100000 1000000] [--real-rows 4000]

Each conversion runs in a fresh child process (serial, one shard at a time) that reports its own peak
resident set and CPU time, so one size's high-water mark cannot hide another's. Peak RSS is VmHWM from
/proc/self/status, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child of a
parent that imported torch would report the parent's ~0.9 GB.
The catalogues are GZ DESI-schema (gzdesi.synthetic_catalogue, written in 100k-row chunks so generating
them is bounded too) whose `file_loc` points every row at one of 64 tiny JPEGs (32x32, real Galaxy10
DECaLS pixels downsampled): the figures measure the pipeline's per-row overhead and memory, not disk.
A third run converts rows pointing at the real 424x424 Galaxy Zoo JPEGs (gz-kaggle-spirals), whose
full decode (every image is validated) dominates a real conversion: its rows per CPU-second is the
figure docs/gzdesi_scale.md extrapolates to the 8.7M-row catalogue.
Ends with one line `rss_ratio_1m_100k: X` (peak RSS at 1M / at 100k; flat memory gives ~1.0).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (sets HF_HUB_OFFLINE before any heavy import)
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

POOL = 64  # distinct tiny JPEGs the synthetic rows point at
GEN_CHUNK = 100_000  # catalogue rows generated and written at once
CAT_ROW_GROUP = 65_536  # row groups of the benchmark catalogues (pyarrow writes up to 1M by default)
SPIRALS = common.REAL_GALAXIES / "gz-kaggle-spirals"


def make_pool(root: Path) -> None:
    """64 tiny JPEGs from real Galaxy10 DECaLS pixels (decode cost ~0.1 ms, so overheads show)."""
    from PIL import Image

    (root / "pool").mkdir(parents=True, exist_ok=True)
    images, _ = common.real_images("256")
    for i in range(POOL):
        buf = io.BytesIO()
        Image.fromarray(images[i % len(images)]).resize((32, 32), Image.BILINEAR).save(
            buf, "JPEG", quality=90
        )
        (root / "pool" / f"{i:02d}.jpg").write_bytes(buf.getvalue())


def make_catalogue(path: Path, rows: int, file_loc: list[str]) -> None:
    """A GZ DESI-schema catalogue of `rows` rows, generated and written GEN_CHUNK rows at a time."""
    from galaxalign_dist.data import gzdesi

    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
        return  # cached
    tmp = path.with_suffix(".tmp")
    writer = None
    for start in range(0, rows, GEN_CHUNK):
        n = min(GEN_CHUNK, rows - start)
        t = gzdesi.synthetic_catalogue(n, seed=start)
        # synthetic ids restart at 0 per call: rebuild them from the global row index so they stay unique.
        i = np.arange(start, start + n)
        brick, objid = pa.array(100_000 + 37 * (i // 2048)), pa.array(i % 2048)
        ids = pc.binary_join_element_wise(pc.cast(brick, pa.string()), pc.cast(objid, pa.string()), "_")
        t = t.set_column(t.schema.get_field_index("dr8_id"), "dr8_id", ids)
        t = t.append_column("file_loc", pa.array([file_loc[j % len(file_loc)] for j in i]))
        if writer is None:
            writer = pq.ParquetWriter(tmp, t.schema)
        writer.write_table(t, row_group_size=CAT_ROW_GROUP)
    writer.close()
    os.replace(tmp, path)


def _status_mb(key: str) -> float:
    """VmRSS / VmHWM (peak) of this process in MB, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def child(catalogue: str, out: str, image_root: str) -> None:
    """Run one conversion in this (fresh) process and print its figures as JSON."""
    from galaxalign_dist.data.gzdesi_prepare import prepare_gzdesi

    rss0 = _status_mb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    meta = prepare_gzdesi(catalogue, out, image_root=image_root, workers=1, overwrite=True, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    bytes_ = sum(f.stat().st_size for s in ("train", "test") for f in (Path(out) / s).glob("*.parquet"))
    print(json.dumps({
        "rows_in": meta["gzdesi"]["rows_in"], "rows_out": meta["num_rows"], "shards": meta["gzdesi"]["shards"],
        "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": _status_mb("VmHWM"),
        "rss_after_import_mb": rss0, "out_bytes": bytes_,
    }))  # fmt: skip


def run_child(catalogue: Path, out: Path, image_root: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", str(catalogue), str(out), str(image_root)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"child failed:\n{res.stderr[-4000:]}")
    shutil.rmtree(out, ignore_errors=True)  # 1M rows of tiny JPEGs: ~1 GB; keep the cache small
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs=2, default=[100_000, 1_000_000], metavar=("SMALL", "LARGE"))
    p.add_argument("--real-rows", type=int, default=4000, help="rows pointing at real 424 px JPEGs (0: skip)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    common.print_machine()
    root = common.CACHE / "catalog_scale"
    make_pool(root)
    pool_locs = [f"pool/{i:02d}.jpg" for i in range(POOL)]
    results = {}
    for rows in args.sizes:
        t0 = time.perf_counter()
        cat = root / f"gzdesi-{rows}.parquet"
        make_catalogue(cat, rows, pool_locs)
        print(f"catalogue {rows:>9,} rows: {cat.stat().st_size / 2**20:.0f} MB "
              f"(generated/cached in {time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
        results[rows] = run_child(cat, root / f"out-{rows}", root)
    real = None
    if args.real_rows:
        jpegs = sorted(str(f) for f in SPIRALS.glob("images/*/*/*.jpg"))  # absolute: replaces the root
        sizes = [os.path.getsize(f) for f in jpegs]
        cat = root / f"gzdesi-real-{args.real_rows}.parquet"
        make_catalogue(cat, args.real_rows, jpegs)
        real = run_child(cat, root / "out-real", root)
        real["jpeg_mean_kb"] = float(np.mean(sizes)) / 1000

    print("\n| catalogue | rows in | rows out | shards | wall s | CPU s | rows/s (wall) | rows per CPU-s "
          "| peak RSS MB | RSS after imports MB | out MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    named = [(f"synthetic 32 px x{rows:,}", r) for rows, r in results.items()]
    named += [(f"real 424 px x{args.real_rows:,}", real)] if real else []
    for name, r in named:
        print(f"| {name} | {r['rows_in']:,} | {r['rows_out']:,} | {r['shards']} | {r['wall_s']:.1f} | "
              f"{r['cpu_s']:.1f} | {r['rows_in'] / r['wall_s']:,.0f} | {r['rows_in'] / r['cpu_s']:,.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['rss_after_import_mb']:.0f} | {r['out_bytes'] / 2**20:.0f} |")  # fmt: skip
    if real:
        per_core = real["rows_in"] / real["cpu_s"]
        out_kb = real["out_bytes"] / max(real["rows_out"], 1) / 1000
        print(f"\nreal 424 px JPEGs: mean {real['jpeg_mean_kb']:.1f} kB on disk, {out_kb:.1f} kB per row in the "
              f"shards; {per_core:,.0f} rows per CPU-second -> 8.7M rows = {8.7e6 / per_core / 3600:.2f} "
              "core-hours", flush=True)  # fmt: skip
    small, large = (results[s] for s in args.sizes)
    common.summary("rss_ratio_1m_100k", large["peak_rss_mb"] / small["peak_rss_mb"])


if __name__ == "__main__":
    main()
