"""The GPU speed switches (engine.compile, optim.fused, model.channels_last, model.grad_checkpointing) change
how a step is computed, not what: on CPU, through the real build_engine + forward_backward, each gives the
loss, the gradients and the optimizer update of the plain step.

Tolerance: every comparison is the largest absolute difference of a tensor divided by the largest magnitude of
the reference tensor (so one number fits weights, gradients and updates of any scale), at most TOL = 1e-4 in
fp32. Why that bound: these switches only reorder floating-point work (fused kernels, another convolution
algorithm, a recomputed forward, one fused optimizer kernel), so the differences are rounding: fp32 has a
relative precision of 1.2e-7, and sums over a few hundred terms through a few layers amplify it to about
1e-6 (measured below each test). A real defect (a dropped gradient, a wrong layout, a parameter the optimizer
does not see) gives an error of order 1. 1e-4 sits two orders above the rounding and four below a defect.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from galaxalign_dist import config
from galaxalign_dist.config import ConfigError
from galaxalign_dist.train.engine import build_engine, full_fp32_state_dict
from galaxalign_dist.train.loss import TriModalLoss, pairs_for
from galaxalign_dist.train.model import build_model, compile_towers
from galaxalign_dist.train.step import forward_backward

TOL = 1e-4
BATCH = 8


@pytest.fixture
def engine_env(single_rank_group, monkeypatch):
    # DeepSpeed JIT-builds its CPU shared-memory op into TORCH_EXTENSIONS_DIR; two venvs sharing the default
    # directory rebuild it in turn and block each other on its lock. One directory per venv (as benchmarks/).
    per_venv = hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]
    monkeypatch.setenv(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions_by_venv" / per_venv)
    )


def _cfg(**overrides) -> config.Config:
    base = {
        "model.name": "tiny",
        "data.batch_size": BATCH,
        "engine.num_workers": 1,
        "engine.zero_stage": 1,
        "optim.schedule": "constant",
        "optim.warmup_fraction": 0.0,
        # A learning rate that moves the weights measurably in two steps (Adam's first step is ~lr * sign).
        "optim.lr.image": 1e-3,
        "optim.lr.text": 1e-3,
        "optim.lr.symbol": 1e-3,
    }
    return config.load(None, {**base, **overrides})


def _batch(size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(BATCH, 3, size, size, generator=g),
        "symbol": torch.randn(BATCH, 3, size, size, generator=g),
        "tokens": torch.randint(1, 49000, (BATCH, 32), generator=g),
        "label": torch.arange(BATCH),
    }


def _train(cfg: config.Config, steps: int = 3) -> dict[str, object]:
    """Stage-2 steps through build_engine + forward_backward: every step's loss, the first step's gradients
    and the first optimizer step's weight update."""
    from deepspeed.utils import safe_get_full_grad

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, with_symbol_tower=True, load_pretrained=False)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    engine = build_engine(model, cfg, world_size=1, total_steps=10)
    loss_fn, pairs, batch = TriModalLoss(cfg.loss), pairs_for(2, cfg.loss), _batch()
    losses, grads, updates, keys = [], {}, {}, []
    for step in range(steps):
        loss, _ = forward_backward(engine, loss_fn, batch, pairs)
        if step == 0:
            for n, p in engine.module.named_parameters():
                grads[n] = safe_get_full_grad(p).detach().float().clone()
        engine.step()
        if step == 0:
            after = full_fp32_state_dict(engine)
            updates, keys = {n: after[n] - before[n] for n in before}, list(after)
        losses.append(loss.detach().float())
    engine.destroy()
    return {"loss": torch.stack(losses), "grads": grads, "updates": updates, "keys": keys}


def _max_rel(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest max|got - ref| / max|ref| over tensors, and the tensor it is in."""
    assert got.keys() == ref.keys()
    return max((float((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)), k) for k in ref)


def _assert_same_step(
    got: dict[str, object], ref: dict[str, object], updates: bool = False
) -> dict[str, float]:
    """Losses of every step and the first step's gradients (and, with `updates`, its weight update) within TOL.

    Updates are compared only where the gradients going in are identical (the fused optimizer test): Adam's
    first update is -lr * g / (|g| + eps), so a gradient that is rounding noise (the attention key bias,
    whose exact gradient is 0, comes out as ~1e-9) becomes an update of up to lr * 1e-3 that changes with any
    rounding difference. The later losses show whether the updates that matter agree.
    """
    (grads, grads_at), (upd, upd_at) = (
        _max_rel(got["grads"], ref["grads"]),
        _max_rel(got["updates"], ref["updates"]),
    )
    errors = {"loss": float(((got["loss"] - ref["loss"]).abs() / ref["loss"].abs()).max()), "grads": grads}
    if updates:
        errors["updates"] = upd
    print(f"max relative differences: {errors} (grads at {grads_at}; update {upd:.2e} at {upd_at})")  # -s
    assert got["keys"] == ref["keys"]
    assert all(e <= TOL for e in errors.values()), (errors, grads_at, upd_at)
    return errors


_BASELINES: dict[tuple[str, int], dict[str, object]] = {}


def _baseline(model: str, zero: int) -> dict[str, object]:
    if (model, zero) not in _BASELINES:
        _BASELINES[model, zero] = _train(_cfg(**{"model.name": model, "engine.zero_stage": zero}))
    return _BASELINES[model, zero]


# ----------------------------------------------------------------------------- config validation


def test_switches_are_config_fields_with_clear_errors():
    cfg = _cfg(
        **{"engine.compile": True, "optim.fused": True, "model.channels_last": True, "engine.zero_stage": 2}
    )
    assert cfg.engine.compile and cfg.optim.fused and cfg.model.channels_last
    with pytest.raises(ConfigError, match=r"engine.compile: not supported with engine.zero_stage=3"):
        _cfg(**{"engine.compile": True, "engine.zero_stage": 3})
    with pytest.raises(ConfigError, match=r"optim.fused: .*offload_optimizer"):
        _cfg(**{"optim.fused": True, "engine.offload_optimizer": True})
    with pytest.raises(ConfigError, match=r"engine.compile_backend: 'tensorrt' is not one of"):
        _cfg(**{"engine.compile_backend": "tensorrt"})
    with pytest.raises(ConfigError, match=r"optim.fused: expected true/false"):
        _cfg(**{"optim.fused": "yes"})


def test_symbol_tower_added_after_compile_runs_its_own_weights():
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, load_pretrained=False)
    compile_towers(model, "eager")
    keys = list(model.state_dict())
    model.add_symbol_tower()
    with torch.no_grad():
        for p in model.symbol.parameters():
            p.mul_(1.5)
    x = _batch()["image"]
    assert model.symbol._compiled_call_impl is not None
    assert not torch.allclose(model.symbol(x), model.image(x))  # not the image tower's bound forward
    assert [k for k in model.state_dict() if not k.startswith("symbol.")] == keys  # no _orig_mod. prefixes


# ----------------------------------------------------------------------------- equal steps


@pytest.mark.timeout(600)
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_fused_adamw_reaches_torch_and_steps_the_same(engine_env, zero):
    from deepspeed.utils import safe_get_full_grad  # noqa: F401 - DeepSpeed importable before building

    cfg = _cfg(**{"optim.fused": True, "engine.zero_stage": zero})
    torch.manual_seed(0)
    engine = build_engine(
        build_model(cfg.model, cfg.loss, with_symbol_tower=True, load_pretrained=False), cfg, 1, 10
    )
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.AdamW):  # DeepSpeed's ZeRO / precision wrappers hold torch's AdamW
        opt = opt.optimizer
    assert opt.defaults["fused"] is True and all(g["fused"] for g in opt.param_groups)
    engine.destroy()
    if zero == 1:  # equality once (the optimizer kernel does not depend on the ZeRO stage)
        _assert_same_step(_train(cfg), _baseline("tiny", 1), updates=True)


@pytest.mark.timeout(600)
def test_compiled_towers_train_the_same_under_zero(engine_env):
    # aot_eager: dynamo's graph capture + AOTAutograd's joint forward/backward graph, without code generation
    # (inductor's C++ compile takes minutes on a 2-core host; see the slow test below).
    got = _train(_cfg(**{"engine.compile": True, "engine.compile_backend": "aot_eager"}))
    _assert_same_step(got, _baseline("tiny", 1))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_inductor_compiled_towers_train_the_same(engine_env):
    got = _train(
        _cfg(**{"engine.compile": True, "engine.compile_backend": "inductor", "engine.zero_stage": 2})
    )
    _assert_same_step(got, _baseline("tiny", 2))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("model", ["tiny", "tiny-convnext"])
def test_grad_checkpointing_trains_the_same(engine_env, model):
    got = _train(_cfg(**{"model.name": model, "model.grad_checkpointing": True, "engine.zero_stage": 2}))
    _assert_same_step(got, _baseline(model, 2))


@pytest.mark.timeout(600)
def test_channels_last_convnext_trains_the_same_and_runs_nhwc(engine_env):
    cfg = _cfg(**{"model.name": "tiny-convnext", "model.channels_last": True, "engine.zero_stage": 2})
    model = build_model(cfg.model, cfg.loss, with_symbol_tower=True, load_pretrained=False)
    seen = []
    for tower in (model.image, model.symbol):
        conv = next(m for m in tower.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous()  # DeepSpeed needs contiguous parameters (model.set_channels_last)
        conv.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
    model(_batch()["image"], _batch()["tokens"], _batch()["symbol"])
    assert seen == [True, True]  # the stem convolution of both towers gets NHWC inputs
    _assert_same_step(_train(cfg), _baseline("tiny-convnext", 2))
