"""Training throughput of galaxalign_dist (Ray Train + DeepSpeed ZeRO, 1 worker) vs a plain PyTorch loop."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402  (sets HF_HUB_OFFLINE / DS_ACCELERATOR before torch imports)
import torch  # noqa: E402

from galaxalign_dist import config as config_mod  # noqa: E402
from galaxalign_dist.config import Config  # noqa: E402

# (model flavour, shipped real sample it trains on): the tiny model is 64 px, ViT-B-16 224 px.
MODELS = {"tiny": "64", "vit-b-16-random": "256"}


def make_config(model: str, batch: int, zero_stage: int, stage: int) -> Config:
    """The demo config with one worker, one epoch of the requested stage, no eval/progress/tensorboard."""
    return config_mod.load(
        "demo_cpu",
        {
            "model.name": model,
            "data.batch_size": batch,
            "engine.num_workers": 1,
            "engine.zero_stage": zero_stage,
            "stages.stage1_epochs": 1 if stage == 1 else 0,
            "stages.stage2_epochs": 1 if stage == 2 else 0,
            "logging.progress": False,
            "logging.tensorboard": False,
            "run.eval_every_epochs": 0,
        },
    )


def make_batches(cfg: Config, n_batches: int) -> list[dict[str, torch.Tensor]]:
    """Pre-decoded train batches: real images through the real TripletTransform, once, up front."""
    from galaxalign_dist.data.schemas import get_schema
    from galaxalign_dist.train.model import build_transform

    kind = MODELS[cfg.model.name]
    schema = get_schema(common.DATASETS[kind][1])
    b = cfg.micro_batch_size
    images, labels = common.replicated(kind, n_batches * b)
    encoded = common.png_bytes(images)
    transform = build_transform(cfg, train=True)
    out = []
    for i in range(n_batches):
        sl = slice(i * b, (i + 1) * b)
        lab = labels[sl]
        raw = {
            "id": [f"bench-{j}" for j in range(sl.start, sl.stop)],
            "image": encoded[sl],
            "label": lab,
            "text": [schema.classes[int(y)].caption for y in lab],
            "symbol": [schema.classes[int(y)].symbol for y in lab],
        }
        out.append({k: torch.from_numpy(v) for k, v in transform(raw).items()})
    return out


# ----------------------------------------------------------------------------- plain PyTorch


class PlainLoop:
    """Same model, loss, param groups, AdamW, grad clipping and lr schedule as ours; no DeepSpeed.

    No `_common` use: Ray ships this class by value (with ours_worker) to the worker process.
    """

    def __init__(self, cfg: Config, stage: int, total_steps: int) -> None:
        from galaxalign_dist.train.engine import lr_lambda, param_groups
        from galaxalign_dist.train.loss import TriModalLoss, pairs_for
        from galaxalign_dist.train.model import build_model

        torch.manual_seed(cfg.run.seed)  # the Trainer seeds the same way: identical initial weights
        self.model = build_model(cfg.model, cfg.loss, with_symbol_tower=stage == 2)
        self.model.train()
        o = cfg.optim
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg), betas=(o.beta1, o.beta2), eps=o.eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(total_steps, o.warmup_fraction, o.schedule)
        )
        self.loss_fn, self.pairs, self.clip = TriModalLoss(cfg.loss), pairs_for(stage, cfg.loss), o.grad_clip
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.phases: dict[str, list[float]] = {"forward+loss": [], "backward": [], "optimizer": []}

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        out = self.model(batch["image"], batch["tokens"], batch["symbol"])
        loss, _ = self.loss_fn(out, out["logit_scale"], batch["label"], self.pairs)
        t1 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()
        t3 = time.perf_counter()
        for k, dt in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            self.phases[k].append(dt)


def run_plain(cfg: Config, batches: list[dict[str, torch.Tensor]], steps: int, stage: int) -> list[float]:
    """Seconds per step of the plain loop, in this process (used by data_throughput.py too)."""
    loop = PlainLoop(cfg, stage, steps)
    out = []
    for i in range(steps):
        t0 = time.perf_counter()
        loop.step(batches[i % len(batches)])
        out.append(time.perf_counter() - t0)
    del loop
    gc.collect()
    return out


# ----------------------------------------------------------------------------- ours: Ray Train + DeepSpeed


def ours_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: the real Trainer (DeepSpeed engine, loss, report) on in-memory batches, with a
    plain-loop step before each of its steps in this same process (plain, ours, plain, ours...): both
    see the same threads, memory and machine noise, which on a shared host swings step times 5-10x.
    """
    import tempfile
    import time

    import torch

    from galaxalign_dist import config as config_mod
    from galaxalign_dist.launch.train import RayReporter
    from galaxalign_dist.train import engine as engine_mod
    from galaxalign_dist.train import trainer as trainer_mod

    cfg = config_mod.from_dict(loop_config["config"], validate=False)
    batches = torch.load(loop_config["batches_file"])
    steps, stage = int(loop_config["steps"]), int(loop_config["stage"])
    plain = PlainLoop(cfg, stage, steps)
    plain_s: list[float] = []
    ours_s: list[float] = []
    phases: dict[str, list[float]] = {"forward+loss": [], "backward": [], "optimizer": []}

    def train(epoch: int):  # noqa: ANN202
        for i in range(steps):
            batch = batches[i % len(batches)]
            t0 = time.perf_counter()
            plain.step(batch)
            plain_s.append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            yield batch  # the Trainer runs one step of ours, then asks for the next batch
            ours_s.append(time.perf_counter() - t1)

    def timed(fn, key: str):  # noqa: ANN001, ANN202
        def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[key].append(time.perf_counter() - t0)

        return wrapper

    def build_engine(*a, **k):  # noqa: ANN002, ANN003, ANN202
        # Time DeepSpeed's three calls per step (engine(...) + loss is 'forward+loss' by difference).
        engine = engine_mod.build_engine(*a, **k)
        engine.backward = timed(engine.backward, "backward")
        engine.step = timed(engine.step, "optimizer")  # ZeRO reduce/partition, clip, AdamW, param sync
        return engine

    class StampReporter(RayReporter):
        def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
            extra = {
                "plain_s": plain_s,
                "ours_s": ours_s,
                "plain_phases": plain.phases,
                "ours_phases": phases,
                "torch_threads": torch.get_num_threads(),
            }
            # Ray Train V2 keeps only metrics that come with a checkpoint (Result.metrics): attach an
            # empty one (the real checkpoint write is skipped below).
            ckpt = checkpoint_dir or tempfile.mkdtemp(prefix="bench-ckpt-")
            super().report({**metrics, **extra}, ckpt)

    data = trainer_mod.TrainData(train=train, steps_per_epoch=steps)
    # The Trainer's seams: a timed engine, and no end-of-stage checkpoint write (GBs for ViT-B, after the
    # timed steps).
    trainer_mod.Trainer(
        cfg, data, StampReporter(), build_engine=build_engine, save_checkpoint=lambda *a, **k: None
    ).fit()


def run_ours(
    cfg: Config, batches_file: str, steps: int, stage: int, storage: str, tag: str
) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        ours_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "batches_file": batches_file,
            "steps": steps,
            "stage": stage,
        },
        # All of the host's CPUs for the one worker, so Ray sets OMP_NUM_THREADS = nproc, the torch
        # default outside Ray (with the demo's 0.5 CPU per worker, Ray pins torch to 1 thread).
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=False, resources_per_worker={"CPU": float(os.cpu_count() or 1)}
        ),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name=tag, storage_path=storage),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics)


# ----------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny model, a few steps: a smoke test")
    ap.add_argument("--models", default="tiny,vit-b-16-random")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--stage", type=int, default=1, choices=(1, 2), help="training stage to time")
    ap.add_argument("--tiny-batch", type=int, default=32)
    ap.add_argument(
        "--vit-batch", type=int, default=4, help="4, not 8: plain + ours ViT-B states fit a shared 24 GB host"
    )
    ap.add_argument("--tiny-steps", type=int, default=60, help="timed steps per side (tiny)")
    ap.add_argument("--vit-steps", type=int, default=3, help="timed steps per side (ViT-B-16)")
    ap.add_argument("--warmup", type=int, default=5, help="discarded steps per side (tiny)")
    ap.add_argument("--vit-warmup", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.tiny_batch, args.tiny_steps, args.warmup = "tiny", 8, 4, 1

    common.print_machine()
    from galaxalign_dist.launch.train import init_ray

    t_total = time.perf_counter()
    init_ray()
    storage = tempfile.mkdtemp(prefix="galaxalign-bench-ray-")
    results: dict[str, dict[str, Any]] = {}
    for model in args.models.split(","):
        vit = model != "tiny"
        batch = args.vit_batch if vit else args.tiny_batch
        warmup = args.vit_warmup if vit else args.warmup
        steps = warmup + (args.vit_steps if vit else args.tiny_steps)
        cfg = make_config(model, batch, args.zero_stage, args.stage)
        batches = make_batches(cfg, n_batches=min(4, steps))
        batches_file = str(Path(storage) / f"batches-{model}.pt")
        torch.save(batches, batches_file)
        print(
            f"\n{model}: batch {batch} at {batches[0]['image'].shape[-1]} px, training stage {args.stage}, "
            f"ZeRO-{args.zero_stage}; {warmup} warm-up + {steps - warmup} timed steps per side, "
            "interleaved step by step (plain, ours, plain, ours...) in one Ray Train worker",
            flush=True,
        )
        t0 = time.perf_counter()
        m = run_ours(cfg, batches_file, steps, args.stage, storage, f"overhead-{model}")
        plain_s, ours_s = m["plain_s"][warmup:], m["ours_s"][warmup:]
        # Per-pair ratios cancel machine noise that spans a pair; the headline is the ratio of medians.
        pair = [p / o for p, o in zip(plain_s, ours_s, strict=True)]
        res = {
            "plain": batch / common.median(plain_s),
            "ours": batch / common.median(ours_s),
            "pair_median": common.median(pair),
            "epoch_rate": m["samples_per_s"],
            "threads": m["torch_threads"],
            "plain_phases": {k: common.median(v[warmup:]) for k, v in m["plain_phases"].items()},
            "ours_phases": {k: common.median(v[warmup:]) for k, v in m["ours_phases"].items() if v},
            "wall": time.perf_counter() - t0,
        }
        # DeepSpeed's forward + our loss, by difference: the loop's other work is a few tensor adds.
        res["ours_phases"]["forward+loss"] = common.median(ours_s) - sum(res["ours_phases"].values())
        results[model] = res
        print(f"  plain s/step: {_fmt(plain_s)}\n  ours  s/step: {_fmt(ours_s)}")
        print(
            f"  plain {res['plain']:.3f} samples/s, ours {res['ours']:.3f} samples/s (Trainer's epoch "
            f"samples_per_s, warm-up and the interleaved plain steps included: {res['epoch_rate']:.3f}); "
            f"worker torch threads {res['threads']}; fit() {res['wall']:.0f} s",
            flush=True,
        )
        print("  median s/step by phase:      plain     ours")
        for k in ("forward+loss", "backward", "optimizer"):
            print(f"    {k:<24}{res['plain_phases'][k]:>9.4f}{res['ours_phases'].get(k, float('nan')):>9.4f}")

    print(f"\ndriver torch threads (plain default outside Ray): {torch.get_num_threads()}")
    print(f"{'model':<18}{'plain samples/s':>17}{'ours samples/s':>16}{'ours/plain':>12}{'pairwise':>10}")
    for model, r in results.items():
        print(
            f"{model:<18}{r['plain']:>17.3f}{r['ours']:>16.3f}{r['ours'] / r['plain']:>12.3f}"
            f"{r['pair_median']:>10.3f}"
        )
    print(f"total time: {time.perf_counter() - t_total:.0f} s; load average at end: {common.load_average()}")
    headline = "tiny" if "tiny" in results else next(iter(results))
    value = results[headline]["ours"] / results[headline]["plain"]
    print(
        f"headline: {headline} (median samples/s, ours / plain; 'pairwise' = median of per-step-pair ratios)"
    )
    common.summary("overhead_ratio", value)
    return value


def _fmt(step_s: list[float]) -> str:
    if len(step_s) <= 6:
        return ", ".join(f"{s:.3g}" for s in step_s)
    q = sorted(step_s)
    return f"median {common.median(step_s):.4g} (min {q[0]:.4g}, max {q[-1]:.4g}, n {len(q)})"


if __name__ == "__main__":
    main()
