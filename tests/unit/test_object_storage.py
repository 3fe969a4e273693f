"""`data.path` as a URI: the readers go through pyarrow.fs, so s3:// / gs:// datasets work like local ones.

`file:///abs/path` exercises exactly that code path (pyarrow.fs.FileSystem.from_uri, here backed by
the LocalFileSystem) without a bucket: every reader must return the same rows as with the plain
local path. `prepare` writes local directories only and refuses a URI with what to do instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from open_clip.tokenizer import SimpleTokenizer

from galaxalign_dist import config as config_mod
from galaxalign_dist.data import shards
from galaxalign_dist.data.prepare import prepare
from galaxalign_dist.data.reader import iter_batches
from galaxalign_dist.data.transform import TripletTransform
from galaxalign_dist.evaluation.embed import thumbnails
from galaxalign_dist.launch.train import ensure_dataset
from galaxalign_dist.paths import absolute_paths, is_uri


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """40 synthetic galaxies, several files per split and several row groups per file."""
    out = tmp_path_factory.mktemp("store") / "ds"
    prepare("synthetic:galaxymnist", out, n=40, rows_per_file=16, row_group_rows=8, progress=False)
    return out


@pytest.fixture(scope="module")
def uri(local: Path) -> str:
    return local.as_uri()  # file:///abs/path/ds


def test_metadata_and_files_through_uri(local, uri):
    assert uri.startswith("file:///")
    assert is_uri(uri) and not is_uri(local)
    assert shards.read_metadata(uri) == shards.read_metadata(local)
    assert shards.is_prepared(uri) and not shards.is_prepared(f"{uri}-missing")
    for split in shards.SPLITS:
        files = shards.split_files(local, split)
        assert len(files) >= 1
        assert shards.split_files(uri, split) == [Path(f).as_uri() for f in files]
        fs, paths = shards.split_paths(uri, split)
        assert isinstance(fs, pafs.LocalFileSystem) and paths == files
        assert shards.check_split_files(uri, split) == shards.check_split_files(local, split)
    assert len(shards.split_files(uri, "train")) > 1  # the listing covers several files


def test_rows_through_uri_match_local(local, uri):
    for split in shards.SPLITS:
        assert shards.dataset(uri, split).to_table().equals(shards.dataset(local, split).to_table())
    # The single-process reader (eval/embed, per-rank validation): same batches, also when sharded.
    for kw in ({}, {"shuffle": True, "seed": 3, "epoch": 1}, {"rank": 1, "world_size": 2, "drop_last": True}):
        a = list(iter_batches(uri, "train", 5, **kw))
        b = list(iter_batches(local, "train", 5, **kw))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert list(x["id"]) == list(y["id"]) and list(x["image"]) == list(y["image"])
    # With the eval transform, as evaluate.embed reads a split.
    transform = TripletTransform(32, train=False, tokenizer=SimpleTokenizer(context_length=16), keep_ids=True)
    a = next(iter_batches(uri, "test", 4, transform))
    b = next(iter_batches(local, "test", 4, transform))
    assert list(a["id"]) == list(b["id"]) and a["image"].equal(b["image"]) and a["tokens"].equal(b["tokens"])
    ids = np.asarray(a["id"])
    assert np.array_equal(thumbnails(uri, "test", ids, size=16), thumbnails(local, "test", ids, size=16))


def test_subset_from_uri_source(local, uri, tmp_path):
    from_uri = shards.write_subset(uri, tmp_path / "a", "train", 0.5, seed=1)
    from_local = shards.write_subset(local, tmp_path / "b", "train", 0.5, seed=1)
    assert from_uri["splits"] == from_local["splits"] and from_uri["subset_of"]["source"] == uri


def test_ensure_dataset_and_absolute_paths_with_uri(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pairs = {"data.path": uri, "data.batch_size": 8, "run.out_dir": "s3://bucket/runs"}
    cfg = config_mod.load("demo_cpu", pairs)
    assert ensure_dataset(cfg) == shards.read_metadata(uri)
    abs_cfg = absolute_paths(cfg)  # Ray workers get the URIs untouched
    assert abs_cfg.data.path == uri and abs_cfg.run.out_dir == "s3://bucket/runs"
    # A URI with no dataset: the driver's check fails clearly (demo_cpu would prepare it: refused).
    missing = config_mod.load("demo_cpu", {**pairs, "data.path": f"{uri}-missing"})
    with pytest.raises(ValueError, match="prepare locally"):
        ensure_dataset(missing)
    assert list(tmp_path.iterdir()) == []  # nothing written under a mangled local path (./file:/...)


def test_errors_name_the_uri(local, uri, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"dataset directory {uri}-missing does not exist"):
        shards.read_metadata(f"{uri}-missing")
    bad = tmp_path / "bad"
    prepare("synthetic:galaxymnist", bad, n=40, rows_per_file=16, row_group_rows=8, progress=False)
    part = bad / "train" / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{part.as_uri()}: not a readable Parquet shard"):
        shards.check_split_files(bad.as_uri(), "train")
    part.unlink()
    with pytest.raises(
        FileNotFoundError, match=f"{part.as_uri()}: shard listed in _metadata.json is missing"
    ):
        shards.check_split_files(bad.as_uri(), "train")
    with pytest.raises(ValueError, match="not a URI pyarrow can open"):
        shards.read_metadata("nosuchscheme://bucket/ds")


def test_prepare_refuses_uri_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in ("s3://bucket/ds", (tmp_path / "ds").as_uri()):
        with pytest.raises(ValueError, match=r"prepare locally, copy the directory \(e.g. `aws s3 sync"):
            prepare("synthetic:galaxymnist", out, n=8, progress=False)
        with pytest.raises(ValueError, match="prepare locally"):
            prepare("gzdesi:/nowhere/catalogue.parquet", out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_object_store_uri_paths_keep_options():
    """s3:// without a network: the filesystem path drops scheme and query, names keep both."""
    uri = "s3://bucket/ds/?region=us-east-1&endpoint_override=127.0.0.1:9&scheme=http"
    fs, path = shards._fs_and_path(uri)
    assert fs.type_name == "s3" and path == "bucket/ds"
    assert (
        shards._shown(uri, "train", "part-00000.parquet")
        == "s3://bucket/ds/train/part-00000.parquet?region=us-east-1&endpoint_override=127.0.0.1:9&scheme=http"
    )
