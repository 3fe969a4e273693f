"""Per-rank bytes of parameters, gradients and optimizer state that DeepSpeed ZeRO 0-3 holds with 2 CPU ranks."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (sets HF_HUB_OFFLINE / DS_ACCELERATOR before torch imports)
import torch  # noqa: E402

from galaxalign_dist.launch.train import free_port  # noqa: E402

CATEGORIES = ("params", "master", "grads", "optim", "buffers", "other")
COUNTED = ("params", "master", "grads", "optim")  # model states; comm buffers are shown apart


# ----------------------------------------------------------------------------- finding the tensors


class Ledger:
    """Bytes per category, each storage counted once (flat buffers and their views share one storage).

    A storage is charged to the first category it is seen under; the order of `collect` makes that the
    most specific one (module parameters first). Aliases are recorded so the table can say e.g. that
    ZeRO-3 fp32 master weights ARE the parameter partitions (no copy).
    """

    def __init__(self) -> None:
        self.owner: dict[int, str] = {}
        self.nbytes: dict[int, int] = {}
        self.paths: dict[str, list[str]] = defaultdict(list)
        self.aliases: set[tuple[str, str]] = set()

    def add(self, t: torch.Tensor, category: str, path: str) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return  # e.g. a ZeRO-3 module parameter between gathers: an empty placeholder
        if key in self.owner:
            if self.owner[key] != category:
                self.aliases.add((category, self.owner[key]))
            return
        self.owner[key], self.nbytes[key] = category, size
        if len(self.paths[category]) < 6:
            self.paths[category].append(f"{path} {tuple(t.shape)} {t.dtype}".replace("torch.", ""))

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for key, cat in self.owner.items():
            out[cat] += self.nbytes[key]
        return out


def _category(path: str) -> str:
    """Which model state an optimizer attribute path holds (names from DeepSpeed 0.19.8's zero/ sources)."""
    p = path.lower()
    if "ipg" in p or "bucket" in p or "allgather" in p:
        return "buffers"  # reduce/all-gather staging buffers (reduce_bucket_size elements by default)
    if p.endswith(".grad") or "grad" in p:
        # averaged_gradients (ZeRO-1/2 flat partition of reduced grads), grads_in_partition (ZeRO-2
        # contiguous gradients), grad_partitions_flat_buffer (ZeRO-3 gradient shard), fp32 .grad.
        return "grads"
    if ".state[" in p:
        return "optim"  # torch AdamW state of the (flat, partitioned) fp32 master params
    if "fp32" in p or "master_params" in p:
        # single_partition_of_fp32_groups (ZeRO-1/2: a CLONE of this rank's slice, even in fp32),
        # fp32_partitioned_groups_flat (ZeRO-3: the parameter shard itself when dtypes match).
        return "master"
    if any(k in p for k in ("bit16", "fp16", "lp_param", "ds_tensor", "param")):
        # bit16_groups_flat (ZeRO-1/2 full flat copy the module params view), fp16_partitioned_groups_flat
        # and lp_param_buffer (ZeRO-3 parameter shards: the ds_tensors view these).
        return "params"
    return "other"


def _walk(obj: Any, path: str, ledger: Ledger, seen: set[int], depth: int) -> None:
    """Every tensor reachable from a DeepSpeed optimizer object's attributes and containers."""
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        ledger.add(obj, _category(path), path)
        for attr in ("grad", "ds_tensor", "grad_accum"):
            sub = getattr(obj, attr, None)
            if isinstance(sub, torch.Tensor):
                _walk(sub, f"{path}.{attr}", ledger, seen, depth + 1)
        return
    if isinstance(obj, torch.nn.Module) or type(obj).__name__ == "DeepSpeedEngine":
        return  # the module's tensors are collected first, by name
    if isinstance(obj, dict):
        for k, v in obj.items():
            label = k if isinstance(k, (str, int)) else type(k).__name__
            _walk(v, f"{path}[{label}]", ledger, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", ledger, seen, depth + 1)
    elif isinstance(obj, torch.optim.Optimizer) or type(obj).__module__.startswith("deepspeed"):
        attrs = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
        if isinstance(obj, torch.optim.Optimizer):
            # The tensors a torch optimizer updates: module params under ZeRO-0 fp32 (already charged), else
            # DeepSpeed's fp32 master copies (flat partitions), hence the "master_params" label.
            groups = [g["params"] for g in obj.param_groups]
            attrs = {"state": obj.state, "master_params": groups, **attrs}
        for k, v in attrs.items():
            _walk(v, f"{path}.{k}", ledger, seen, depth + 1)


def collect(engine: Any) -> Ledger:
    """Charge every tensor DeepSpeed holds for the model to params / master / grads / optim / buffers."""
    ledger = Ledger()
    for name, p in engine.module.named_parameters():
        # The module parameter: full under ZeRO 0-2 (views into bit16_groups_flat for 1-2); under ZeRO-3
        # an empty placeholder whose shard is ds_tensor (a view into fp16_partitioned_groups_flat).
        ledger.add(p.data, "params", f"module.{name}")
        if hasattr(p, "ds_tensor"):
            ledger.add(p.ds_tensor, "params", f"module.{name}.ds_tensor")
        # Gradients still on the parameter: full p.grad under ZeRO-0 (after the all-reduce), none under
        # 1-3 after DeepSpeed's backward epilogue moved them into its partitions.
        for attr in ("grad", "grad_accum"):
            g = getattr(p, attr, None)
            if isinstance(g, torch.Tensor):
                ledger.add(g, "grads", f"module.{name}.{attr}")
    _walk(engine.optimizer, "optimizer", ledger, set(), 0)
    return ledger


# ----------------------------------------------------------------------------- one run: 2 gloo ranks


def _rank_main(rank: int, world: int, port: int, spec: dict[str, Any], out_dir: str) -> None:
    """One DeepSpeed rank: build the engine, take two real steps, count what it holds."""
    import resource

    import psutil
    import torch.distributed as dist
    from deepspeed.runtime.zero.stage3 import model_to_params

    from galaxalign_dist import config as config_mod
    from galaxalign_dist.train import engine as engine_mod
    from galaxalign_dist.train.loss import TriModalLoss, pairs_for
    from galaxalign_dist.train.model import build_model, build_tokenizer, image_size
    from galaxalign_dist.train.step import DTYPES, batch_to_device, forward_backward

    torch.set_num_threads(1)  # two ranks share two cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = config_mod.load(
        "demo_cpu",
        {
            "model.name": spec["model"],
            "engine.zero_stage": spec["zero"],
            "engine.num_workers": world,
            "engine.precision": spec["precision"],
            "data.batch_size": world * spec["micro_batch"],
        },
    )
    stage = spec["stage"]
    torch.manual_seed(0)  # same initial weights on every rank
    model = build_model(cfg.model, cfg.loss, with_symbol_tower=stage == 2, load_pretrained=False)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _, largest = model_to_params(
        model
    )  # DeepSpeed's "largest layer" (params of one module), for its estimator
    if spec.get("bucket"):
        # Experiment: smaller reduce/all-gather staging buffers than DeepSpeed's 5e8-element default.
        real_config = engine_mod.deepspeed_config

        def bucketed(*a: Any, **k: Any) -> dict[str, Any]:
            ds = real_config(*a, **k)
            ds["zero_optimization"].update(
                reduce_bucket_size=spec["bucket"], allgather_bucket_size=spec["bucket"]
            )
            return ds

        engine_mod.deepspeed_config = bucketed
    rss0 = psutil.Process().memory_info().rss
    engine = engine_mod.build_engine(model, cfg, world, total_steps=10)
    loss_fn, pairs = TriModalLoss(cfg.loss), pairs_for(stage, cfg.loss)
    b, s = cfg.micro_batch_size, image_size(cfg.model)
    ctx = build_tokenizer(cfg.model)(["x"]).shape[1]  # the text tower's context length
    dtype = DTYPES[cfg.engine.precision]
    g = torch.Generator().manual_seed(rank)
    results: dict[str, Any] = {}
    for step in range(2):
        batch = {
            "image": torch.randn(b, 3, s, s, generator=g),
            "symbol": torch.randn(b, 3, s, s, generator=g),
            "tokens": torch.randint(1, 1000, (b, ctx), generator=g),
            "label": torch.arange(b) + rank * b,
        }
        forward_backward(engine, loss_fn, batch_to_device(batch, engine.device, dtype, True), pairs)
        if step == 1:
            # After the 2nd backward: optimizer state exists (AdamW creates it lazily at the 1st step) and
            # this step's gradients are held where DeepSpeed keeps them until step().
            results["after_backward"] = collect(engine)
        engine.step()
    results["after_step"] = collect(engine)
    rss = psutil.Process().memory_info().rss
    report = {
        "rank": rank,
        "n_params": n_params,
        "largest_layer": largest,
        "rss_bytes": rss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "rss_engine_delta": rss - rss0,
        **{
            k: {"totals": v.totals(), "paths": dict(v.paths), "aliases": sorted(v.aliases)}
            for k, v in results.items()
        },
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    if hasattr(engine, "destroy"):
        engine.destroy()
    dist.destroy_process_group()


def _states(rank_report: dict[str, Any], when: str = "after_backward") -> int:
    """params + fp32 master + grads + optimizer state bytes one rank holds (comm buffers excluded)."""
    return sum(rank_report[when]["totals"][c] for c in COUNTED)


def measure(spec: dict[str, Any], world: int = 2) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    for attempt in range(2):
        with tempfile.TemporaryDirectory(prefix="galaxalign-zero-mem-") as out_dir:
            try:
                mp.spawn(_rank_main, args=(world, free_port(), spec, out_dir), nprocs=world, join=True)
            except mp.ProcessExitedException as e:
                # Seen once here: a rank aborted with glibc "malloc(): unaligned tcache chunk detected"
                # (not reproduced on rerun). Retry once, and say so: a crash is a finding, not noise.
                print(f"    run {spec} attempt {attempt + 1} failed: {e}; retrying once", flush=True)
                if attempt:
                    raise
                continue
            return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- DeepSpeed's estimators


def estimates(n_params: int, largest: int, world: int) -> dict[int, float]:
    """DeepSpeed's per-GPU model-state estimates (bytes), no offload. They assume 16-bit mixed precision:
    ZeRO-2 = 2P (16-bit params) + 18P/N; ZeRO-3 = 4 x largest layer + 18P/N."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, z2 = estimate_zero2_model_states_mem_needs(n_params, num_gpus_per_node=world, cpu_offload=False)
    _, z3, _ = estimate_zero3_model_states_mem_needs(
        n_params,
        largest,
        num_gpus_per_node=world,
        cpu_offload=False,
        cpu_offload_params=False,
        zero_init=False,
    )
    return {2: float(z2), 3: float(z3)}


def fp32_expected(zero: int, p: int, world: int) -> float:
    """What this fp32 setup should hold per rank (P params, N ranks), from DeepSpeed 0.19.8's sources."""
    n = world
    return {
        0: 4 * p + 4 * p + 8 * p,  # params + full grads + Adam exp_avg/exp_avg_sq; no master copy
        1: 4 * p + (4 + 4 + 8) * p / n,  # full params; fp32 master clone, reduced-grad and Adam partitions
        2: 4 * p + (4 + 4 + 8) * p / n,  # as ZeRO-1 at rest (the difference is the peak during backward)
        # Param shard + fp32 master shard + grad shard + Adam shards. stage3.py means to alias the master to
        # the shard when dtype and device match, but compares `tensor.device == self.device` (a
        # torch.device against the str 'cpu'/'cuda:0': always False), so fp32 runs get a 4P/N copy.
        3: (4 + 4 + 4 + 8) * p / n,
    }[zero]


# ----------------------------------------------------------------------------- driver


def run_table(models: list[str], stages: list[int], spec: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """Measure each (model, ZeRO stage); prints each run's breakdown; returns one row per run."""
    rows = []
    for model in models:
        runs: dict[int, list[dict[str, Any]]] = {}
        for zero in stages:
            t0 = time.perf_counter()
            runs[zero] = ranks = measure({**spec, "model": model, "zero": zero}, world)
            r0 = ranks[0]
            bucket = f", buckets {spec['bucket']:.0e}" if spec.get("bucket") else ""
            print(
                f"\n{model} ZeRO-{zero} ({spec['precision']}, training stage {spec['stage']}{bucket}, "
                f"{r0['n_params'] / 1e6:.1f}M trainable params): {time.perf_counter() - t0:.0f} s; rank0 RSS "
                f"{r0['rss_bytes'] / 2**20:.0f} MiB, peak {r0['peak_rss_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )
            live = r0["after_backward"]
            for cat in CATEGORIES:
                where = "; ".join(live["paths"].get(cat, [])[:3])
                print(f"    {cat:<8}{live['totals'][cat] / 2**20:10.1f} MiB   e.g. {where}")
            if live["aliases"]:
                print(f"    same storage seen as (category, charged to): {live['aliases']}")
            print(
                f"    per-rank model states: {[f'{_states(r) / 2**20:.1f} MiB' for r in ranks]}", flush=True
            )
        # The unsharded total: what plain data-parallel training holds per process (= ZeRO-0 measured).
        p = next(iter(runs.values()))[0]["n_params"]
        base = max(_states(r) for r in runs[0]) if 0 in runs else fp32_expected(0, p, world)
        for zero, ranks in runs.items():
            rows.append({"model": model, "zero": zero, "ranks": ranks, "base": base, **spec})
    return rows


def print_table(rows: list[dict[str, Any]], world: int) -> None:
    print(
        f"\n{'model':<17}{'prec':>5}{'ZeRO':>5}{'params':>9}{'master':>9}{'grads':>9}{'optim':>9}"
        f"{'per rank':>10}{'/total':>8}{'expect':>9}{'DS est.':>9}{'buffers':>9}{'RSS':>8}{'peak':>8}"
    )
    mib = 2**20
    for row in rows:
        r0, zero = row["ranks"][0], row["zero"]
        tot = r0["after_backward"]["totals"]
        per_rank = max(_states(r) for r in row["ranks"])
        p = r0["n_params"]
        exp = fp32_expected(zero, p, world) if row["precision"] == "fp32" else float("nan")
        est = estimates(p, r0["largest_layer"], world).get(zero, float("nan"))
        print(
            f"{row['model']:<17}{row['precision']:>5}{zero:>5}{tot['params'] / mib:>9.1f}{tot['master'] / mib:>9.1f}"
            f"{tot['grads'] / mib:>9.1f}{tot['optim'] / mib:>9.1f}{per_rank / mib:>10.1f}"
            f"{per_rank / row['base']:>8.3f}{exp / mib:>9.1f}{est / mib:>9.1f}{tot['buffers'] / mib:>9.1f}"
            f"{r0['rss_bytes'] / mib:>8.0f}{r0['peak_rss_bytes'] / mib:>8.0f}"
        )


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny model, ZeRO 0 and 3 only, no extras")
    ap.add_argument("--models", default="tiny,vit-b-16-random")
    ap.add_argument("--stages", default="0,1,2,3", help="ZeRO stages")
    ap.add_argument("--train-stage", type=int, default=2, choices=(1, 2), help="2 = all three towers")
    # bf16 by default: the precision of every shipped GPU/ZeRO-3 config. In fp32 DeepSpeed still keeps a
    # separate fp32 master partition beside the fp32 parameter partition (2.5P of 4P per rank at ZeRO-3
    # with 2 ranks, 0.625); the extras measure that too.
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument(
        "--extras",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the other precision's ZeRO-0/3 (every model) and ViT-B-16 ZeRO-3 with 5e7-element buckets",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.stages, args.extras = "tiny", "0,3", False
    world = 2
    common.print_machine()
    t_total = time.perf_counter()
    models = args.models.split(",")
    spec = {"stage": args.train_stage, "precision": args.precision, "micro_batch": args.micro_batch}
    rows = run_table(models, [int(z) for z in args.stages.split(",")], spec, world)
    ratio3 = {r["model"]: max(_states(x) for x in r["ranks"]) / r["base"] for r in rows if r["zero"] == 3}
    extra_rows = []
    if args.extras:
        other = "fp32" if args.precision == "bf16" else "bf16"
        extra_rows += run_table(models, [0, 3], {**spec, "precision": other}, world)
        if "vit-b-16-random" in models:
            extra_rows += run_table(["vit-b-16-random"], [3], {**spec, "bucket": int(5e7)}, world)
            extra_rows[-1]["base"] = next(
                r["base"] for r in rows if r["model"] == "vit-b-16-random" and r["zero"] == 0
            )
    print_table(rows + extra_rows, world)
    print(
        "MiB per rank (the larger of the 2 ranks in 'per rank'), held after the 2nd backward: params + fp32 "
        "master + grads + optimizer state. '/total' = per rank over the unsharded total (ZeRO-0 measured in "
        "the same precision: what one process holds in plain data-parallel training). 'expect' (fp32) = 4P "
        "params + 4P grads + 8P Adam, + a 4P fp32 master copy for ZeRO 1-3, each sharded as the stage "
        "shards it. 'DS est.' = DeepSpeed's estimator (16-bit mixed precision GPU accounting, 18P/N + 2P or "
        "4 x largest layer: a cross-check of the sharding, not of fp32 bytes). buffers = reduce/all-gather "
        "staging buffers (torch.empty, touched only as far as used), not counted in 'per rank'. "
        "RSS/peak: rank 0 process, MiB."
    )
    print(f"total time: {time.perf_counter() - t_total:.0f} s; load average at end: {common.load_average()}")
    for m, r in ratio3.items():
        print(f"zero3 per-rank / unsharded total ({args.precision}), {m}: {r:.3f}")
    headline = "vit-b-16-random" if "vit-b-16-random" in ratio3 else next(iter(ratio3))
    print(f"headline: {headline}, {args.precision}")
    common.summary("zero3_shard_ratio", ratio3[headline])
    return ratio3[headline]


if __name__ == "__main__":
    main()
