"""One training step on a DeepSpeed engine: batch to the device, forward, gathered loss, backward, optimizer step."""

from __future__ import annotations

from typing import Any

import torch

from galaxalign_dist.train.loss import Pair, TriModalLoss

Batch = dict[str, torch.Tensor]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def batch_to_device(batch: Batch, device: torch.device, dtype: torch.dtype, use_symbols: bool) -> Batch:
    """Images (and symbols, when the run uses them) in the run's precision; tokens and labels as they are."""
    out = {
        "image": batch["image"].to(device, dtype, non_blocking=True),
        "tokens": batch["tokens"].to(device, non_blocking=True),
        "label": batch["label"].to(device, non_blocking=True),
    }
    if use_symbols:
        out["symbol"] = batch["symbol"].to(device, dtype, non_blocking=True)
    return out


def forward_backward(
    engine: Any, loss_fn: TriModalLoss, batch: Batch, pairs: tuple[Pair, ...]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward the three towers, the loss against every worker's features, backward. Returns (loss, per pair)."""
    out = engine(batch["image"], batch["tokens"], batch.get("symbol"))
    loss, parts = loss_fn(out, out["logit_scale"], batch["label"], pairs)
    engine.backward(loss)
    return loss, parts


def train_step(
    engine: Any, loss_fn: TriModalLoss, batch: Batch, pairs: tuple[Pair, ...]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """forward_backward, then the optimizer step (DeepSpeed steps only at a gradient-accumulation boundary)."""
    loss, parts = forward_backward(engine, loss_fn, batch, pairs)
    engine.step()
    return loss, parts
