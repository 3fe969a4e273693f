"""`prepare gzdesi:`: plan the shards, claim and lock the output, run them with a runner, write the metadata."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from galaxalign_dist.data import gzdesi, shards
from galaxalign_dist.data.catalog_io import csv_header, csv_to_parquet
from galaxalign_dist.data.gzdesi_convert import (
    LEGACY_MANIFEST_DIR,
    MANIFEST_DIR,
    TMP_DIR,
    ShardJob,
    verify_shard,
    write_json,
)
from galaxalign_dist.data.gzdesi_runners import Runner, local_runner
from galaxalign_dist.data.gzdesi_source import GZDesiSource, pick_columns
from galaxalign_dist.data.images import MAX_LISTED_SKIPS
from galaxalign_dist.data.options import GZDESI, PrepareOptions

log = logging.getLogger(__name__)

PLAN_VERSION = 1
STAGED_CATALOGUE = "catalogue.parquet"  # OUT/_manifests/: a CSV catalogue's columns, typed, as Parquet


def _plan(src: GZDesiSource, opts: PrepareOptions) -> dict:
    """What decides the shards' contents; a resumed run must match it exactly (not the image root: mounts move)."""
    return {
        "plan_version": PLAN_VERSION,
        "catalogue": src.origin.name,
        "catalogue_rows": src.file.metadata.num_rows,
        "catalogue_bytes": src.origin.stat().st_size,
        "rows": src.total,
        "rows_per_shard": opts.gzdesi.rows_per_shard,
        **{f"mapping.{k}": v for k, v in dataclasses.asdict(src.mapping).items()},  # flat: short diffs
        "id_column": src.columns.id,
        "path_column": src.columns.path,
        "extras": src.extras,
        "seed": opts.seed,
        "test_fraction": opts.test_fraction,
        "row_group_rows": opts.row_group_rows,
    }


def _check_claimable(out: Path, overwrite: bool) -> Path | None:
    """Refuse an OUT that is neither empty nor a gzdesi conversion; returns its plan.json if it has one."""
    if out.exists() and not out.is_dir():
        raise shards.OutputExistsError(f"output {out} exists and is not a directory")
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return None
    for name in (MANIFEST_DIR, LEGACY_MANIFEST_DIR):
        if (out / name / "plan.json").is_file():
            return out / name / "plan.json"
    raise shards.OutputExistsError(
        f"output directory {out} exists and is not a gzdesi conversion (pass --overwrite to replace it)"
    )


def _claim_output(out: Path, plan: dict[str, Any], overwrite: bool) -> None:
    """Create OUT for this plan, or accept it as an earlier run of the same plan (resume)."""
    old_plan = _check_claimable(out, overwrite)
    if overwrite and out.exists():
        shutil.rmtree(out)
    if old_plan is not None:
        old, plan = json.loads(old_plan.read_text()), json.loads(json.dumps(plan))  # both as JSON sees them
        if old != plan:
            diff = {
                k: (old.get(k), plan.get(k)) for k in plan.keys() | old.keys() if old.get(k) != plan.get(k)
            }
            raise shards.OutputExistsError(
                f"{out} holds a conversion with other options {diff} (was, now): rerun with the same "
                "options to resume it, or pass --overwrite to start again"
            )
        if old_plan.parent.name == LEGACY_MANIFEST_DIR:  # older layout: `manifests/` is read as Parquet
            os.replace(old_plan.parent, out / MANIFEST_DIR)
            (out / shards.LEGACY_METADATA_FILE).unlink(missing_ok=True)  # rewritten as _metadata.json
        return
    (out / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
    write_json(out / MANIFEST_DIR / "plan.json", plan)


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


@contextmanager
def _staged(
    catalogue: Path, out: Path, opts: PrepareOptions, mapping: gzdesi.GZDesiMapping
) -> Iterator[Path]:
    """The catalogue as Parquet: itself, or a CSV's columns converted next to OUT (removed on error).

    Shard tasks read row ranges, which CSV cannot seek to; one streaming pass writes a typed copy.
    Columns are checked from the header before that pass, and the output before any of it.
    """
    if catalogue.suffix.lower() != ".csv":
        yield catalogue
        return
    if not catalogue.is_file():
        raise FileNotFoundError(f"Galaxy Zoo DESI catalogue {catalogue} does not exist")
    cols = pick_columns(csv_header(catalogue), opts, mapping, str(catalogue))
    _check_claimable(out, opts.overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.catalogue-", dir=out.parent))
    try:
        staged = tmp / STAGED_CATALOGUE
        csv_to_parquet(catalogue, staged, cols.read, cols.text, [*cols.extras, *cols.numbers])
        yield staged
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_gzdesi(
    catalogue: str | Path,
    out: str | Path,
    options: PrepareOptions | None = None,
    *,
    runner: Runner | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Convert a GZ DESI catalogue (Parquet or CSV) into `out` (train/test shards + _metadata.json), resuming.

    Shard k holds catalogue rows [k*R, (k+1)*R) (R = rows_per_shard). Shards already written and
    verified (see verify_shard) are kept; missing or damaged ones are rebuilt. _metadata.json is
    written last. `runner` runs the shards (gzdesi_runners; default: serial, or `workers` local
    processes; Ray: launch/gzdesi.py). `max_shards` stops after converting that many shards (a
    time-boxed job; run again to continue) and returns {"complete": False, ...} instead of the metadata.
    Options: `options` and/or keyword arguments by field name (options.py).
    """
    opts = PrepareOptions.from_flat(options, **kwargs)
    opts.check_form(GZDESI)
    g = opts.gzdesi
    if g.use_ray and runner is None:
        raise ValueError(
            "use_ray: the data layer does not import Ray; use `galaxalign prepare --ray` or pass "
            "runner=galaxalign_dist.launch.gzdesi.ray_runner(workers)"
        )
    mapping = g.resolved_mapping(opts.schema)
    out, catalogue = Path(out).absolute(), Path(catalogue).absolute()
    opts = dataclasses.replace(opts, image_root=Path(opts.image_root).absolute() if opts.image_root else None)
    with _staged(catalogue, out, opts, mapping) as path:
        src = GZDesiSource(
            path, opts, mapping, origin=catalogue
        )  # column checks: fail in a second, not hours
        if src.total == 0:
            raise ValueError(f"Galaxy Zoo DESI catalogue {catalogue} has no rows")
        plan = _plan(src, opts)
        fingerprint = hashlib.blake2b(json.dumps(plan, sort_keys=True).encode(), digest_size=8).hexdigest()
        _claim_output(out, plan, opts.overwrite)
        lock = _lock(out)
        try:
            if (
                path != catalogue
            ):  # the staged CSV: shard tasks read it from OUT (other processes, later runs)
                os.replace(path, out / MANIFEST_DIR / STAGED_CATALOGUE)
                path = out / MANIFEST_DIR / STAGED_CATALOGUE
            job = ShardJob(str(path), str(catalogue), str(out), opts, mapping, src.total, fingerprint)
            return _run(job, src, runner or local_runner(g.workers))
        finally:
            lock.close()


def _run(job: ShardJob, src: GZDesiSource, runner: Runner) -> dict[str, Any]:
    """Verify the shards on disk, convert the rest with `runner`, then aggregate the metadata."""
    out, g = Path(job.out), job.opts.gzdesi
    manifests = {k: m for k in range(job.num_shards) if (m := verify_shard(job, k, g.verify_checksums))}
    todo = [k for k in range(job.num_shards) if k not in manifests]
    meta_path = out / shards.METADATA_FILE
    if not todo and meta_path.is_file():
        log.info("%s is complete: %d shards verified", out, job.num_shards)
        return shards.read_metadata(out)
    meta_path.unlink(missing_ok=True)  # the dataset is incomplete until every shard is back
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)  # a killed run's half-written shards
    if manifests:
        log.info(
            "resuming %s: %d of %d shards verified, %d to write",
            out,
            len(manifests),
            job.num_shards,
            len(todo),
        )
    todo = todo[: g.max_shards] if g.max_shards is not None else todo
    rows_done = sum(job.bounds(k)[1] - job.bounds(k)[0] for k in manifests)
    with tqdm(total=src.total, initial=rows_done, unit="row", desc=f"prepare {out.name}",
              disable=not job.opts.progress, smoothing=0.05) as bar:  # fmt: skip

        def done(manifest: dict[str, Any]) -> None:
            manifests[manifest["shard"]] = manifest

        runner(job, todo, done, bar.update)
    if len(manifests) < job.num_shards:
        return {"complete": False, "shards": {"done": len(manifests), "total": job.num_shards}}
    meta = _metadata(src, job, [manifests[k] for k in range(job.num_shards)])
    if meta["num_rows"] == 0:
        raise ValueError(f"every row of {job.origin} was excluded or skipped; nothing to write")
    _log_counts(meta)
    write_json(meta_path, meta)  # last: its presence marks the dataset complete (as shards.py)
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    return meta


def _add(total: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        total[k] = total.get(k, 0) + v


def _metadata(src: GZDesiSource, job: ShardJob, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """_metadata.json (keys of prepare.py's, see docs/data_format.md) aggregated from the shard manifests."""
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
    opts = job.opts
    return {
        **shards.dataset_metadata(
            schema,
            source=f"gzdesi:{job.origin}",
            source_description=src.description,
            columns=shards.arrow_schema(src.extra_fields).names,
            image_size=size,
            image_formats=formats,
            split_method=f"hash(seed={opts.seed}, test_fraction={opts.test_fraction})",
            seed=opts.seed,
            test_fraction=opts.test_fraction,
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
        log.warning("skipped %d rows with unusable images (listed in %s and %s/)", meta["skipped"]["count"],
                    shards.METADATA_FILE, MANIFEST_DIR)  # fmt: skip
