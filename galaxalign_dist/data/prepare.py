"""`prepare`: stream any SOURCE into validated Parquet shards (train/test) plus metadata.json."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from galaxalign_dist.data import shards
from galaxalign_dist.data.sources import Chunk, Source, SourceOptions, open_source

log = logging.getLogger(__name__)

# torchvision.io.decode_image (used by data.TripletTransform) reads these; other formats are re-encoded.
PASSTHROUGH_FORMATS = {"JPEG", "PNG", "WEBP"}
MAX_LISTED_SKIPS = 1000  # metadata lists the first skipped rows; the count is always exact
MAPPING_KEYS = {"id_column", "path_column", "label_column", "split_column", "class_names", "class_symbols"}
# Options of the gzdesi: form only (see gzdesi_prepare.prepare_gzdesi).
GZDESI_KEYS = set("gz_schema caption_mode symbol_mode on_uncertain rows_per_shard workers use_ray".split())


def parse_mapping(text: str | dict[str, str] | None, option: str) -> dict[str, str] | None:
    """'a=b,c=d' -> {'a': 'b', 'c': 'd'} (used by --class-names / --class-symbols)."""
    if text is None or isinstance(text, dict):
        return text
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{option}: expected KEY=VALUE[,KEY=VALUE...], got {item!r}")
        out[key.strip()] = value.strip()
    return out


def hash_split(ids: list[str], seed: int, test_fraction: float) -> list[str]:
    """'test' for ids whose seeded hash falls below test_fraction, else 'train'.

    A function of (seed, id) only: the same galaxy lands in the same split however the source
    is ordered, chunked or filtered, and no pass over all rows is needed. Class fractions match
    test_fraction in expectation (binomial scatter per class, ~sqrt(n_class * f) rows).
    """
    out = []
    for i in ids:
        h = int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little")
        out.append("test" if h / 2.0**64 < test_fraction else "train")
    return out


def _encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # compress_level=1: ~3x faster than the default 6 and, on noisy sky images, no bigger (measured).
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _check_image(data: bytes) -> tuple[bytes, tuple[int, int] | None, str, str | None]:
    """Fully decode one encoded image: (bytes to store, (H, W), stored format, problem or None)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # verify() alone misses truncated JPEG data
            size = (im.height, im.width)
            if im.format in PASSTHROUGH_FORMATS:
                return data, size, im.format, None
            return _encode_png(np.asarray(im.convert("RGB"))), size, "PNG", None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
        return data, None, "", f"image does not decode ({type(e).__name__}: {e})"


class _Preparer:
    """Per-run state: label resolution cache, counts, skipped rows, image sizes."""

    def __init__(
        self, source: Source, skip_bad: bool, seed: int, test_fraction: float, pool: ThreadPoolExecutor
    ):
        self.source, self.skip_bad, self.seed, self.test_fraction, self.pool = (
            source,
            skip_bad,
            seed,
            test_fraction,
            pool,
        )
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
            images = list(self.pool.map(_encode_png, chunk.images))
            self.sizes[tuple(chunk.images.shape[1:3])] += m
            self.formats["PNG"] += m
        else:
            images = [None] * m
            todo = [i for i in range(m) if i not in problems]
            for i, (data, size, fmt, problem) in zip(
                todo, self.pool.map(_check_image, [chunk.image_bytes[i] for i in todo]), strict=True
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
    *,
    image_root: str | Path | None = None,
    schema: str | None = None,
    n: int | None = None,
    seed: int = 0,
    size: int | None = None,
    test_fraction: float = 0.2,
    skip_bad: bool = False,
    rows_per_file: int | None = None,
    file_bytes: int = shards.DEFAULT_FILE_BYTES,
    row_group_rows: int = shards.DEFAULT_ROW_GROUP_ROWS,
    overwrite: bool = False,
    progress: bool = True,
    **mapping: Any,
) -> dict[str, Any]:
    """Convert SOURCE (`galaxy10:FILE.h5`, `galaxymnist:DIR|FILE`, `catalog:FILE`, `folder:DIR`,
    `synthetic:SCHEMA`) into a shard directory at `out`; returns the metadata written.

    `n` caps the number of rows (synthetic: how many to draw); `size` is the synthetic image size.
    `mapping` holds catalogue/folder options: id_column, path_column, label_column, split_column,
    class_names and class_symbols ('key=value,...' strings or dicts, for schema 'auto').
    `gzdesi:CATALOGUE.parquet` goes to gzdesi_prepare.prepare_gzdesi (resumable; GZDESI_KEYS options).
    `out` is a local (or shared-filesystem) directory; a URI is refused (prepare locally, then copy).
    """
    shards.check_local_output(out)  # before Path(): it would fold s3://b/x into the local s3:/b/x
    if source.lower().startswith("gzdesi:"):
        # 8.7M rows take hours: resumable per-shard output, not one temporary directory (docs/gzdesi_scale.md).
        from galaxalign_dist.data.gzdesi_prepare import prepare_gzdesi

        return prepare_gzdesi(
            source.partition(":")[2], out, image_root=image_root, schema=schema, n=n, seed=seed,
            test_fraction=test_fraction, skip_bad=skip_bad, row_group_rows=row_group_rows,
            overwrite=overwrite, progress=progress, size=size, rows_per_file=rows_per_file, **mapping,
        )  # fmt: skip
    gz_only = sorted(k for k in GZDESI_KEYS if mapping.pop(k, None) is not None)
    if gz_only:
        raise ValueError(f"options {gz_only} apply to gzdesi: sources only")
    unknown = set(mapping) - MAPPING_KEYS
    if unknown:
        raise ValueError(f"unknown prepare options {sorted(unknown)}; known: {sorted(MAPPING_KEYS)}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if n is not None and n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if size is not None and not source.lower().startswith("synthetic:"):
        raise ValueError("size applies to synthetic sources only (images are resized at training time)")
    mapping["class_names"] = parse_mapping(mapping.get("class_names"), "--class-names")
    mapping["class_symbols"] = parse_mapping(mapping.get("class_symbols"), "--class-symbols")
    schema = schema.lower() if schema else None
    out = Path(out)
    shards.check_output_dir(out, overwrite)  # before any work: fail in a second, not after an hour
    opts = SourceOptions(
        image_root=Path(image_root) if image_root else None,
        schema=schema,
        n=n,
        seed=seed,
        size=size,
        **mapping,
    )
    src = open_source(source, opts)
    total = min(src.total, n) if src.total is not None and n is not None else (src.total or n)
    symbols = [c.symbol for c in src.schema.classes]
    if len(set(symbols)) < len(symbols):
        log.warning("classes share symbols %s: pass --class-symbols KEY=SPEC,... to tell them apart", symbols)

    schema_arrow = shards.arrow_schema(src.extra_fields)
    kw = dict(rows_per_file=rows_per_file, file_bytes=file_bytes, row_group_rows=row_group_rows)
    with shards.atomic_output_dir(out, overwrite) as tmp, ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        writers = {s: shards.ShardWriter(tmp / s, schema_arrow, **kw) for s in shards.SPLITS}
        prep = _Preparer(src, skip_bad, seed, test_fraction, pool)
        seen = 0
        with tqdm(total=total, unit="img", desc=f"prepare {out.name}", disable=not progress) as bar:
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
                "skipped %d of %d rows with unusable images (listed in metadata.json)", prep.n_skipped, seen
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
