"""`prepare gzdesi:`: resumable, sharded conversion of the Galaxy Zoo DESI catalogue into training shards."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from galaxalign_dist.data import gzdesi, shards
from galaxalign_dist.data.prepare import MAX_LISTED_SKIPS, _check_image, hash_split
from galaxalign_dist.data.schemas import get_schema
from galaxalign_dist.data.sources import CATALOG_EXTRAS, Chunk, Source, SourceOptions

log = logging.getLogger(__name__)

# 10k catalogue rows per shard: ~150-250 MB of 424 px JPEGs, ~10 s of one core, 870 shards for the
# full 8.7M catalogue -- enough files for Ray Data to read in parallel, few enough to list quickly.
DEFAULT_ROWS_PER_SHARD = 10_000
READ_BATCH_ROWS = 16_384  # catalogue rows mapped at once: ~6 MB of float64 fractions
IO_THREADS = 4  # per shard task: hides NFS/object-mount read latency; JPEG decode releases the GIL
ID_COLUMNS = ("dr8_id", "id_str")
PATH_COLUMN = "file_loc"  # galaxy-datasets catalogues carry each image's path here
MANIFEST_DIR = "manifests"  # OUT/manifests/plan.json + shard-NNNNN.json; training never reads it
TMP_DIR = ".tmp"  # OUT/.tmp/shard-NNNNN/{train,test}/: a shard being written; renamed when complete
PLAN_VERSION = 1


class GZDesiSource(Source):
    """`gzdesi:CATALOGUE.parquet`: reads row ranges of the catalogue in batches and maps them with gzdesi.py.

    Only the columns the mapping needs (plus id, `file_loc`, ra/dec/redshift) are read, one batch of
    at most `READ_BATCH_ROWS` rows at a time, so memory does not depend on the catalogue's size.
    """

    def __init__(self, arg: str, opts: SourceOptions, mapping: gzdesi.GZDesiMapping | None = None) -> None:
        self.path, self.opts = Path(arg), opts
        if not self.path.is_file():
            raise FileNotFoundError(f"Galaxy Zoo DESI catalogue {self.path} does not exist")
        if self.path.suffix.lower() not in (".parquet", ".pq"):
            raise ValueError(f"gzdesi:{self.path}: expected a .parquet catalogue")
        inapplicable = {
            "--label-column": opts.label_column,
            "--split-column": opts.split_column,
            "--class-names": opts.class_names,
            "--class-symbols": opts.class_symbols,
        }
        given = [k for k, v in inapplicable.items() if v]
        if given:
            raise ValueError(f"{given} do not apply to gzdesi: (labels come from the vote fractions)")
        self.mapping = mapping or opts.gzdesi_mapping or gzdesi.GZDesiMapping()
        if opts.schema not in (None, self.mapping.schema):
            raise ValueError(
                f"--schema {opts.schema} != the mapping's {self.mapping.schema}: use --gz-schema"
            )
        self.file = pq.ParquetFile(self.path)  # reads the footer only
        names = self.file.schema_arrow.names
        gzdesi.check_columns(names, self.mapping, str(self.path))  # every missing column, before any work
        self.id_col = opts.id_column or next((c for c in ID_COLUMNS if c in names), None)
        if self.id_col not in names:
            raise gzdesi.MissingColumnsError(
                f"Galaxy Zoo DESI catalogue {self.path} has no id column {opts.id_column or list(ID_COLUMNS)}"
            )
        self.path_col = opts.path_column or (PATH_COLUMN if PATH_COLUMN in names else None)
        if self.path_col and self.path_col not in names:
            raise gzdesi.MissingColumnsError(f"catalogue {self.path} has no column {self.path_col!r}")
        self.root = Path(opts.image_root) if opts.image_root else self.path.parent
        self.schema = get_schema(self.mapping.schema)
        self.extras = [c for c in CATALOG_EXTRAS if c in names]
        self.extra_fields = [pa.field(c, pa.float64()) for c in self.extras]
        rows = self.file.metadata.num_rows
        self.total = min(rows, opts.n) if opts.n is not None else rows
        self.columns = list(dict.fromkeys([self.id_col, *filter(None, [self.path_col]), *self.extras,
                                           *gzdesi.required_columns(self.mapping)]))  # fmt: skip
        layout = f"{self.path_col!r} column" if self.path_col else "{brickid}/{brickid}_{objid}.jpg"
        self.description = f"{self.path} (images under {self.root}, {layout}; {self.mapping.schema})"

    def read(
        self, start: int, stop: int, batch_rows: int = READ_BATCH_ROWS
    ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(first catalogue row, batch) for rows [start, stop), reading only the row groups that hold them."""
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        groups = [g for g in range(len(sizes)) if bounds[g] < stop and bounds[g + 1] > start]
        if not groups:
            return
        pos = int(bounds[groups[0]])
        # use_threads=False: one shard task = one core (parallelism comes from running shards at once).
        for batch in self.file.iter_batches(batch_rows, groups, self.columns, use_threads=False):
            lo, hi = max(start, pos), min(stop, pos + batch.num_rows)
            if lo < hi:
                yield lo, batch.slice(lo - pos, hi - lo)
            pos += batch.num_rows
            if pos >= stop:
                break

    def image_paths(self, batch: pa.RecordBatch, idx: np.ndarray) -> list[Path | None]:
        """Image file of rows `idx` of `batch`: `file_loc` under the root (absolute replaces it), else the DESI layout."""
        if self.path_col:
            rel = batch.column(self.path_col).take(pa.array(idx, pa.int64())).to_pylist()
        else:
            rel = gzdesi.image_relpath(batch.column(self.id_col).take(pa.array(idx, pa.int64()))).to_pylist()
        return [self.root / r if r else None for r in rel]

    def chunks(self) -> Iterator[Chunk]:
        """Kept galaxies as Chunks with per-row class names, captions and symbols (label -1 = uncertain)."""
        for start, batch in self.read(0, self.total):
            res = gzdesi.map_batch(batch, self.mapping, source=str(self.path))
            keep = np.flatnonzero(res["keep"].to_numpy(zero_copy_only=False))
            for piece in range(0, len(keep), 256):
                idx = keep[piece : piece + 256]
                take = pa.array(idx, pa.int64())
                files = self.image_paths(batch, idx)
                problems = {
                    i: f"missing image file {f}" for i, f in enumerate(files) if not f or not f.is_file()
                }
                yield Chunk(
                    origin=str(self.path),
                    rows=(start + idx).tolist(),
                    ids=batch.column(self.id_col).take(take).cast(pa.string()).to_pylist(),
                    labels=res["label"].take(take).to_numpy(),
                    image_bytes=[None if i in problems else f.read_bytes() for i, f in enumerate(files)],
                    problems=problems,
                    extras={c: batch.column(c).take(take).cast(pa.float64()) for c in self.extras},
                    class_names=res["class_name"].take(take).to_pylist(),
                    texts=res["text"].take(take).to_pylist(),
                    symbols=res["symbol"].take(take).to_pylist(),
                )


@dataclass(frozen=True)
class ShardJob:
    """Everything a shard task needs (picklable: shipped to Ray tasks or worker processes)."""

    catalogue: str
    out: str
    opts: SourceOptions
    mapping: gzdesi.GZDesiMapping
    rows_per_shard: int
    total: int
    seed: int
    test_fraction: float
    skip_bad: bool
    row_group_rows: int
    fingerprint: str
    io_threads: int = IO_THREADS

    @property
    def num_shards(self) -> int:
        return -(-self.total // self.rows_per_shard)

    def bounds(self, k: int) -> tuple[int, int]:
        """Shard k = catalogue rows [k*R, (k+1)*R): fixed by the catalogue alone, so any run rebuilds it identically."""
        return k * self.rows_per_shard, min((k + 1) * self.rows_per_shard, self.total)


def shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def _manifest_path(out: Path, k: int) -> Path:
    return out / MANIFEST_DIR / f"shard-{k:05d}.json"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of one


def _checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(2**22):
            h.update(block)
    return h.hexdigest()


def _load(paths: list[Path | None]) -> list[tuple[bytes | None, tuple[int, int] | None, str, str | None]]:
    """Read and fully decode each image: (bytes, (H, W), format, problem or None)."""
    out = []
    for p in paths:
        try:
            data = p.read_bytes() if p is not None else None
        except OSError as e:  # missing, or unreadable (permissions, a flaky mount)
            out.append((None, None, "", "missing image file" if isinstance(e, FileNotFoundError) else str(e)))
            continue
        out.append(_check_image(data) if data is not None else (None, None, "", "empty image path"))
    return out


def convert_shard(job: ShardJob, k: int, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write shard k (train and test files, then its manifest) and return the manifest.

    Files are written under OUT/.tmp/ and renamed into place; the manifest is written last, so a
    shard whose manifest exists and verifies is complete, whatever happened to the process after.
    """
    t0 = time.perf_counter()
    out, (lo, hi) = Path(job.out), job.bounds(k)
    src = GZDesiSource(job.catalogue, job.opts, job.mapping)
    _manifest_path(out, k).unlink(missing_ok=True)  # first: the shard is incomplete from now on
    tmp = out / TMP_DIR / f"shard-{k:05d}"
    shutil.rmtree(tmp, ignore_errors=True)
    schema = shards.arrow_schema(src.extra_fields)
    # One file per split per shard: file_bytes never triggers, rows per file <= rows_per_shard.
    writers = {
        s: shards.ShardWriter(tmp / s, schema, file_bytes=2**62, row_group_rows=job.row_group_rows)
        for s in shards.SPLITS
    }
    excluded, uncertain, sizes, formats = Counter(), Counter(), Counter(), Counter()
    n_classes = len(src.schema.classes)
    per_class = {s: np.zeros(n_classes + 1, np.int64) for s in shards.SPLITS}  # slot 0: label -1
    skipped: list[dict[str, Any]] = []
    n_skipped = 0
    with ThreadPoolExecutor(job.io_threads) as pool:
        for start, batch in src.read(lo, hi):
            res = gzdesi.map_batch(batch, job.mapping, source=job.catalogue)
            keep_mask = res["keep"].to_numpy(zero_copy_only=False)
            reasons = res["reason"].to_numpy(zero_copy_only=False)
            excluded.update(reasons[~keep_mask].tolist())
            uncertain.update(r for r in reasons[keep_mask].tolist() if r)
            keep = np.flatnonzero(keep_mask)
            ids_all = batch.column(src.id_col).cast(pa.string())
            # Images are read a row group at a time: memory holds ~row_group_rows images, not a batch.
            for piece in range(0, len(keep), job.row_group_rows):
                idx = keep[piece : piece + job.row_group_rows]
                files = src.image_paths(batch, idx)
                parts = [files[i :: job.io_threads] for i in range(job.io_threads)]  # one future per thread
                loaded: list[Any] = [None] * len(files)
                for i, part in enumerate(pool.map(_load, parts)):
                    loaded[i :: job.io_threads] = part
                ids = ids_all.take(pa.array(idx, pa.int64())).to_pylist()
                good = []
                for i, (_, size, fmt, problem) in enumerate(loaded):
                    if problem is None:
                        good.append(i)
                        sizes[f"{size[0]}x{size[1]}"] += 1
                        formats[fmt] += 1
                        continue
                    row, reason = int(start + idx[i]), f"{problem}: {files[i]}"
                    if not job.skip_bad:
                        raise ValueError(
                            f"{job.catalogue} row {row} (id {ids[i]}): {reason} (pass --skip-bad to skip such rows)"
                        )
                    n_skipped += 1
                    if len(skipped) < MAX_LISTED_SKIPS:
                        skipped.append({"file": job.catalogue, "row": row, "id": ids[i], "reason": reason})
                if not good:
                    continue
                take = pa.array(idx[good], pa.int64())
                table = pa.table(
                    {
                        "id": ids_all.take(take),
                        "image": pa.array([loaded[i][0] for i in good], pa.binary()),
                        **{c: res[c].take(take) for c in ("label", "class_name", "text", "symbol")},
                        **{c: batch.column(c).take(take).cast(pa.float64()) for c in src.extras},
                    }
                )
                test = np.array(hash_split([ids[i] for i in good], job.seed, job.test_fraction)) == "test"
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
            "blake2b": _checksum(dest),
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
    _write_json(_manifest_path(out, k), manifest)  # last: marks the shard complete
    return manifest


def verify_shard(job: ShardJob, k: int, checksums: bool = False) -> dict[str, Any] | None:
    """Shard k's manifest if the shard is complete and intact, else None (it must be rebuilt).

    Checks the manifest's options fingerprint and row range, and that each file it lists exists with
    the recorded size and a Parquet footer holding the recorded row count (a truncated or partly
    copied file fails); with `checksums`, also re-hashes every file (reads all of it).
    """
    out = Path(job.out)
    try:
        manifest = json.loads(_manifest_path(out, k).read_text())
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
        if checksums and _checksum(path) != info["blake2b"]:
            return None
    return manifest


def _plan(
    src: GZDesiSource, rows_per_shard: int, seed: int, test_fraction: float, row_group_rows: int
) -> dict:
    """What decides the shards' contents; a resumed run must match it exactly (not the image root: mounts move)."""
    return {
        "plan_version": PLAN_VERSION,
        "catalogue": src.path.name,
        "catalogue_rows": src.file.metadata.num_rows,
        "catalogue_bytes": src.path.stat().st_size,
        "rows": src.total,
        "rows_per_shard": rows_per_shard,
        **{f"mapping.{k}": v for k, v in dataclasses.asdict(src.mapping).items()},  # flat: short diffs
        "id_column": src.id_col,
        "path_column": src.path_col,
        "extras": src.extras,
        "seed": seed,
        "test_fraction": test_fraction,
        "row_group_rows": row_group_rows,
    }


def _claim_output(out: Path, plan: dict[str, Any], overwrite: bool) -> None:
    """Create OUT for this plan, or accept it as an earlier run of the same plan (resume)."""
    plan_path = out / MANIFEST_DIR / "plan.json"
    if out.exists() and not out.is_dir():
        raise shards.OutputExistsError(f"output {out} exists and is not a directory")
    if overwrite and out.exists():
        shutil.rmtree(out)
    if out.is_dir() and any(out.iterdir()):
        if not plan_path.is_file():
            raise shards.OutputExistsError(
                f"output directory {out} exists and is not a gzdesi conversion (pass --overwrite to replace it)"
            )
        old, plan = json.loads(plan_path.read_text()), json.loads(json.dumps(plan))  # both as JSON sees them
        if old != plan:
            diff = {
                k: (old.get(k), plan.get(k)) for k in plan.keys() | old.keys() if old.get(k) != plan.get(k)
            }
            raise shards.OutputExistsError(
                f"{out} holds a conversion with other options {diff} (was, now): rerun with the same "
                "options to resume it, or pass --overwrite to start again"
            )
        return
    (out / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
    _write_json(plan_path, plan)


def _lock(out: Path) -> Any:
    """Hold an exclusive lock on OUT for this run (released when the process exits, even on kill -9)."""
    f = open(out / MANIFEST_DIR / ".lock", "a")  # noqa: SIM115 - held for the run; "a": no truncation
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise shards.OutputExistsError(
            f"another prepare is writing {out}; wait for it (two runs would clobber shards)"
        ) from None
    return f


def _run_serial(job: ShardJob, todo: list[int], done: Callable[..., None], bar: tqdm) -> None:
    for k in todo:
        done(convert_shard(job, k, progress=bar.update), rows_counted=True)


def _run_processes(job: ShardJob, todo: list[int], workers: int, done: Callable[..., None]) -> None:
    # spawn, not fork: the parent may hold threads (tqdm, Arrow's pools) that a fork would copy mid-lock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(convert_shard, job, k) for k in todo}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    done(f.result())
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _run_ray(job: ShardJob, todo: list[int], workers: int | None, done: Callable[..., None]) -> None:
    import ray  # only this path needs Ray: the library itself does not

    started = not ray.is_initialized()
    if started:
        # With RAY_ADDRESS set (e.g. `auto` on a cluster head) this joins the cluster; else a local one.
        ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": workers or os.cpu_count()}))
    try:
        limit = workers or int(ray.cluster_resources().get("CPU", 1))
        # One task per shard, 1 CPU each; retried if a node dies (a shard is rebuilt from scratch).
        task = ray.remote(num_cpus=1, max_retries=3)(convert_shard)
        queue, running = list(todo), []
        while queue or running:
            while queue and len(running) < limit:  # bounded in flight: results are small, but keep it tidy
                running.append(task.remote(job, queue.pop(0)))
            ready, running = ray.wait(running, num_returns=1)
            try:
                done(ray.get(ready[0]))
            except ray.exceptions.RayTaskError as e:
                for ref in running:
                    ray.cancel(ref)
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, Exception) else e) from None
    finally:
        if started:
            ray.shutdown()


def prepare_gzdesi(
    catalogue: str | Path,
    out: str | Path,
    *,
    image_root: str | Path | None = None,
    mapping: gzdesi.GZDesiMapping | None = None,
    schema: str | None = None,
    gz_schema: str | None = None,
    caption_mode: str | None = None,
    symbol_mode: str | None = None,
    on_uncertain: str | None = None,
    id_column: str | None = None,
    path_column: str | None = None,
    n: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    skip_bad: bool = False,
    rows_per_shard: int | None = None,
    row_group_rows: int = shards.DEFAULT_ROW_GROUP_ROWS,
    workers: int | None = None,
    use_ray: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_shards: int | None = None,
    verify_checksums: bool = False,
    io_threads: int = IO_THREADS,
    **inapplicable: Any,
) -> dict[str, Any]:
    """Convert a GZ DESI catalogue into `out` (train/test shards + metadata.json), resuming an earlier run.

    Shard k holds catalogue rows [k*R, (k+1)*R) (R = rows_per_shard). Shards already written and
    verified (see verify_shard) are kept; missing or damaged ones are rebuilt. metadata.json is
    written last. `workers` > 1 (or `use_ray`) runs one task per shard: Ray when importable,
    otherwise local processes. `max_shards` stops after converting that many shards (a time-boxed
    job; run again to continue) and returns {"complete": False, ...} instead of the metadata.
    Mapping options (`schema`/`gz_schema`, the modes) override the fields of `mapping`.
    """
    bad = sorted(k for k, v in inapplicable.items() if v is not None)
    if bad:
        raise ValueError(f"options {bad} do not apply to gzdesi: (shards are cut by --rows-per-shard)")
    if schema and gz_schema and schema.lower() != gz_schema.lower():
        raise ValueError(f"--schema {schema} and --gz-schema {gz_schema} disagree")
    overrides = {"schema": (gz_schema or schema or "").lower() or None, "caption_mode": caption_mode,
                 "symbol_mode": symbol_mode, "on_uncertain": on_uncertain}  # fmt: skip
    mapping = dataclasses.replace(
        mapping or gzdesi.GZDesiMapping(), **{k: v for k, v in overrides.items() if v is not None}
    )
    rows_per_shard = rows_per_shard or DEFAULT_ROWS_PER_SHARD
    if rows_per_shard < 1 or row_group_rows < 1 or io_threads < 1:
        raise ValueError("rows_per_shard, row_group_rows and io_threads must be positive")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if n is not None and n < 1:
        raise ValueError(f"n must be positive, got {n}")
    out = Path(out).absolute()
    opts = SourceOptions(
        image_root=Path(image_root).absolute() if image_root else None,
        n=n,
        id_column=id_column,
        path_column=path_column,
        gzdesi_mapping=mapping,
    )
    src = GZDesiSource(str(Path(catalogue).absolute()), opts)  # column check: fails in a second, not hours
    if src.total == 0:
        raise ValueError(f"Galaxy Zoo DESI catalogue {catalogue} has no rows")
    plan = _plan(src, rows_per_shard, seed, test_fraction, row_group_rows)
    fingerprint = hashlib.blake2b(json.dumps(plan, sort_keys=True).encode(), digest_size=8).hexdigest()
    job = ShardJob(str(src.path), str(out), opts, mapping, rows_per_shard, src.total, seed, test_fraction,
                   skip_bad, row_group_rows, fingerprint, io_threads)  # fmt: skip
    _claim_output(out, plan, overwrite)
    lock = _lock(out)
    try:
        manifests = {k: m for k in range(job.num_shards) if (m := verify_shard(job, k, verify_checksums))}
        todo = [k for k in range(job.num_shards) if k not in manifests]
        meta_path = out / shards.METADATA_FILE
        if not todo and meta_path.is_file():
            log.info("%s is complete: %d shards verified", out, job.num_shards)
            return shards.read_metadata(out)
        meta_path.unlink(missing_ok=True)  # the dataset is incomplete until every shard is back
        shutil.rmtree(out / TMP_DIR, ignore_errors=True)  # a killed run's half-written shards
        if manifests:
            log.info("resuming %s: %d of %d shards verified, %d to write", out, len(manifests),
                     job.num_shards, len(todo))  # fmt: skip
        todo = todo[:max_shards] if max_shards is not None else todo
        total_rows = sum(job.bounds(k)[1] - job.bounds(k)[0] for k in manifests)
        with tqdm(total=src.total, initial=total_rows, unit="row", desc=f"prepare {out.name}",
                  disable=not progress, smoothing=0.05) as bar:  # fmt: skip

            def done(manifest: dict[str, Any], rows_counted: bool = False) -> None:
                manifests[manifest["shard"]] = manifest
                if not rows_counted:
                    bar.update(manifest["rows_in"])

            if use_ray or (workers is not None and workers > 1 and use_ray is None and _have_ray()):
                _run_ray(job, todo, workers, done)
            elif workers is not None and workers > 1:
                _run_processes(job, todo, workers, done)
            else:
                _run_serial(job, todo, done, bar)
        if len(manifests) < job.num_shards:
            return {"complete": False, "shards": {"done": len(manifests), "total": job.num_shards}}
        meta = _metadata(src, job, [manifests[k] for k in range(job.num_shards)])
        if meta["num_rows"] == 0:
            raise ValueError(f"every row of {catalogue} was excluded or skipped; nothing to write")
        _log_counts(meta)
        _write_json(meta_path, meta)  # last: its presence marks the dataset complete (as shards.py)
        shutil.rmtree(out / TMP_DIR, ignore_errors=True)
        return meta
    finally:
        lock.close()


def _have_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        log.info("Ray is not installed: converting shards in %d local processes", os.cpu_count() or 1)
        return False
    return True


def _add(total: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        total[k] = total.get(k, 0) + v


def _metadata(src: GZDesiSource, job: ShardJob, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """metadata.json (keys of prepare.py's, see docs/data_format.md) aggregated from the shard manifests."""
    schema = src.schema
    excluded: dict[str, int] = {}
    uncertain: dict[str, int] = {}
    sizes: dict[str, int] = {}
    formats: dict[str, int] = {}
    splits = {s: {"rows": 0, "files": [], "per_class": {c.key: 0 for c in schema.classes}, "uncertain": 0}
              for s in shards.SPLITS}  # fmt: skip
    skipped_rows: list[dict[str, Any]] = []
    for m in manifests:
        _add(excluded, m["excluded"])
        _add(uncertain, m["uncertain_kept"])
        _add(sizes, m["image_sizes"])
        _add(formats, m["image_formats"])
        skipped_rows += m["skipped"]["rows"][: MAX_LISTED_SKIPS - len(skipped_rows)]
        for s, info in m["splits"].items():
            splits[s]["rows"] += info["rows"]
            splits[s]["files"].append(info["file"])
            splits[s]["uncertain"] += info["uncertain"]
            _add(splits[s]["per_class"], info["per_class"])
    n_skipped = sum(m["skipped"]["count"] for m in manifests)
    size = [int(v) for v in next(iter(sizes)).split("x")] if len(sizes) == 1 else None
    return {
        **shards.dataset_metadata(
            schema,
            source=f"gzdesi:{src.path}",
            source_description=src.description,
            columns=shards.arrow_schema(src.extra_fields).names,
            image_size=size,
            image_formats=formats,
            split_method=f"hash(seed={job.seed}, test_fraction={job.test_fraction})",
            seed=job.seed,
            test_fraction=job.test_fraction,
            splits=splits,
            skipped={"count": n_skipped, "rows": skipped_rows, "listed": len(skipped_rows)},
        ),
        "gzdesi": {
            "mapping": dataclasses.asdict(job.mapping),
            "rows_in": job.total,
            "excluded": dict(sorted(excluded.items(), key=lambda kv: -kv[1])),
            "excluded_count": sum(excluded.values()),
            "uncertain_kept": dict(sorted(uncertain.items(), key=lambda kv: -kv[1])),
            "shards": job.num_shards,
            "rows_per_shard": job.rows_per_shard,
            "manifests": MANIFEST_DIR,
        },
    }


def _log_counts(meta: dict[str, Any]) -> None:
    g = meta["gzdesi"]
    log.info(
        "gzdesi: %d rows in, %d written, %d excluded, %d skipped (bad images)",
        g["rows_in"], meta["num_rows"], g["excluded_count"], meta["skipped"]["count"],
    )  # fmt: skip
    for reason, count in list(g["excluded"].items())[:20]:
        log.info("  excluded %9d  %s", count, reason)
    if g["uncertain_kept"]:
        log.info("  kept as uncertain (label -1): %d", sum(g["uncertain_kept"].values()))
    if meta["skipped"]["count"]:
        log.warning("skipped %d rows with unusable images (listed in metadata.json and manifests/)",
                    meta["skipped"]["count"])  # fmt: skip
