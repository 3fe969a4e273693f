"""A long 2-rank run of the real train loop (DeepSpeed ZeRO-2 over gloo, both stages), without Ray."""

from __future__ import annotations

import pytest
import torch

from multiproc import run_ranks

pytestmark = [pytest.mark.slow]

ROWS_PER_RANK, GLOBAL_BATCH = 1024, 32  # 64 steps per epoch per rank


def _train(rank: int, root: str) -> list[dict]:
    from galaxalign_dist import config
    from galaxalign_dist.train.checkpoint import LocalReporter
    from galaxalign_dist.train.model import build_tokenizer
    from galaxalign_dist.train.trainer import TrainData, Trainer

    cfg = config.load(
        "demo_cpu",
        {
            "data.batch_size": GLOBAL_BATCH,
            "stages.stage1_epochs": 3,
            "stages.stage2_epochs": 3,
            "logging.progress": False,
            "logging.tensorboard": False,
            "run.checkpoint_every_epochs": 3,
        },
    )
    mb = cfg.micro_batch_size
    captions = build_tokenizer(cfg.model)([f"A picture of a class {i} galaxy" for i in range(4)])

    def batches(epoch: int):
        g = torch.Generator().manual_seed(1000 * epoch + rank)
        for _ in range(ROWS_PER_RANK // mb):
            labels = torch.randint(0, 4, (mb,), generator=g)
            images = torch.randn(mb, 3, 32, 32, generator=g) + labels[:, None, None, None]
            images = torch.nn.functional.interpolate(images, size=64)
            yield {"image": images, "symbol": images.flip(-1), "tokens": captions[labels], "label": labels}

    data = TrainData(train=batches, steps_per_epoch=ROWS_PER_RANK // mb)
    reporter = LocalReporter(root, keep=1)
    Trainer(cfg, data, reporter).fit()
    return reporter.history


@pytest.mark.timeout(600)
def test_two_ranks_train_both_stages_for_hundreds_of_steps(tmp_path):
    # 6 epochs x 64 steps = 384 contrastive steps, each gathering features across both ranks: the demo's
    # worker crash (gloo heap corruption in the old gather) came 25-30 s into stage 1.
    histories = run_ranks(_train, str(tmp_path))
    for hist in histories:
        assert [(h["stage"], h["epoch"]) for h in hist] == [(1, e) for e in range(1, 4)] + [
            (2, e) for e in range(1, 4)
        ]
        assert hist[-1]["step"] == 6 * ROWS_PER_RANK // (GLOBAL_BATCH // 2)
    stage1 = [h["loss"] for h in histories[0] if h["stage"] == 1]
    assert stage1[-1] < stage1[0]  # labels are in the pixels: the loss must fall
