"""Two DeepSpeed ranks save ZeRO shards; export consolidates them; the reloaded model embeds identically."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port
from galaxalign_dist import config
from galaxalign_dist.train import checkpoint
from galaxalign_dist.evaluation.bundle import load_model
from galaxalign_dist.train.export import export

WORLD = 2


def _fixed_inputs(cfg):
    from galaxalign_dist.train.model import build_tokenizer

    g = torch.Generator().manual_seed(123)
    images = torch.randn(4, 3, 64, 64, generator=g)
    tokens = build_tokenizer(cfg.model)(
        ["A picture of an edge-on disk galaxy", "A picture of a round smooth galaxy"] * 2
    )
    return images, tokens


def _rank(rank: int, port: int, zero_stage: int, stage: int, ckpt_dir: str, out: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from galaxalign_dist.train.engine import build_engine, partition_report
    from galaxalign_dist.train.loss import TriModalLoss, pairs_for
    from galaxalign_dist.train.model import build_model

    cfg = config.load("demo_cpu", [f"engine.zero_stage={zero_stage}", "data.batch_size=8"])
    torch.manual_seed(0)
    engine = build_engine(
        build_model(cfg.model, cfg.loss, with_symbol_tower=stage == 2), cfg, WORLD, total_steps=4
    )
    loss_fn = TriModalLoss(cfg.loss)
    images, tokens = _fixed_inputs(cfg)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):  # a couple of real optimizer steps so weights differ from init
        x = torch.randn(4, 3, 64, 64, generator=g)
        feats = engine(x, tokens, x.flip(-1))
        loss, _ = loss_fn(feats, feats["logit_scale"], torch.arange(4), pairs_for(stage, cfg.loss))
        engine.backward(loss)
        engine.step()
    checkpoint.save(engine, cfg, {"stage": stage, "epoch": 1, "step": 2}, rank, ckpt_dir=ckpt_dir)
    engine.eval()
    with torch.no_grad():  # ZeRO-3 forwards are collective: both ranks run them
        emb = {
            "image": engine.module.encode_image(images),
            "text": engine.module.encode_text(tokens),
            "symbol": engine.module.encode_symbol(images),
            "scale": engine.module.temperature_scale() if zero_stage != 3 else torch.zeros(1),
        }
    out[rank] = ({k: v.clone() for k, v in emb.items()}, partition_report(engine))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(900)  # two spawned DeepSpeed ranks; minutes on a loaded 2-core host
@pytest.mark.parametrize("zero_stage, stage", [(3, 2), (2, 1)])
def test_export_of_two_rank_zero_checkpoint_gives_same_embeddings(tmp_path, zero_stage, stage):
    ckpt = tmp_path / "ckpt"
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            _rank, args=(free_port(), zero_stage, stage, str(ckpt), out), nprocs=WORLD, start_method="spawn"
        )
        results = [out[r] for r in range(WORLD)]
    emb, report = results[0]
    if zero_stage == 3:
        # Each rank holds about half of every tower's parameters (DeepSpeed's partition sizes).
        for tower in ("image", "text", *(["symbol"] if stage == 2 else [])):
            for _, rep in results:
                frac = rep[tower]["local"] / rep[tower]["full"]
                assert 0.45 <= frac <= 0.56, (tower, frac)
    exported = export(ckpt, tmp_path / "export")
    assert (exported / "model.safetensors").exists()
    model = load_model(exported)
    assert model.has_symbol_tower == (stage == 2)
    images, tokens = _fixed_inputs(config.load("demo_cpu"))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), emb["image"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), emb["text"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_symbol(images), emb["symbol"], atol=1e-5, rtol=1e-5)
        if zero_stage != 3:
            torch.testing.assert_close(model.temperature_scale(), emb["scale"], atol=1e-5, rtol=1e-5)


def test_load_model_refuses_non_export_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        load_model(tmp_path)
