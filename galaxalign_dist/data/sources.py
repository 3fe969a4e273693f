"""Readers for every SOURCE form of `galaxalign prepare`: each streams chunks of galaxies, never a whole file."""

from __future__ import annotations

import functools
import gzip
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

from galaxalign_dist.data.catalog_io import (
    INTEGER,
    NUMBER,
    TEXT,
    CatalogueError,
    as_float,
    as_text,
    check_kind,
)
from galaxalign_dist.data.options import PrepareOptions
from galaxalign_dist.data.schemas import ClassSchema, GalaxyClass, get_schema, parse_symbol_spec

CHUNK_ROWS = 256
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
# Shards hold two splits; a catalogue's validation rows are held out, so they go to `test`.
SPLIT_ALIASES = {"train": "train", "training": "train", "test": "test", "testing": "test",
                 "validation": "test", "valid": "test", "val": "test", "eval": "test"}  # fmt: skip
# A class of a `--schema auto` dataset without --class-symbols is drawn as a plain disk: the
# symbol tower then learns nothing for it, so prepare warns when classes share a symbol.
DEFAULT_SYMBOL = "disk"
H5_EXTRAS = ("ra", "dec", "redshift", "pxscale")
CATALOG_EXTRAS = ("ra", "dec", "redshift")
ID_COLUMNS = ("id_str", "id", "galaxy_id", "dr8_id", "iauname")
PATH_COLUMNS = ("file_loc", "path", "filename", "file")
LABEL_COLUMNS = ("label", "class")
# Forms prepare() converts without open_source (resumable, sharded): named in the unknown-form error.
OTHER_FORMS = ("gzdesi",)


@dataclass
class Chunk:
    """A batch of galaxies from one source file. Exactly one of `images` / `image_bytes` is set."""

    origin: str  # file the rows come from, named in error messages
    rows: list[int]  # row index of each galaxy within `origin` (0-based, header excluded)
    ids: list[str]
    labels: np.ndarray | list[Any]  # int class indices, or raw values (names, keys) to resolve
    images: np.ndarray | None = None  # (m, H, W, 3) uint8 pixels, stored as PNG
    image_bytes: list[bytes | None] | None = None  # encoded files, passed through
    problems: dict[int, str] = field(default_factory=dict)  # position -> why its image is unusable
    splits: list[str | None] | None = None  # published split per row (None: assign by hash)
    extras: dict[str, Any] = field(default_factory=dict)  # optional columns, each of length m
    # Per-row caption/symbol/class name for sources that derive them per galaxy (e.g. gzdesi);
    # when None they come from the row's class in the schema.
    class_names: list[str] | None = None
    texts: list[str] | None = None
    symbols: list[str] | None = None


class Source:
    """Base reader: subclasses set the attributes in __init__ (cheap, validates early) and stream chunks()."""

    description: str = ""
    schema: ClassSchema
    extra_fields: list[pa.Field]
    total: int | None = None  # number of rows if known up front (progress bar)
    published_split: bool = False
    auto_keys: dict[str, int] | None = None  # --schema auto: raw label value -> class index

    def chunks(self) -> Iterator[Chunk]:
        raise NotImplementedError

    def resolve(self, value: Any) -> GalaxyClass:
        """Class of one raw label value; ValueError if it is not a class of the schema."""
        if self.auto_keys is not None:
            if str(value) not in self.auto_keys:
                raise ValueError(f"unknown class {value!r}; known: {list(self.auto_keys)}")
            return self.schema.classes[self.auto_keys[str(value)]]
        return self.schema.lookup(value)


def generic_schema(
    keys: list[str], names: dict[str, str] | None = None, symbols: dict[str, str] | None = None
) -> ClassSchema:
    """A schema built from a dataset's own class values (`--schema auto`), sorted (numerically if all digits)."""
    keys = sorted(set(keys), key=lambda k: (int(k), k) if all(s.isdigit() for s in keys) else (0, k))
    for opt, mapping in (("--class-names", names), ("--class-symbols", symbols)):
        unknown = sorted(set(mapping or {}) - set(keys))
        if unknown:
            raise ValueError(f"{opt} names {unknown}, which are not classes in the data {keys}")
    classes = []
    for i, key in enumerate(keys):
        symbol = (symbols or {}).get(key, DEFAULT_SYMBOL)
        parse_symbol_spec(symbol)
        name = (names or {}).get(key, key.replace("_", " ").replace("-", " "))
        classes.append(GalaxyClass(i, key, name, symbol))
    return ClassSchema("auto", tuple(classes))


def _fixed_schema(opts: PrepareOptions, name: str) -> ClassSchema:
    if opts.schema not in (None, name):
        raise ValueError(f"this source's labels are {name} classes; --schema {opts.schema} does not apply")
    if opts.catalog.class_names or opts.catalog.class_symbols:
        raise ValueError("--class-names/--class-symbols only apply with --schema auto")
    return get_schema(name)


def _pick_schema(source: Source, opts: PrepareOptions, values: Callable[[], list[str]]) -> None:
    """Named schema from --schema, or (default: auto) one built from the distinct label values."""
    if opts.schema in (None, "auto"):
        source.schema = generic_schema(values(), opts.catalog.class_names, opts.catalog.class_symbols)
        source.auto_keys = {c.key: c.index for c in source.schema.classes}
    else:
        source.schema = _fixed_schema(opts, opts.schema.lower())


class H5Source(Source):
    """HDF5 files with an image array and an integer label array (Galaxy10 DECaLS, GalaxyMNIST)."""

    image_key = "images"

    def __init__(
        self, files: list[tuple[Path, str | None]], opts: PrepareOptions, schema: str, label_key: str
    ) -> None:
        self.files, self.opts, self.label_key = files, opts, label_key
        self.schema = _fixed_schema(opts, schema)
        self.published_split = all(split is not None for _, split in files)
        self.description = ", ".join(str(p) for p, _ in files)
        self.extra_fields, self.total = [], 0
        for path, _ in files:
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
            if path.suffix == ".gz":
                self.total = None  # known only after decompressing
                continue
            with _open_h5(path) as f:
                n = self._check(f, path)
                self.total = None if self.total is None else self.total + n
                self.extra_fields = [pa.field(k, pa.float64()) for k in H5_EXTRAS if k in f]

    def _check(self, f: h5py.File, path: Path) -> int:
        for key in (self.image_key, self.label_key):
            if key not in f:
                raise ValueError(f"{path}: HDF5 dataset {key!r} is missing (has {sorted(f.keys())})")
        images, labels = f[self.image_key], f[self.label_key]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"{path}: 'images' must be (N, H, W, 3) uint8, not {images.shape} {images.dtype}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{path}: {self.label_key!r} has shape {labels.shape}, not ({images.shape[0]},)")
        return images.shape[0]

    def chunks(self) -> Iterator[Chunk]:
        step = CHUNK_ROWS
        for path, split in self.files:
            with _gunzipped(path) as local, _open_h5(path, local) as f:
                n = self._check(f, path)
                extras = [k for k in H5_EXTRAS if k in f and f[k].shape == (n,)]
                prefix = f"{split}-" if split else f"{self.schema.name}-"
                for start in range(0, n, step):
                    stop = min(start + step, n)
                    rows = list(range(start, stop))
                    yield Chunk(
                        origin=str(path),
                        rows=rows,
                        ids=[f"{prefix}{r:06d}" for r in rows],
                        labels=np.asarray(f[self.label_key][start:stop]).astype(np.int64),
                        images=f[self.image_key][start:stop],  # one slice read: h5py never loads all
                        splits=[split] * len(rows) if split else None,
                        extras={k: np.asarray(f[k][start:stop], np.float64) for k in extras},
                    )


@contextmanager
def _gunzipped(path: Path) -> Iterator[Path]:
    """`path`, or for .gz a temporary copy decompressed in 1 MB pieces (h5py needs a real file)."""
    if path.suffix != ".gz":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="galaxalign-gunzip-") as tmp:
        local = Path(tmp) / path.stem
        try:
            with gzip.open(path, "rb") as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 2**20)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a valid gzip file ({e})") from None
        yield local


def _open_h5(path: Path, local: Path | None = None) -> h5py.File:
    try:
        return h5py.File(local or path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from None


def galaxy10_source(arg: str, opts: PrepareOptions) -> Source:
    """`galaxy10:PATH/Galaxy10_DECals.h5` (datasets images, ans, optional ra/dec/redshift/pxscale)."""
    return H5Source([(Path(arg), None)], opts, "galaxy10", label_key="ans")


def galaxymnist_source(arg: str, opts: PrepareOptions) -> Source:
    """`galaxymnist:DIR` (published train/test split) or `galaxymnist:FILE.hdf5[.gz]` (hash split)."""
    path = Path(arg)
    if path.is_dir():
        files = []
        for split in ("train", "test"):
            found = [path / f"{split}_dataset.hdf5{gz}" for gz in ("", ".gz")]
            found = [p for p in found if p.is_file()]
            if not found:
                raise FileNotFoundError(f"{path} has no {split}_dataset.hdf5 or {split}_dataset.hdf5.gz")
            files.append((found[0], split))
    else:
        files = [(path, None)]
    return H5Source(files, opts, "galaxymnist", label_key="labels")


class CatalogSource(Source):
    """A Parquet/CSV table with an id, an image path and a label column, read in batches."""

    def __init__(self, arg: str, opts: PrepareOptions) -> None:
        self.path, self.opts = Path(arg), opts
        if not self.path.is_file():
            raise FileNotFoundError(f"catalogue {self.path} does not exist")
        self.root = Path(opts.image_root) if opts.image_root else self.path.parent
        self.description = f"{self.path} (images under {self.root})"
        names = self._dataset(None).schema.names
        col, cat = functools.partial(_column, self.path, names), opts.catalog
        self.id_col = col(cat.id_column, ID_COLUMNS, "id", "--id-column")
        self.path_col = col(cat.path_column, PATH_COLUMNS, "image path", "--path-column")
        self.label_col = col(cat.label_column, LABEL_COLUMNS, "label", "--label-column")
        self.split_col = "split" if "split" in names else None  # a published split is kept
        if cat.split_column:
            self.split_col = col(cat.split_column, (), "split", "--split-column")
        self.published_split = self.split_col is not None
        self.extras = [c for c in CATALOG_EXTRAS if c in names]
        self.extra_fields = [pa.field(c, pa.float64()) for c in self.extras]
        self.ds = self._dataset([self.id_col, self.path_col, self.label_col, self.split_col])
        self._check_kinds(self.ds.schema)
        self.total = self.ds.count_rows() if self.path.suffix != ".csv" else None
        _pick_schema(self, opts, self._distinct_labels)

    def _check_kinds(self, schema: pa.Schema) -> None:
        """One line per unusable column (any writer's string types, ints and floats are fine; see catalog_io)."""
        any_scalar = (TEXT, INTEGER, NUMBER)  # ids and labels are cast to text, as they always were
        roles = [(self.id_col, any_scalar, "id"), (self.path_col, (TEXT,), "image path"),
                 (self.label_col, any_scalar, "label"), (self.split_col, (TEXT,), "split")]  # fmt: skip
        roles += [(c, (NUMBER,), "copied as float64") for c in self.extras]
        for column, kinds, role in roles:
            if column:
                check_kind(str(self.path), schema, column, kinds, role)

    def _dataset(self, text_cols: list[str | None] | None) -> pads.Dataset:
        suffix = self.path.suffix.lower()
        if suffix not in (".parquet", ".pq", ".csv"):
            raise ValueError(f"catalogue {self.path}: expected a .parquet or .csv file")
        fmt: str | pads.FileFormat = "parquet"
        if suffix == ".csv":
            # Read mapped columns as text: ids like 0123 keep their zeros, labels mix ints and names.
            types = {c: pa.string() for c in text_cols or [] if c}
            fmt = pads.CsvFileFormat(convert_options=pacsv.ConvertOptions(column_types=types))
        try:
            return pads.dataset(self.path, format=fmt)
        except pa.ArrowException as e:
            raise CatalogueError(f"catalogue {self.path}: not a readable {suffix[1:]} file ({e})") from None

    def _distinct_labels(self) -> list[str]:
        seen: set[str] = set()
        for batch in self.ds.to_batches(columns=[self.label_col], batch_size=65536):
            col = as_text(batch.column(0))
            seen.update(v for v in pc.unique(col).to_pylist() if v is not None)
        if not seen:
            raise ValueError(f"catalogue {self.path} has no labels in column {self.label_col!r}")
        return sorted(seen)

    def chunks(self) -> Iterator[Chunk]:
        cols = [c for c in (self.id_col, self.path_col, self.label_col, self.split_col) if c] + self.extras
        row = 0
        for batch in self.ds.to_batches(columns=cols, batch_size=CHUNK_ROWS):
            d = {c: as_text(batch.column(c)).to_pylist() for c in cols if c not in self.extras}
            m = batch.num_rows
            rows = list(range(row, row + m))
            row += m
            images: list[bytes | None] = [None] * m
            problems: dict[int, str] = {}
            for i, rel in enumerate(d[self.path_col]):
                file = self.root / (rel or "")  # an absolute `rel` replaces the root
                if not rel or not file.is_file():
                    problems[i] = f"missing image file {file}" if rel else f"empty {self.path_col!r}"
                else:
                    images[i] = file.read_bytes()
            pairs = zip(d[self.split_col], rows, strict=True) if self.split_col else ()
            splits = [_split_value(v, self.path, r, self.split_col) for v, r in pairs] or None
            yield Chunk(
                origin=str(self.path),
                rows=rows,
                ids=[str(v) if v else f"row-{r}" for v, r in zip(d[self.id_col], rows, strict=True)],
                labels=d[self.label_col],
                image_bytes=images,
                problems=problems,
                splits=splits,
                extras={c: as_float(batch.column(c)) for c in self.extras},
            )


def _column(path: Path, names: list[str], wanted: str | None, defaults: tuple, what: str, opt: str) -> str:
    if wanted:
        if wanted not in names:
            raise ValueError(f"catalogue {path} has no column {wanted!r}; columns: {names}")
        return wanted
    for c in defaults:
        if c in names:
            return c
    raise ValueError(
        f"catalogue {path} has no {what} column (tried {list(defaults)}); pass {opt}; columns: {names}"
    )


def _split_value(value: str | None, path: Path, row: int, column: str) -> str | None:
    if value is None or value == "":
        return None
    try:
        return SPLIT_ALIASES[value.strip().lower()]
    except KeyError:
        raise ValueError(
            f"{path} row {row}: split {value!r} in {column!r} is not one of {sorted(SPLIT_ALIASES)}"
        ) from None


class FolderSource(Source):
    """`folder:DIR` with one sub-folder per class, optionally under train/ and test/ (or validation/)."""

    def __init__(self, arg: str, opts: PrepareOptions) -> None:
        self.root, self.opts = Path(arg), opts
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        subdirs = _subdirs(self.root)
        self.published_split = bool(subdirs) and all(d.name.lower() in SPLIT_ALIASES for d in subdirs)
        if self.published_split:
            self.class_dirs = [(c, SPLIT_ALIASES[d.name.lower()]) for d in subdirs for c in _subdirs(d)]
        else:
            self.class_dirs = [(d, None) for d in subdirs]
        if not self.class_dirs:
            raise ValueError(f"image folder {self.root} has no class sub-folders")
        self.description, self.extra_fields = str(self.root), []
        _pick_schema(self, opts, lambda: [d.name for d, _ in self.class_dirs])
        for d, _ in self.class_dirs:
            try:
                self.resolve(d.name)  # fail now on a folder that is not a class of the schema
            except ValueError as e:
                raise ValueError(f"image folder {d}: {e}") from None

    def chunks(self) -> Iterator[Chunk]:
        step = CHUNK_ROWS
        for class_dir, split in self.class_dirs:
            files = sorted(
                p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            for start in range(0, len(files), step):
                part = files[start : start + step]
                yield Chunk(
                    origin=str(class_dir),
                    rows=list(range(start, start + len(part))),
                    ids=[p.relative_to(self.root).with_suffix("").as_posix() for p in part],
                    labels=[class_dir.name] * len(part),
                    image_bytes=[p.read_bytes() for p in part],
                    splits=[split] * len(part) if split else None,
                )


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


class SyntheticSource(Source):
    """`synthetic:galaxymnist|galaxy10`: procedurally drawn galaxies (synthetic.iter_chunks), n/seed/size."""

    def __init__(self, arg: str, opts: PrepareOptions) -> None:
        self.schema = _fixed_schema(opts, get_schema(arg).name)
        self.opts, self.total = opts, opts.n if opts.n is not None else 1000
        self.size = opts.size or 64
        self.description = f"synthetic:{self.schema.name} n={self.total} seed={opts.seed} size={self.size}"
        self.extra_fields = []

    def chunks(self) -> Iterator[Chunk]:
        from galaxalign_dist.data import synthetic  # imported late: only this form needs it

        it = synthetic.iter_chunks(
            self.schema, self.total, seed=self.opts.seed, size=self.size, chunk=CHUNK_ROWS
        )
        for images, labels, start in it:
            rows = list(range(start, start + len(labels)))
            ids = [f"synthetic-{r:07d}" for r in rows]
            yield Chunk(origin=self.description, rows=rows, ids=ids, labels=np.asarray(labels), images=images)


# SOURCE form -> reader factory. Adding a form is one line here.
SOURCES: dict[str, Callable[[str, PrepareOptions], Source]] = {
    "galaxy10": galaxy10_source,
    "galaxymnist": galaxymnist_source,
    "catalog": CatalogSource,
    "folder": FolderSource,
    "synthetic": SyntheticSource,
}


def parse_source(source: str) -> tuple[str, str]:
    """`FORM:ARG` -> (form in lower case, arg), with a clear error for an unknown form."""
    form, sep, arg = source.partition(":")
    if not sep or form.lower() not in (*SOURCES, *OTHER_FORMS) or not arg:
        forms = ", ".join(f"{f}:..." for f in (*SOURCES, *OTHER_FORMS))
        raise ValueError(f"unknown SOURCE {source!r}: expected one of {forms}")
    return form.lower(), arg


def open_source(source: str, opts: PrepareOptions) -> Source:
    """Open the reader of a `FORM:ARG` source (the forms of SOURCES)."""
    form, arg = parse_source(source)
    if form not in SOURCES:
        raise ValueError(f"{form}: sources are converted by their own module, not read through open_source")
    return SOURCES[form](arg, opts)
