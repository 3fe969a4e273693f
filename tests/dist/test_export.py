"""Export at every ZeRO stage and precision: 2 DeepSpeed ranks save shards, export consolidates them, and a
process that cannot import DeepSpeed or Ray reloads them and embeds as the trained engine did."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from galaxalign_dist.evaluation.bundle import load_model
from galaxalign_dist.train.export import export
from multiproc import run_ranks

WORLD = 2
# (ZeRO stage, precision, model stage): every ZeRO stage in fp32 and bf16; stage-1 models (no symbol tower)
# and stage-2 models both exported.
CASES = [(z, p, 2 if z % 2 else 1) for z in (0, 1, 2, 3) for p in ("fp32", "bf16")]
IDS = [f"zero{z}-{p}-stage{s}" for z, p, s in CASES]


def _cfg(zero_stage: int, precision: str):
    from galaxalign_dist import config

    return config.load(
        "demo_cpu",
        {
            "engine.zero_stage": zero_stage,
            "engine.precision": precision,
            "data.batch_size": 8,
            "logging.progress": False,
            "logging.tensorboard": False,
            # Large steps, and a temperature that moves: a stale or re-initialised value is visible.
            "optim.lr.image": 1e-2,
            "optim.lr.text": 1e-2,
            "optim.lr.symbol": 1e-2,
            "optim.lr.temperature": 0.1,
            "optim.warmup_fraction": 0.0,
        },
    )


def _fixed_inputs():
    from galaxalign_dist import config
    from galaxalign_dist.train.model import build_tokenizer

    g = torch.Generator().manual_seed(123)
    images = torch.randn(4, 3, 64, 64, generator=g)
    tokens = build_tokenizer(config.load("demo_cpu").model)(
        ["A picture of an edge-on disk galaxy", "A picture of a round smooth galaxy"] * 2
    )
    return images, tokens


def _train_and_save(rank: int, root: str) -> dict:
    """Each case: 2 optimizer steps on 2 ranks, a checkpoint, and the engine's own embeddings and weights."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from galaxalign_dist.train import checkpoint
    from galaxalign_dist.train.checkpoint import LocalReporter
    from galaxalign_dist.train.loss import pairs_for
    from galaxalign_dist.train.trainer import TrainData, Trainer

    inputs = load_file(str(Path(root, "inputs.safetensors")))
    images, tokens = inputs["images"], inputs["tokens"]
    out = {}
    for zero_stage, precision, stage in CASES:
        cfg = _cfg(zero_stage, precision)
        trainer = Trainer(cfg, TrainData(train=lambda e: [], steps_per_epoch=1), LocalReporter(root))
        engine = trainer._new_stage_engine(stage)
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            x = torch.randn(4, 3, 64, 64, generator=g)
            batch = {"image": x, "symbol": x.flip(-1), "tokens": tokens, "label": torch.arange(4)}
            trainer.train_step(engine, batch, pairs_for(stage, cfg.loss))
        ckpt = Path(root, "-".join(map(str, (zero_stage, precision, stage))))
        checkpoint.save(engine, cfg, {"stage": stage, "epoch": 1, "step": 2}, rank, ckpt_dir=str(ckpt))
        # The weights the engine trains (fp32 masters where DeepSpeed keeps them; collective under ZeRO).
        masters = {}
        for name, p in engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            masters[name] = (p if full is None else full).detach().float().contiguous().clone()
        engine.eval()
        dtype = trainer.dtype
        with torch.no_grad(), deepspeed.zero.GatheredParameters([engine.module.logit_scale]):
            module = engine.module  # ZeRO-3 forwards are collective: both ranks run them
            emb = {
                "image": module.encode_image(images.to(dtype)).float(),
                "text": module.encode_text(tokens).float(),
                "symbol": module.encode_symbol(images.to(dtype)).float(),
                "temperature": module.temperature_scale().float().reshape(1),
            }
        if rank == 0:
            save_file(
                {k: v.contiguous() for k, v in emb.items()}, str(ckpt / "engine_embeddings.safetensors")
            )
            save_file(masters, str(ckpt / "engine_weights.safetensors"))
        out[(zero_stage, precision, stage)] = str(ckpt)
        engine.destroy()
    return out


# Runs in a fresh interpreter where `import deepspeed` and `import ray` fail: loading an export needs neither.
RELOAD = textwrap.dedent(
    """
    import json, sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("deepspeed", "ray"):
                raise ImportError(f"{name} may not be imported when loading an export")
            return None

    sys.meta_path.insert(0, Refuse())  # before galaxalign_dist is imported
    for blocked in ("deepspeed", "ray"):
        try:
            __import__(blocked)
            raise SystemExit(f"{blocked} imported despite the block")
        except ImportError:
            pass

    import torch
    from safetensors.torch import save_file

    from safetensors.torch import load_file

    from galaxalign_dist.evaluation.bundle import load_model

    inputs = load_file(sys.argv[2])
    images, tokens = inputs["images"], inputs["tokens"]
    for export_dir, dtype in json.loads(sys.argv[1]):
        model = load_model(export_dir).to(getattr(torch, dtype))  # the engine's compute precision
        with torch.no_grad():
            emb = {
                "image": model.encode_image(images.to(model.logit_scale.dtype)).float(),
                "text": model.encode_text(tokens).float(),
                "symbol": model.encode_symbol(images.to(model.logit_scale.dtype)).float(),
                "temperature": model.temperature_scale().float().reshape(1),
            }
        save_file({k: v.contiguous() for k, v in emb.items()}, export_dir + "/reloaded.safetensors")
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("deepspeed", "ray"))
    assert not leaked, leaked
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    images, tokens = _fixed_inputs()
    save_file({"images": images, "tokens": tokens}, str(root / "inputs.safetensors"))
    ckpts = run_ranks(_train_and_save, str(root), world=WORLD)[0]
    exports = {case: export(ckpt, f"{ckpt}-export") for case, ckpt in ckpts.items()}
    jobs = [(str(exports[case]), "bfloat16" if case[1] == "bf16" else "float32") for case in CASES]
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, json.dumps(jobs), str(root / "inputs.safetensors")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {case: (Path(ckpts[case]), exports[case]) for case in CASES}


@pytest.mark.slow  # 8 engines on 2 spawned ranks, 8 exports and a reload: minutes on 2 cores
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_export_reloads_without_deepspeed_or_ray_and_embeds_as_the_engine(exported, case):
    zero_stage, precision, stage = case
    ckpt, export_dir = exported[case]
    # The export holds exactly the weights the engine trained: its fp32 masters, temperature included.
    weights, masters = (
        load_file(export_dir / "model.safetensors"),
        load_file(ckpt / "engine_weights.safetensors"),
    )
    assert weights.keys() == masters.keys() and "logit_scale" in weights
    assert [k for k in weights if not torch.equal(weights[k], masters[k])] == []
    assert json.loads((export_dir / "export.json").read_text())["has_symbol_tower"] == (stage == 2)
    # Reloaded in a process where deepspeed and ray cannot be imported, in the engine's compute precision.
    engine = load_file(ckpt / "engine_embeddings.safetensors")
    reloaded = load_file(export_dir / "reloaded.safetensors")
    # fp32: the same weights through the same ops (ZeRO-3's own linear differs in the last bits: ~1e-7).
    # bf16: the engine's bf16 weights are the rounded masters, as the reloaded model's; ZeRO-3's linear
    # rounds differently by at most one bf16 ulp of a unit row's elements (< 1: 2**-8), seen 2**-9.
    atol = 1e-6 if precision == "fp32" else 2**-8
    for key in ("image", "text", "symbol"):
        torch.testing.assert_close(reloaded[key], engine[key], atol=atol, rtol=0, msg=f"{key} embeddings")
    assert torch.equal(reloaded["temperature"], engine["temperature"])


def test_load_model_refuses_non_export_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        load_model(tmp_path)
