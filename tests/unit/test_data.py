"""TripletTransform (decode, augment, symbols, tokens) and iter_batches (sharding, shuffling) on real galaxies."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from open_clip import image_transform
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from conftest import real_path
from galaxalign_dist.data import shards
from galaxalign_dist.data.prepare import prepare
from galaxalign_dist.data.reader import iter_batches, to_numpy
from galaxalign_dist.data.symbols import render_symbol
from galaxalign_dist.data.transform import TripletTransform

MEAN = np.array(OPENAI_DATASET_MEAN, np.float32)[:, None, None]
STD = np.array(OPENAI_DATASET_STD, np.float32)[:, None, None]


@pytest.fixture(scope="module")
def tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer(context_length=32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The 40 real GalaxyMNIST galaxies as shards: 3 files, row groups of 8 (exercises both levels), stored
    losslessly (PNG) so pixel values can be compared exactly."""
    d = np.load(real_path("galaxymnist_40_64px.npz"))
    root = tmp_path_factory.mktemp("data")
    with h5py.File(root / "gm.hdf5", "w") as f:
        f["images"], f["labels"] = d["images"], d["labels"]
    out = root / "ds"
    prepare(
        f"galaxymnist:{root / 'gm.hdf5'}",
        out,
        test_fraction=0.0,
        rows_per_file=16,
        row_group_rows=8,
        progress=False,
        image_format="png",
    )
    return out


def _batch(data_dir: Path, n: int = 8) -> dict[str, np.ndarray]:
    return to_numpy(shards.dataset(data_dir, "train").head(n))


def test_eval_transform_shapes_and_normalisation(data_dir, tokenizer):
    batch = _batch(data_dir)
    tf = TripletTransform(64, train=False, tokenizer=tokenizer)
    out = tf(batch)
    assert out["image"].shape == (8, 3, 64, 64) and out["image"].dtype == np.float32
    assert out["symbol"].shape == (8, 3, 64, 64) and out["symbol"].dtype == np.float32
    assert out["tokens"].shape == (8, 32) and out["tokens"].dtype == np.int64
    assert out["label"].dtype == np.int64 and list(out["label"]) == list(batch["label"])
    assert "id" not in out
    pixels = np.load(real_path("galaxymnist_40_64px.npz"))["images"][:8]
    expected = (pixels.transpose(0, 3, 1, 2) / np.float32(255) - MEAN) / STD  # 64 px in, 64 px out
    np.testing.assert_allclose(out["image"], expected, atol=1e-5)
    # Same as open_clip's eval preprocessing (it resizes with PIL, we with torchvision).
    ref = image_transform(48, is_train=False)(Image.fromarray(pixels[0])).numpy()
    small = TripletTransform(48, train=False, tokenizer=tokenizer)(batch)["image"][0]
    assert np.abs(small - ref).mean() < 0.05
    sym = render_symbol(batch["symbol"][0], size=64)
    np.testing.assert_allclose(
        out["symbol"][0], (sym.transpose(2, 0, 1) / np.float32(255) - MEAN) / STD, atol=1e-5
    )
    np.testing.assert_array_equal(out["tokens"], tokenizer(list(batch["text"])).numpy())
    again = tf(batch)
    assert all(np.array_equal(out[k], again[k]) for k in out)  # eval is deterministic


def test_train_augmentation_random_but_reproducible(data_dir, tokenizer):
    batch = _batch(data_dir)
    tf = TripletTransform(48, train=True, tokenizer=tokenizer, seed=1, keep_ids=True, epoch=0)
    a = tf(batch)
    assert list(a["id"]) == list(batch["id"])
    b = TripletTransform(48, train=True, tokenizer=tokenizer, seed=1, epoch=0)(batch)  # a fresh instance
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["symbol"], b["symbol"])
    evl = TripletTransform(48, train=False, tokenizer=tokenizer)(batch)
    assert not np.allclose(a["image"], evl["image"])
    tf.set_epoch(1)
    assert not np.allclose(tf(batch)["image"], a["image"])  # new epoch, new views
    other_seed = TripletTransform(48, train=True, tokenizer=tokenizer, seed=2, epoch=0)(batch)
    assert not np.allclose(other_seed["image"], a["image"])
    # A row's augmentation does not depend on which batch it lands in.
    halves = [
        TripletTransform(48, True, tokenizer, seed=1, epoch=0)({k: v[s] for k, v in batch.items()})
        for s in (slice(0, 3), slice(3, 8))
    ]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), a["image"])
    # Picklable for Ray Data, and the copy behaves the same.
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(TripletTransform(48, True, tokenizer, seed=1, epoch=0)))(batch)["image"],
        a["image"],
    )
    # No epoch given (one instance reused by every epoch of a Ray Data pipeline): fresh views per call.
    unseeded = TripletTransform(48, True, tokenizer, seed=1)
    assert not np.allclose(unseeded(batch)["image"], unseeded(batch)["image"])


def test_bad_image_bytes(data_dir, tokenizer, caplog):
    batch = _batch(data_dir, 4)
    batch["image"] = batch["image"].copy()
    batch["image"][2] = b"\x89PNG garbage"
    bad_id = batch["id"][2]
    with pytest.raises(ValueError, match=f"row id {bad_id}: image does not decode"):
        TripletTransform(32, train=False, tokenizer=tokenizer)(batch)
    tf = TripletTransform(32, train=True, tokenizer=tokenizer, on_bad_image="skip", keep_ids=True)
    out = tf(batch)
    assert out["image"].shape[0] == out["tokens"].shape[0] == out["label"].shape[0] == 3
    assert bad_id not in list(out["id"]) and tf.n_bad == 1
    assert "skipped 1 rows" in caplog.text and bad_id in caplog.text
    batch["image"][:] = b"junk"
    empty = tf(batch)
    assert empty["image"].shape == (0, 3, 32, 32) and empty["tokens"].shape == (0, 32)
    with pytest.raises(ValueError, match="on_bad_image"):
        TripletTransform(32, train=True, tokenizer=tokenizer, on_bad_image="ignore")


def _ids(data_dir: Path, **kw) -> list[list[str]]:
    return [list(b["id"]) for b in iter_batches(data_dir, "train", columns=["id"], **kw)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_sharding_disjoint_and_covering(data_dir, world_size):
    per_rank = [
        sum(_ids(data_dir, batch_size=5, rank=r, world_size=world_size, shuffle=True), [])
        for r in range(world_size)
    ]
    flat = sum(per_rank, [])
    assert len(flat) == len(set(flat)) == 40
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    dropped = [
        _ids(data_dir, batch_size=4, rank=r, world_size=world_size, drop_last=True) for r in range(world_size)
    ]
    assert len({len(b) for b in dropped}) == 1  # equal batch counts on every rank
    assert all(len(batch) == 4 for rank in dropped for batch in rank)
    flat = sum(sum(dropped, []), [])
    assert len(flat) == len(set(flat))


def test_shuffle_changes_order_across_epochs(data_dir):
    plain = sum(_ids(data_dir, batch_size=8), [])
    assert plain == sorted(plain)  # prepare wrote ids in order; no shuffle keeps it
    e0 = sum(_ids(data_dir, batch_size=8, shuffle=True, seed=0, epoch=0, shuffle_buffer=16), [])
    e1 = sum(_ids(data_dir, batch_size=8, shuffle=True, seed=0, epoch=1, shuffle_buffer=16), [])
    assert e0 != e1 and e0 != plain and sorted(e0) == sorted(e1) == plain
    assert e0 == sum(_ids(data_dir, batch_size=8, shuffle=True, seed=0, epoch=0, shuffle_buffer=16), [])


def test_iter_batches_with_transform(data_dir, tokenizer):
    tf = TripletTransform(32, train=True, tokenizer=tokenizer)
    batches = list(iter_batches(data_dir, "train", 16, tf, shuffle=True, epoch=3))
    assert tf.epoch == 3 and [len(b["label"]) for b in batches] == [16, 16, 8]
    assert isinstance(batches[0]["image"], torch.Tensor) and batches[0]["image"].shape == (16, 3, 32, 32)
    assert batches[0]["tokens"].dtype == torch.int64
    assert list(iter_batches(data_dir, "test", 4, tf)) == []  # empty split: no files, no batches
    with pytest.raises(ValueError, match="unknown split"):
        list(iter_batches(data_dir, "valid", 4, tf))
