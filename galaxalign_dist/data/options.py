"""Typed options of `prepare`: the common group, catalogue columns, Galaxy Zoo DESI, and the forms each fits.

Each field says which SOURCE forms it applies to (`only` / `not_for` in its metadata) and how the
command line spells it; cli/prepare.py builds its flags from these fields and prepare() rejects an
option given for a form it does not apply to. Nothing here is kept in sync by hand with a list.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # imported where used: building the CLI's flags from these fields needs no pyarrow
    from galaxalign_dist.data.gzdesi import GZDesiMapping

GZDESI = "gzdesi"
# Shard writer defaults (shards.ShardWriter): ~128 MB files; row groups of 256 rows hold ~30 MB of
# 256 px PNGs, so a reader streams a dataset in bounded memory.
DEFAULT_FILE_BYTES = 128 * 2**20
DEFAULT_ROW_GROUP_ROWS = 256
# 10k catalogue rows per shard: ~150-250 MB of 424 px JPEGs, ~10 s of one core, 870 shards for the
# full 8.7M catalogue -- enough files for Ray Data to read in parallel, few enough to list quickly.
DEFAULT_ROWS_PER_SHARD = 10_000
IO_THREADS = 4  # per shard task: hides NFS/object-mount read latency; JPEG decode releases the GIL
NOT_GZDESI_LABELS = "labels come from the vote fractions"
NOT_GZDESI_FILES = "shards are cut by --rows-per-shard"


# How pixel arrays (Galaxy10 / GalaxyMNIST HDF5, synthetic) are stored (benchmarks/RESULTS.md#stored-image-
# encoding, one core): on 100 real Galaxy10 images at 256 px, PNG decodes in 2.3 ms and takes 120 KiB; JPEG
# quality 95 with full-resolution chroma in 0.6 ms and 30 KiB at 48 dB PSNR (mean error 0.6 of 255); raw in
# 0.1 ms and 192 KiB. On 64 px GalaxyMNIST, PNG decodes in 0.19 ms and JPEG's 8x8 blocks cost small images
# most (mean error 2.2). So `auto` (the default) stores JPEG from AUTO_JPEG_MIN_SIDE px up, where decoding is
# the data side's main cost (4x less CPU and storage than PNG; CUDA decodes it too), and PNG below it.
IMAGE_FORMATS = ("auto", "jpeg", "png", "raw")
DEFAULT_IMAGE_FORMAT = "auto"
AUTO_JPEG_MIN_SIDE = 128


def _opt(default: Any, help: str, *, only: str | None = None, not_for: str | None = None, why: str = "",
         flag: str | None = None, unit: int = 1, cli: bool = True) -> Any:  # fmt: skip
    """A field with its help text, the forms it applies to (`only` one, or all but `not_for`) and its CLI
    flag (`unit`: the flag's value times this is the field's, e.g. MB -> bytes; cli=False: Python only)."""
    meta = {
        "help": help,
        "only": only,
        "not_for": not_for,
        "why": why,
        "flag": flag,
        "unit": unit,
        "cli": cli,
    }
    return field(default=default, metadata=meta)


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


@dataclass(frozen=True)
class CatalogOptions:
    """Which catalogue columns hold what, and the classes of a `--schema auto` dataset."""

    id_column: str | None = _opt(None, "default: first of id_str, id, galaxy_id, dr8_id, iauname")
    path_column: str | None = _opt(None, "default: first of file_loc, path, filename, file")
    label_column: str | None = _opt(
        None, "class index, key or name; default: label, else class", not_for=GZDESI, why=NOT_GZDESI_LABELS
    )
    split_column: str | None = _opt(
        None,
        "train/test(/validation) per row; default: split if present",
        not_for=GZDESI,
        why=NOT_GZDESI_LABELS,
    )
    class_names: dict[str, str] | str | None = _opt(
        None,
        "--schema auto: KEY=NAME,... e.g. 'spirals=spiral galaxy'",
        not_for=GZDESI,
        why=NOT_GZDESI_LABELS,
    )
    class_symbols: dict[str, str] | str | None = _opt(
        None, "--schema auto: KEY=SPEC,... e.g. 'spirals=disk+arms,non_spirals=round'", not_for=GZDESI,
        why=NOT_GZDESI_LABELS,
    )  # fmt: skip

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", parse_mapping(self.class_names, "--class-names"))
        object.__setattr__(self, "class_symbols", parse_mapping(self.class_symbols, "--class-symbols"))


@dataclass(frozen=True)
class GZDesiOptions:
    """The `gzdesi:` form only: how vote fractions become classes, and how the resumable conversion runs."""

    gz_schema: Literal["galaxy10", "galaxymnist"] | None = _opt(None, "default galaxy10", only=GZDESI)
    caption_mode: Literal["class", "rich"] | None = _opt(None, "class (default) or rich", only=GZDESI)
    symbol_mode: Literal["class", "rich"] | None = _opt(None, "class (default) or rich", only=GZDESI)
    on_uncertain: Literal["exclude", "label"] | None = _opt(
        None, "galaxies fitting no class: drop (default) or keep as label -1", only=GZDESI
    )
    rows_per_shard: int = _opt(
        DEFAULT_ROWS_PER_SHARD, "catalogue rows per shard (default 10000)", only=GZDESI
    )
    workers: int | None = _opt(None, "shards converted at once (Ray tasks if Ray is installed)", only=GZDESI)
    use_ray: bool | None = _opt(
        None, "shards as Ray tasks (RAY_ADDRESS=auto: a cluster)", only=GZDESI, flag="--ray"
    )
    max_shards: int | None = _opt(
        None, "stop after converting this many shards (rerun to continue)", only=GZDESI
    )
    verify_checksums: bool = _opt(False, "re-hash every finished shard before resuming", only=GZDESI)
    io_threads: int = _opt(IO_THREADS, "image-reading threads per shard task (default 4)", only=GZDESI)
    # Thresholds and modes as one object (Python only); gz_schema and the modes above override its fields.
    mapping: GZDesiMapping | None = _opt(None, "", only=GZDESI, cli=False)

    def __post_init__(self) -> None:
        if self.rows_per_shard < 1 or self.io_threads < 1:
            raise ValueError("rows_per_shard and io_threads must be positive")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be positive, got {self.workers}")

    def resolved_mapping(self, schema: str | None) -> GZDesiMapping:
        """`mapping` (default GZDesiMapping()) with the schema and modes given as options applied."""
        if schema and self.gz_schema and schema.lower() != self.gz_schema.lower():
            raise ValueError(f"--schema {schema} and --gz-schema {self.gz_schema} disagree")
        overrides = {"schema": (self.gz_schema or schema or "").lower() or None, "caption_mode": self.caption_mode,
                     "symbol_mode": self.symbol_mode, "on_uncertain": self.on_uncertain}  # fmt: skip
        from galaxalign_dist.data.gzdesi import GZDesiMapping

        base = self.mapping or GZDesiMapping()
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class PrepareOptions:
    """Options of every SOURCE form, with the catalogue and gzdesi groups."""

    image_root: str | Path | None = _opt(
        None, "catalog/gzdesi: directory image paths are relative to (default: the catalogue's)"
    )
    schema: str | None = _opt(
        None, "class schema: galaxy10, galaxymnist, or auto (classes = the data's sorted label values; "
        "default for catalog/folder)",
    )  # fmt: skip
    n: int | None = _opt(None, "synthetic: rows to draw (default 1000); others: keep the first N rows")
    seed: int = _opt(0, "seed of the synthetic data and of the hash split")
    size: int | None = _opt(
        None, "synthetic: image size in pixels (default 64)", only="synthetic",
        why="images are resized at training time",
    )  # fmt: skip
    test_fraction: float = _opt(
        0.2, "test share for sources without a published split (seeded hash of the id; default 0.2)"
    )
    skip_bad: bool = _opt(False, "skip (count and list) unreadable or missing images")
    overwrite: bool = _opt(False, "replace an existing non-empty --out")
    rows_per_file: int | None = _opt(
        None, "cap rows per Parquet file (default: none, ~128 MB files)", not_for=GZDESI, why=NOT_GZDESI_FILES
    )
    file_bytes: int = _opt(
        DEFAULT_FILE_BYTES, "start a new file after this many MB of images (default 128)", not_for=GZDESI,
        why=NOT_GZDESI_FILES, flag="--file-mb", unit=2**20,
    )  # fmt: skip
    row_group_rows: int = _opt(DEFAULT_ROW_GROUP_ROWS, "rows per Parquet row group (default 256)")
    image_format: str = _opt(
        DEFAULT_IMAGE_FORMAT, "how pixel arrays (galaxy10, galaxymnist, synthetic) are stored: auto (default: "
        "jpeg from 128 px, png below), jpeg (quality 95), png (lossless) or raw (no decode, 6x the bytes of "
        "jpeg); image files are stored as given",
        not_for=GZDESI, why="its images are JPEG files, stored as given",
    )  # fmt: skip
    progress: bool = _opt(True, "no progress bar", flag="--no-progress")
    catalog: CatalogOptions = field(default_factory=CatalogOptions)
    gzdesi: GZDesiOptions = field(default_factory=GZDesiOptions)

    def __post_init__(self) -> None:
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.n is not None and self.n < 1:
            raise ValueError(f"n must be positive, got {self.n}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(
                f"--image-format {self.image_format!r}: expected one of {', '.join(IMAGE_FORMATS)}"
            )
        if self.schema:
            object.__setattr__(self, "schema", self.schema.lower())

    @classmethod
    def from_flat(cls, base: PrepareOptions | None = None, **kwargs: Any) -> PrepareOptions:
        """`base` (default: all defaults) with options given by field name, whichever group holds them."""
        base = base or cls()
        known = {f.name for _, f in option_fields()}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown prepare options {unknown}; known: {sorted(known)}")
        groups: dict[str, dict[str, Any]] = {"": {}, "catalog": {}, "gzdesi": {}}
        for group, f in option_fields():
            if f.name in kwargs:
                groups[group][f.name] = kwargs[f.name]
        return dataclasses.replace(
            base,
            **groups[""],
            catalog=dataclasses.replace(base.catalog, **groups["catalog"]),
            gzdesi=dataclasses.replace(base.gzdesi, **groups["gzdesi"]),
        )

    def check_form(self, form: str) -> None:
        """ValueError naming every option given (not at its default) that does not apply to `form`."""
        only: dict[tuple[str, str], list[str]] = {}
        not_for: dict[tuple[str, str], list[str]] = {}
        for group, f in option_fields():
            owner = self if not group else getattr(self, group)
            if getattr(owner, f.name) == f.default:
                continue
            m = f.metadata
            if m["only"] and m["only"] != form:
                only.setdefault((m["only"], m["why"]), []).append(flag(f))
            elif m["not_for"] == form:
                not_for.setdefault((form, m["why"]), []).append(flag(f))
        problems = [f"options {sorted(v)} apply to {k}: sources only" + (f" ({why})" if why else "")
                    for (k, why), v in only.items()]  # fmt: skip
        problems += [f"options {sorted(v)} do not apply to {k}: ({why})" for (k, why), v in not_for.items()]
        if problems:
            raise ValueError("; ".join(problems))


def option_fields() -> list[tuple[str, dataclasses.Field]]:
    """(group, field) of every option: group "" (PrepareOptions), "catalog" or "gzdesi"."""
    out = [("", f) for f in dataclasses.fields(PrepareOptions) if f.name not in ("catalog", "gzdesi")]
    out += [("catalog", f) for f in dataclasses.fields(CatalogOptions)]
    return out + [("gzdesi", f) for f in dataclasses.fields(GZDesiOptions)]


def flag(f: dataclasses.Field) -> str:
    """The command-line flag of an option field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def field_types(group: str) -> dict[str, Any]:
    """Resolved type hints of a group's fields (the annotations are strings here). GZDesiMapping, the
    type of a Python-only field, resolves to `object`: the command line never sees it."""
    cls = {"": PrepareOptions, "catalog": CatalogOptions, "gzdesi": GZDesiOptions}[group]
    return typing.get_type_hints(cls, localns={"GZDesiMapping": object})
