"""Sharded embeddings on disk: plan and per-shard manifests (resumable output), the shard writer, readers.

Layout of `galaxalign embed ... --out OUT`::

    OUT/embeddings.json             written last: its presence marks the output complete
    OUT/{split}/part-NNNNN.parquet  output shard k = catalogue unit k (catalogue.Unit): id, [label,
                                    class_name], source, source_row, {image,text,symbol}_embedding
    OUT/manifests/plan.json         what decides every shard (model fingerprint, options, units)
    OUT/manifests/part-NNNNN.json   shard k's rows, bytes, blake2b checksum: written after the shard
                                    is renamed into place, so a manifest that verifies means a complete shard

A rerun with the same plan keeps every shard whose manifest verifies and redoes the rest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from galaxalign_dist.data.shards import OutputExistsError, check_local_output
from galaxalign_dist.evaluation.catalogue import Catalogue, Unit
from galaxalign_dist.evaluation.embed import Embeddings
from galaxalign_dist.train import checkpoint
from galaxalign_dist.train.export import WEIGHTS

FORMAT_VERSION = 1
META_FILE = "embeddings.json"
MANIFEST_DIR = "manifests"
PLAN_FILE = "plan.json"
TMP_DIR = ".tmp"
MAX_LISTED = 1000  # skipped rows listed in embeddings.json (all are counted)
ARROW_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


def model_fingerprint(model_dir: str | Path) -> str:
    """blake2b of an export's weights and config: which model made a set of embeddings."""
    h = hashlib.blake2b(digest_size=16)
    for name in (WEIGHTS, checkpoint.CONFIG_FILE):
        with open(Path(model_dir) / name, "rb") as f:
            while block := f.read(2**22):
                h.update(block)
    return h.hexdigest()


def _checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(2**22):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: readers see the old file or the new one


def shard_path(out: Path, unit: Unit) -> Path:
    return Path(out) / unit.split / f"part-{unit.k:05d}.parquet"


def manifest_path(out: Path, k: int) -> Path:
    return Path(out) / MANIFEST_DIR / f"part-{k:05d}.json"


def make_plan(
    cat: Catalogue, fingerprint: str, modalities: list[str], dtype: str, rows_per_shard: int
) -> dict:
    """Everything that decides the shards' contents (not where the model or data live: mounts move)."""
    return {
        "format_version": FORMAT_VERSION,
        "model_fingerprint": fingerprint,
        "modalities": modalities,
        "dtype": dtype,
        "rows_per_shard": rows_per_shard,
        "catalogue": cat.identity,
        "units": [u.describe(cat.root) for u in cat.units],
    }


def plan_fingerprint(plan: dict) -> str:
    return hashlib.blake2b(json.dumps(plan, sort_keys=True).encode(), digest_size=16).hexdigest()


def check_output(out: str | Path, plan: dict, overwrite: bool) -> bool:
    """Read-only check of OUT before any work: True when it holds an earlier run of the same plan (resume)."""
    check_local_output(out)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory")
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return False
    plan_path = out / MANIFEST_DIR / PLAN_FILE
    if not plan_path.is_file():
        raise OutputExistsError(
            f"output directory {out} exists and is not a `galaxalign embed` output (pass --overwrite to replace it)"
        )
    old, new = json.loads(plan_path.read_text()), json.loads(json.dumps(plan))
    if old != new:
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        what = {"model_fingerprint": "another model", "units": "another catalogue or --rows-per-shard"}
        raise OutputExistsError(
            f"{out} holds embeddings made with other settings ({', '.join(what.get(k, k) for k in keys)}): "
            "rerun with the same model, data and options to resume, or pass --overwrite to start again"
        )
    return True


def create_output(out: str | Path, plan: dict, overwrite: bool) -> Any:
    """Create (or reopen) OUT for `plan`, holding an exclusive lock for the run; returns the lock."""
    out = Path(out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    (out / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
    lock = open(out / MANIFEST_DIR / ".lock", "a")  # noqa: SIM115 - held for the run, released on exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise OutputExistsError(f"another `galaxalign embed` is writing {out}; wait for it") from None
    if not (out / MANIFEST_DIR / PLAN_FILE).exists():
        _write_json(out / MANIFEST_DIR / PLAN_FILE, plan)
    (out / META_FILE).unlink(missing_ok=True)  # incomplete from now on, until finish() writes it again
    return lock


def verify_unit(out: Path, unit: Unit, plan_fp: str, skip_bad: bool, checksums: bool = True) -> dict | None:
    """Shard k's manifest when the shard is complete and intact (size, footer rows, checksum), else None."""
    try:
        manifest = json.loads(manifest_path(out, unit.k).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("plan") != plan_fp or (manifest["skipped"]["count"] and not skip_bad):
        return None  # another plan, or rows skipped that must now fail (or be embedded) instead
    path = shard_path(out, unit)
    try:
        if path.stat().st_size != manifest["bytes"] or pq.read_metadata(path).num_rows != manifest["rows"]:
            return None
    except (OSError, pa.ArrowException):
        return None
    if checksums and _checksum(path) != manifest["blake2b"]:
        return None
    return manifest


def _matrix_column(x: np.ndarray, dtype: str, valid: np.ndarray | None) -> pa.Array:
    values = pa.array(np.ascontiguousarray(x, dtype=dtype).ravel(), ARROW_DTYPES[dtype])
    mask = None if valid is None or valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(values, x.shape[1], mask=mask)


class UnitCollector:
    """Driver side: gathers embedded rows per unit and writes each unit's shard once all its rows are in.

    Rows carry (unit, pos); a row seen twice (a retried task) is kept once. Memory holds only the units
    in flight, never the catalogue.
    """

    def __init__(self, out: Path, units: list[Unit], plan: dict, catalogue_columns: list[str]) -> None:
        self.out, self.units = Path(out), {u.k: u for u in units}
        self.plan_fp, self.dtype = plan_fingerprint(plan), plan["dtype"]
        self.modalities = plan["modalities"]
        self.carried = [c for c in ("label", "class_name") if c in catalogue_columns]
        self.parts: dict[int, list[dict[str, np.ndarray]]] = {}
        self.seen: dict[int, np.ndarray] = {}
        self.t0: dict[int, float] = {}

    @property
    def in_flight(self) -> int:
        return len(self.parts)

    def add(self, batch: dict[str, np.ndarray]) -> list[dict]:
        """Take one embedded batch; returns the manifests of the units it completed."""
        done = []
        units = np.asarray(batch["unit"])
        for k in np.unique(units):
            k = int(k)
            unit = self.units[k]
            idx = np.flatnonzero(units == k)
            seen = self.seen.setdefault(k, np.zeros(unit.rows, bool))
            self.t0.setdefault(k, time.perf_counter())
            pos = np.asarray(batch["pos"])[idx]
            fresh = idx[~seen[pos]]
            seen[pos] = True
            if len(fresh):
                self.parts.setdefault(k, []).append({c: np.asarray(v)[fresh] for c, v in batch.items()})
            if seen.all():
                done.append(self._write(unit))
        return done

    def _write(self, unit: Unit) -> dict:
        parts = self.parts.pop(unit.k)
        del self.seen[unit.k]
        rows = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
        order = np.argsort(rows["pos"], kind="stable")
        rows = {c: v[order] for c, v in rows.items()}
        bad = rows["bad"].astype(bool)
        skipped = [
            {"id": str(rows["id"][i]), "source": str(rows["source"][i]), "row": int(rows["source_row"][i]),
             "reason": str(rows["reason"][i])}
            for i in np.flatnonzero(bad)
        ]  # fmt: skip
        keep = ~bad
        columns: dict[str, pa.Array] = {"id": pa.array(rows["id"][keep].astype(str), pa.string())}
        if "label" in self.carried:
            columns["label"] = pa.array(rows["label"][keep].astype(np.int32))
        if "class_name" in self.carried:
            columns["class_name"] = pa.array(rows["class_name"][keep].astype(str), pa.string())
        columns["source"] = pa.array(rows["source"][keep].astype(str), pa.string())
        columns["source_row"] = pa.array(rows["source_row"][keep].astype(np.int64))
        for m in self.modalities:
            valid = rows[f"{m}_valid"][keep].astype(bool) if f"{m}_valid" in rows else None
            columns[f"{m}_embedding"] = _matrix_column(rows[f"{m}_embedding"][keep], self.dtype, valid)
        dest = shard_path(self.out, unit)
        tmp = self.out / TMP_DIR / dest.name
        tmp.parent.mkdir(parents=True, exist_ok=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Embeddings barely compress; the string columns repeat (dictionary + zstd).
        pq.write_table(pa.table(columns), tmp, compression="zstd", use_dictionary=["class_name", "source"])
        os.replace(tmp, dest)
        manifest = {
            "k": unit.k,
            "split": unit.split,
            "rows": int(keep.sum()),
            "rows_in": unit.rows,
            "skipped": {"count": len(skipped), "rows": skipped[:MAX_LISTED]},
            "bytes": dest.stat().st_size,
            "blake2b": _checksum(dest),
            "seconds": round(time.perf_counter() - self.t0.pop(unit.k), 3),
            "plan": self.plan_fp,
        }
        _write_json(manifest_path(self.out, unit.k), manifest)  # last: marks the shard complete
        return manifest


def finish(
    out: Path, cat: Catalogue, plan: dict, manifests: dict[int, dict], model_dir: str, dim: int
) -> dict:
    """Write embeddings.json (last): the model, the catalogue, per-split rows and shards, skipped rows."""
    out = Path(out)
    splits: dict[str, dict[str, Any]] = {}
    skipped: list[dict] = []
    n_skipped = 0
    for unit in cat.units:
        m = manifests[unit.k]
        s = splits.setdefault(unit.split, {"rows": 0, "files": []})
        s["rows"] += m["rows"]
        s["files"].append(shard_path(out, unit).name)
        n_skipped += m["skipped"]["count"]
        skipped += m["skipped"]["rows"][: MAX_LISTED - len(skipped)]
    meta = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(Path(model_dir).resolve()),
        "model_fingerprint": plan["model_fingerprint"],
        "data": cat.data,
        "kind": cat.kind,
        "modalities": plan["modalities"],
        "dtype": plan["dtype"],
        "dim": dim,
        "labelled": "label" in cat.columns,
        "num_rows": sum(s["rows"] for s in splits.values()),
        "splits": splits,
        "skipped": {"count": n_skipped, "rows": skipped, "listed": len(skipped)},
    }
    if cat.meta is not None:
        meta.update({k: cat.meta[k] for k in ("classes", "class_names", "captions") if k in cat.meta})
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    _write_json(out / META_FILE, meta)
    return meta


# ----------------------------------------------------------------------------- readers


@dataclass
class EmbeddingSet:
    """A finished `galaxalign embed` output."""

    path: Path
    meta: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def files(self, splits: list[str] | None = None) -> list[tuple[str, Path]]:
        """(split, shard path) in catalogue order."""
        chosen = splits or list(self.meta["splits"])
        unknown = [s for s in chosen if s not in self.meta["splits"]]
        if unknown:
            raise ValueError(
                f"embeddings {self.path} have no split {unknown[0]!r} (have {sorted(self.meta['splits'])})"
            )
        return [(s, self.path / s / f) for s in chosen for f in self.meta["splits"][s]["files"]]

    def num_rows(self, splits: list[str] | None = None) -> int:
        return sum(self.meta["splits"][s]["rows"] for s in (splits or list(self.meta["splits"])))

    def iter_batches(
        self, splits: list[str] | None = None, columns: list[str] | None = None, batch_rows: int = 65_536
    ) -> Iterator[tuple[str, Path, pa.RecordBatch]]:
        """(split, shard, batch) streamed shard by shard, in catalogue order."""
        for split, path in self.files(splits):
            try:
                for rb in pq.ParquetFile(path).iter_batches(batch_rows, columns=columns):
                    yield split, path, rb
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{path}: not a readable embeddings shard ({e})") from None


def open_embeddings(path: str | Path) -> EmbeddingSet:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"embeddings directory {path} does not exist (write it with `galaxalign embed`)"
        )
    if not (path / META_FILE).is_file():
        hint = (
            " (an unfinished run: rerun the same `galaxalign embed` command)"
            if (path / MANIFEST_DIR).is_dir()
            else ""
        )
        raise ValueError(f"{path} is not a finished `galaxalign embed` output: no {META_FILE}{hint}")
    try:
        meta = json.loads((path / META_FILE).read_text())
        _ = meta["splits"], meta["dim"], meta["modalities"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path / META_FILE}: not a valid embeddings description ({e})") from None
    return EmbeddingSet(path, meta)


def matrix(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column -> (N, D) float32; null rows (no caption/symbol) become NaN."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    d = col.type.list_size
    out = []
    for c in chunks:
        v = c.values.slice(c.offset * d, len(c) * d).to_numpy(zero_copy_only=False).astype(np.float32)
        v = v.reshape(len(c), d)
        if c.null_count:
            v[~c.is_valid().to_numpy(zero_copy_only=False)] = np.nan
        out.append(v)
    return np.concatenate(out) if out else np.zeros((0, d), np.float32)


def load_split(emb: EmbeddingSet, split: str, max_rows: int | None = None) -> Embeddings:
    """One split as in-memory Embeddings (for eval, which needs labels and all three modalities)."""
    missing = [m for m in ("image", "symbol", "text") if m not in emb.meta["modalities"]]
    if missing or not emb.meta.get("labelled"):
        need = f"modalities {missing}" if missing else "labels (it was embedded from an unlabelled catalogue)"
        raise ValueError(
            f"embeddings {emb.path} lack {need}; eval needs `galaxalign embed` of a prepared dataset"
        )
    cols = ["id", "label", "image_embedding", "symbol_embedding", "text_embedding"]
    parts, n = [], 0
    for _, _, rb in emb.iter_batches([split], cols):
        parts.append(rb if max_rows is None else rb.slice(0, max_rows - n))
        n += parts[-1].num_rows
        if max_rows is not None and n >= max_rows:
            break
    if not n:
        raise ValueError(f"embeddings {emb.path}: split {split!r} has no rows")
    t = pa.Table.from_batches(parts)
    return Embeddings(
        ids=t.column("id").to_numpy(zero_copy_only=False),
        labels=t.column("label").to_numpy().astype(np.int64),
        image=matrix(t.column("image_embedding")),
        symbol=matrix(t.column("symbol_embedding")),
        text=matrix(t.column("text_embedding")),
    )


def stored_for_eval(
    path: str | Path,
    bundle: Any,
    split: str,
    train_split: str,
    max_test_rows: int | None,
    max_train_rows: int | None,
) -> tuple[Embeddings, Embeddings | None]:
    """`galaxalign eval --embeddings`: the test (and train, when embedded) splits of a sharded output,
    checked to come from `bundle`'s model (same width, same weights) so the heads score what they should."""
    emb = open_embeddings(path)
    dim = int(bundle.embed_texts(["x"]).shape[1])
    if emb.dim != dim:
        raise ValueError(
            f"embeddings {emb.path} are {emb.dim}-d but model {bundle.path} makes {dim}-d ones: "
            "evaluate with the model that made them"
        )
    if emb.meta.get("model_fingerprint") != model_fingerprint(bundle.path):
        raise ValueError(
            f"embeddings {emb.path} were made by model {emb.meta.get('model')}, not {bundle.path} (weights "
            "differ): re-embed with this model or evaluate that one"
        )
    test = load_split(emb, split, max_test_rows)
    train = load_split(emb, train_split, max_train_rows) if train_split in emb.meta["splits"] else None
    return test, train
