"""`prepare`: stream any SOURCE into validated Parquet shards (train/test) plus _metadata.json."""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from galaxalign_dist.data import shards
from galaxalign_dist.data.gzdesi_prepare import prepare_gzdesi
from galaxalign_dist.data.gzdesi_runners import Runner
from galaxalign_dist.data.images import MAX_LISTED_SKIPS, check_image, encode, resolve_format
from galaxalign_dist.data.options import GZDESI, PrepareOptions
from galaxalign_dist.data.sources import Chunk, Source, open_source, parse_source
from galaxalign_dist.data.splits import hash_split

log = logging.getLogger(__name__)


class _Preparer:
    """Per-run state: label resolution cache, counts, skipped rows, image sizes."""

    def __init__(
        self,
        source: Source,
        skip_bad: bool,
        seed: int,
        test_fraction: float,
        pool: ThreadPoolExecutor,
        image_format: str,
    ):
        self.source, self.skip_bad, self.seed, self.test_fraction, self.pool = (
            source,
            skip_bad,
            seed,
            test_fraction,
            pool,
        )
        self.image_format = image_format
        self.counts = {s: Counter() for s in shards.SPLITS}
        self.skipped: list[dict[str, Any]] = []
        self.n_skipped = 0
        self.sizes: Counter = Counter()
        self.formats: Counter = Counter()
        self._classes: dict[Any, Any] = {}

    def _resolve(self, chunk: Chunk) -> list:
        classes = self.source.schema.classes
        if isinstance(chunk.labels, np.ndarray) and chunk.labels.dtype.kind in "iu":
            bad = np.flatnonzero((chunk.labels < 0) | (chunk.labels >= len(classes)))
            if bad.size:
                i = int(bad[0])
                raise ValueError(
                    f"{chunk.origin} row {chunk.rows[i]}: label {int(chunk.labels[i])} out of range for schema "
                    f"{self.source.schema.name!r} (0..{len(classes) - 1})"
                )
            return [classes[int(v)] for v in chunk.labels]
        out = []
        for i, value in enumerate(chunk.labels):
            if value not in self._classes:
                if value is None or value == "":
                    raise ValueError(f"{chunk.origin} row {chunk.rows[i]} (id {chunk.ids[i]}): empty label")
                try:
                    self._classes[value] = self.source.resolve(value)
                except ValueError as e:
                    raise ValueError(f"{chunk.origin} row {chunk.rows[i]} (id {chunk.ids[i]}): {e}") from None
            out.append(self._classes[value])
        return out

    def process(self, chunk: Chunk) -> dict[str, pa.Table]:
        """Validated rows of one chunk, as one table per split."""
        classes = self._resolve(chunk)
        m = len(chunk.ids)
        problems = dict(chunk.problems)
        if chunk.images is not None:
            fmt = resolve_format(self.image_format, *chunk.images.shape[1:3])
            images = list(self.pool.map(functools.partial(encode, fmt=fmt), chunk.images))
            self.sizes[tuple(chunk.images.shape[1:3])] += m
            self.formats[fmt.upper()] += m
        else:
            images = [None] * m
            todo = [i for i in range(m) if i not in problems]
            for i, (data, size, fmt, problem) in zip(
                todo, self.pool.map(check_image, [chunk.image_bytes[i] for i in todo]), strict=True
            ):
                if problem:
                    problems[i] = problem
                else:
                    images[i] = data
                    self.sizes[size] += 1
                    self.formats[fmt] += 1
        for i in sorted(problems):
            where = f"{chunk.origin} row {chunk.rows[i]} (id {chunk.ids[i]})"
            if not self.skip_bad:
                raise ValueError(f"{where}: {problems[i]} (pass --skip-bad to skip such rows)")
            self.n_skipped += 1
            if len(self.skipped) < MAX_LISTED_SKIPS:
                self.skipped.append(
                    {"file": chunk.origin, "row": chunk.rows[i], "id": chunk.ids[i], "reason": problems[i]}
                )
        splits = chunk.splits or [None] * m
        if any(s is None for s in splits):
            hashed = hash_split(chunk.ids, self.seed, self.test_fraction)
            splits = [s or h for s, h in zip(splits, hashed, strict=True)]
        columns: dict[str, Any] = {
            "id": chunk.ids,
            "image": images,
            "label": [c.index for c in classes],
            "class_name": chunk.class_names or [c.name for c in classes],
            "text": chunk.texts or [c.caption for c in classes],
            "symbol": chunk.symbols or [c.symbol for c in classes],
            **chunk.extras,
        }
        table = pa.table(
            {
                k: (v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v))
                for k, v in columns.items()
            }
        )
        out = {}
        for split in shards.SPLITS:
            keep = [i for i in range(m) if splits[i] == split and i not in problems]
            if keep:
                out[split] = table.take(keep)
                self.counts[split].update(classes[i].key for i in keep)
        return out


def prepare(
    source: str,
    out: str | Path,
    options: PrepareOptions | None = None,
    *,
    runner: Runner | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Convert SOURCE (`galaxy10:FILE.h5`, `galaxymnist:DIR|FILE`, `catalog:FILE`, `folder:DIR`,
    `synthetic:SCHEMA`, `gzdesi:CATALOGUE`) into a shard directory at `out`; returns the metadata written.

    Options (options.py) come as `options` and/or keyword arguments by field name, e.g.
    `prepare("synthetic:galaxymnist", out, n=640, seed=0)`; an option given for a form it does not
    apply to is an error. `gzdesi:` goes to gzdesi_prepare.prepare_gzdesi (resumable; shards run by
    `runner`). `out` is a local (or shared-filesystem) directory; a URI is refused (prepare locally,
    then copy).
    """
    shards.check_local_output(out)  # before Path(): it would fold s3://b/x into the local s3:/b/x
    opts = PrepareOptions.from_flat(options, **kwargs)
    form, arg = parse_source(source)
    if form == GZDESI:
        # 8.7M rows take hours: resumable per-shard output, not one temporary directory (docs/gzdesi_scale.md).
        return prepare_gzdesi(arg, out, opts, runner=runner)
    opts.check_form(form)
    out = Path(out)
    shards.check_output_dir(out, opts.overwrite)  # before any work: fail in a second, not after an hour
    src = open_source(source, opts)
    n, seed, test_fraction = opts.n, opts.seed, opts.test_fraction
    total = min(src.total, n) if src.total is not None and n is not None else (src.total or n)
    symbols = [c.symbol for c in src.schema.classes]
    if len(set(symbols)) < len(symbols):
        log.warning("classes share symbols %s: pass --class-symbols KEY=SPEC,... to tell them apart", symbols)

    schema_arrow = shards.arrow_schema(src.extra_fields)
    kw = dict(
        rows_per_file=opts.rows_per_file, file_bytes=opts.file_bytes, row_group_rows=opts.row_group_rows
    )
    with (
        shards.atomic_output_dir(out, opts.overwrite) as tmp,
        ThreadPoolExecutor(os.cpu_count() or 1) as pool,
    ):
        writers = {s: shards.ShardWriter(tmp / s, schema_arrow, **kw) for s in shards.SPLITS}
        prep = _Preparer(src, opts.skip_bad, seed, test_fraction, pool, opts.image_format)
        seen = 0
        with tqdm(total=total, unit="img", desc=f"prepare {out.name}", disable=not opts.progress) as bar:
            for chunk in src.chunks():
                if n is not None and seen + len(chunk.ids) > n:
                    chunk = _head(chunk, n - seen)
                for split, table in prep.process(chunk).items():
                    writers[split].write(table)
                seen += len(chunk.ids)
                bar.update(len(chunk.ids))
                if n is not None and seen >= n:
                    break
        for w in writers.values():
            w.close()
        if seen == 0:
            raise ValueError(f"source {source!r} has no rows")
        written = sum(w.num_rows for w in writers.values())
        if written == 0:
            raise ValueError(
                f"every row of {source!r} was skipped ({prep.n_skipped} bad images); nothing to write"
            )
        if prep.n_skipped:
            log.warning(
                "skipped %d of %d rows with unusable images (listed in %s)",
                prep.n_skipped,
                seen,
                shards.METADATA_FILE,
            )
        meta = _metadata(source, src, prep, writers, schema_arrow, seed=seed, test_fraction=test_fraction)
        shards.write_metadata(tmp, meta)  # last: its presence marks the dataset complete
    log.info("wrote %s: %s", out, {s: m["rows"] for s, m in meta["splits"].items()})
    return meta


def _head(chunk: Chunk, k: int) -> Chunk:
    """The first k rows of a chunk (for the `n` cap)."""
    cut = {}
    for name in (
        "rows",
        "ids",
        "labels",
        "images",
        "image_bytes",
        "splits",
        "class_names",
        "texts",
        "symbols",
    ):
        value = getattr(chunk, name)
        cut[name] = value[:k] if value is not None else None
    return Chunk(
        origin=chunk.origin,
        problems={i: p for i, p in chunk.problems.items() if i < k},
        extras={c: v[:k] for c, v in chunk.extras.items()},
        **cut,
    )


def _metadata(
    source: str,
    src: Source,
    prep: _Preparer,
    writers: dict,
    schema_arrow: pa.Schema,
    *,
    seed: int,
    test_fraction: float,
) -> dict[str, Any]:
    schema = src.schema
    sizes = list(prep.sizes)
    return shards.dataset_metadata(
        schema,
        source=source,
        source_description=src.description,
        columns=schema_arrow.names,
        image_size=list(sizes[0]) if len(sizes) == 1 else None,
        image_formats=dict(prep.formats),
        split_method="published"
        if src.published_split
        else f"hash(seed={seed}, test_fraction={test_fraction})",
        seed=seed,
        test_fraction=test_fraction,
        splits={
            s: {
                "rows": w.num_rows,
                "files": [p.name for p in w.files],
                "per_class": {c.key: prep.counts[s][c.key] for c in schema.classes},
            }
            for s, w in writers.items()
        },
        skipped={"count": prep.n_skipped, "rows": prep.skipped, "listed": len(prep.skipped)},
    )
