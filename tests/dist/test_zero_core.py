"""The distributed core on 2 gloo ranks with real DeepSpeed: stage 1 -> 2 copy, gradients and AdamW steps
against a plain-PyTorch reference, and what ZeRO-3 really keeps on each rank.

All 2-rank checks run in one spawned process group (spawning and importing DeepSpeed costs far more than
the checks); each test reads its part of the results.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import traceback
import warnings

import pytest
import torch
import torch.nn.functional as F

from multiproc import run_ranks

WORLD, LOCAL_B = 2, 4
N_CLASSES = 2  # few classes: class-aware targets see many same-class pairs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _cfg(zero_stage: int, precision: str = "fp32", **overrides):
    from galaxalign_dist import config

    base = {
        "engine.zero_stage": zero_stage,
        "engine.precision": precision,
        "data.batch_size": WORLD * LOCAL_B,
        "logging.progress": False,
        "logging.tensorboard": False,
        # Distinct per-tower learning rates and a visible weight decay: a parameter in the wrong group
        # shows up after one step. A constant schedule without warmup: the lr of step 1 is the base lr.
        "optim.lr.image": 1e-3,
        "optim.lr.text": 2e-3,
        "optim.lr.symbol": 3e-3,
        "optim.lr.temperature": 4e-3,
        "optim.weight_decay": 0.1,
        "optim.warmup_fraction": 0.0,
        "optim.schedule": "constant",
        # Adam divides by sqrt(v) + eps: with CLIP's 1e-6 a gradient element far below eps moves its weight
        # by lr * g / eps, which turns float32 noise in the gradient into visible noise in the weights.
        "optim.eps": 1e-3,
    }
    return config.load("demo_cpu", {**base, **overrides})


def _trainer(cfg):
    from galaxalign_dist.train.checkpoint import LocalReporter
    from galaxalign_dist.train.trainer import TrainData, Trainer

    return Trainer(cfg, TrainData(train=lambda epoch: [], steps_per_epoch=1), LocalReporter("unused"))


def _global_batch(cfg, seed: int) -> dict[str, torch.Tensor]:
    """The global batch (WORLD * LOCAL_B rows); rank r trains rows [r*LOCAL_B, (r+1)*LOCAL_B)."""
    from galaxalign_dist.train.model import build_tokenizer

    g = torch.Generator().manual_seed(seed)
    n = WORLD * LOCAL_B
    labels = torch.randint(0, N_CLASSES, (n,), generator=g)
    images = torch.randn(n, 3, 64, 64, generator=g)
    symbols = torch.randn(n, 3, 64, 64, generator=g)
    captions = build_tokenizer(cfg.model)([f"A picture of a class {i} galaxy" for i in range(N_CLASSES)])
    return {"image": images, "symbol": symbols, "tokens": captions[labels], "label": labels}


def _local(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {k: v[rank * LOCAL_B : (rank + 1) * LOCAL_B] for k, v in batch.items()}


def _full_fp32(engine) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Every parameter's full fp32 weights, gathered from the ZeRO shards (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (p if full is None else full).detach().float().cpu().clone()  # ZeRO-0: no masters
    return out


def _guard(fn, *args):  # noqa: ANN001, ANN202
    """One part's result, or its traceback: a failing part must not hide the others' results."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - reported to the test, which fails with it
        return {"error": traceback.format_exc()}


# ----------------------------------------------------------------------------- 1. stage 1 -> 2 copy

TRANSITIONS = [(2, "fp32"), (3, "fp32"), (2, "bf16"), (3, "bf16")]


def _stage_transition(rank: int) -> dict:
    from galaxalign_dist.train.loss import pairs_for

    out = {}
    for zero_stage, precision in TRANSITIONS:
        cfg = _cfg(zero_stage, precision)
        trainer = _trainer(cfg)
        engine = trainer._new_stage_engine(1)
        for step in range(2):  # stage-1 weights that differ from their initialisation
            trainer.train_step(engine, _local(_global_batch(cfg, step), rank), pairs_for(1, cfg.loss))
        before = _full_fp32(engine)
        engine2 = trainer._new_stage_engine(2, previous=engine)
        after = _full_fp32(engine2)
        wrong = [n for n in before if not torch.equal(after[n], before[n])]  # image, text, temperature
        wrong += [
            f"symbol.{n[len('image.') :]}"
            for n in before
            if n.startswith("image.") and not torch.equal(after[f"symbol.{n[len('image.') :]}"], before[n])
        ]
        towers = sorted({n.split(".", 1)[0] for n in after})
        out[(zero_stage, precision)] = {"wrong": wrong, "towers": towers, "n": len(after)}
        engine2.destroy()
    return out


# ----------------------------------------------------------------------------- 2. gradients and one step


def _reference_clip(a, b, scale, labels, targets: str) -> torch.Tensor:  # noqa: ANN001
    """Symmetric InfoNCE on the whole (global) batch, written out: a (N, D), b (N, D) unit rows."""
    logits = scale * a @ b.T  # (N, N)
    if targets == "diagonal":
        t = torch.eye(len(a))
    else:  # uniform over every same-class column
        same = (labels[:, None] == labels[None, :]).float()
        t = same / same.sum(dim=1, keepdim=True)
    loss_ab = -(t * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_ba = -(t.T * torch.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (loss_ab + loss_ba) / 2


def _reference_loss(model, batch, stage: int, targets: str) -> torch.Tensor:  # noqa: ANN001
    image = F.normalize(model.image(batch["image"]), dim=-1)
    text = F.normalize(model.text(batch["tokens"]), dim=-1)
    # Stage 1 encodes symbols with the image tower; stage 2 with the symbol tower.
    symbol = F.normalize((model.image if stage == 1 else model.symbol)(batch["symbol"]), dim=-1)
    scale = model.logit_scale.reshape(()).clamp(max=math.log(100.0)).exp()
    y = batch["label"]
    loss = _reference_clip(image, text, scale, y, targets) + _reference_clip(symbol, text, scale, y, targets)
    if stage == 2:
        loss = loss + _reference_clip(image, symbol, scale, y, targets)
    return loss


def _reference_adamw(model, cfg) -> torch.optim.AdamW:  # noqa: ANN001
    """torch AdamW with one group per (tower, decay): open_clip's no-decay rule, the config's lrs."""
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        tower = "temperature" if name == "logit_scale" else name.split(".", 1)[0]
        no_decay = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or name == "logit_scale"
        groups.setdefault((tower, no_decay), []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": getattr(cfg.optim.lr, tower),
                "weight_decay": 0.0 if no_decay else cfg.optim.weight_decay,
            }
            for (tower, no_decay), params in groups.items()
        ],
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
    )


def _compare(got: dict, ref: dict, atol: float, relative: bool) -> dict:
    """Names whose largest error exceeds atol (times the reference's largest value if `relative`)."""
    bad, worst = [], 0.0
    for name, r in ref.items():
        err = (got[name] - r).abs().max().item()
        scale = r.abs().max().item() if relative else 1.0
        worst = max(worst, err / max(scale, 1e-30))
        if err > atol * scale:
            bad.append((name, err, scale))
    return {"bad": bad[:5], "n_bad": len(bad), "worst": worst}


GRADIENT_ZERO_STAGES = (0, 1, 2, 3)
# float32 noise: a float32 reference differs from a float64 one by up to ~4e-5 of a parameter's largest
# gradient element. A gradient scaled by the number of workers is off by 100%.
GRAD_TOL = 2e-4
# Weights after the step: updates are ~lr = 1e-3; noise is ~lr * gradient noise / eps, below 1e-6.
PARAM_TOL = 1e-5


def _gradients_and_steps(rank: int) -> dict:
    from deepspeed.utils import safe_get_full_grad

    from galaxalign_dist.train.loss import TriModalLoss, pairs_for
    from galaxalign_dist.train.model import build_model
    from galaxalign_dist.train.step import batch_to_device, forward_backward

    out = {}
    for zero_stage in GRADIENT_ZERO_STAGES:
        for stage in (1, 2):
            cfg = _cfg(zero_stage)
            trainer = _trainer(cfg)
            engine = trainer._new_stage_engine(stage)  # seeds torch with cfg.run.seed, then builds
            torch.manual_seed(cfg.run.seed)
            ref = build_model(cfg.model, cfg.loss, with_symbol_tower=stage == 2, load_pretrained=False)
            opt = _reference_adamw(ref, cfg)
            for step, targets in enumerate(("diagonal", "class_aware")):  # two steps: Adam state carries
                batch = _global_batch(cfg, 100 * zero_stage + 10 * stage + step)
                loss_fn = TriModalLoss(dataclasses.replace(cfg.loss, targets=targets))
                local = batch_to_device(_local(batch, rank), engine.device, torch.float32, True)
                forward_backward(engine, loss_fn, local, pairs_for(stage, cfg.loss))
                # The gradient DeepSpeed reduced across ranks, before clipping and the step (collective).
                grads = {n: safe_get_full_grad(p).detach().float().cpu().clone() for n, p in engine.module.named_parameters()}  # fmt: skip
                engine.step()
                params = _full_fp32(engine)

                opt.zero_grad()
                _reference_loss(ref, batch, stage, targets).backward()
                ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
                torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optim.grad_clip)  # DeepSpeed's clipping
                opt.step()
                ref_params = {n: p.detach().clone() for n, p in ref.named_parameters()}
                out[(zero_stage, stage, targets)] = {
                    "grad": _compare(grads, ref_grads, GRAD_TOL, relative=True),
                    "param": _compare(params, ref_params, PARAM_TOL, relative=False),
                    "grad_norm": float(torch.cat([g.flatten() for g in ref_grads.values()]).norm()),
                }
            engine.destroy()
    return out


# ----------------------------------------------------------------------------- 5. ZeRO-3 memory


def _storages(tensors) -> dict[int, int]:  # noqa: ANN001
    """Distinct storages (data pointer -> bytes) behind some tensors: views and aliases count once."""
    held = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() and storage.nbytes():
                held[storage.data_ptr()] = storage.nbytes()
    return held


def _all_storages() -> dict[int, int]:
    """Every tensor storage alive in this process: what the rank really holds, buffers included."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated module attributes warns
        warnings.simplefilter("ignore", FutureWarning)
        return _storages([obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)])


def _state_storages(engine) -> dict[int, int]:  # noqa: ANN001
    """The model state a rank holds: parameters (the module's tensors and their ZeRO-3 partitions), the fp32
    master partitions and the optimizer's state (Adam moments)."""
    opt = engine.optimizer
    params = list(engine.module.parameters())
    tensors = [*params, *(p.ds_tensor for p in params if hasattr(p, "ds_tensor"))]
    tensors += list(getattr(opt, "fp32_partitioned_groups_flat", []))  # ZeRO-3's fp32 masters
    tensors += [v for state in opt.optimizer.state.values() for v in state.values()]
    return _storages(tensors)


def zero3_state(rank: int) -> dict:
    """A ZeRO-3 stage-2 engine after 2 steps: bytes of state and of everything it added, parameter status."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from galaxalign_dist.train.collectives import world
    from galaxalign_dist.train.loss import pairs_for

    before = _all_storages()
    size = world()[1]
    cfg = _cfg(3, "bf16", **{"data.batch_size": size * LOCAL_B, "engine.num_workers": size})
    trainer = _trainer(cfg)
    engine = trainer._new_stage_engine(2)
    gathered_between_steps = []
    for step in range(2):
        trainer.train_step(engine, _local(_global_batch(cfg, step), rank), pairs_for(2, cfg.loss))
        # Between steps every parameter is partitioned: the module's tensor is empty, the rank's slice
        # lives in ds_tensor.
        gathered_between_steps += [
            (step, name, str(p.ds_status), p.data.numel())
            for name, p in engine.module.named_parameters()
            if p.ds_status != ZeroParamStatus.NOT_AVAILABLE or p.data.numel() != 0
        ]
    added = {ptr: n for ptr, n in _all_storages().items() if ptr not in before}
    result = {
        "state": sum(_state_storages(engine).values()),
        "total": sum(added.values()),
        "n_params": sum(p.ds_numel for p in engine.module.parameters()),
        "gathered": gathered_between_steps[:10],
    }
    engine.destroy()
    return result


# ----------------------------------------------------------------------------- the 2-rank run


def _all_checks(rank: int) -> dict:
    return {
        "transition": _guard(_stage_transition, rank),
        "gradients": _guard(_gradients_and_steps, rank),
        "zero3": _guard(zero3_state, rank),
    }


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(_all_checks, world=WORLD)


def _part(results: list[dict], name: str) -> list[dict]:
    parts = [r[name] for r in results]
    for rank, part in enumerate(parts):
        assert "error" not in part, f"rank {rank}:\n{part.get('error')}"
    return parts


@pytest.mark.parametrize("zero_stage, precision", TRANSITIONS, ids=[f"zero{z}-{p}" for z, p in TRANSITIONS])
def test_stage_transition_copies_the_image_tower_exactly(two_ranks, zero_stage, precision):
    for part in _part(two_ranks, "transition"):
        r = part[(zero_stage, precision)]
        assert r["towers"] == ["image", "logit_scale", "symbol", "text"], r["towers"]
        # torch.equal on the gathered fp32 weights: the symbol tower IS the stage-1 image tower, and the
        # image and text towers and the temperature are their stage-1 selves.
        assert r["wrong"] == [], r["wrong"][:10]


GRADIENT_CASES = [(z, s, t) for z in (0, 1, 2, 3) for s in (1, 2) for t in ("diagonal", "class_aware")]


@pytest.mark.parametrize(
    "zero_stage, stage, targets", GRADIENT_CASES, ids=[f"zero{z}-stage{s}-{t}" for z, s, t in GRADIENT_CASES]
)
def test_deepspeed_gradient_and_adamw_step_equal_the_reference(two_ranks, zero_stage, stage, targets):
    for part in _part(two_ranks, "gradients"):
        r = part[(zero_stage, stage, targets)]
        # The gradient DeepSpeed reduced over 2 ranks = the gradient of the reference loss on the global
        # batch (a gradient scaled by the number of workers is off by 100%).
        assert r["grad"]["n_bad"] == 0, r["grad"]
        # One DeepSpeed optimizer step (clipping included) = torch AdamW on the reference.
        assert r["param"]["n_bad"] == 0, r["param"]


def test_zero3_partitions_every_parameter_and_holds_half_the_state(two_ranks, single_rank_group):
    one = zero3_state(0)  # the same engine (bf16, stage 2) trained by one rank alone: the unsharded state
    assert one["gathered"] == []
    for rank, part in enumerate(_part(two_ranks, "zero3")):
        assert part["gathered"] == [], part["gathered"]
        assert part["n_params"] == one["n_params"]
        # bf16 parameters, fp32 master partitions and Adam moments: each of 2 ranks holds half.
        ratio = part["state"] / one["state"]
        assert ratio <= 0.55, (rank, part["state"], one["state"], ratio)
        # Everything the rank holds, staging buffers included, stays below one unsharded copy of the state.
        assert part["total"] < one["state"], (rank, part["total"], one["state"])
