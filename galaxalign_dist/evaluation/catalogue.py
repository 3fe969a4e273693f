"""Catalogues to embed (a prepared dataset or a folder of image files), cut into units: one output shard each."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from galaxalign_dist.data import shards
from galaxalign_dist.paths import absolute, is_uri

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # what torchvision's decode_image reads
FOLDER_SPLIT = "all"  # the one split of an image folder
MODALITIES = ("image", "text", "symbol")
MODALITY_COLUMN = {"image": "image", "text": "text", "symbol": "symbol"}  # the shard column each tower reads
CARRIED = ("label", "class_name")  # copied to the output when the catalogue has them


@dataclass(frozen=True)
class Unit:
    """Rows [first_row, first_row + rows) of one source: the input of output shard `k`.

    Parquet: row groups [row_groups[0], row_groups[1]) of `file`. Folder: `names[i]` is row i
    (an image file), `first_row` its position in the folder's sorted file list.
    """

    k: int
    split: str
    file: str  # path inside the catalogue's filesystem ("" for a folder unit)
    first_row: int
    rows: int
    row_groups: tuple[int, int] = (0, 0)
    names: tuple[str, ...] = field(default=(), repr=False)

    def describe(self, root: str) -> dict[str, Any]:
        """The unit as plan.json records it (file relative to the catalogue root; no file lists)."""
        return {
            "k": self.k,
            "split": self.split,
            "file": _relative(root, self.file) if self.file else "",
            "first_row": self.first_row,
            "rows": self.rows,
            "row_groups": list(self.row_groups),
        }


@dataclass
class Catalogue:
    """What `galaxalign embed --data` names, opened and checked; `units` cover every row once."""

    data: str  # as given, local paths made absolute
    kind: str  # "dataset" | "folder"
    fs: pafs.FileSystem
    root: str  # path of `data` inside `fs`
    splits: list[str]
    units: list[Unit]
    columns: list[str]  # source columns the rows carry (id, image, text, ...)
    meta: dict[str, Any] | None = None  # a dataset's metadata.json
    identity: dict[str, Any] = field(default_factory=dict)  # what decides the units (plan.json)

    @property
    def num_rows(self) -> int:
        return sum(u.rows for u in self.units)

    def shown(self, path: str) -> str:
        """How messages name a file of the catalogue: a local path, or the URI with the file's path."""
        rel = _relative(self.root, path)
        return f"{self.data.rstrip('/')}/{rel}" if rel else self.data


def _relative(root: str, path: str) -> str:
    root = root.rstrip("/")
    return path[len(root) + 1 :] if path.startswith(root + "/") else path


def _fs_and_root(data: str) -> tuple[pafs.FileSystem, str]:
    if not is_uri(data):
        return pafs.LocalFileSystem(), str(Path(data))
    try:
        fs, path = pafs.FileSystem.from_uri(data)
    except (pa.ArrowException, ValueError) as e:
        raise ValueError(f"{data}: not a URI pyarrow can open ({e})") from None
    return fs, path.rstrip("/") or path


def check_modalities(modalities: list[str] | tuple[str, ...]) -> list[str]:
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities:
        raise ValueError(f"--modalities: unknown {bad or 'none given'}; choose from {','.join(MODALITIES)}")
    return [m for m in MODALITIES if m in modalities]  # canonical order, no repeats


def open_catalogue(
    data: str | Path, modalities: list[str], splits: list[str] | None = None, rows_per_shard: int = 10_000
) -> Catalogue:
    """Open a prepared dataset (metadata.json) or a folder of images and plan its units.

    Everything here reads metadata only (footers, directory listings): it runs in the driver before any
    cluster work, and fails naming the file and column, split or folder at fault.
    """
    if rows_per_shard < 1:
        raise ValueError(f"--rows-per-shard must be positive, got {rows_per_shard}")
    data = absolute(data)
    modalities = check_modalities(modalities)
    fs, root = _fs_and_root(data)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"catalogue {data} does not exist (a prepared dataset or a folder of images)")
    if shards.is_prepared(data):
        return _open_dataset(data, fs, root, modalities, splits, rows_per_shard)
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"catalogue {data} is not a directory (a prepared dataset or a folder of images)")
    return _open_folder(data, fs, root, modalities, splits, rows_per_shard)


def _open_dataset(data, fs, root, modalities, splits, rows_per_shard) -> Catalogue:  # noqa: ANN001
    meta = shards.read_metadata(data)
    splits = splits or list(meta["splits"])
    needed = ["id", *(MODALITY_COLUMN[m] for m in modalities)]
    units: list[Unit] = []
    files_seen: list[list[Any]] = []
    columns: list[str] | None = None
    for split in splits:
        _, files = shards.split_paths(data, split)  # unknown split -> ValueError naming the splits
        if not files or not meta["splits"][split].get("rows", 1):
            raise ValueError(f"{data}: split {split!r} has no rows to embed")
        for path in files:
            shown = f"{data.rstrip('/')}/{_relative(root, path)}"
            try:
                footer = pq.read_metadata(path, filesystem=fs)
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{shown}: not a readable Parquet shard ({e})") from None
            names = footer.schema.names
            missing = [c for c in needed if c not in names]
            if missing:
                raise ValueError(
                    f"{shown}: no column {missing[0]!r} (needed for --modalities {','.join(modalities)})"
                )
            cols = needed + [c for c in CARRIED if c in names]
            columns = cols if columns is None else [c for c in columns if c in cols]
            files_seen.append([_relative(root, path), footer.num_rows, footer.num_row_groups])
            units += _cut(split, path, [footer.row_group(g).num_rows for g in range(footer.num_row_groups)],
                          rows_per_shard, start_k=len(units))  # fmt: skip
    if not units or not sum(u.rows for u in units):
        raise ValueError(f"{data}: splits {splits} have no rows to embed")
    identity = {"kind": "dataset", "splits": splits, "files": files_seen}
    return Catalogue(data, "dataset", fs, root, splits, units, columns or needed, meta, identity)


def _cut(split: str, path: str, group_rows: list[int], rows_per_shard: int, start_k: int) -> list[Unit]:
    """Consecutive row groups of one file, at most rows_per_shard rows a unit (a bigger group is its own unit)."""
    units, g0, first, n = [], 0, 0, 0
    for g, rows in enumerate(group_rows):
        if n and n + rows > rows_per_shard:
            units.append(Unit(start_k + len(units), split, path, first, n, (g0, g)))
            g0, first, n = g, first + n, 0
        n += rows
    if n:
        units.append(Unit(start_k + len(units), split, path, first, n, (g0, len(group_rows))))
    return units


def _open_folder(data, fs, root, modalities, splits, rows_per_shard) -> Catalogue:  # noqa: ANN001
    if splits and splits != [FOLDER_SPLIT]:
        raise ValueError(f"{data} is a folder of images: its one split is {FOLDER_SPLIT!r}, not {splits}")
    other = [m for m in modalities if m != "image"]
    if other:
        raise ValueError(
            f"{data} is a folder of images (no captions or symbols): --modalities {','.join(other)} "
            "needs a prepared dataset; use --modalities image"
        )
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    paths = sorted(
        i.path
        for i in found
        if i.type == pafs.FileType.File
        and i.base_name.lower().endswith(IMAGE_SUFFIXES)
        and not any(p.startswith(".") for p in _relative(root, i.path).split("/"))
    )
    if not paths:
        parquet = any(i.base_name.endswith(".parquet") for i in found)
        hint = " (Parquet files but no metadata.json: an unfinished `galaxalign prepare`?)" if parquet else ""
        raise ValueError(f"{data}: no image files ({', '.join(IMAGE_SUFFIXES)}) and no metadata.json{hint}")
    ids: dict[str, str] = {}
    for p in paths:
        gid = folder_id(root, p)
        if gid in ids:
            raise ValueError(
                f"{data}: two files give the id {gid!r}: {_relative(root, ids[gid])}, {_relative(root, p)}"
            )
        ids[gid] = p
    digest = hashlib.blake2b(
        "\n".join(_relative(root, p) for p in paths).encode(), digest_size=16
    ).hexdigest()
    units = [
        Unit(k, FOLDER_SPLIT, "", lo, len(chunk), names=tuple(chunk))
        for k, lo in enumerate(range(0, len(paths), rows_per_shard))
        for chunk in [paths[lo : lo + rows_per_shard]]
    ]
    identity = {"kind": "folder", "files": len(paths), "names_blake2b": digest}
    return Catalogue(data, "folder", fs, root, [FOLDER_SPLIT], units, ["id", "image"], None, identity)


def folder_id(root: str, path: str) -> str:
    """A folder image's id: its path below the folder, without the suffix (`spirals/587722`)."""
    rel = _relative(root, path)
    return rel.rsplit(".", 1)[0]


def read_unit(cat: Catalogue, unit: Unit, batch_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The unit's rows in batches (numpy, as Ray Data's numpy format): the catalogue columns plus
    ``unit`` and ``pos`` (row within the unit), ``source`` (file, relative) and ``source_row``."""
    if cat.kind == "folder":
        for lo in range(0, unit.rows, batch_rows):
            names = unit.names[lo : lo + batch_rows]
            images = np.empty(len(names), dtype=object)
            for i, name in enumerate(names):
                try:
                    with cat.fs.open_input_stream(name) as f:
                        images[i] = f.read()
                except (OSError, pa.ArrowException):
                    images[i] = None  # reported by the decoder as an unreadable image of this row
            rel = np.array([_relative(cat.root, n) for n in names], dtype=object)
            yield {
                "unit": np.full(len(names), unit.k, np.int32),
                "pos": np.arange(lo, lo + len(names), dtype=np.int32),
                "id": np.array([folder_id(cat.root, n) for n in names], dtype=object),
                "image": images,
                "source": rel,
                "source_row": np.zeros(len(names), np.int64),
            }
        return
    shown = cat.shown(unit.file)
    try:
        with cat.fs.open_input_file(unit.file) as f:
            pf = pq.ParquetFile(f)
            pos = 0
            for rb in pf.iter_batches(batch_rows, range(*unit.row_groups), cat.columns, use_threads=False):
                batch = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names}
                n = rb.num_rows
                batch.update(
                    unit=np.full(n, unit.k, np.int32),
                    pos=np.arange(pos, pos + n, dtype=np.int32),
                    source=np.full(n, _relative(cat.root, unit.file), dtype=object),
                    source_row=np.arange(unit.first_row + pos, unit.first_row + pos + n, dtype=np.int64),
                )
                pos += n
                yield batch
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{shown}: damaged Parquet shard, cannot read its rows ({e})") from None
    if pos != unit.rows:
        raise ValueError(f"{shown}: row groups {unit.row_groups} hold {pos} rows, the plan says {unit.rows}")


def fetch_images(data: str, refs: list[tuple[str, int]]) -> list[bytes | None]:
    """Encoded images of catalogue rows named by (source file relative to `data`, row in it).

    For thumbnails: reads only the row group holding each row, not the split. None where the row
    cannot be read (e.g. the dataset moved since it was embedded).
    """
    fs, root = _fs_and_root(absolute(data))
    out: list[bytes | None] = [None] * len(refs)
    opened: dict[str, pq.ParquetFile] = {}
    try:
        for i, (source, row) in enumerate(refs):
            path = f"{root.rstrip('/')}/{source}"
            try:
                if not source.endswith(".parquet"):
                    with fs.open_input_stream(path) as f:
                        out[i] = f.read()
                    continue
                if path not in opened:
                    opened[path] = pq.ParquetFile(fs.open_input_file(path))  # random access: footer only
                pf, start = opened[path], 0
                for g in range(pf.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    if row < start + n:
                        out[i] = pf.read_row_group(g, columns=["image"]).column("image")[row - start].as_py()
                        break
                    start += n
            except (OSError, pa.ArrowException):
                continue
    finally:
        for pf in opened.values():
            pf.close()
    return out
