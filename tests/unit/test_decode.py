"""The two halves of the pipeline: the data side hands over uint8 pixels, tokens and spec strings only; the
device side finishes them exactly as the one-process transform; stored encodings decode as promised."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from galaxalign_dist.data.decode import DecodeTransform, canvas_size
from galaxalign_dist.data.images import RAW_MAGIC, decode, encode
from galaxalign_dist.data.preprocess import DevicePreprocess
from galaxalign_dist.data.transform import TripletTransform


def _pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random images (a few blurred blobs): JPEG-friendly, like sky cutouts."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size, 3), np.float64)
    for i in range(n):
        for _ in range(3):
            x0, y0 = rng.uniform(0.2, 0.8, 2) * size
            s = rng.uniform(0.05, 0.2) * size
            out[i] += (
                rng.uniform(60, 160) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s))[..., None]
            )
    return np.clip(out * [1.0, 0.8, 0.6], 0, 255).astype(np.uint8)


def _rows(images: np.ndarray, fmt: str = "png") -> dict[str, np.ndarray]:
    n = len(images)
    return {
        "id": np.array([f"g{i}" for i in range(n)], dtype=object),
        "image": np.array([encode(img, fmt) for img in images], dtype=object),
        "label": np.arange(n) % 3,
        "text": np.array(
            ["A picture of a round smooth galaxy", "A picture of a cigar"] * (n // 2), dtype=object
        ),
        "symbol": np.array(["round", "cigar"] * (n // 2), dtype=object),
    }


@pytest.fixture(scope="module")
def tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer(context_length=16)


def test_data_side_hands_over_uint8_tokens_and_specs_only(tokenizer):
    rows = _rows(_pixels(6, 48))
    out = DecodeTransform(48, tokenizer)(rows)
    assert out["image"].dtype == np.uint8 and out["image"].shape == (6, 48, 48, 3)  # channels last
    assert not any(v.dtype.kind == "f" for v in out.values())  # no float32 crosses the object store
    assert out["tokens"].dtype == np.int64 and out["tokens"].shape == (6, 16)
    assert list(out["symbol"]) == list(rows["symbol"]) and out["key"].dtype == np.int64
    assert np.array_equal(out["image"], _pixels(6, 48))  # PNG: exact
    assert "id" not in out and "id" in DecodeTransform(48, tokenizer, keep_ids=True)(rows)


def test_data_side_resizes_only_off_canvas_images(tokenizer):
    out = DecodeTransform(32, tokenizer)(_rows(_pixels(2, 64)))
    assert out["image"].shape == (2, 32, 32, 3)
    assert canvas_size([256, 256], 224) == 256  # shipped as stored: the device warp crops and scales
    assert canvas_size([424, 424], 64) == 72  # much larger than the input: resized on the data side
    assert canvas_size(None, 224) == 251


@pytest.mark.parametrize("epoch", [None, 0, 5])
def test_one_process_transform_is_decode_then_device_side(tokenizer, epoch):
    rows = _rows(_pixels(4, 64))
    whole = TripletTransform(
        48, train=epoch is not None, tokenizer=tokenizer, seed=3, epoch=epoch, canvas=64
    )(rows)
    decoded = DecodeTransform(64, tokenizer)(rows)
    device = DevicePreprocess(48, seed=3)(decoded, epoch)
    for key in ("image", "symbol", "tokens", "label"):
        np.testing.assert_array_equal(whole[key], device[key].numpy())


def test_device_side_is_reproducible_per_seed_epoch_and_row_whatever_the_batching(tokenizer):
    rows = _rows(_pixels(6, 64))
    decoded = DecodeTransform(64, tokenizer)(rows)
    pre = DevicePreprocess(48, seed=1)
    whole = pre(decoded, 2)
    halves = [pre({k: v[s] for k, v in decoded.items()}, 2) for s in (slice(0, 3), slice(3, 6))]
    for key in ("image", "symbol"):
        torch.testing.assert_close(whole[key], torch.cat([h[key] for h in halves]))
    assert not torch.equal(pre(decoded, 3)["image"], whole["image"])  # a new view each epoch
    assert not torch.equal(DevicePreprocess(48, seed=2)(decoded, 2)["image"], whole["image"])


def test_device_side_decodes_encoded_bytes_as_the_data_side(tokenizer):
    rows = _rows(_pixels(4, 48), "jpeg")
    decoded = DecodeTransform(48, tokenizer)(rows)
    as_bytes = {**{k: v for k, v in decoded.items() if k != "image"}, "image_bytes": rows["image"]}
    pre = DevicePreprocess(48)
    torch.testing.assert_close(pre(as_bytes, None)["image"], pre(decoded, None)["image"])


def test_stored_encodings_round_trip():
    img = _pixels(1, 40)[0]
    assert np.array_equal(decode(encode(img, "png")).permute(1, 2, 0).numpy(), img)
    raw = encode(img, "raw")
    assert raw[:4] == RAW_MAGIC and len(raw) == 8 + 40 * 40 * 3
    assert np.array_equal(decode(raw).permute(1, 2, 0).numpy(), img)
    jpeg = decode(encode(img, "jpeg")).permute(1, 2, 0).numpy().astype(np.int16)
    assert np.abs(jpeg - img).mean() < 1.5  # quality 95, full-resolution chroma
    with pytest.raises(ValueError, match="raw image of 40x40"):
        decode(raw[:-1])
    with pytest.raises(ValueError, match="image format 'gif'"):
        encode(img, "gif")
