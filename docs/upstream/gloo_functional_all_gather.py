"""Minimal reproducer: torch's functional autograd all-gather on gloo kills a process with heap corruption.

Two gloo processes on one host, no Ray, no DeepSpeed, nothing but torch:
    python gloo_functional_all_gather.py funcol 3000   # crashes (SIGSEGV / SIGABRT) on the machines we tried
    python gloo_functional_all_gather.py c10d 3000     # the same step through plain c10d calls: runs to the end
funcol  three torch.distributed._functional_collectives.all_gather_single_autograd calls per step, all issued
        before any result is used, then backward (what a contrastive loss over three modalities does)
c10d    the same three gathers as a torch.autograd.Function over dist.all_gather_into_tensor (forward) and
        dist.all_reduce (backward): what galaxalign_dist.train.collectives does instead
Prints its step rate only; a crash shows as `ProcessExitedException: process N terminated with signal ...`.
"""

import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp


class AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        ctx.rows = x.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        r = dist.get_rank()
        return total[r * ctx.rows : (r + 1) * ctx.rows]


def gather(mode, x):
    if mode == "funcol":
        return funcol.all_gather_single_autograd(x, 0, dist.group.WORLD)
    return AllGather.apply(x)


def run(rank, world, port, steps, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    w = torch.nn.Linear(256, 64)
    t0 = time.time()
    for i in range(steps):
        feats = [torch.nn.functional.normalize(w(torch.randn(32, 256)), dim=-1) for _ in range(3)]
        gathered = [gather(mode, f) for f in feats]  # all issued before any is used
        loss = sum((f @ g.T).logsumexp(1).mean() for f, g in zip(feats, reversed(gathered), strict=True))
        loss.backward()
        with torch.no_grad():
            for p in w.parameters():
                dist.all_reduce(p.grad)
                p -= 1e-3 * p.grad
                p.grad = None
        if rank == 0 and i % 250 == 0:
            print(f"{mode}: step {i} ({time.time() - t0:.0f} s)", flush=True)
    if rank == 0:
        print(f"{mode}: {steps} steps done in {time.time() - t0:.0f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, steps = sys.argv[1], int(sys.argv[2])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(2, port, steps, mode), nprocs=2)
