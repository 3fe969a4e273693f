"""The gathered loss equals the single-process loss on the concatenated batch, forward and backward."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from conftest import free_port
from galaxalign_dist.config import LossConfig
from galaxalign_dist.train.loss import STAGE1_PAIRS, STAGE2_PAIRS, TriModalLoss, pairs_for

WORLD, LOCAL_B, DIM = 2, 6, 16


def _inputs(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = {
        m: F.normalize(torch.randn(WORLD * LOCAL_B, DIM, generator=g), dim=-1)
        for m in ("image", "symbol", "text")
    }
    labels = torch.randint(0, 3, (WORLD * LOCAL_B,), generator=g)  # few classes: many same-class pairs
    scale = torch.tensor([14.0])
    return feats, labels, scale


def _reference(targets: str, pairs) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
    feats, labels, scale = _inputs()
    leaves = {m: f.clone().requires_grad_(True) for m, f in feats.items()}
    s = scale.clone().requires_grad_(True)
    loss, _ = TriModalLoss(LossConfig(targets=targets))(leaves, s, labels, pairs)
    loss.backward()
    return loss.item(), {m: t.grad for m, t in leaves.items()}, s.grad


CASES = [(t, p) for t in ("diagonal", "class_aware") for p in (STAGE1_PAIRS, STAGE2_PAIRS)]


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for case, (targets, pairs) in enumerate(CASES):  # one process group for every case: spawns are slow
            feats, labels, scale = _inputs()
            rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
            leaves = {m: f[rows].clone().requires_grad_(True) for m, f in feats.items()}
            s = scale.clone().requires_grad_(True)
            loss, _ = TriModalLoss(LossConfig(targets=targets))(leaves, s, labels[rows], pairs)
            loss.backward()
            # What data-parallel training does with replicated parameters (the temperature): average.
            dist.all_reduce(s.grad)
            s.grad /= WORLD
            out[(case, rank)] = (loss.item(), {m: t.grad.clone() for m, t in leaves.items()}, s.grad.clone())
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(free_port(), out), nprocs=WORLD, start_method="spawn")
        return dict(out)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "case", range(len(CASES)), ids=["diag-stage1", "diag-stage2", "aware-stage1", "aware-stage2"]
)
def test_two_process_gloo_equals_single_process(two_process_results, case):
    targets, pairs = CASES[case]
    ref_loss, ref_grads, ref_scale_grad = _reference(targets, pairs)
    results = [two_process_results[(case, r)] for r in range(WORLD)]
    # Forward: the mean of the ranks' local losses is the global loss.
    assert abs(sum(r[0] for r in results) / WORLD - ref_loss) < 1e-5
    # Backward: all_gather's backward sums every rank's loss into each rank's rows, so a rank's
    # gradient is WORLD times the global-mean gradient; data-parallel averaging divides it back.
    for m in ref_grads:
        got = torch.cat([r[1][m] for r in results]) / WORLD
        torch.testing.assert_close(got, ref_grads[m], atol=1e-5, rtol=1e-5)
    for r in results:
        torch.testing.assert_close(r[2], ref_scale_grad, atol=1e-5, rtol=1e-5)


def test_diagonal_image_text_matches_open_clip_clip_loss():
    feats, labels, scale = _inputs()
    ours, parts = TriModalLoss(LossConfig())(feats, scale, labels, (("image", "text"),))
    theirs = ClipLoss()(feats["image"], feats["text"], scale.reshape(()))
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert set(parts) == {"image_text"}


def test_class_aware_differs_when_classes_repeat_and_matches_when_unique():
    feats, labels, scale = _inputs()
    pair = (("image", "text"),)
    diag, _ = TriModalLoss(LossConfig(targets="diagonal"))(feats, scale, labels, pair)
    aware, _ = TriModalLoss(LossConfig(targets="class_aware"))(feats, scale, labels, pair)
    assert abs(diag.item() - aware.item()) > 1e-3
    unique = torch.arange(labels.shape[0])  # no two rows share a class: both targets coincide
    diag_u, _ = TriModalLoss(LossConfig(targets="diagonal"))(feats, scale, unique, pair)
    aware_u, _ = TriModalLoss(LossConfig(targets="class_aware"))(feats, scale, unique, pair)
    assert abs(diag_u.item() - aware_u.item()) < 1e-6


def test_pair_weights_and_clip_only_pairs():
    feats, labels, scale = _inputs()
    full, parts = TriModalLoss(LossConfig())(feats, scale, labels, STAGE2_PAIRS)
    assert abs(full.item() - sum(p.item() for p in parts.values())) < 1e-5
    weighted, _ = TriModalLoss(LossConfig(weight_image_symbol=0.0))(feats, scale, labels, STAGE2_PAIRS)
    assert abs(weighted.item() - (full - parts["image_symbol"]).item()) < 1e-5
    assert pairs_for(2, LossConfig(use_symbols=False)) == (("image", "text"),)
    assert pairs_for(1, LossConfig()) == STAGE1_PAIRS
