"""`prepare gzdesi:` end to end on real JPEGs: rows, labels, captions, splits, resume, bad input, training reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from conftest import galaxy_jpegs
from galaxalign_dist.cli.main import main
from galaxalign_dist.data import gzdesi, gzdesi_convert, shards
from galaxalign_dist.data.gzdesi_prepare import prepare_gzdesi
from galaxalign_dist.data.gzdesi_source import GZDesiSource
from galaxalign_dist.data.options import IO_THREADS, PrepareOptions
from galaxalign_dist.data.prepare import prepare
from galaxalign_dist.data.reader import iter_batches
from galaxalign_dist.data.schemas import get_schema, parse_symbol_spec
from galaxalign_dist.data.splits import hash_split
from galaxalign_dist.data.transform import TripletTransform

N_ROWS, SHARD = 150, 40  # 4 shards (the last one short); catalogue row groups of 64 cut across them


def _make(root: Path, drop: tuple[str, ...] = ()) -> tuple[Path, Path, pa.Table]:
    """Catalogue + image root whose `{brickid}/{brickid}_{objid}.jpg` are symlinks to galaxy JPEGs."""
    table = gzdesi.synthetic_catalogue(N_ROWS, seed=3)
    table = table.drop_columns(list(drop))
    cat = root / "gz_desi_catalog.parquet"
    pq.write_table(table, cat, row_group_size=64)
    jpegs = galaxy_jpegs(N_ROWS, root / "jpegs")
    images = root / "images"
    for rel, jpeg in zip(gzdesi.image_relpath(table["dr8_id"]).to_pylist(), jpegs, strict=False):
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).symlink_to(jpeg)
    return cat, images, table


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, pa.Table]:
    return _make(tmp_path_factory.mktemp("gzdesi"))


@pytest.fixture
def fresh(tmp_path) -> tuple[Path, Path, pa.Table]:
    """A private copy for tests that damage images."""
    return _make(tmp_path)


def _rows(out: Path, split: str) -> pa.Table:
    return shards.dataset(out, split).to_table()


def _kept(table: pa.Table, mapping: gzdesi.GZDesiMapping) -> dict[str, dict]:
    """Expected output rows by id: map_batch over the whole catalogue (the reference)."""
    res = gzdesi.map_batch(table, mapping)
    keep = res["keep"].to_numpy(zero_copy_only=False)
    cols = {c: res[c].to_pylist() for c in ("label", "class_name", "text", "symbol")}
    ids = table["dr8_id"].to_pylist()
    return {ids[i]: {c: cols[c][i] for c in cols} | {"row": int(i)} for i in np.flatnonzero(keep)}


def _files(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


def test_cli_end_to_end_class_mode(data, tmp_path, capsys):
    cat, images, table = data
    out = tmp_path / "out"
    args = ["prepare", f"gzdesi:{cat}", "--image-root", str(images), "--out", str(out)]
    assert main([*args, "--rows-per-shard", str(SHARD), "--row-group-rows", "16", "--no-progress"]) == 0
    assert "rows (train" in capsys.readouterr().out
    meta = shards.read_metadata(out)
    expected = _kept(table, gzdesi.GZDesiMapping())
    assert meta["schema"] == "galaxy10" and meta["num_rows"] == len(expected) > 60
    assert meta["gzdesi"]["rows_in"] == N_ROWS and meta["gzdesi"]["shards"] == 4
    reasons = gzdesi.count_reasons(gzdesi.map_batch(table, gzdesi.GZDesiMapping()))
    assert meta["gzdesi"]["excluded"] == reasons
    assert meta["gzdesi"]["excluded_count"] == N_ROWS - len(expected)
    side = Image.open(galaxy_jpegs(1, tmp_path / "jpegs")[0]).size[0]  # 424 px real, 128 px synthetic
    assert meta["image_size"] == [side, side] and meta["image_formats"] == {"JPEG": len(expected)}
    assert meta["skipped"]["count"] == 0 and meta["columns"] == [*shards.ARROW_SCHEMA.names, "ra", "dec"]
    seen = set()
    for split in shards.SPLITS:
        files = shards.split_files(out, split)
        assert [Path(f).name for f in files] == meta["splits"][split]["files"]
        for f in files:  # bounded rows per file (one shard) and per row group
            md = pq.read_metadata(f)
            assert md.num_rows <= SHARD
            assert all(md.row_group(g).num_rows <= 16 for g in range(md.num_row_groups))
        rows = _rows(out, split).to_pylist()
        assert len(rows) == meta["splits"][split]["rows"]
        for r in rows:
            want = expected[r["id"]]
            assert {c: r[c] for c in ("label", "class_name", "text", "symbol")} == {
                c: want[c] for c in ("label", "class_name", "text", "symbol")
            }
            assert r["text"] == get_schema("galaxy10").classes[r["label"]].caption
            assert hash_split([r["id"]], 0, 0.2) == [split]  # the same rule as every other source
            rel = gzdesi.image_relpath(pa.array([r["id"]]))[0].as_py()
            assert r["image"] == (images / rel).read_bytes()
            assert r["ra"] == pytest.approx(table["ra"][want["row"]].as_py())
        per_class = {c.key: sum(r["label"] == c.index for r in rows) for c in get_schema("galaxy10").classes}
        assert meta["splits"][split]["per_class"] == per_class
        seen |= {r["id"] for r in rows}
    assert seen == set(expected)  # every kept galaxy exactly once, in one split
    assert 0 < meta["splits"]["test"]["rows"] < meta["splits"]["train"]["rows"]
    # Catalogue order within each file: a shard's rows come from its own row range only.
    for split in shards.SPLITS:
        for f in shards.split_files(out, split):
            k = int(Path(f).stem.split("-")[1])
            rows = [expected[i]["row"] for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
            assert rows == sorted(rows) and all(k * SHARD <= r < (k + 1) * SHARD for r in rows)


def test_rich_captions_symbols_and_uncertain_rows(data, tmp_path):
    cat, images, table = data
    mapping = gzdesi.GZDesiMapping(caption_mode="rich", symbol_mode="rich", on_uncertain="label")
    meta = prepare(
        f"gzdesi:{cat}", tmp_path / "rich", image_root=images, caption_mode="rich", symbol_mode="rich",
        on_uncertain="label", rows_per_shard=64, progress=False,
    )  # fmt: skip
    expected = _kept(table, mapping)
    rows = _rows(tmp_path / "rich", "train").to_pylist() + _rows(tmp_path / "rich", "test").to_pylist()
    assert len(rows) == len(expected) == meta["num_rows"]
    for r in rows:
        assert r["text"] == expected[r["id"]]["text"] and r["symbol"] == expected[r["id"]]["symbol"]
        parse_symbol_spec(r["symbol"])
    uncertain = [r for r in rows if r["label"] == -1]
    assert uncertain and all(r["class_name"] == gzdesi.UNCERTAIN for r in uncertain)
    assert sum(meta["splits"][s]["uncertain"] for s in shards.SPLITS) == len(uncertain)
    assert sum(meta["gzdesi"]["uncertain_kept"].values()) == len(uncertain)
    assert any(" with " in r["text"] for r in rows)  # composed, not per-class captions
    assert meta["gzdesi"]["mapping"]["caption_mode"] == "rich"
    # galaxymnist schema through the API's mapping object: labels within its 4 classes.
    gm = prepare_gzdesi(cat, tmp_path / "gm", image_root=images, gz_schema="galaxymnist", progress=False)
    assert gm["schema"] == "galaxymnist"
    assert gm["num_rows"] == len(_kept(table, gzdesi.GZDesiMapping("galaxymnist")))
    assert set(pc.unique(_rows(tmp_path / "gm", "train")["label"]).to_pylist()) <= {0, 1, 2, 3}


def test_resume_after_interruption(data, tmp_path, monkeypatch):
    cat, images, _ = data
    kw = dict(image_root=images, rows_per_shard=SHARD, row_group_rows=8, progress=False)
    clean = prepare_gzdesi(cat, tmp_path / "clean", **kw)
    out = tmp_path / "out"
    # A time-boxed run: 2 of 4 shards, no _metadata.json (not a dataset yet).
    partial = prepare_gzdesi(cat, out, max_shards=2, **kw)
    assert partial == {"complete": False, "shards": {"done": 2, "total": 4}}
    assert not (out / shards.METADATA_FILE).exists()
    # Then a crash in the middle of shard 2 (after some of its rows were written to OUT/.tmp).
    real_load, calls = gzdesi_convert.load_images, []

    def crash(paths):
        calls.append(1)
        if len(calls) > 3 * IO_THREADS:  # after 3 row groups' images (one call per thread)
            raise KeyboardInterrupt
        return real_load(paths)

    monkeypatch.setattr(gzdesi_convert, "load_images", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_gzdesi(cat, out, **kw)
    monkeypatch.setattr(gzdesi_convert, "load_images", real_load)
    assert list((out / gzdesi_convert.TMP_DIR / "shard-00002").rglob("*.parquet"))  # half written
    assert not (out / "_manifests" / "shard-00002.json").exists()
    # Damage: shard 1's train file truncated (e.g. a partial copy).
    victim = out / "train" / "part-00001.parquet"
    victim.write_bytes(victim.read_bytes()[:-100])
    before = _files(out)
    meta = prepare_gzdesi(cat, out, **kw)
    after = _files(out)
    for kept in ("train/part-00000.parquet", "test/part-00000.parquet", "_manifests/shard-00000.json"):
        assert after[kept] == before[kept]  # verified shard 0: not rewritten
    assert after["train/part-00001.parquet"] != before["train/part-00001.parquet"]  # rebuilt
    assert not (out / gzdesi_convert.TMP_DIR).exists()
    for split in shards.SPLITS:  # same rows, same order, same files as an uninterrupted run
        assert _rows(out, split).equals(_rows(tmp_path / "clean", split))
        assert meta["splits"][split] == clean["splits"][split]
    assert meta["gzdesi"] == clean["gzdesi"]
    # Complete: a rerun verifies and returns without touching a file.
    assert prepare_gzdesi(cat, out, **kw)["num_rows"] == meta["num_rows"]
    assert _files(out) == after
    # Other options would mix two conversions: refused, unless --overwrite.
    with pytest.raises(shards.OutputExistsError, match="caption_mode"):
        prepare_gzdesi(cat, out, caption_mode="rich", **kw)
    with pytest.raises(shards.OutputExistsError, match="not a gzdesi conversion"):
        prepare_gzdesi(cat, tmp_path, **kw)
    assert prepare_gzdesi(cat, out, caption_mode="rich", overwrite=True, **kw)["num_rows"] == meta["num_rows"]


def test_parquet_readers_open_the_output_and_an_old_layout_resumes(data, tmp_path):
    """pyarrow.dataset / pandas read OUT as-is, even mid-conversion; `manifests/` + `metadata.json` (the
    layout before) are read as they are and renamed when the conversion is resumed."""
    cat, images, _ = data
    kw = dict(image_root=images, rows_per_shard=SHARD, progress=False)
    out = tmp_path / "out"
    prepare_gzdesi(cat, out, max_shards=2, **kw)
    (out / gzdesi_convert.TMP_DIR / "shard-00002" / "train").mkdir(parents=True)  # a killed run's leftover
    shutil.copy(
        out / "train" / "part-00000.parquet", out / ".tmp" / "shard-00002" / "train" / "part-00000.parquet"
    )
    done = sum(pq.read_metadata(f).num_rows for f in out.glob("*/part-*.parquet"))
    assert pads.dataset(out, format="parquet").count_rows() == done > 0  # _manifests/, .tmp/ skipped
    meta = prepare_gzdesi(cat, out, **kw)
    assert (
        pads.dataset(out, format="parquet").to_table().num_rows
        == meta["num_rows"]
        == len(pd.read_parquet(out))
    )
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "_manifests").rename(old / "manifests")
    (old / "_metadata.json").rename(old / "metadata.json")
    assert shards.read_metadata(old) == meta
    before = _files(old)
    again = prepare_gzdesi(cat, old, **kw)
    assert (old / "_manifests" / "plan.json").is_file() and not (old / "manifests").exists()
    assert not (old / "metadata.json").exists() and shards.read_metadata(old) == again
    assert again["splits"] == meta["splits"] and again["gzdesi"] == meta["gzdesi"]
    after = _files(old)
    assert {k: v for k, v in after.items() if k.endswith(".parquet")} == {
        k: v for k, v in before.items() if k.endswith(".parquet")
    }  # every shard verified and kept
    assert pads.dataset(old, format="parquet").count_rows() == meta["num_rows"]


def test_missing_and_corrupt_images(fresh, tmp_path):
    cat, images, table = fresh
    kept = sorted(_kept(table, gzdesi.GZDesiMapping()).items(), key=lambda kv: kv[1]["row"])
    (gone_id, gone), (bad_id, bad) = kept[50], kept[5]  # in shards 1+ and 0
    gone_path = images / gzdesi.image_relpath(pa.array([gone_id]))[0].as_py()
    gone_path.unlink()
    bad_path = images / gzdesi.image_relpath(pa.array([bad_id]))[0].as_py()
    data = bad_path.read_bytes()
    bad_path.unlink()
    bad_path.write_bytes(data[: len(data) // 2])  # truncated JPEG: opens, fails to decode
    kw = dict(image_root=images, rows_per_shard=SHARD, progress=False)
    decode_error = rf"row {bad['row']} \(id {bad_id}\): image does not decode.*{bad_path}"
    with pytest.raises(ValueError, match=decode_error):
        prepare_gzdesi(cat, tmp_path / "a", **kw)
    bad_path.write_bytes(data)
    missing_error = rf"row {gone['row']} \(id {gone_id}\): missing image file: {gone_path}"
    with pytest.raises(ValueError, match=missing_error):
        prepare_gzdesi(cat, tmp_path / "a", **kw)
    assert (tmp_path / "a" / "_manifests" / "shard-00000.json").exists()  # done before the error: kept
    bad_path.write_bytes(data[: len(data) // 2])
    meta = prepare_gzdesi(cat, tmp_path / "b", skip_bad=True, **kw)
    assert meta["skipped"]["count"] == meta["skipped"]["listed"] == 2
    listed = {r["id"]: r for r in meta["skipped"]["rows"]}
    assert set(listed) == {gone_id, bad_id} and str(gone_path) in listed[gone_id]["reason"]
    assert listed[bad_id]["row"] == bad["row"] and "does not decode" in listed[bad_id]["reason"]
    ids = {i for s in shards.SPLITS for i in _rows(tmp_path / "b", s)["id"].to_pylist()}
    assert gone_id not in ids and bad_id not in ids and meta["num_rows"] == len(kept) - 2
    for p in sorted((tmp_path / "b" / "_manifests").glob("shard-*.json")):  # every catalogue row counted
        m = json.loads(p.read_text())
        assert m["rows_in"] == m["kept"] + sum(m["excluded"].values()) + m["skipped"]["count"]


def test_missing_columns_and_bad_options(tmp_path, capsys):
    drop = ("bar_no_fraction", "spiral-winding_tight_fraction")
    cat, images, _ = _make(tmp_path, drop=drop)
    args = ["prepare", f"gzdesi:{cat}", "--image-root", str(images), "--out", str(tmp_path / "o")]
    assert main(args) == 2  # one-line error, as for every bad input
    err = capsys.readouterr().err
    assert f"{cat} lacks 2 column(s)" in err and "'bar_no_fraction', 'spiral-winding_tight_fraction'" in err
    with pytest.raises(gzdesi.MissingColumnsError, match="bar_no_fraction"):
        prepare_gzdesi(cat, tmp_path / "o", image_root=images)
    assert not (tmp_path / "o").exists()  # checked before any output
    with pytest.raises(
        ValueError, match=r"options \['--label-column'\] do not apply to gzdesi: \(labels come"
    ):
        prepare(f"gzdesi:{cat}", tmp_path / "o", label_column="x")
    with pytest.raises(ValueError, match=r"options \['--rows-per-shard'\] apply to gzdesi: sources only"):
        prepare(f"catalog:{cat}", tmp_path / "o", rows_per_shard=10)
    with pytest.raises(
        ValueError, match=r"\['--file-mb', '--rows-per-file'\] do not apply to gzdesi: \(shards are cut"
    ):
        prepare(f"gzdesi:{cat}", tmp_path / "o", rows_per_file=10, file_bytes=2**20)
    with pytest.raises(ValueError, match="use_ray: the data layer does not import Ray"):
        prepare_gzdesi(cat, tmp_path / "o", use_ray=True)
    assert not (tmp_path / "o").exists()


def test_parallel_processes_match_serial(data, tmp_path):
    cat, images, _ = data
    kw = dict(image_root=images, rows_per_shard=SHARD, progress=False)
    serial = prepare_gzdesi(cat, tmp_path / "serial", **kw)
    par = prepare_gzdesi(cat, tmp_path / "par", workers=2, use_ray=False, **kw)
    assert par["splits"] == serial["splits"] and par["gzdesi"] == serial["gzdesi"]
    for split in shards.SPLITS:
        assert _rows(tmp_path / "par", split).equals(_rows(tmp_path / "serial", split))


@pytest.mark.slow
def test_ray_tasks_match_serial(data, tmp_path):
    ray = pytest.importorskip("ray")
    from galaxalign_dist.launch.gzdesi import ray_runner

    cat, images, _ = data
    kw = dict(image_root=images, rows_per_shard=SHARD, progress=False)
    serial = prepare_gzdesi(cat, tmp_path / "serial", **kw)
    par = prepare_gzdesi(cat, tmp_path / "ray", workers=2, use_ray=True, runner=ray_runner(2), **kw)
    assert not ray.is_initialized()  # started and stopped by prepare
    assert par["splits"] == serial["splits"]
    for split in shards.SPLITS:
        assert _rows(tmp_path / "ray", split).equals(_rows(tmp_path / "serial", split))


def test_training_reads_the_output_and_source_streams(data, tmp_path):
    cat, images, table = data
    out = tmp_path / "out"
    prepare_gzdesi(cat, out, image_root=images, rows_per_shard=SHARD, progress=False)
    meta = shards.read_metadata(out)
    tf = TripletTransform(32, train=True, tokenizer=SimpleTokenizer(context_length=32), seed=0)
    batches = list(iter_batches(out, "train", 16, tf, shuffle=True, drop_last=True))
    assert len(batches) == meta["splits"]["train"]["rows"] // 16
    b = batches[0]
    assert b["image"].shape == (16, 3, 32, 32) and b["symbol"].shape == (16, 3, 32, 32)
    assert b["tokens"].shape == (16, 32) and set(b["label"].tolist()) <= set(range(10))
    # The reader streams any row range of the catalogue in normalised batches.
    src = GZDesiSource(cat, PrepareOptions(image_root=images), gzdesi.GZDesiMapping())
    parts = list(src.read(30, 130, batch_rows=32))
    assert [s for s, _ in parts][0] == 30 and sum(b.num_rows for _, b in parts) == 100 and src.total == N_ROWS
    assert parts[0][1].column(src.id_col).to_pylist()[:2] == table["dr8_id"].to_pylist()[30:32]
    assert all(b.column("ra").type == pa.float64() for _, b in parts)
    assert all(p.is_file() for _, b in parts for p in src.image_paths(b, np.arange(b.num_rows)))
    shutil.rmtree(out)
