"""prepare: every SOURCE form from real-format files, shard layout, metadata, and bad input."""

from __future__ import annotations

import csv
import gzip
import io
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import real_path
from galaxalign_dist.cli.main import main
from galaxalign_dist.data import shards
from galaxalign_dist.data.images import decode
from galaxalign_dist.data.prepare import prepare
from galaxalign_dist.data.schemas import GALAXY10, GALAXY_MNIST


def _rows(out: Path, split: str) -> dict[str, list]:
    return shards.dataset(out, split).to_table().to_pydict()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _no_dataset_left(out: Path) -> None:
    """After a failure: no OUT, and no temporary directory that could be mistaken for one."""
    assert not out.exists()
    assert not list(out.parent.glob(f"{out.name}.tmp-*"))


@pytest.fixture(scope="module")
def g10(tmp_path_factory) -> tuple[Path, dict]:
    d = np.load(real_path("galaxy10_decals_100.npz"))
    path = tmp_path_factory.mktemp("g10") / "Galaxy10_DECals.h5"
    with h5py.File(path, "w") as f:
        f["images"], f["ans"] = d["images"], d["labels"]
        f["ra"], f["dec"] = np.linspace(0, 360, 100), np.linspace(-30, 30, 100)
    return path, {"images": d["images"], "labels": d["labels"]}


@pytest.fixture(scope="module")
def gm_dir(tmp_path_factory) -> Path:
    """GalaxyMNIST layout: train_dataset.hdf5 (30 rows) and a gzip-compressed test file (10 rows)."""
    d = np.load(real_path("galaxymnist_40_64px.npz"))
    root = tmp_path_factory.mktemp("gm")
    test_rows = np.arange(40) % 4 == 0
    with h5py.File(root / "train_dataset.hdf5", "w") as f:
        f["images"], f["labels"] = d["images"][~test_rows], d["labels"][~test_rows]
    with h5py.File(root / "plain_test.hdf5", "w") as f:
        f["images"], f["labels"] = d["images"][test_rows], d["labels"][test_rows]
    with open(root / "plain_test.hdf5", "rb") as src, gzip.open(root / "test_dataset.hdf5.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (root / "plain_test.hdf5").unlink()
    return root


@pytest.fixture(scope="module")
def spirals_csv(tmp_path_factory) -> Path:
    """A 24-row subset of the gz-kaggle-spirals catalogue (6 per split and class), images left in place."""
    with open(real_path("gz-kaggle-spirals") / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    keep, seen = [], {}
    for r in rows:
        k = (r["split"], r["class"])
        if seen.get(k, 0) < 6:
            seen[k] = seen.get(k, 0) + 1
            keep.append(r)
    path = tmp_path_factory.mktemp("spirals") / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    return path


SPIRAL_MAPPING = dict(
    id_column="galaxy_id",
    path_column="path",
    label_column="class",
    class_names="non_spirals=non-spiral galaxy,spirals=spiral galaxy",
    class_symbols="non_spirals=round,spirals=disk+arms",
)


def test_galaxy10_h5(g10, tmp_path):
    path, src = g10
    out = tmp_path / "g10"
    # png: lossless, so stored pixels can be compared exactly (the default JPEG is tested below)
    meta = prepare(
        f"galaxy10:{path}", out, rows_per_file=32, row_group_rows=16, progress=False, image_format="png"
    )
    assert meta["schema"] == "galaxy10" and meta["num_rows"] == 100 and meta["image_size"] == [256, 256]
    assert meta["captions"] == GALAXY10.captions and meta["symbols"] == [c.symbol for c in GALAXY10.classes]
    assert meta["split_method"].startswith("hash")
    per_class = [sum(meta["splits"][s]["per_class"][c.key] for s in shards.SPLITS) for c in GALAXY10.classes]
    assert per_class == [10] * 10
    assert 5 <= meta["splits"]["test"]["rows"] <= 40  # ~20% by hash
    assert shards.read_metadata(out) == meta
    for split in shards.SPLITS:
        rows = _rows(out, split)
        assert len(rows["id"]) == meta["splits"][split]["rows"]
        for i, rid in enumerate(rows["id"]):
            k = int(rid.split("-")[1])
            assert rows["label"][i] == src["labels"][k]
            assert rows["text"][i] == GALAXY10.classes[src["labels"][k]].caption
            assert rows["ra"][i] == pytest.approx(np.linspace(0, 360, 100)[k])
            if i < 3:  # PNG is lossless: exactly the original pixels
                np.testing.assert_array_equal(_decode(rows["image"][i]), src["images"][k])
        for f in shards.split_files(out, split):
            md = pq.ParquetFile(f).metadata
            assert md.num_rows <= 32 and all(md.row_group(g).num_rows <= 16 for g in range(md.num_row_groups))
    # Same seed, same split: the hash split depends on the ids only.
    again = prepare(f"galaxy10:{path}", tmp_path / "again", progress=False)
    assert _rows(tmp_path / "again", "test")["id"] == _rows(out, "test")["id"]
    assert again["splits"]["test"]["per_class"] == meta["splits"]["test"]["per_class"]


def test_galaxymnist_dir_keeps_published_split(gm_dir, tmp_path):
    meta = prepare(f"galaxymnist:{gm_dir}", tmp_path / "gm", progress=False, image_format="png")
    assert meta["split_method"] == "published" and meta["image_size"] == [64, 64]
    assert meta["splits"]["train"]["rows"] == 30 and meta["splits"]["test"]["rows"] == 10
    assert meta["splits"]["test"]["per_class"] == {
        c.key: (3 if c.index % 2 == 0 else 2) for c in GALAXY_MNIST.classes
    }
    test = _rows(tmp_path / "gm", "test")
    assert all(i.startswith("test-") for i in test["id"])
    d = np.load(real_path("galaxymnist_40_64px.npz"))
    np.testing.assert_array_equal(_decode(test["image"][1]), d["images"][4])
    assert test["symbol"][0] == GALAXY_MNIST.classes[test["label"][0]].symbol


def test_galaxymnist_dir_needs_both_files(gm_dir, tmp_path):
    shutil.copy(gm_dir / "train_dataset.hdf5", tmp_path)
    with pytest.raises(FileNotFoundError, match="has no test_dataset.hdf5 or test_dataset.hdf5.gz"):
        prepare(f"galaxymnist:{tmp_path}", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="--schema galaxy10 does not apply"):
        prepare(f"galaxymnist:{gm_dir}", tmp_path / "out", schema="Galaxy10", progress=False)
    _no_dataset_left(tmp_path / "out")


def test_galaxymnist_single_file_hash_split(gm_dir, tmp_path):
    meta = prepare(
        f"galaxymnist:{gm_dir / 'train_dataset.hdf5'}", tmp_path / "one", test_fraction=0.5, progress=False
    )
    assert meta["num_rows"] == 30 and meta["split_method"].startswith("hash")
    assert 0 < meta["splits"]["test"]["rows"] < 30


def test_catalog_spirals_with_mapping(spirals_csv, tmp_path):
    out = tmp_path / "sp"
    meta = prepare(
        f"catalog:{spirals_csv}",
        out,
        image_root=real_path("gz-kaggle-spirals"),
        progress=False,
        **SPIRAL_MAPPING,
    )
    assert meta["schema"] == "auto" and meta["class_names"] == ["non-spiral galaxy", "spiral galaxy"]
    assert meta["captions"] == ["A picture of a non-spiral galaxy", "A picture of a spiral galaxy"]
    assert meta["symbols"] == ["round", "disk+arms"] and meta["split_method"] == "published"
    assert meta["splits"]["train"]["per_class"] == {"non_spirals": 6, "spirals": 6}
    assert meta["splits"]["test"]["per_class"] == {"non_spirals": 6, "spirals": 6}  # validation -> test
    assert meta["image_size"] == [424, 424] and meta["image_formats"] == {"JPEG": 24}
    rows = _rows(out, "test")
    by_id = {r["galaxy_id"]: r for r in csv.DictReader(open(spirals_csv))}
    for i, rid in enumerate(rows["id"]):
        assert (
            rows["image"][i] == (real_path("gz-kaggle-spirals") / by_id[rid]["path"]).read_bytes()
        )  # JPEG bytes untouched
        assert rows["label"][i] == int(by_id[rid]["label_spiral"])
    assert shards.schema_from_metadata(meta).lookup("spirals").name == "spiral galaxy"


def test_catalog_parquet_named_schema(tmp_path):
    """galaxy-datasets style: id_str, file_loc (absolute), labels as keys, names and ints; fixed schema."""
    d = np.load(real_path("galaxymnist_40_64px.npz"))
    for i in range(8):
        Image.fromarray(d["images"][i * 5]).save(tmp_path / f"g{i}.png")
    labels = [GALAXY_MNIST.classes[d["labels"][i * 5]] for i in range(8)]
    values = [c.key if i % 3 == 0 else c.name if i % 3 == 1 else str(c.index) for i, c in enumerate(labels)]
    files = [str(tmp_path / f"g{i}.png") for i in range(8)]
    pq.write_table(
        pa.table({"id_str": [f"x{i}" for i in range(8)], "file_loc": files, "label": values}),
        tmp_path / "c.parquet",
    )
    meta = prepare(
        f"catalog:{tmp_path / 'c.parquet'}", tmp_path / "out", schema="galaxymnist", progress=False
    )
    assert meta["num_rows"] == 8 and meta["class_names"] == GALAXY_MNIST.class_names
    rows = {**_rows(tmp_path / "out", "train")}
    test = _rows(tmp_path / "out", "test")
    got = dict(zip(rows["id"] + test["id"], rows["label"] + test["label"], strict=True))
    assert got == {f"x{i}": c.index for i, c in enumerate(labels)}


def test_folder_source(tmp_path):
    root = tmp_path / "imgs"
    for cls in ("spirals", "non_spirals"):
        (root / cls).mkdir(parents=True)
        for p in sorted((real_path("gz-kaggle-spirals") / "images/train" / cls).glob("*.jpg"))[:3]:
            shutil.copy(p, root / cls / p.name)
    (root / "spirals" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    Image.open(p).save(root / "spirals" / "extra.bmp")  # not decodable by torchvision: re-encoded
    meta = prepare(f"folder:{root}", tmp_path / "out", test_fraction=0.0, progress=False)
    assert meta["class_names"] == ["non spirals", "spirals"] and meta["splits"]["train"]["rows"] == 7
    assert meta["image_formats"] == {"JPEG": 6, "PNG": 1}
    bmp = _rows(tmp_path / "out", "train")["image"][6]
    assert bmp.startswith(b"\x89PNG") and np.array_equal(_decode(bmp), np.asarray(Image.open(p)))
    rows = _rows(tmp_path / "out", "train")
    assert rows["id"][0].startswith("non_spirals/") and rows["label"][0] == 0
    assert _decode(rows["image"][0]).shape == (424, 424, 3)
    with pytest.raises(
        ValueError, match=r"folder .*non_spirals: unknown class 'non_spirals' for schema 'galaxy10'"
    ):
        prepare(f"folder:{root}", tmp_path / "bad", schema="galaxy10", progress=False)
    _no_dataset_left(tmp_path / "bad")


def test_synthetic_source_plumbing(tmp_path, monkeypatch):
    """Chunks from synthetic.iter_chunks (its documented signature) become rows; n/seed/size reach it."""
    from galaxalign_dist.data import synthetic

    calls = []

    def fake_iter_chunks(schema, n, seed=0, size=64, chunk=1024):
        calls.append((schema.name, n, seed, size))
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            yield np.full((m, size, size, 3), start % 255, np.uint8), np.arange(start, start + m) % 4, start

    monkeypatch.setattr(synthetic, "iter_chunks", fake_iter_chunks, raising=False)
    meta = prepare("synthetic:galaxymnist", tmp_path / "syn", n=600, size=16, seed=5, progress=False)
    assert calls == [("galaxymnist", 600, 5, 16)]
    assert (
        meta["num_rows"] == 600 and meta["image_size"] == [16, 16] and meta["split_method"].startswith("hash")
    )
    rows = _rows(tmp_path / "syn", "train")
    i = rows["id"].index(next(r for r in rows["id"] if r >= "synthetic-0000300"))
    assert rows["label"][i] == int(rows["id"][i][-7:]) % 4


def test_synthetic_source(tmp_path):
    if not hasattr(pytest.importorskip("galaxalign_dist.data.synthetic"), "iter_chunks"):
        pytest.skip("synthetic.iter_chunks not available")
    meta = prepare("synthetic:galaxymnist", tmp_path / "syn", n=50, size=32, seed=3, progress=False)
    assert meta["num_rows"] == 50 and meta["image_size"] == [32, 32] and meta["schema"] == "galaxymnist"
    rows = _rows(tmp_path / "syn", "train")
    assert _decode(rows["image"][0]).shape == (32, 32, 3)


# ---- bad input: each fails with a message naming what to fix, and leaves no dataset behind ----


def _catalog(tmp_path: Path, n: int = 6, bad: dict[int, bytes | None] | None = None, label=None) -> Path:
    jpgs = sorted((real_path("gz-kaggle-spirals") / "images/train/spirals").glob("*.jpg"))[:n]
    rows = []
    for i, p in enumerate(jpgs):
        loc = str(p)
        if bad and i in bad:
            loc = str(tmp_path / f"bad{i}.jpg")
            if bad[i] is not None:
                Path(loc).write_bytes(bad[i])
        rows.append({"id_str": f"g{i}", "file_loc": loc, "label": label(i) if label else "unbarred_spiral"})
    path = tmp_path / "cat.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id_str", "file_loc", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_corrupt_image_errors_or_is_skipped(tmp_path):
    truncated = (real_path("gz-kaggle-spirals") / "images/train/spirals/101756.jpg").read_bytes()[:2000]
    cat = _catalog(tmp_path, bad={3: b"not a jpeg at all", 5: truncated})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"cat.csv row 3 \(id g3\): image does not decode"):
        prepare(f"catalog:{cat}", out, schema="galaxymnist", row_group_rows=1, progress=False)
    _no_dataset_left(out)
    meta = prepare(f"catalog:{cat}", out, schema="galaxymnist", skip_bad=True, progress=False)
    assert meta["num_rows"] == 4 and meta["skipped"]["count"] == 2
    assert [(s["row"], s["id"]) for s in meta["skipped"]["rows"]] == [(3, "g3"), (5, "g5")]
    assert "truncated" in meta["skipped"]["rows"][1]["reason"]


def test_missing_image_file(tmp_path):
    cat = _catalog(tmp_path, bad={2: None})
    with pytest.raises(ValueError, match=r"row 2 \(id g2\): missing image file .*bad2.jpg"):
        prepare(f"catalog:{cat}", tmp_path / "out", schema="galaxymnist", progress=False)
    _no_dataset_left(tmp_path / "out")
    meta = prepare(f"catalog:{cat}", tmp_path / "out", schema="galaxymnist", skip_bad=True, progress=False)
    assert meta["skipped"]["count"] == 1 and "missing image file" in meta["skipped"]["rows"][0]["reason"]


def test_unknown_class_in_catalogue(tmp_path):
    cat = _catalog(tmp_path, label=lambda i: "lenticular" if i == 4 else "smooth_round")
    with pytest.raises(ValueError, match=r"row 4 \(id g4\): unknown class 'lenticular'"):
        prepare(f"catalog:{cat}", tmp_path / "out", schema="galaxymnist", progress=False)
    _no_dataset_left(tmp_path / "out")
    with pytest.raises(ValueError, match=r"row 2 \(id g2\): label 4 out of range for schema 'galaxymnist'"):
        prepare(
            f"catalog:{_catalog(tmp_path, label=lambda i: str(i + 2))}", tmp_path / "o2", schema="galaxymnist"
        )


@pytest.mark.parametrize("drop", ["images", "ans"])
def test_h5_missing_dataset(drop, tmp_path):
    path = tmp_path / "g.h5"
    with h5py.File(path, "w") as f:
        if drop != "images":
            f["images"] = np.zeros((4, 8, 8, 3), np.uint8)
        if drop != "ans":
            f["ans"] = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match=rf"g.h5: HDF5 dataset '{drop}' is missing"):
        prepare(f"galaxy10:{path}", tmp_path / "out", progress=False)
    _no_dataset_left(tmp_path / "out")


def test_h5_label_out_of_range(tmp_path):
    path = tmp_path / "g.h5"
    with h5py.File(path, "w") as f:
        f["images"] = np.zeros((600, 8, 8, 3), np.uint8)
        f["ans"] = np.where(np.arange(600) == 517, 10, 1)  # in the third chunk: files already written
    with pytest.raises(ValueError, match=r"g.h5 row 517: label 10 out of range for schema 'galaxy10'"):
        prepare(f"galaxy10:{path}", tmp_path / "out", row_group_rows=8, progress=False)
    _no_dataset_left(tmp_path / "out")


def test_empty_sources(tmp_path):
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        f["images"], f["ans"] = np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0, np.int64)
    with pytest.raises(ValueError, match="has no rows"):
        prepare(f"galaxy10:{path}", tmp_path / "out", progress=False)
    (tmp_path / "folder" / "spirals").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no rows"):
        prepare(f"folder:{tmp_path / 'folder'}", tmp_path / "out", progress=False)
    (tmp_path / "head.csv").write_text("id_str,file_loc,label\n")
    with pytest.raises(ValueError, match="no labels"):
        prepare(f"catalog:{tmp_path / 'head.csv'}", tmp_path / "out", progress=False)
    _no_dataset_left(tmp_path / "out")


def test_unknown_form_and_existing_output(g10, tmp_path):
    with pytest.raises(ValueError, match="unknown SOURCE 'imagenet:/x'.*galaxy10:"):
        prepare("imagenet:/x", tmp_path / "out")
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        prepare(f"galaxy10:{g10[0]}", out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    meta = prepare(f"galaxy10:{g10[0]}", out, overwrite=True, n=10, progress=False)
    assert meta["num_rows"] == 10 and not (out / "keep.txt").exists()
    assert not list(tmp_path.glob("exists.*"))  # no tmp/old directories left behind


def test_read_metadata_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shards.read_metadata(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no _metadata.json"):
        shards.read_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text("{oops")  # the name before _metadata.json: still read
    with pytest.raises(ValueError, match=r"metadata.json is not valid JSON"):
        shards.read_metadata(tmp_path)
    (tmp_path / "_metadata.json").write_text("[1")  # the current name wins
    with pytest.raises(ValueError, match=r"_metadata.json is not valid JSON"):
        shards.read_metadata(tmp_path)


def test_ecosystem_readers_open_a_prepared_directory(g10, tmp_path):
    """pyarrow.dataset and pandas read OUT as-is (they skip `_metadata.json`); an old layout still loads."""
    out = tmp_path / "g10"
    meta = prepare(f"galaxy10:{g10[0]}", out, rows_per_file=32, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["_metadata.json", "test", "train"]
    table = pads.dataset(out, format="parquet").to_table()
    assert table.num_rows == meta["num_rows"] == 100 and table.schema.names == meta["columns"]
    frame = pd.read_parquet(out)
    assert sorted(frame["id"]) == sorted(table.column("id").to_pylist())
    # Written before the rename: metadata.json among the shards. Our readers still open it.
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "_metadata.json").rename(old / "metadata.json")
    assert shards.is_prepared(old) and shards.read_metadata(old) == meta
    for split in shards.SPLITS:
        assert shards.check_split_files(old, split) == meta["splits"][split]["rows"]
        assert shards.dataset(old, split).to_table().equals(shards.dataset(out, split).to_table())


def test_cli(spirals_csv, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "prepare",
        f"catalog:{spirals_csv}",
        "--out",
        str(out),
        "--image-root",
        str(real_path("gz-kaggle-spirals")),
        "--no-progress",
    ]
    mapping = ["--id-column", "galaxy_id", "--path-column", "path", "--label-column", "class"]
    assert main(argv + mapping + ["--class-symbols", "non_spirals=round,spirals=disk+arms"]) == 0
    assert "24 rows (train 12, test 12)" in capsys.readouterr().out
    assert main(argv + mapping) == 2  # exists
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["prepare", "bogus:thing", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("galaxalign prepare: error: unknown SOURCE") and err.count("\n") == 1
    assert (
        main(["prepare", f"catalog:{spirals_csv}", "--out", str(tmp_path / "y"), "--label-column", "nope"])
        == 2
    )
    assert "no column 'nope'" in capsys.readouterr().err
    assert main(["prepare", f"galaxy10:{tmp_path / 'missing.h5'}", "--out", str(tmp_path / "z")]) == 2
    assert "missing.h5 does not exist" in capsys.readouterr().err
    _no_dataset_left(tmp_path / "z")


def test_options_are_typed_and_the_cli_derives_its_flags(spirals_csv, tmp_path, capsys):
    """Every option field is one flag of `galaxalign prepare`; options given for another form fail in one line."""
    import argparse

    from galaxalign_dist.cli import prepare as cli_prepare
    from galaxalign_dist.data.options import PrepareOptions, flag, option_fields

    parser = argparse.ArgumentParser()
    cli_prepare.add_arguments(parser)
    dests = {a.dest: a.option_strings for a in parser._actions}
    for _, f in option_fields():
        assert (dests.get(f.name) == [flag(f)]) == f.metadata["cli"], f.name
    args = parser.parse_args(["catalog:x.csv", "--out", "o", "--file-mb", "0.5", "--no-progress", "--ray"])
    assert cli_prepare.options_from_args(args) == {"file_bytes": 2**19, "progress": False, "use_ray": True}
    opts = PrepareOptions.from_flat(n=5, id_column="galaxy_id", rows_per_shard=7, class_names="a=b")
    assert (opts.n, opts.catalog.id_column, opts.gzdesi.rows_per_shard) == (5, "galaxy_id", 7)
    assert opts.catalog.class_names == {"a": "b"}
    with pytest.raises(ValueError, match=r"unknown prepare options \['bogus'\]"):
        PrepareOptions.from_flat(bogus=1)
    with pytest.raises(ValueError, match="--class-names: expected KEY=VALUE"):
        PrepareOptions.from_flat(class_names="oops")
    with pytest.raises(ValueError, match="test_fraction must be in"):
        prepare("synthetic:galaxymnist", tmp_path / "x", test_fraction=1.5)
    base = ["prepare", f"catalog:{spirals_csv}", "--out", str(tmp_path / "o"), "--no-progress"]
    for extra, want in (
        (["--rows-per-shard", "10", "--workers", "2"], "options ['--rows-per-shard', '--workers'] apply to gzdesi: sources only"),
        (["--size", "32"], "options ['--size'] apply to synthetic: sources only (images are resized"),
    ):  # fmt: skip
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert want in err and err.count("\n") == 1, err
    _no_dataset_left(tmp_path / "o")


@pytest.mark.parametrize(
    "fmt, npz, stored, max_mean_error",
    [
        ("auto", "galaxymnist4_decals_121_224px.npz", "JPEG", 2.5),  # 224 px: JPEG q95, <= 1% per image
        ("auto", "galaxymnist_40_64px.npz", "PNG", 0.0),  # 64 px: PNG, lossless
        ("raw", "galaxymnist_40_64px.npz", "RAW", 0.0),
    ],
)
def test_pixel_arrays_stored_by_size_or_as_asked(tmp_path, fmt, npz, stored, max_mean_error):
    d = np.load(real_path(npz))
    with h5py.File(tmp_path / "gm.hdf5", "w") as f:
        f["images"], f["labels"] = d["images"], d["labels"]
    kwargs = {} if fmt == "auto" else {"image_format": fmt}
    meta = prepare(f"galaxymnist:{tmp_path / 'gm.hdf5'}", tmp_path / "out", progress=False, **kwargs)
    assert meta["image_formats"] == {stored: len(d["labels"])}
    rows = shards.dataset(tmp_path / "out", "train").to_table().to_pydict()
    for rid, data in zip(rows["id"], rows["image"], strict=True):
        k = int(rid.rsplit("-", 1)[1])
        err = np.abs(decode(data).permute(1, 2, 0).numpy().astype(np.int16) - d["images"][k]).mean()
        assert err <= max_mean_error, (rid, err)
