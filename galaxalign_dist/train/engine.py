"""DeepSpeed engine: ZeRO config from the run config, per-tower parameter groups, warmup + cosine schedule."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from galaxalign_dist.config import Config
from galaxalign_dist.train.model import TriModalCLIP, compile_towers


def set_accelerator(use_gpu: bool) -> None:
    """Pin DeepSpeed's accelerator before it is imported: on CPU hosts it would otherwise probe and warn."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


# DeepSpeed's default staging-buffer sizes (elements): reduce/all-gather buckets, ZeRO-3 prefetch bucket.
DEFAULT_BUCKET, DEFAULT_PREFETCH_BUCKET = int(5e8), int(5e7)


def deepspeed_config(cfg: Config, world_size: int, n_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a run; `n_params` (trainable parameters) caps the staging buffers."""
    e = cfg.engine
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if n_params and e.zero_stage >= 1:
        # A bucket larger than the model's whole gradient buys nothing, and DeepSpeed allocates it up front:
        # 5e8 fp32 elements are 1.9 GiB on every rank, ~500x the tiny model's gradient (tests/dist/test_zero_core.py).
        # (Rounded up to a multiple of 4096: DeepSpeed wants buckets aligned to its NCCL start alignment.)
        bucket = min(DEFAULT_BUCKET, -(-n_params // 4096) * 4096)
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
        if e.zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size=min(DEFAULT_PREFETCH_BUCKET, bucket))
    if e.zero_stage >= 2:
        zero.update(overlap_comm=e.use_gpu, contiguous_gradients=True)
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": e.use_gpu}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": e.use_gpu}
    if e.zero_stage == 3:
        # Keep parameters partitioned between steps (no persistence threshold surprises for the tiny
        # model), so the per-rank shard is what ZeRO-3 promises.
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=int(1e9))
    opt = cfg.optim
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": e.grad_accum_steps,
        "train_batch_size": cfg.micro_batch_size * e.grad_accum_steps * world_size,
        "gradient_clipping": opt.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": e.precision == "fp16", "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr.image,  # default only: every parameter group carries its own lr
                "betas": [opt.beta1, opt.beta2],
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
                # torch's AdamW: DeepSpeed's fused CPU Adam would JIT-compile for ~80 s on first use.
                # ZeRO-Offload needs DeepSpeed's CPU Adam, which DeepSpeed picks itself.
                **({} if e.offload_optimizer else {"torch_adam": True}),
                # DeepSpeed passes the remaining params to torch.optim.AdamW(..., fused=True): one kernel per
                # group (checked in tests/dist/test_switches.py).
                **({"fused": True} if opt.fused else {}),
            },
        },
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    # open_clip's rule: no weight decay on gains, biases, norms and the temperature.
    return (
        p.ndim < 2
        or "bias" in name
        or "ln" in name
        or "bn" in name
        or "norm" in name
        or name == "logit_scale"
    )


def param_groups(model: TriModalCLIP, cfg: Config) -> list[dict[str, Any]]:
    """One group per (tower, decay/no-decay): image, text, symbol and temperature have their own lr."""
    groups = []
    for tower, named in model.tower_parameters().items():
        lr = getattr(cfg.optim.lr, tower)
        for decay in (True, False):
            params = [p for n, p in named if _no_decay(n, p) != decay]
            if params:
                wd = cfg.optim.weight_decay if decay else 0.0
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": f"{tower}"})
    return groups


def lr_lambda(total_steps: int, warmup_fraction: float, schedule: str):  # noqa: ANN201
    """Multiplier on each group's base lr: linear warmup, then cosine to 0 (or constant)."""
    warmup = int(round(total_steps * warmup_fraction))

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def build_engine(model: TriModalCLIP, cfg: Config, world_size: int, total_steps: int):  # noqa: ANN201
    """deepspeed.initialize on the one module (no prepare_model): returns the DeepSpeed engine."""
    set_accelerator(cfg.engine.use_gpu)
    import deepspeed  # imported late: DS_ACCELERATOR must be set first

    if cfg.engine.compile:
        # Per tower, in place; compiled lazily at the first forward, after DeepSpeed has cast and flattened the
        # parameters (config.check rules out ZeRO-3, whose parameter gathering compiled graphs bypass).
        compile_towers(model, cfg.engine.compile_backend)
    sched = lr_lambda(total_steps, cfg.optim.warmup_fraction, cfg.optim.schedule)
    # In bf16/fp16 DeepSpeed casts the module first and then creates the fp32 master weights from the cast
    # parameters: the masters would be the rounded weights (pretrained ones, or stage 1's at the stage 1 -> 2
    # copy). Keep the exact fp32 values and write them into the masters afterwards.
    exact = (
        {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        if cfg.engine.precision != "fp32"
        else None
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg),
        config=deepspeed_config(
            cfg, world_size, n_params=sum(p.numel() for p in model.parameters() if p.requires_grad)
        ),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched),
    )
    if exact is not None:
        set_fp32_masters(engine, exact)
    return engine


def set_fp32_masters(engine, weights: dict[str, torch.Tensor]) -> None:  # noqa: ANN001
    """Write full fp32 weights (name -> tensor) into the optimizer's fp32 master copies (this rank's part).

    Local to each rank (no collective). DeepSpeed's safe_set_full_fp32_param slices past the end of a ZeRO-3
    parameter whose last partition is all padding (the 1-element temperature on 2 ranks), so ZeRO-3
    partitions are sliced here, padded as ZeRO-3 pads them.
    """
    import torch.distributed as dist
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    for name, p in engine.module.named_parameters():
        if name not in weights or not p.requires_grad:
            continue
        value = weights[name].to(torch.float32).flatten()
        if hasattr(p, "ds_id"):
            part = p.ds_tensor.numel()
            rank, size = (
                dist.get_rank(group=p.ds_process_group),
                dist.get_world_size(group=p.ds_process_group),
            )
            padded = value.new_zeros(part * size)
            padded[: value.numel()] = value
            safe_set_local_fp32_param(p, padded[rank * part : (rank + 1) * part].to(p.ds_tensor.device))
        else:
            safe_set_full_fp32_param(p, value.to(p.device))


def full_fp32_state_dict(engine) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The full fp32 weights on every rank (collective under ZeRO: every rank must call it).

    ZeRO 1-3 and bf16 keep fp32 master weights apart from the module's (possibly low-precision)
    parameters; DeepSpeed's safe_get_full_fp32_param assembles them. Without master copies (fp32,
    ZeRO-0) the module parameters are the weights.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            if hasattr(p, "ds_id"):  # frozen ZeRO-3 parameter: gather the module copy
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    full = p.detach().clone()
            else:
                full = p.detach()
        out[name] = full.detach().float().cpu().clone()
    persistent = set(engine.module.state_dict().keys())  # skips non-persistent buffers (attn masks)
    for name, b in engine.module.named_buffers():
        if name in persistent:
            out[name] = b.detach().cpu().clone()
    return out


def partition_report(engine) -> dict[str, dict[str, int]]:  # noqa: ANN001
    """Per tower: parameters this rank holds vs the full count (ZeRO-3 partitions; others hold all)."""
    report: dict[str, dict[str, int]] = {}
    for name, p in engine.module.named_parameters():
        tower = "temperature" if name == "logit_scale" else name.split(".", 1)[0]
        r = report.setdefault(tower, {"local": 0, "full": 0})
        if hasattr(p, "ds_tensor"):
            r["local"] += p.ds_tensor.numel()
            r["full"] += p.ds_numel
        else:
            r["local"] += p.numel()
            r["full"] += p.numel()
    return report
