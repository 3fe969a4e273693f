"""One `gzdesi:` shard: convert catalogue rows [k*R, (k+1)*R) to train/test files plus a manifest, or verify one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from galaxalign_dist.data import gzdesi, shards
from galaxalign_dist.data.gzdesi_source import GZDesiSource
from galaxalign_dist.data.images import MAX_LISTED_SKIPS, load_images
from galaxalign_dist.data.options import PrepareOptions
from galaxalign_dist.data.splits import hash_split

MANIFEST_DIR = "_manifests"  # OUT/_manifests/plan.json + shard-NNNNN.json; `_`: Parquet readers skip it
LEGACY_MANIFEST_DIR = "manifests"  # the name before 2026-12: renamed on resume
TMP_DIR = ".tmp"  # OUT/.tmp/shard-NNNNN/{train,test}/: a shard being written; renamed when complete


@dataclass(frozen=True)
class ShardJob:
    """Everything a shard task needs (picklable: shipped to worker processes or Ray tasks)."""

    catalogue: str  # the Parquet file read (a CSV catalogue's staged copy)
    origin: str  # the catalogue the user named: in messages
    out: str
    opts: PrepareOptions
    mapping: gzdesi.GZDesiMapping
    total: int
    fingerprint: str

    @property
    def rows_per_shard(self) -> int:
        return self.opts.gzdesi.rows_per_shard

    @property
    def num_shards(self) -> int:
        return -(-self.total // self.rows_per_shard)

    def bounds(self, k: int) -> tuple[int, int]:
        """Shard k = catalogue rows [k*R, (k+1)*R): fixed by the catalogue alone, so any run rebuilds it identically."""
        return k * self.rows_per_shard, min((k + 1) * self.rows_per_shard, self.total)


def shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def manifest_path(out: Path, k: int) -> Path:
    return out / MANIFEST_DIR / f"shard-{k:05d}.json"


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of one


def checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(2**22):
            h.update(block)
    return h.hexdigest()


def convert_shard(job: ShardJob, k: int, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write shard k (train and test files, then its manifest) and return the manifest.

    Files are written under OUT/.tmp/ and renamed into place; the manifest is written last, so a
    shard whose manifest exists and verifies is complete, whatever happened to the process after.
    """
    t0 = time.perf_counter()
    out, (lo, hi), opts = Path(job.out), job.bounds(k), job.opts
    src = GZDesiSource(job.catalogue, opts, job.mapping, Path(job.origin))
    manifest_path(out, k).unlink(missing_ok=True)  # first: the shard is incomplete from now on
    tmp = out / TMP_DIR / f"shard-{k:05d}"
    shutil.rmtree(tmp, ignore_errors=True)
    schema = shards.arrow_schema(src.extra_fields)
    group, threads = opts.row_group_rows, opts.gzdesi.io_threads
    # One file per split per shard: file_bytes never triggers, rows per file <= rows_per_shard.
    writers = {
        s: shards.ShardWriter(tmp / s, schema, file_bytes=2**62, row_group_rows=group) for s in shards.SPLITS
    }
    excluded, uncertain, sizes, formats = Counter(), Counter(), Counter(), Counter()
    n_classes = len(src.schema.classes)
    per_class = {s: np.zeros(n_classes + 1, np.int64) for s in shards.SPLITS}  # slot 0: label -1
    skipped: list[dict[str, Any]] = []
    n_skipped = 0
    with ThreadPoolExecutor(threads) as pool:
        for start, batch in src.read(lo, hi):
            res = gzdesi.map_batch(batch, job.mapping, source=job.origin)
            keep_mask = res["keep"].to_numpy(zero_copy_only=False)
            reasons = res["reason"].to_numpy(zero_copy_only=False)
            excluded.update(reasons[~keep_mask].tolist())
            uncertain.update(r for r in reasons[keep_mask].tolist() if r)
            keep = np.flatnonzero(keep_mask)
            ids_all = batch.column(src.id_col)
            # Images are read a row group at a time: memory holds ~row_group_rows images, not a batch.
            for piece in range(0, len(keep), group):
                idx = keep[piece : piece + group]
                files = src.image_paths(batch, idx)
                parts = [files[i::threads] for i in range(threads)]  # one future per thread
                loaded: list[Any] = [None] * len(files)
                for i, part in enumerate(pool.map(load_images, parts)):
                    loaded[i::threads] = part
                ids = ids_all.take(pa.array(idx, pa.int64())).to_pylist()
                good = []
                for i, (_, size, fmt, problem) in enumerate(loaded):
                    if problem is None:
                        good.append(i)
                        sizes[f"{size[0]}x{size[1]}"] += 1
                        formats[fmt] += 1
                        continue
                    row, reason = int(start + idx[i]), f"{problem}: {files[i]}"
                    if not opts.skip_bad:
                        raise ValueError(
                            f"{job.origin} row {row} (id {ids[i]}): {reason} (pass --skip-bad to skip such rows)"
                        )
                    n_skipped += 1
                    if len(skipped) < MAX_LISTED_SKIPS:
                        skipped.append({"file": job.origin, "row": row, "id": ids[i], "reason": reason})
                if not good:
                    continue
                take = pa.array(idx[good], pa.int64())
                table = pa.table(
                    {
                        "id": ids_all.take(take),
                        "image": pa.array([loaded[i][0] for i in good], pa.binary()),
                        **{c: res[c].take(take) for c in ("label", "class_name", "text", "symbol")},
                        **{c: batch.column(c).take(take) for c in src.extras},
                    }
                )
                test = np.array(hash_split([ids[i] for i in good], opts.seed, opts.test_fraction)) == "test"
                labels = table.column("label").to_numpy()
                for split, mask in (("train", ~test), ("test", test)):
                    if mask.any():
                        writers[split].write(table.filter(pa.array(mask)))
                        per_class[split] += np.bincount(labels[mask] + 1, minlength=n_classes + 1)
            if progress:
                progress(batch.num_rows)
    splits: dict[str, Any] = {}
    for split, w in writers.items():
        w.close()
        if not w.files:
            continue
        dest = out / split / shard_name(k)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(w.files[0], dest)
        counts = per_class[split]
        splits[split] = {
            "file": dest.name,
            "rows": w.num_rows,
            "bytes": dest.stat().st_size,
            "blake2b": checksum(dest),
            "per_class": {c.key: int(counts[c.index + 1]) for c in src.schema.classes},
            "uncertain": int(counts[0]),
        }
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = {
        "shard": k,
        "rows": [lo, hi],
        "rows_in": hi - lo,
        "kept": sum(s["rows"] for s in splits.values()),
        "excluded": dict(sorted(excluded.items())),
        "uncertain_kept": dict(sorted(uncertain.items())),
        "skipped": {"count": n_skipped, "rows": skipped},
        "splits": splits,
        "image_sizes": dict(sizes),
        "image_formats": dict(formats),
        "seconds": round(time.perf_counter() - t0, 3),
        "fingerprint": job.fingerprint,
    }
    write_json(manifest_path(out, k), manifest)  # last: marks the shard complete
    return manifest


def verify_shard(job: ShardJob, k: int, checksums: bool = False) -> dict[str, Any] | None:
    """Shard k's manifest if the shard is complete and intact, else None (it must be rebuilt).

    Checks the manifest's options fingerprint and row range, and that each file it lists exists with
    the recorded size and a Parquet footer holding the recorded row count (a truncated or partly
    copied file fails); with `checksums`, also re-hashes every file (reads all of it).
    """
    out = Path(job.out)
    try:
        manifest = json.loads(manifest_path(out, k).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("fingerprint") != job.fingerprint or manifest.get("rows") != list(job.bounds(k)):
        return None
    for split in shards.SPLITS:
        path, info = out / split / shard_name(k), manifest["splits"].get(split)
        if info is None:
            if path.exists():  # a file no manifest accounts for would be read by training
                return None
            continue
        try:
            if path.stat().st_size != info["bytes"] or pq.read_metadata(path).num_rows != info["rows"]:
                return None
        except (OSError, pa.ArrowException):
            return None
        if checksums and checksum(path) != info["blake2b"]:
            return None
    return manifest
