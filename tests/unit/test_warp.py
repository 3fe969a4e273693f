"""Device-side geometry: the one-sample warp equals torchvision's rotate + resized crop + flips, the eval
transform equals open_clip's, parameters depend on (seed, epoch, id) only, the symbol bank draws as the renderer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from open_clip.transform import image_transform
from PIL import Image
from torchvision.transforms import InterpolationMode

from galaxalign_dist.data.symbol_bank import SymbolBank
from galaxalign_dist.data.symbols import render_symbol
from galaxalign_dist.data.warp import draw_params, normalise, resize_center_crop, warp

N, S = 256, 224


def _smooth_image(n: int = N) -> torch.Tensor:
    """uint8 (3, n, n): three Gaussian blobs (sigma >= 12 px), off-centre so rotations and flips show."""
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    k = n / 256

    def blob(x0: float, y0: float, s: float) -> torch.Tensor:
        return torch.exp(-((xx - x0 * k) ** 2 + (yy - y0 * k) ** 2) / (2 * (s * k) ** 2))

    img = (200 * blob(100, 90, 20) + 150 * blob(170, 160, 12) + 80 * blob(128, 128, 50)).clamp(0, 255)
    return torch.stack([img, img * 0.8, img * 0.5]).to(torch.uint8)


# Tolerance (pixel values 0-255). torchvision samples twice (bilinear rotation, then a bicubic antialiased
# resize); the warp samples once, bilinearly. On features of sigma >= 12 px the interpolation errors are a
# fraction of a level (bilinear error <= h^2/8 max|f''| ~ 200/12^2/8 ~ 0.2 per sampling); measured here
# 0.19 mean and 1.6 max (at the rotated corners, where the zero fill meets the image), so: 0.5 and 3.
MEAN_TOL, MAX_TOL = 0.5, 3.0


@pytest.mark.parametrize("angle", [0.0, 30.0, -75.0, 180.0])
@pytest.mark.parametrize("side, top, left", [(256, 0, 0), (224, 10, 20), (230, 0, 26)])
@pytest.mark.parametrize("flip_x, flip_y", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_warp_equals_torchvision_rotate_crop_flip(angle, side, top, left, flip_x, flip_y):
    img = _smooth_image()
    ref = TF.rotate(img, angle, interpolation=InterpolationMode.BILINEAR)
    ref = TF.resized_crop(ref, top, left, side, side, [S, S], InterpolationMode.BICUBIC, antialias=True)
    if flip_x:
        ref = TF.horizontal_flip(ref)
    if flip_y:
        ref = TF.vertical_flip(ref)
    centre = [(left + side / 2) / N * 2 - 1, (top + side / 2) / N * 2 - 1]
    params = torch.tensor([[math.radians(angle), side / N, *centre, flip_x, flip_y]])
    diff = (warp(img[None], params, S)[0] - ref.float()).abs()
    assert diff.mean() <= MEAN_TOL and diff.max() <= MAX_TOL, (diff.mean().item(), diff.max().item())


def test_warp_of_a_batch_is_the_warp_of_each_row():
    imgs = torch.stack([_smooth_image(), _smooth_image().flip(-1)])
    params = torch.from_numpy(draw_params(["a", "b"], seed=0, epoch=3)["image"])
    batch = warp(imgs, params, 64)
    for i in range(2):
        torch.testing.assert_close(batch[i], warp(imgs[i : i + 1], params[i : i + 1], 64)[0])


@pytest.mark.parametrize("size, n", [(224, 256), (64, 256), (300, 256), (64, 424)])
def test_eval_transform_equals_open_clip(size, n):
    img = _smooth_image(n)
    ref = image_transform(size, is_train=False, mean=(0, 0, 0), std=(1, 1, 1))(
        Image.fromarray(img.permute(1, 2, 0).numpy())
    )
    diff = (resize_center_crop(img[None], size)[0] - ref * 255).abs()
    # open_clip resizes the PIL image (PIL's bicubic), we resize the tensor (torch's antialiased bicubic).
    assert diff.mean() <= 0.5 and diff.max() <= 2.0, (diff.mean().item(), diff.max().item())


def test_normalise_is_clip_mean_std_in_the_run_precision():
    x = torch.full((1, 3, 2, 2), 255.0)
    out = normalise(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0), torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert out[0, :, 0, 0].float().tolist() == [2.0, 1.0, 0.5]


def test_params_depend_on_seed_epoch_and_id_only():
    ids = [f"g{i}" for i in range(10)]
    whole = draw_params(ids, seed=1, epoch=2)
    parts = [draw_params(ids[i : i + 3], seed=1, epoch=2) for i in range(0, 10, 3)]
    for key in whole:
        assert np.array_equal(whole[key], np.concatenate([p[key] for p in parts]))  # any batching
    assert np.array_equal(draw_params(ids[::-1], 1, 2)["image"], whole["image"][::-1])  # any order
    assert not np.array_equal(draw_params(ids, 1, 3)["image"], whole["image"])  # new views each epoch
    assert not np.array_equal(draw_params(ids, 2, 2)["image"], whole["image"])
    p = whole["image"]
    assert np.all(np.abs(p[:, 0]) <= math.pi)
    assert np.all((p[:, 1] >= math.sqrt(0.8)) & (p[:, 1] <= 1))
    assert np.all(np.abs(p[:, 2:4]) <= 1 - p[:, 1:2] + 1e-6)  # the crop stays inside the image


def test_bank_canonical_symbol_is_the_renderers():
    bank = SymbolBank(64)
    specs = ["round", "disk+bar:strong+arms:tight", "edgeon+bulge:small"]
    got = bank.lookup(specs, np.ones(3, np.int64))  # variant 1: canonical line width
    for spec, sym in zip(specs, got, strict=True):
        assert torch.equal(sym.permute(1, 2, 0), torch.from_numpy(render_symbol(spec, 64)))
    assert len(bank.images) == 3 * SymbolBank.variants
    thin, thick = bank.lookup(["disk+bar:strong+arms:tight"] * 2, np.array([0, 2]))
    assert not torch.equal(thin, thick)
    bank.lookup(["round"], np.zeros(1, np.int64))
    assert len(bank.images) == 3 * SymbolBank.variants  # nothing rendered twice


@pytest.mark.gpu
def test_warp_and_eval_on_cuda_equal_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    img = torch.stack([_smooth_image(), _smooth_image().flip(-2)])
    params = torch.from_numpy(draw_params(["a", "b"], seed=0, epoch=0)["image"])
    torch.testing.assert_close(
        warp(img.cuda(), params.cuda(), S).cpu(), warp(img, params, S), atol=1e-2, rtol=0
    )
    torch.testing.assert_close(
        resize_center_crop(img.cuda(), 64).cpu(), resize_center_crop(img, 64), atol=1e-2, rtol=0
    )
    bank = SymbolBank(S, "cuda")
    assert bank.lookup(["disk+arms:loose"], np.zeros(1, np.int64)).device.type == "cuda"
