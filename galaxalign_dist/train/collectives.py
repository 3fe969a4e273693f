"""Collectives for the contrastive loss: all-gather with exact gradients, safe on gloo and NCCL."""

from __future__ import annotations

import torch
import torch.distributed as dist

# Why not torch.distributed._functional_collectives (all_gather_tensor_autograd / all_gather_single_autograd):
# on gloo (torch 2.15) several of its in-flight autograd all-gathers corrupt the heap and kill a worker with
# `malloc(): unaligned tcache chunk detected` or SIGSEGV (docs/upstream/gloo_functional_all_gather.md). These
# are plain c10d calls, each complete when it returns on gloo; on NCCL they are stream-ordered and never block
# the host, so the step loses nothing (the loss needs every gathered row before it can start anyway).


def world() -> tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """(B, ...) local rows -> (world*B, ...) in rank order; backward returns each rank its rows' summed grad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        # Every rank's loss depends on every rank's rows: the gradient of rank r's rows is the sum over
        # all ranks of d(loss_q)/d(rows_r). (Data-parallel averaging of parameter grads then divides by world.)
        rows = slice(ctx.rank * ctx.rows, (ctx.rank + 1) * ctx.rows)
        if dist.get_backend() == dist.Backend.NCCL:
            out = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad.contiguous())
            return out
        # gloo has no native reduce-scatter (torch emulates it); all_reduce is its most used collective.
        total = grad.contiguous().clone()  # autograd may hand the same buffer to other consumers
        dist.all_reduce(total)
        return total[rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, D) local rows -> (world*B, D) in rank order; gradients flow back to every rank's rows."""
    if world()[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) local rows -> (world*B, ...) in rank order, outside autograd (labels, eval embeddings)."""
    size = world()[1]
    if size == 1:
        return x
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out
