"""GPU benchmark: ViT-B-16 tri-modal training samples/s/GPU and MFU, bf16, ZeRO 1/2/3, global batch 256/512."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402
import torch  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, from the vendors' datasheets. Matched by substring of
# torch.cuda.get_device_name(); override with --peak-tflops for anything else.
PEAK_BF16 = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "GH200": 989e12,
    "A100": 312e12,
    "A6000": 154.8e12,  # RTX A6000 (the paper's GPU)
    "L40S": 362e12,
    "L4": 121e12,
}


def peak_flops(name: str, override_tflops: float | None) -> float:
    if override_tflops:
        return override_tflops * 1e12
    for key, value in PEAK_BF16.items():  # most specific names first (dict order)
        if key in name:
            return value
    return float("nan")


def _rank_main(rank: int, world: int, port: int, spec: dict[str, Any], out_dir: str) -> None:
    """One rank: NCCL, the library's model/engine/loss, synthetic on-GPU batches, timed optimizer steps."""
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    from galaxalign_dist import config as config_mod
    from galaxalign_dist.train.engine import build_engine
    from galaxalign_dist.train.loss import TriModalLoss, pairs_for
    from galaxalign_dist.train.model import build_model, build_tokenizer, image_size

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    cfg = config_mod.load(
        None,
        {
            "model.name": spec["model"],
            "model.pretrained": "none",  # weights do not change the speed; no download
            "model.grad_checkpointing": spec["grad_checkpointing"],
            "data.batch_size": spec["global_batch"],
            "engine.zero_stage": spec["zero"],
            "engine.precision": "bf16",
            "engine.use_gpu": True,
            "engine.num_workers": world,
            "engine.grad_accum_steps": spec["grad_accum"],
            "optim.warmup_fraction": 0.0,
        },
    )
    stage, mb = spec["stage"], cfg.micro_batch_size
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, with_symbol_tower=stage == 2, load_pretrained=False)
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, cfg, world, total_steps=1000)
    loss_fn, pairs = TriModalLoss(cfg.loss), pairs_for(stage, cfg.loss)
    s, ctx = image_size(cfg.model), build_tokenizer(cfg.model)(["x"]).shape[1]
    dev = engine.device
    g = torch.Generator(device=dev).manual_seed(rank)
    # Synthetic batches already on the GPU: this measures the model step, not the data pipeline.
    images = torch.randn(mb, 3, s, s, device=dev, generator=g, dtype=torch.bfloat16)
    symbols = torch.randn(mb, 3, s, s, device=dev, generator=g, dtype=torch.bfloat16)
    tokens = torch.randint(1, 49000, (mb, ctx), device=dev, generator=g)
    labels = torch.arange(mb, device=dev) + rank * mb

    def micro_step() -> None:
        out = engine(images, tokens, symbols)
        loss, _ = loss_fn(out, out["logit_scale"], labels, pairs)
        engine.backward(loss)
        engine.step()

    def optimizer_step() -> None:
        for _ in range(cfg.engine.grad_accum_steps):
            micro_step()

    try:
        for _ in range(spec["warmup"]):
            optimizer_step()
        torch.cuda.synchronize()
        # Model FLOPs of one forward+backward micro step on this rank (no optimizer, no recompute counted
        # twice: FlopCounterMode counts what runs, so with grad checkpointing this is hardware FLOPs).
        with FlopCounterMode(display=False) as counter:
            out = engine(images, tokens, symbols)
            loss, _ = loss_fn(out, out["logit_scale"], labels, pairs)
            engine.backward(loss)
        engine.step()
        flops_micro = counter.get_total_flops()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(spec["steps"]):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            optimizer_step()
            torch.cuda.synchronize()  # host sync: time the whole step, not its launch
            times.append(time.perf_counter() - t0)
        result = {
            "ok": True,
            "step_s": times,
            "flops_per_step_rank": flops_micro * cfg.engine.grad_accum_steps,
            "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "n_params": n_params,
            "micro_batch": mb,
        }
    except torch.OutOfMemoryError as e:
        result = {"ok": False, "error": f"CUDA OOM at micro batch {mb}: {str(e).splitlines()[0]}"}
    if rank == 0:
        result["device"] = torch.cuda.get_device_name(rank)
        Path(out_dir, "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run(spec: dict[str, Any], world: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="galaxalign-gpu-bench-") as out_dir:
        mp.spawn(_rank_main, args=(world, port, spec, out_dir), nprocs=world, join=True)
        return json.loads(Path(out_dir, "result.json").read_text())


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vit-b-16-random", help="a flavour or open_clip name (e.g. ViT-B-16)")
    ap.add_argument("--batches", default="256,512", help="global batches")
    ap.add_argument("--zero", default="1,2,3", help="ZeRO stages")
    ap.add_argument("--stage", type=int, default=2, choices=(1, 2), help="2 = three towers, three losses")
    ap.add_argument("--gpus", type=int, default=0, help="0 = every visible GPU")
    ap.add_argument(
        "--grad-accum", type=int, default=1, help="micro steps per optimizer step (fewer negatives)"
    )
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak per GPU, TFLOP/s")
    ap.add_argument("--quick", action="store_true", help="global batch 32, ZeRO-2, 3 steps")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(
            "gpu_train.py: CUDA is not available on this machine (torch.cuda.is_available() is False); "
            "this benchmark needs NVIDIA GPUs. Run it on a GPU node, e.g. "
            "`python benchmarks/gpu_train.py` (all visible GPUs) or `--gpus 1`."
        )
    # The CPU benchmarks and tests pin DeepSpeed to its CPU accelerator; this one needs CUDA.
    os.environ["DS_ACCELERATOR"] = "cuda"
    if args.quick:
        args.batches, args.zero, args.steps, args.warmup = "32", "2", 3, 1
    world = args.gpus or torch.cuda.device_count()
    common.print_machine()
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name, args.peak_tflops)
    print(f"GPUs: {world} x {name}; bf16 dense peak {peak / 1e12:.0f} TFLOP/s per GPU", flush=True)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for zero in (int(z) for z in args.zero.split(",")):
            spec = {
                "model": args.model,
                "global_batch": batch,
                "zero": zero,
                "stage": args.stage,
                "grad_accum": args.grad_accum,
                "grad_checkpointing": args.grad_checkpointing,
                "warmup": args.warmup,
                "steps": args.steps,
            }
            r = run(spec, world)
            if not r["ok"]:
                print(f"global batch {batch} ZeRO-{zero}: {r['error']}", flush=True)
                rows.append((batch, zero, float("nan"), float("nan"), float("nan")))
                continue
            step = common.median(r["step_s"])
            per_gpu = batch / step / world
            mfu = r["flops_per_step_rank"] / step / peak
            rows.append((batch, zero, per_gpu, mfu, r["max_mem_gib"]))
            print(
                f"global batch {batch} (micro {r['micro_batch']}/GPU) ZeRO-{zero}: {per_gpu:.1f} samples/s/GPU, "
                f"step {step * 1e3:.0f} ms, {r['flops_per_step_rank'] / 1e12:.2f} TFLOP/step/GPU, "
                f"MFU {mfu:.3f}, peak mem {r['max_mem_gib']:.1f} GiB",
                flush=True,
            )
    print(f"\n{'global batch':>12}{'ZeRO':>6}{'samples/s/GPU':>15}{'MFU':>8}{'mem GiB':>9}")
    for batch, zero, per_gpu, mfu, mem in rows:
        print(f"{batch:>12}{zero:>6}{per_gpu:>15.1f}{mfu:>8.3f}{mem:>9.1f}")
    best = max((r for r in rows if math.isfinite(r[2])), key=lambda r: r[2], default=None)
    value = best[2] if best else float("nan")
    common.summary("gpu_samples_per_s_per_gpu", value)
    return value


if __name__ == "__main__":
    main()
