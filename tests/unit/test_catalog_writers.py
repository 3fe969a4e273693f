"""Catalogues as users write them (pandas 2/3, polars, DuckDB, Arrow, CSV): same shards, or one clear line.

GitHub issue 18: a GZ DESI catalogue written by pandas 3 (strings as large_string) died in
`gzdesi.image_relpath` with an ArrowNotImplementedError traceback. Every writer and column type here
must give identical shards (ids, splits, classes, captions, symbols, image bytes); every unusable
catalogue must fail before any output, with exit code 2 and one line naming the file and column.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REAL_GALAXIES, galaxy_jpegs
from galaxalign_dist.cli.main import main
from galaxalign_dist.data import gzdesi, shards
from galaxalign_dist.data.prepare import prepare

N_ROWS = 80
CLI = [sys.executable, "-m", "galaxalign_dist.cli.main"]
FRACTION = "smooth-or-featured_smooth_fraction"


@pytest.fixture(scope="module")
def gz(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A friendly-column GZ DESI catalogue as a pandas DataFrame (dr8_id, brickid, objid, ra, dec, float32
    fractions with NaN), and an image root holding `{brickid}/{dr8_id}.jpg` links to real 424 px JPEGs."""
    root = tmp_path_factory.mktemp("gz")
    table = gzdesi.synthetic_catalogue(N_ROWS, seed=5)
    jpegs = galaxy_jpegs(N_ROWS, root / "jpegs")
    for rel, jpeg in zip(gzdesi.image_relpath(table["dr8_id"]).to_pylist(), jpegs, strict=False):
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / rel).symlink_to(jpeg)
    df = table.to_pandas()  # pandas 3: dr8_id becomes the `str` dtype, written back as large_string
    brick_obj = df["dr8_id"].str.split("_", expand=True).astype("int64")
    df.insert(1, "brickid", brick_obj[0])
    df.insert(2, "objid", brick_obj[1])
    return root, df


@pytest.fixture(scope="module")
def spirals(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A `catalog:` catalogue (split, class, label_spiral, galaxy_id, path) and its image root: the real
    Galaxy Zoo spirals sample (5 rows per split and class) when it is there, else the same layout with
    synthetic galaxies, so a bare clone runs these tests too."""
    real = Path(REAL_GALAXIES, "gz-kaggle-spirals")
    if (real / "labels.csv").is_file():
        df = pd.read_csv(real / "labels.csv", dtype={"galaxy_id": str}).groupby(["split", "class"]).head(5)
        return real, df.reset_index(drop=True)
    root = tmp_path_factory.mktemp("spirals")
    rows = [(s, c, int(c == "spirals")) for s in ("train", "validation") for c in ("spirals", "non_spirals")]
    rows = [r for r in rows for _ in range(5)]
    jpegs = galaxy_jpegs(len(rows), root / "jpegs")
    records = []
    for i, ((split, cls, label), jpeg) in enumerate(zip(rows, jpegs, strict=True)):
        galaxy_id, rel = f"{100000 + i}", f"images/{split}/{cls}/{100000 + i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(jpeg)
        records.append(
            {"split": split, "class": cls, "label_spiral": label, "galaxy_id": galaxy_id, "path": rel}
        )
    return root, pd.DataFrame(records)


def _strings_as_objects(df: pd.DataFrame) -> pd.DataFrame:
    """What pandas 2 wrote: object-dtype strings (Arrow `string`)."""
    return df.astype({c: object for c in df.columns if pd.api.types.is_string_dtype(df[c])})


def _duckdb(df: pd.DataFrame, path: Path) -> None:
    with duckdb.connect() as con:
        con.register("catalogue", df)
        con.execute(f"COPY (SELECT * FROM catalogue) TO '{path}' (FORMAT parquet)")


def _arrow(df: pd.DataFrame, column: str, type_: pa.DataType) -> pa.Table:
    t = pa.Table.from_pandas(df, preserve_index=False)
    return t.set_column(t.schema.get_field_index(column), column, t[column].cast(type_))


GZ_WRITERS: dict[str, Callable[[pd.DataFrame, Path], None]] = {
    "pandas3": lambda df, p: df.to_parquet(p),
    "pandas2-object-strings": lambda df, p: _strings_as_objects(df).to_parquet(p),
    "pandas-categorical-ids": lambda df, p: df.astype({"dr8_id": "category"}).to_parquet(p),
    "polars": lambda df, p: pl.from_pandas(df).write_parquet(p),
    "duckdb": _duckdb,
    "arrow-string-view": lambda df, p: pq.write_table(_arrow(df, "dr8_id", pa.string_view()), p),
    "float64-fractions": lambda df, p: df.astype({c: "float64" for c in df if "fraction" in c}).to_parquet(p),
    "int-brick-objid-no-dr8_id": lambda df, p: df.drop(columns="dr8_id").to_parquet(p),
    "str-brick-objid-no-dr8_id": lambda df, p: df.drop(columns="dr8_id").astype({"brickid": str, "objid": str}).to_parquet(p),
    "csv": lambda df, p: df.to_csv(p, index=False),
}  # fmt: skip


def _rows(out: Path) -> dict[str, list[tuple]]:
    """Every column of every row per split; `ra` at float32 precision (a CSV holds a float32's decimal form)."""
    cols = ("id", "label", "class_name", "text", "symbol", "image", "ra")
    out_rows = {}
    for s in shards.SPLITS:
        t = shards.dataset(out, s).to_table()
        values = [t.column(c).to_pylist() for c in cols[:-1]] + [
            t.column("ra").cast(pa.float32()).to_pylist()
        ]
        out_rows[s] = list(zip(*values, strict=True))
    return out_rows


def test_gzdesi_every_writer_gives_identical_shards(gz, tmp_path):
    root, df = gz
    results = {}
    for name, write in GZ_WRITERS.items():
        cat = tmp_path / f"{name}.{'csv' if name == 'csv' else 'parquet'}"
        write(df, cat)
        out = tmp_path / f"out-{name}"
        meta = prepare(f"gzdesi:{cat}", out, image_root=root / "images", rows_per_shard=32, progress=False)
        results[name] = _rows(out)
        assert meta["num_rows"] == sum(len(r) for r in results[name].values()) > N_ROWS // 2, name
    assert pq.read_schema(tmp_path / "pandas3.parquet").field("dr8_id").type == pa.large_string()  # issue 18
    assert pa.types.is_dictionary(
        pq.read_schema(tmp_path / "pandas-categorical-ids.parquet").field("dr8_id").type
    )
    reference = results.pop("pandas3")
    for name, rows in results.items():
        assert rows == reference, name
    # Resuming a CSV conversion reads the staged copy: nothing to redo, same metadata.
    csv_out = tmp_path / "out-csv"
    assert (csv_out / "_manifests" / "catalogue.parquet").is_file()
    again = prepare(f"gzdesi:{tmp_path / 'csv.csv'}", csv_out, image_root=root / "images", rows_per_shard=32,
                    progress=False)  # fmt: skip
    assert again == shards.read_metadata(csv_out)


def test_gzdesi_issue_18_through_the_cli(gz, tmp_path, capsys):
    root, df = gz
    cat = tmp_path / "gz_desi_friendly.parquet"
    df.to_parquet(cat)  # pandas 3 + DataFrame.to_parquet, exactly as reported
    out = tmp_path / "out"
    assert main(["prepare", f"gzdesi:{cat}", "--image-root", str(root / "images"), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    assert "rows (train" in capsys.readouterr().out
    assert shards.read_metadata(out)["num_rows"] > 0


def test_catalog_every_writer_gives_identical_shards(spirals, tmp_path):
    root, df = spirals
    df = df.copy()
    df["ra"] = np.linspace(0, 90, len(df)).astype("float32")
    writers = {
        "csv": lambda p: df.to_csv(p, index=False),
        "pandas3": lambda p: df.to_parquet(p),
        "pandas2-object-strings": lambda p: _strings_as_objects(df).to_parquet(p),
        "pandas-categorical-labels": lambda p: df.astype({"class": "category", "split": "category"}).to_parquet(p),
        "polars": lambda p: pl.from_pandas(df).write_parquet(p),
        "duckdb": lambda p: _duckdb(df, p),
        "arrow-string-view": lambda p: pq.write_table(_arrow(df, "path", pa.string_view()), p),
        "int-ids": lambda p: df.astype({"galaxy_id": "int64"}).to_parquet(p),
    }  # fmt: skip
    results = {}
    for name, write in writers.items():
        cat = tmp_path / f"{name}.{'csv' if name == 'csv' else 'parquet'}"
        write(cat)
        out = tmp_path / f"out-{name}"
        prepare(f"catalog:{cat}", out, image_root=root, id_column="galaxy_id", path_column="path",
                label_column="class", progress=False)  # fmt: skip
        results[name] = _rows(out)
    reference = results.pop("csv")
    assert sum(len(r) for r in reference.values()) == len(df) == 20
    for name, rows in results.items():
        assert rows == reference, name


def test_unexpected_failure_is_one_line_and_the_output_resumes(gz, tmp_path, monkeypatch, capsys):
    """A bug inside the conversion: exit 1, one line (traceback at -v); the finished shards are kept."""
    root, df = gz
    cat = tmp_path / "gz.parquet"
    df.to_parquet(cat)
    args = ["prepare", f"gzdesi:{cat}", "--image-root", str(root / "images"), "--rows-per-shard", "32",
            "--no-progress"]  # fmt: skip
    real, calls = gzdesi.map_batch, []

    def fails_in_shard_1(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise pa.ArrowNotImplementedError("Function 'x' has no kernel matching input types (y)")
        return real(*a, **kw)

    monkeypatch.setattr(gzdesi, "map_batch", fails_in_shard_1)
    assert main([*args, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("galaxalign prepare: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "unexpected failure: ArrowNotImplementedError: Function 'x'" in lines[0] and "resume" in lines[0]
    assert (tmp_path / "out" / "_manifests" / "shard-00000.json").is_file()
    assert not (tmp_path / "out" / shards.METADATA_FILE).exists()
    monkeypatch.setattr(gzdesi, "map_batch", real)
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    assert _rows(tmp_path / "out") == _rows(tmp_path / "clean")


# ---- unusable catalogues: exit 2, one line naming the file and the column, nothing written ----


def _bad_gz(df: pd.DataFrame, path: Path, kind: str) -> str:
    """Write a broken variant of the catalogue; returns what the error line must contain."""
    if kind == "fraction-as-text":
        df.astype({FRACTION: str}).to_parquet(path)
        return f"catalogue {path}: column '{FRACTION}' (vote fraction) holds large_string, expected numbers"
    if kind == "ids-off-layout":
        df.assign(dr8_id=df["brickid"]).to_parquet(path)
        return (
            f"catalogue {path}: column 'dr8_id' row 0 holds '{df['brickid'][0]}', not {{brickid}}_{{objid}}"
        )
    if kind == "id-of-lists":
        pq.write_table(
            _arrow(df, "dr8_id", pa.string()).set_column(0, "dr8_id", pa.array([[1]] * len(df))), path
        )
        return f"catalogue {path}: column 'dr8_id' (id) holds list<"
    if kind == "csv-bad-number":
        df.astype({FRACTION: object}).assign(**{FRACTION: ["high"] + list(df[FRACTION][1:])}).to_csv(
            path, index=False
        )
        return f"catalogue {path}: column '{FRACTION}', row 0: CSV conversion error to double: invalid value 'high'"
    path.write_bytes(b"PAR1 not really")  # "not-parquet"
    return f"catalogue {path}: not a readable Parquet file"


@pytest.mark.parametrize(
    "kind", ["fraction-as-text", "ids-off-layout", "id-of-lists", "csv-bad-number", "not-parquet"]
)
def test_unusable_gzdesi_catalogue_fails_in_one_line(kind, gz, tmp_path):
    root, df = gz
    cat = tmp_path / f"bad.{'csv' if kind.startswith('csv') else 'parquet'}"
    want = _bad_gz(df, cat, kind)
    _fails_in_one_line([f"gzdesi:{cat}", "--image-root", str(root / "images")], want, tmp_path)


@pytest.mark.parametrize("kind", ["path-as-int", "ra-as-text"])
def test_unusable_catalog_fails_in_one_line(kind, spirals, tmp_path):
    root, df = spirals
    df = df.head(6).astype({"galaxy_id": "int64"})
    if kind == "path-as-int":
        df["path"] = range(6)
        want = "column 'path' (image path) holds int64, expected strings"
    else:
        df["ra"] = ["10:20:30"] * 6
        want = "column 'ra' (copied as float64) holds large_string, expected numbers"
    cat = tmp_path / "bad.parquet"
    df.to_parquet(cat)
    args = [f"catalog:{cat}", "--image-root", str(root), "--id-column", "galaxy_id", "--path-column", "path",
            "--label-column", "class"]  # fmt: skip
    _fails_in_one_line(args, f"catalogue {cat}: {want}", tmp_path)


def _fails_in_one_line(args: list[str], want: str, tmp_path: Path) -> None:
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "out"
    proc = subprocess.run([*CLI, "prepare", *args, "--out", str(out), "--no-progress"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("galaxalign prepare: error: "), proc.stderr
    assert want in proc.stderr, proc.stderr
    assert sorted(tmp_path.rglob("*")) == before  # checked before any output, nothing left behind
