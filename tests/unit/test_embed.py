"""`galaxalign embed` without Ray (--local): same numbers as evaluation/embed.py, every row once, resumable shards."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from embed_helpers import export_tiny

from galaxalign_dist.evaluation.embed_job import EmbedOptions, embed_local
from galaxalign_dist.evaluation.embed_store import load_split, open_embeddings

pytestmark = [pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from galaxalign_dist.data.prepare import prepare

    root = tmp_path_factory.mktemp("embed")
    prepare("synthetic:galaxymnist", root / "data", n=64, rows_per_file=16, row_group_rows=8, progress=False)
    export_tiny(root / "model")
    return root


def opts(**kw) -> EmbedOptions:
    return EmbedOptions(**{"batch_size": 7, "rows_per_shard": 10, "progress": False, **kw})


def reference(world: Path, split: str):
    from galaxalign_dist.evaluation.bundle import load_bundle
    from galaxalign_dist.evaluation.embed import embed

    return embed(load_bundle(world / "model"), world / "data", split, batch_size=64, progress=False)


def test_local_job_equals_single_process_embedding_every_row_once(world: Path, tmp_path: Path) -> None:
    summary = embed_local(world / "model", world / "data", tmp_path / "emb", opts())
    emb = open_embeddings(tmp_path / "emb")
    assert summary["rows"] == 64 == emb.meta["num_rows"] and summary["shards_written"] == summary["shards"]
    for split in ("train", "test"):
        ref, got = reference(world, split), load_split(emb, split)
        assert list(got.ids) == list(ref.ids) and len(set(got.ids)) == len(got.ids)
        np.testing.assert_array_equal(got.labels, ref.labels)
        for m in ("image", "symbol", "text"):
            np.testing.assert_allclose(getattr(got, m), getattr(ref, m), atol=1e-5)
    # One shard per unit of <= 10 rows (cut at 8-row row groups), each with a manifest; stored as fixed-size lists.
    manifests = sorted((tmp_path / "emb" / "manifests").glob("part-*.json"))
    assert (
        len(manifests) == summary["shards"]
        and sum(json.loads(m.read_text())["rows"] for m in manifests) == 64
    )
    schema = pq.read_schema(emb.files()[0][1])
    assert schema.field("image_embedding").type == pa.list_(pa.float32(), 64)
    assert {"id", "label", "class_name", "source", "source_row"} <= set(schema.names)


def test_float16_image_only(world: Path, tmp_path: Path) -> None:
    embed_local(
        world / "model",
        world / "data",
        tmp_path / "e",
        opts(dtype="float16", modalities=["image"], splits=["test"]),
    )
    emb = open_embeddings(tmp_path / "e")
    table = pq.read_table(emb.files()[0][1])
    assert table.schema.field("image_embedding").type == pa.list_(pa.float16(), 64)
    assert "text_embedding" not in table.schema.names and list(emb.meta["splits"]) == ["test"]
    from galaxalign_dist.evaluation.embed_store import matrix

    got = np.concatenate([matrix(pq.read_table(p).column("image_embedding")) for _, p in emb.files()])
    np.testing.assert_allclose(got, reference(world, "test").image, atol=2e-3)


def test_rerun_skips_verified_shards_and_redoes_damaged_ones(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    first = embed_local(world / "model", world / "data", out, opts())
    shards = sorted(out.glob("*/part-*.parquet"))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])  # truncated: fails the footer/size check
    (out / "manifests" / f"{shards[1].stem}.json").unlink()  # never finished
    shards[2].write_bytes(
        shards[2].read_bytes()[:-9] + b"X" + shards[2].read_bytes()[-8:]
    )  # one byte: checksum
    second = embed_local(world / "model", world / "data", out, opts())
    assert second["shards_written"] == 3 and second["shards_reused"] == first["shards"] - 3
    for p in shards[3:]:
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == before[p], f"{p} was rewritten"
    emb = open_embeddings(out)
    for split in ("train", "test"):
        ref, got = reference(world, split), load_split(emb, split)
        assert list(got.ids) == list(ref.ids)
        np.testing.assert_allclose(got.image, ref.image, atol=1e-5)


def test_rerun_with_other_settings_is_refused_unless_overwrite(world: Path, tmp_path: Path) -> None:
    from galaxalign_dist.data.shards import OutputExistsError

    out = tmp_path / "emb"
    embed_local(world / "model", world / "data", out, opts(splits=["test"]))
    with pytest.raises(OutputExistsError, match=r"other settings \(dtype\).*--overwrite"):
        embed_local(world / "model", world / "data", out, opts(splits=["test"], dtype="float16"))
    export_tiny(tmp_path / "other", seed=1)
    with pytest.raises(OutputExistsError, match="another model"):
        embed_local(tmp_path / "other", world / "data", out, opts(splits=["test"]))
    done = embed_local(tmp_path / "other", world / "data", out, opts(splits=["test"], overwrite=True))
    assert done["shards_reused"] == 0 and open_embeddings(out).meta["model"] == str(
        (tmp_path / "other").resolve()
    )


def _corrupt(world: Path, dst: Path, split: str = "train", file: int = 1, row: int = 5) -> str:
    shutil.copytree(world / "data", dst)
    f = sorted((dst / split).glob("part-*.parquet"))[file]
    t = pq.read_table(f)
    images = t.column("image").to_pylist()
    images[row] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 9
    i = t.schema.get_field_index("image")
    pq.write_table(t.set_column(i, t.schema.field(i), pa.array(images, pa.binary())), f, row_group_size=8)
    return t.column("id")[row].as_py()


def test_corrupt_image_names_the_row_or_is_skipped_and_listed(world: Path, tmp_path: Path) -> None:
    bad = _corrupt(world, tmp_path / "data")
    with pytest.raises(
        ValueError, match=rf"row id {bad}: image does not decode.*train/part-00001.parquet row 5.*--skip-bad"
    ):
        embed_local(world / "model", tmp_path / "data", tmp_path / "e1", opts())
    summary = embed_local(world / "model", tmp_path / "data", tmp_path / "e2", opts(skip_bad=True))
    emb = open_embeddings(tmp_path / "e2")
    assert summary["skipped_rows"] == 1 and emb.meta["num_rows"] == 63
    listed = emb.meta["skipped"]["rows"]
    assert (
        listed[0]["id"] == bad and listed[0]["source"] == "train/part-00001.parquet" and listed[0]["row"] == 5
    )
    ids = list(load_split(emb, "train").ids)
    assert bad not in ids and len(ids) == len(set(ids)) == len(list(reference(world, "train").ids)) - 1


def test_folder_of_images_ids_from_file_names(world: Path, tmp_path: Path) -> None:
    from galaxalign_dist.evaluation.bundle import load_bundle

    table = pq.read_table(sorted((world / "data" / "train").glob("*.parquet"))[0])  # 16 rows
    folder = tmp_path / "folder"
    for i, blob in enumerate(table.column("image").to_pylist()[:12]):
        sub = folder / ("a" if i % 2 else "b" / Path("deep"))
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"g{i:02d}.png").write_bytes(blob)
    (folder / ".hidden.png").write_bytes(b"not looked at")
    (folder / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="folder of images.*--modalities image"):
        embed_local(world / "model", folder, tmp_path / "e0", opts())
    embed_local(world / "model", folder, tmp_path / "e", opts(modalities=["image"]))
    emb = open_embeddings(tmp_path / "e")
    assert emb.meta["kind"] == "folder" and not emb.meta["labelled"] and list(emb.meta["splits"]) == ["all"]
    t = pa.concat_tables([pq.read_table(p) for _, p in emb.files()])
    assert "label" not in t.column_names and t.num_rows == 12
    ids = t.column("id").to_pylist()
    assert ids[0] == "a/g01" and "b/deep/g00" in ids and t.column("source").to_pylist()[0] == "a/g01.png"
    from galaxalign_dist.evaluation.embed_store import matrix

    bundle = load_bundle(world / "model")
    files = [folder / f"{i}.png" for i in ids]
    np.testing.assert_allclose(
        matrix(t.column("image_embedding")), bundle.embed_images([f.read_bytes() for f in files]), atol=1e-5
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        embed_local(world / "model", tmp_path / "empty", tmp_path / "e3", opts(modalities=["image"]))


def _unlabelled(world: Path, dst: Path) -> None:
    """A gzdesi-like catalogue kept with --on-uncertain label: label -1, and rows without a caption."""
    from galaxalign_dist.data import shards

    shutil.copytree(world / "data", dst)
    for f in sorted(dst.glob("*/part-*.parquet")):
        t = pq.read_table(f)
        n = t.num_rows
        text = [c if i % 3 else "" for i, c in enumerate(t.column("text").to_pylist())]
        t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(np.full(n, -1, np.int32)))
        t = t.set_column(t.schema.get_field_index("class_name"), "class_name", pa.array(["uncertain"] * n))
        t = t.set_column(t.schema.get_field_index("text"), "text", pa.array(text, pa.string()))
        pq.write_table(t, f, row_group_size=8)
    assert shards.is_prepared(dst)


def test_unlabelled_rows_and_missing_captions(world: Path, tmp_path: Path) -> None:
    from galaxalign_dist.evaluation.embed_store import matrix

    _unlabelled(world, tmp_path / "data")
    embed_local(world / "model", tmp_path / "data", tmp_path / "e", opts())
    emb = open_embeddings(tmp_path / "e")
    t = pa.concat_tables([pq.read_table(p) for _, p in emb.files(["test"])])
    assert set(t.column("label").to_pylist()) == {-1} and set(t.column("class_name").to_pylist()) == {
        "uncertain"
    }
    text = t.column("text_embedding")
    valid = text.is_valid().to_numpy(zero_copy_only=False)
    assert 0 < text.null_count < t.num_rows
    m = matrix(text)
    assert np.isnan(m[~valid]).all() and np.isfinite(m[valid]).all()
    np.testing.assert_allclose(matrix(t.column("image_embedding")), reference(world, "test").image, atol=1e-5)


def test_missing_column_and_empty_split_fail_before_any_output(world: Path, tmp_path: Path) -> None:
    shutil.copytree(world / "data", tmp_path / "data")
    f = sorted((tmp_path / "data" / "test").glob("part-*.parquet"))[0]
    pq.write_table(pq.read_table(f).drop_columns(["symbol"]), f)
    with pytest.raises(
        ValueError, match=re.escape(f"{f}: no column 'symbol' (needed for --modalities image,text,symbol)")
    ):
        embed_local(world / "model", tmp_path / "data", tmp_path / "out", opts())
    assert not (tmp_path / "out").exists()
    embed_local(world / "model", tmp_path / "data", tmp_path / "ok", opts(modalities=["image", "text"]))
    meta_file = next(p for p in (tmp_path / "data").iterdir() if p.name.endswith("metadata.json"))
    meta = json.loads(meta_file.read_text())
    meta["splits"]["val"] = {"rows": 0, "files": [], "per_class": {}}
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="split 'val' has no rows to embed"):
        embed_local(world / "model", tmp_path / "data", tmp_path / "out", opts(splits=["val"]))
    with pytest.raises(ValueError, match="unknown split 'nosuch'"):
        embed_local(world / "model", tmp_path / "data", tmp_path / "out", opts(splits=["nosuch"]))
    assert not (tmp_path / "out").exists()


def test_eval_reads_sharded_embeddings(world: Path, tmp_path: Path) -> None:
    from galaxalign_dist.evaluation.evaluate import evaluate_model

    # Batches as `evaluate_model` embeds them (128 rows): the same float sums, so the same embeddings bit
    # for bit; the heads are fitted on 64 rows, and a last-bit difference can flip a prediction.
    embed_local(world / "model", world / "data", tmp_path / "emb", opts(batch_size=128))
    direct = evaluate_model(world / "model", world / "data", tmp_path / "a", make_figures=False)
    stored = evaluate_model(
        world / "model", world / "data", tmp_path / "b", make_figures=False, embeddings=tmp_path / "emb"
    )
    for key in ("accuracy", "f1_macro", "map_at_5", "map", "n_test", "n_train"):
        assert stored[key] == pytest.approx(direct[key], abs=1e-6), key
    export_tiny(tmp_path / "other", seed=3)
    with pytest.raises(ValueError, match="were made by model .* not .*other"):
        evaluate_model(
            tmp_path / "other",
            world / "data",
            tmp_path / "c",
            make_figures=False,
            embeddings=tmp_path / "emb",
        )
    meta = json.loads((tmp_path / "emb" / "embeddings.json").read_text())
    (tmp_path / "emb" / "embeddings.json").write_text(json.dumps({**meta, "dim": 32}))
    with pytest.raises(ValueError, match="are 32-d but model .* makes 64-d ones"):
        evaluate_model(
            world / "model", world / "data", tmp_path / "d", make_figures=False, embeddings=tmp_path / "emb"
        )


def test_cli_embed_index_search_round_trip(world: Path, tmp_path: Path, capsys) -> None:
    from galaxalign_dist.cli.main import main

    emb, idx = tmp_path / "emb", tmp_path / "idx"
    assert main(["embed", str(world / "model"), "--data", str(world / "data"), "--out", str(emb), "--local",
                 "--rows-per-shard", "16", "--no-progress"]) == 0  # fmt: skip
    assert main(["index", str(emb), "--out", str(idx), "--no-progress"]) == 0
    meta = json.loads((idx / "index.json").read_text())
    assert meta["factory"] == "Flat" and meta["count"] == 64 and meta["recall_at_10"] == 1.0
    gid = pq.read_table(open_embeddings(emb).files(["test"])[0][1]).column("id")[0].as_py()
    capsys.readouterr()
    assert (
        main(["search", "--index", str(idx), "--id", gid, "-k", "5", "--grid", str(tmp_path / "g.png")]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0].split()[:3] == ["rank", "score", "id"]
        and len([ln for ln in lines if ln[:4].strip().isdigit()]) == 5
    )
    assert (
        gid not in "".join(lines[1:6]) and (tmp_path / "g.png").stat().st_size > 0
    )  # the query is not its own hit
    assert (
        main(["search", "--index", str(idx), "--text", "a barred spiral galaxy with tight arms", "-k", "3"])
        == 0
    )
    image = tmp_path / "q.png"
    image.write_bytes(
        pq.read_table(world / "data" / "test" / "part-00000.parquet").column("image")[0].as_py()
    )
    capsys.readouterr()
    assert main(["search", str(image), "--index", str(idx), "-k", "1"]) == 0
    top = capsys.readouterr().out.splitlines()[1].split()
    assert float(top[1]) == pytest.approx(1.0, abs=1e-4)  # the same galaxy's embedding


@pytest.mark.parametrize("cpus", [1, 2, 4, 16])
def test_default_actor_pool_leaves_the_read_stage_a_cpu(cpus: int) -> None:
    # An actor pool that reserved every CPU would starve the read tasks: the job would wait forever.
    from galaxalign_dist.launch.embed import plan_resources

    res = plan_resources({"CPU": float(cpus)}, None, 1.0, None, "auto")
    assert res["decode"] == "actor" and res["gpus_per_actor"] is None
    assert res["actors"] == cpus and res["cpus_per_actor"] == 1.0  # one torch thread per core
    assert res["actors"] * res["actor_num_cpus"] + res["read_cpus"] <= cpus + 1e-9
    gpu = plan_resources({"CPU": 8.0, "GPU": 2.0}, None, 1.0, None, "auto")
    assert (gpu["actors"], gpu["gpus_per_actor"], gpu["decode"]) == (2, 1.0, "tasks")
    assert gpu["actors"] * gpu["actor_num_cpus"] + gpu["read_cpus"] <= 8.0
