"""Readers of prepared datasets at a local path or a URI that pyarrow opens (s3://, gs://, file://, ...).

A URI goes through ``pyarrow.fs.FileSystem.from_uri`` (credentials and region from the environment,
as pyarrow and Ray resolve them); anything else is a local path. Writers (shards.py) take local paths
only: prepare locally, then copy to object storage.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from galaxalign_dist.data.format import ARROW_SCHEMA, FORMAT_VERSION, METADATA_FILE, METADATA_FILES
from galaxalign_dist.paths import is_uri


def _fs_and_path(directory: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding `directory` and its path inside it."""
    if not is_uri(directory):
        return pafs.LocalFileSystem(), str(Path(directory))
    try:
        fs, path = pafs.FileSystem.from_uri(str(directory))
    except (pa.ArrowException, ValueError) as e:
        raise ValueError(f"{directory}: not a URI pyarrow can open ({e})") from None
    return fs, path.rstrip("/") or path


def _join(path: str, *parts: str) -> str:
    """`parts` below a filesystem path (pyarrow paths always use '/')."""
    return "/".join([path.rstrip("/"), *parts])


def _shown(directory: str | Path, *parts: str) -> str:
    """How messages and split_files name a path below `directory`: a local path as pathlib writes it,
    a URI with `parts` appended to its path (its query, e.g. ``?region=...``, kept)."""
    if not is_uri(directory):
        return str(Path(directory, *parts))
    u = urlsplit(str(directory))
    return urlunsplit(u._replace(path=_join(u.path, *parts)))


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _metadata_name(fs: pafs.FileSystem, root: str) -> str | None:
    """The metadata file present in `root`: _metadata.json, else (older datasets) metadata.json."""
    infos = fs.get_file_info([_join(root, name) for name in METADATA_FILES])
    return next(
        (name for name, i in zip(METADATA_FILES, infos, strict=True) if i.type == pafs.FileType.File), None
    )


def is_prepared(directory: str | Path) -> bool:
    """Whether `directory` (a local path or URI) holds a metadata file, i.e. a finished prepare."""
    fs, root = _fs_and_path(directory)
    return _metadata_name(fs, root) is not None


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """Load the metadata of a prepared dataset, with a clear error if it is missing or invalid."""
    fs, root = _fs_and_path(directory)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        hint = "prepare it locally and copy it there" if is_uri(directory) else "run `galaxalign prepare`"
        raise FileNotFoundError(f"dataset directory {_shown(directory)} does not exist ({hint})")
    name = _metadata_name(fs, root)
    if name is None:
        raise FileNotFoundError(
            f"{_shown(directory)} is not a prepared dataset: no {METADATA_FILE} (run `galaxalign prepare`; "
            "a *.tmp-* directory is an unfinished prepare)"
        )
    path = _shown(directory, name)
    with fs.open_input_stream(_join(root, name)) as f:
        raw = f.read()
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in ("format_version", "schema", "classes", "splits") if k not in meta]
    if not isinstance(meta, dict) or missing:
        raise ValueError(f"{path} is not a galaxalign dataset metadata file (missing {missing})")
    if meta["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {meta['format_version']} is newer than this galaxalign_dist "
            f"supports ({FORMAT_VERSION}); upgrade galaxalign_dist"
        )
    return meta


def split_rows(meta: dict[str, Any], split: str) -> int:
    """Rows of one split, from a dataset's metadata."""
    return int(meta["splits"][split]["rows"])


def split_paths(directory: str | Path, split: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem holding a dataset and one split's Parquet files as sorted paths inside it
    (empty if the split has no rows): what pyarrow.dataset and ray.data.read_parquet take together."""
    meta = read_metadata(directory)
    if split not in meta["splits"]:
        raise ValueError(f"unknown split {split!r}; dataset {directory} has {sorted(meta['splits'])}")
    fs, root = _fs_and_path(directory)
    found = fs.get_file_info(pafs.FileSelector(_join(root, split), allow_not_found=True))
    paths = [
        i.path for i in found if i.type == pafs.FileType.File and fnmatchcase(i.base_name, "part-*.parquet")
    ]
    return fs, sorted(paths, key=_basename)


def split_files(directory: str | Path, split: str) -> list[str]:
    """Sorted Parquet files of one split (empty if the split has no rows): local paths, or URIs below
    a URI `directory`."""
    _, paths = split_paths(directory, split)
    return [_shown(directory, split, _basename(p)) for p in paths]


def check_split_files(directory: str | Path, split: str, meta: dict[str, Any] | None = None) -> int:
    """Open every Parquet footer of a split (no row data): the files the metadata lists must exist,
    be Parquet, hold the required columns and add up to its row count. Returns the rows; ValueError
    naming the file otherwise. Cheap enough to run before a cluster is started for a training run
    (footers are read a few at a time, which hides object-storage latency). `meta`: the dataset's
    metadata when the caller has already read it."""
    meta = meta if meta is not None else read_metadata(directory)
    info = meta["splits"].get(split)
    if info is None:
        raise ValueError(f"unknown split {split!r}; dataset {directory} has {sorted(meta['splits'])}")
    listed = info.get("files")  # written by every prepare; older/hand-made metadata: what is on disk
    names = listed if listed is not None else [_basename(p) for p in split_paths(directory, split)[1]]
    fs, root = _fs_and_path(directory)
    meta_name = _metadata_name(fs, root) or METADATA_FILE

    def footer_rows(name: str) -> int:
        path, shown = _join(root, split, name), _shown(directory, split, name)
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"{shown}: shard listed in {meta_name} is missing")
        try:
            footer = pq.read_metadata(path, filesystem=fs)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{shown}: not a readable Parquet shard ({e})") from None
        missing = [c for c in ARROW_SCHEMA.names if c not in footer.schema.names]
        if missing:
            raise ValueError(f"{shown}: shard lacks required columns {missing}")
        return footer.num_rows

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(names)))) as pool:
        rows = sum(pool.map(footer_rows, names))  # the first bad file in listed order raises
    if rows != info["rows"]:
        raise ValueError(
            f"{_shown(directory, split)}: shards hold {rows} rows, {meta_name} says {info['rows']}"
        )
    return rows


def dataset(directory: str | Path, split: str) -> pads.Dataset:
    """A pyarrow Dataset over one split's shards (nothing is read until scanned)."""
    fs, paths = split_paths(directory, split)
    if not paths:
        return pads.dataset([], schema=ARROW_SCHEMA, format="parquet")
    return pads.dataset(paths, filesystem=fs, format="parquet")
