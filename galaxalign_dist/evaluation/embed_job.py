"""`galaxalign embed` minus Ray: checks before any work, the resumable plan, the in-process loop, the finish."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galaxalign_dist.evaluation import embed_store
from galaxalign_dist.evaluation.bundle import load_bundle
from galaxalign_dist.evaluation.catalogue import (
    MODALITIES,
    Catalogue,
    Unit,
    check_modalities,
    open_catalogue,
    read_unit,
)
from galaxalign_dist.evaluation.embed_batch import OUTPUT_DTYPES, BatchEmbedder

log = logging.getLogger(__name__)
SMOKE_ROWS = 16  # rows per split embedded in the driver before the cluster is asked for anything


@dataclass
class EmbedOptions:
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    splits: list[str] | None = None  # default: every split of a dataset; "all" for a folder
    dtype: str = "float32"  # of the stored embeddings (the towers always compute in fp32, or bf16 with amp)
    batch_size: int = 128
    rows_per_shard: int = 10_000
    skip_bad: bool = False
    overwrite: bool = False
    verify_checksums: bool = True  # re-hash finished shards on a rerun (reads them once)
    amp: bool = False  # bf16 autocast on CUDA
    progress: bool = True

    def check(self) -> None:
        self.modalities = check_modalities(self.modalities)
        if self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(OUTPUT_DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")


@dataclass
class EmbedJob:
    """A checked job: the catalogue, the plan, the units still to embed, and OUT locked for this run."""

    model_dir: str
    out: Path
    cat: Catalogue
    plan: dict[str, Any]
    opts: EmbedOptions
    todo: list[Unit]
    done: dict[int, dict]  # k -> manifest of a verified shard
    dim: int
    embedder: BatchEmbedder  # the driver's (smoke test; the whole run with --local)
    lock: Any = None
    reused: int = 0  # shards kept from an earlier run
    first: tuple[float, int] | None = None  # (time, rows) when the first batch came back: start-up excluded

    def took(self, rows: int) -> None:
        """Note a finished batch (the first one marks the end of start-up: Ray, actors, model loads)."""
        if self.first is None:
            self.first = (time.perf_counter(), rows)

    @property
    def todo_rows(self) -> int:
        return sum(u.rows for u in self.todo)

    def collector(self) -> embed_store.UnitCollector:
        return embed_store.UnitCollector(self.out, self.todo, self.plan, self.cat.columns)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def prepare_job(model_dir: str | Path, data: str | Path, out: str | Path, opts: EmbedOptions) -> EmbedJob:
    """Everything checkable before a cluster is busy, then claim OUT and sort its shards into done / to do.

    Order: options, model (load_bundle), catalogue (splits, files, columns), OUT against the plan (read
    only), a smoke batch of each split through the model in this process (a corrupt first image, a bad
    symbol spec, a model that cannot run on these rows fail here, naming the row), and only then OUT is
    created or reopened and earlier shards verified.
    """
    opts.check()
    model_dir = str(Path(model_dir).resolve())
    bundle = load_bundle(model_dir)
    cat = open_catalogue(data, opts.modalities, opts.splits, opts.rows_per_shard)
    plan = embed_store.make_plan(
        cat, embed_store.model_fingerprint(model_dir), opts.modalities, opts.dtype, opts.rows_per_shard
    )
    out = Path(out)
    embed_store.check_output(out, plan, opts.overwrite)
    embedder = BatchEmbedder(model_dir, opts.modalities, opts.dtype, skip_bad=opts.skip_bad, bundle=bundle)
    for split in cat.splits:
        first = next(u for u in cat.units if u.split == split)
        embedder(next(read_unit(cat, first, min(opts.batch_size, SMOKE_ROWS))))
    lock = embed_store.create_output(out, plan, opts.overwrite)
    try:
        plan_fp = embed_store.plan_fingerprint(plan)
        with ThreadPoolExecutor(8) as pool:  # checksums read every finished shard: overlap the I/O
            found = list(
                pool.map(
                    lambda u: embed_store.verify_unit(out, u, plan_fp, opts.skip_bad, opts.verify_checksums),
                    cat.units,
                )
            )
    except BaseException:
        lock.close()
        raise
    done = {u.k: m for u, m in zip(cat.units, found, strict=True) if m is not None}
    todo = [u for u in cat.units if u.k not in done]
    if done:
        log.info(
            "%s: %d of %d shards already written and verified; %d to do",
            out,
            len(done),
            len(cat.units),
            len(todo),
        )
    return EmbedJob(
        model_dir, out, cat, plan, opts, todo, done, embedder.dim, embedder, lock, reused=len(done)
    )


def progress_bar(job: EmbedJob) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=job.todo_rows, unit="row", desc="embed", disable=not job.opts.progress, smoothing=0.05)


def run_local(job: EmbedJob) -> None:
    """The plain loop: every unit still to do, batch by batch, through the driver's own model."""
    collector = job.collector()
    with progress_bar(job) as bar:
        for unit in job.todo:
            for batch in read_unit(job.cat, unit, job.opts.batch_size):
                for manifest in collector.add(job.embedder(batch)):
                    job.done[manifest["k"]] = manifest
                bar.update(len(batch["id"]))
                job.took(len(batch["id"]))


def finish_job(job: EmbedJob, seconds: float, **extra: Any) -> dict[str, Any]:
    """embeddings.json once every unit has a verified shard; the run's summary for the CLI."""
    missing = [u.k for u in job.cat.units if u.k not in job.done]
    if missing:
        raise RuntimeError(
            f"{job.out}: shards {missing[:10]} were not written; rerun the same command to finish"
        )
    meta = embed_store.finish(job.out, job.cat, job.plan, job.done, job.model_dir, job.dim)
    rows = job.todo_rows
    steady = None
    if job.first is not None and rows > job.first[1]:
        steady = round((rows - job.first[1]) / max(1e-9, time.perf_counter() - job.first[0]), 1)
    return {
        "out": str(job.out),
        "rows": meta["num_rows"],
        "shards": len(job.cat.units),
        "shards_reused": job.reused,
        "shards_written": len(job.todo),
        "skipped_rows": meta["skipped"]["count"],
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 1) if seconds > 0 and rows else None,
        "steady_rows_per_s": steady,  # after the first batch: without start-up
        **extra,
    }


def embed_local(
    model_dir: str | Path, data: str | Path, out: str | Path, opts: EmbedOptions
) -> dict[str, Any]:
    """`galaxalign embed --local`: the whole job in this process (no Ray)."""
    job = prepare_job(model_dir, data, out, opts)
    try:
        t0 = time.perf_counter()
        run_local(job)
        return finish_job(job, time.perf_counter() - t0, engine="local")
    finally:
        job.close()
