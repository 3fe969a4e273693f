"""One GPU check (run by benchmarks/gpu_check.sh): the gpu-marked tests, device-side augmentation throughput,
and the stage-2 training step of ViT-B/16-sized towers in bf16 at a global batch of 256 under DeepSpeed
ZeRO 0/1/2, with and without torch.compile, against a plain-PyTorch loop of the same model.

Single process, world size 1 (NCCL on a GPU, gloo with --dry), through the project's own seams:
train.model.build_model, train.engine.build_engine, train.step.batch_to_device + train_step. Prints a table
and writes a JSON summary after every section (a run cut short still leaves what it measured).

--dry: CPU, the tiny model, batch 8, 1 warm-up + 1 timed step, compile with the aot_eager backend (no code
generation): checks the script end to end in the quick tests, so it cannot rot. Its figures mean nothing.

Runs on torch 2.11 (the GPU machine's) and 2.15 (this repo's venv): nn.Module.compile (2.2), FlopCounterMode,
torch.amp.autocast(device_type) and fused AdamW are older than 2.11.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

DRY = "--dry" in sys.argv
# Before anything imports DeepSpeed: its accelerator (the CPU one builds a shared-memory op into a per-venv
# TORCH_EXTENSIONS_DIR, set by _common), no hub retries, unbuffered output for a remote log.
os.environ.setdefault("DS_ACCELERATOR", "cpu" if DRY else "cuda")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# H100/H200 SXM dense bf16 tensor-core peak (datasheet); the device tool measured ~790 TFLOP/s on a large
# matmul on its H200, so ~0.8 is the practical MFU ceiling against this figure.
PEAK_BF16_TFLOPS = 989.0
# docs: open_clip's model_profile.csv, forward GFLOP at 224 px, ViT-B-16: image 35.13, text 5.96 per sample.
# A stage-2 triplet trains two image towers and the text tower: 3 x (2 x 35.13 + 5.96) = 228.7 GFLOP.
ANCHOR_TRAIN_GFLOP = 3 * (2 * 35.13 + 5.96)
SYMBOL_SPECS = ("round", "disk+bar:strong+arms:tight", "edgeon+bulge:small", "disk+arms:loose")


class Check:
    """The JSON summary, written after every section."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path, self.t0, self.budget_s = path, time.perf_counter(), budget_s
        self.data: dict[str, Any] = {"ok": True, "dry": DRY, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def write(self) -> None:
        self.data["wall_s"] = round(self.elapsed(), 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nproc": os.cpu_count(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    for mod in ("deepspeed", "open_clip", "torchvision", "timm", "pydantic"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - recorded, the sections that need it fail with their own error
            info[mod] = f"missing ({type(e).__name__})"
    if device.type == "cuda":
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- 1. gpu-marked tests


def gpu_tests(timeout_s: float) -> dict[str, Any]:
    """`pytest -m gpu` over the test files that use the marker; skipped tests (no CUDA) are not failures."""
    files = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text()
    )
    out: dict[str, Any] = {"files": files}
    if not files:
        return {**out, "ok": True, "note": "no test uses the gpu marker"}
    xml = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_tests_{os.getpid()}.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [*cmd, f"--junitxml={xml}", *files],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {**out, "ok": False, "error": f"pytest -m gpu ran past {timeout_s:.0f} s"}
    out.update(rc=proc.returncode, wall_s=round(time.perf_counter() - t0, 1), tail=proc.stdout[-2000:])
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.exists():
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        xml.unlink()
    out.update(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"])
    # pytest exit 5: nothing selected (every gpu test deselected) is not a failure either.
    out["ok"] = proc.returncode in (0, 5)
    print(proc.stdout[-1500:], flush=True)
    return out


# ----------------------------------------------------------------------------- 2. device-side augmentation


def augmentation(device: torch.device, batch: int, src: int, size: int, iters: int) -> dict[str, Any]:
    """Images/s of the device-side geometry on a uint8 batch already on the device (data/warp.py, symbol_bank)."""
    from open_clip.constants import OPENAI_DATASET_MEAN as MEAN
    from open_clip.constants import OPENAI_DATASET_STD as STD

    from galaxalign_dist.data.symbol_bank import SymbolBank
    from galaxalign_dist.data.warp import draw_params, normalise, resize_center_crop, warp

    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, src, src), dtype=torch.uint8, device=device, generator=g)
    ids = [f"row{i}" for i in range(batch)]
    t0 = time.perf_counter()
    params = draw_params(ids, seed=0, epoch=0)
    draw_s = time.perf_counter() - t0
    image_p = torch.from_numpy(params["image"]).to(device)
    symbol_p = torch.from_numpy(params["symbol"]).to(device)
    specs = [SYMBOL_SPECS[i % len(SYMBOL_SPECS)] for i in range(batch)]
    bank = SymbolBank(size, device)
    bank.lookup(specs, params["variant"])  # renders each spec once (host), not timed

    cases = {
        "train_warp": lambda: normalise(warp(images, image_p, size), MEAN, STD, torch.bfloat16),
        "eval_resize_crop": lambda: normalise(resize_center_crop(images, size), MEAN, STD, torch.bfloat16),
        "symbols_bank_warp": lambda: normalise(
            warp(bank.lookup(specs, params["variant"]), symbol_p, size), MEAN, STD, torch.bfloat16
        ),
    }
    out: dict[str, Any] = {
        "batch": batch,
        "src_px": src,
        "out_px": size,
        "draw_params_rows_per_s": batch / draw_s,
    }
    for name, fn in cases.items():
        for _ in range(2):  # warm-up: kernels, allocator
            fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            result = fn()
        sync(device)
        dt = (time.perf_counter() - t0) / iters
        assert result.shape == (batch, 3, size, size) and result.dtype == torch.bfloat16
        out[f"{name}_img_per_s"] = batch / dt
        out[f"{name}_ms_per_batch"] = dt * 1e3
    return out


# ----------------------------------------------------------------------------- 3. training step


def run_config(model_name: str, batch: int, zero: int, compile_: bool, fused: bool, backend: str):  # noqa: ANN201
    from galaxalign_dist import config as config_mod

    return config_mod.load(
        None,
        {
            "model.name": model_name,
            "model.pretrained": "none",  # random init: weights do not change the speed; nothing to download
            "data.batch_size": batch,
            "engine.num_workers": 1,
            "engine.zero_stage": zero,
            "engine.precision": "bf16",
            "engine.use_gpu": not DRY,
            "engine.compile": compile_,
            "engine.compile_backend": backend,
            "optim.fused": fused,
            "optim.warmup_fraction": 0.0,
        },
    )


def train_flops_per_sample(cfg) -> dict[str, float]:  # noqa: ANN001
    """Model FLOPs of one stage-2 training micro step per sample, counted on the meta device.

    torch.utils.flop_counter.FlopCounterMode counts 2 FLOPs per multiply-add of every matmul, convolution
    and attention (SDPA) in one forward + backward of the model and the loss, as it would run: no kernels
    execute on the meta device, so counting ViT-B/16 takes seconds on any host. Element-wise work is not
    counted (MFU's convention). The forward counts per tower are checked against open_clip's profile.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from galaxalign_dist.train.loss import TriModalLoss, pairs_for
    from galaxalign_dist.train.model import build_model, build_tokenizer, image_size

    b = 2
    s, ctx = image_size(cfg.model), build_tokenizer(cfg.model)(["x"]).shape[1]
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.loss, with_symbol_tower=True, load_pretrained=False)
        images = torch.empty(b, 3, s, s)
        tokens = torch.zeros(b, ctx, dtype=torch.long)
        labels = torch.arange(b)
    counts = {}
    for name, fn in (("image", lambda: model.image(images)), ("text", lambda: model.text(tokens))):
        with FlopCounterMode(display=False) as counter:
            fn()
        counts[f"fwd_gflop_{name}"] = counter.get_total_flops() / b / 1e9
    with FlopCounterMode(display=False) as counter:
        out = model(images, tokens, images)
        loss, _ = TriModalLoss(cfg.loss)(out, out["logit_scale"], labels, pairs_for(2, cfg.loss))
        loss.backward()
    counts["train_gflop"] = counter.get_total_flops() / b / 1e9
    return counts


def _inputs(cfg, device: torch.device) -> dict[str, torch.Tensor]:  # noqa: ANN001
    from galaxalign_dist.train.model import build_tokenizer, image_size

    b, s = cfg.micro_batch_size, image_size(cfg.model)
    ctx = build_tokenizer(cfg.model)(["x"]).shape[1]
    g = torch.Generator(device=device).manual_seed(0)
    # Already on the device, normalised-range values: this measures the model step, not the data pipeline.
    return {
        "image": torch.randn(b, 3, s, s, device=device, generator=g, dtype=torch.bfloat16),
        "symbol": torch.randn(b, 3, s, s, device=device, generator=g, dtype=torch.bfloat16),
        "tokens": torch.randint(1, 49000, (b, ctx), device=device, generator=g),
        "label": torch.arange(b, device=device),
    }


def deepspeed_step(cfg, device: torch.device):  # noqa: ANN001, ANN201
    """The project's step: build_model -> build_engine (DeepSpeed) -> batch_to_device -> train_step."""
    from galaxalign_dist.train.engine import build_engine
    from galaxalign_dist.train.loss import TriModalLoss, pairs_for
    from galaxalign_dist.train.model import build_model
    from galaxalign_dist.train.step import batch_to_device, train_step

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, with_symbol_tower=True, load_pretrained=False)
    engine = build_engine(model, cfg, world_size=1, total_steps=1000)
    loss_fn, pairs = TriModalLoss(cfg.loss), pairs_for(2, cfg.loss)
    batch = batch_to_device(_inputs(cfg, device), engine.device, torch.bfloat16, use_symbols=True)

    def step() -> torch.Tensor:
        return train_step(engine, loss_fn, batch, pairs)[0]

    return step, engine.destroy


def plain_step(cfg, device: torch.device):  # noqa: ANN001, ANN201
    """Plain PyTorch, no DeepSpeed: fp32 weights, bf16 autocast (open_clip's --precision amp_bf16), torch's
    AdamW over the same per-tower groups (fused as `cfg.optim.fused`), the same clipping, schedule and loss."""
    from galaxalign_dist.train.engine import lr_lambda, param_groups
    from galaxalign_dist.train.loss import TriModalLoss, pairs_for
    from galaxalign_dist.train.model import build_model, compile_towers

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, with_symbol_tower=True, load_pretrained=False).to(device)
    if cfg.engine.compile:
        compile_towers(model, cfg.engine.compile_backend)
    o = cfg.optim
    opt = torch.optim.AdamW(
        param_groups(model, cfg), lr=o.lr.image, betas=(o.beta1, o.beta2), eps=o.eps, fused=o.fused
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(1000, o.warmup_fraction, o.schedule))
    loss_fn, pairs, batch = TriModalLoss(cfg.loss), pairs_for(2, cfg.loss), _inputs(cfg, device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(batch["image"], batch["tokens"], batch["symbol"])
            loss, _ = loss_fn(out, out["logit_scale"], batch["label"], pairs)
        loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, None


def measure(step, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:  # noqa: ANN001
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0  # includes compilation when compiled
    for _ in range(warmup - 1):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync(device)  # host sync: the whole step, not its launch
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach().float()))
    out = {"first_step_s": first, "step_s": times, "step_ms_median": common.median(times) * 1e3}
    out["loss_first"], out["loss_last"] = losses[0], losses[-1]
    out["finite"] = all(math.isfinite(x) for x in losses)
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def training(check: Check, args: argparse.Namespace, device: torch.device) -> None:
    model_name = "tiny" if DRY else args.model
    backend = "aot_eager" if DRY else "inductor"
    batch = args.batch
    flops = train_flops_per_sample(run_config(model_name, batch, 0, False, True, backend))
    flops["method"] = "FlopCounterMode, one forward+backward of model and loss on the meta device; 2 per MAC"
    if not DRY:
        flops["anchor_train_gflop"] = ANCHOR_TRAIN_GFLOP
        flops["counted_over_anchor"] = flops["train_gflop"] / ANCHOR_TRAIN_GFLOP
    check.data["flops_per_sample"] = flops
    peak = None if DRY else args.peak_tflops * 1e12
    # Order: what every later comparison needs first; compiled runs after (the first pays the compilation,
    # the others reuse dynamo's graphs); fused off last. Each row: (engine, zero, compile, fused, reserve_s).
    plan = [
        ("deepspeed", 1, False, True, 40),
        ("plain", None, False, True, 40),
        ("deepspeed", 0, False, True, 40),
        ("deepspeed", 2, False, True, 40),
        ("deepspeed", 1, True, True, 240),
        ("deepspeed", 0, True, True, 60),
        ("deepspeed", 2, True, True, 60),
        ("plain", None, True, True, 200),
        ("deepspeed", 1, False, False, 40),
    ]
    if DRY and not args.configs:
        # The same loop over fewer rows (the others differ only in their numbers): eager and compiled, ours
        # (ZeRO-1, ZeRO-2) and plain, so every code path of the full run executes.
        args.configs = "zero1-eager,plain-eager,zero2-compile,plain-compile"
    if args.configs:
        wanted = set(args.configs.split(","))
        plan = [p for p in plan if _name(*p[:4]) in wanted]
    rows = check.data.setdefault("train", [])
    for engine_kind, zero, compile_, fused, reserve in plan:
        name = _name(engine_kind, zero, compile_, fused)
        row: dict[str, Any] = {"name": name, "engine": engine_kind, "zero": zero, "compile": compile_}
        row.update(fused=fused, model=model_name, global_batch=batch, precision="bf16")
        if not DRY and check.left() < reserve:
            row.update(ok=None, skipped=f"time budget: {check.left():.0f} s left, reserve {reserve} s")
            rows.append(row)
            print(f"{name}: skipped ({row['skipped']})", flush=True)
            continue
        cfg = run_config(model_name, batch, zero or 0, compile_, fused, backend)
        cleanup = None
        try:
            build = deepspeed_step if engine_kind == "deepspeed" else plain_step
            step, cleanup = build(cfg, device)
            row.update(measure(step, device, args.warmup, args.steps))
            sps = batch / (row["step_ms_median"] / 1e3)
            row.update(ok=row["finite"], samples_per_s=sps)
            if peak:
                row["mfu"] = flops["train_gflop"] * 1e9 * sps / peak
        except Exception as e:  # noqa: BLE001 - one failing configuration must not stop the others
            row.update(
                ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            )
        finally:
            if cleanup is not None:
                try:
                    cleanup()
                except Exception:  # noqa: BLE001, S110 - best effort between configurations
                    pass
            step = cleanup = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(_row_line(row), flush=True)
        check.write()
    ok_rows = [r for r in rows if r.get("ok")]
    summary: dict[str, Any] = {}
    if ok_rows:
        best = max(ok_rows, key=lambda r: r["samples_per_s"])
        summary["best"] = {k: best.get(k) for k in ("name", "samples_per_s", "mfu", "peak_mem_gib")}
        for mode in (False, True):
            ours = [r for r in ok_rows if r["engine"] == "deepspeed" and r["compile"] == mode and r["fused"]]
            plain = [r for r in ok_rows if r["engine"] == "plain" and r["compile"] == mode]
            if ours and plain:
                fastest = max(ours, key=lambda r: r["samples_per_s"])
                key = "ours_over_plain_" + ("compiled" if mode else "eager")
                summary[key] = fastest["samples_per_s"] / plain[0]["samples_per_s"]
                summary[key + "_config"] = fastest["name"]
    check.data["train_summary"] = summary
    if any(r.get("ok") is False for r in rows):
        check.data["ok"] = False


def _name(engine_kind: str, zero: int | None, compile_: bool, fused: bool) -> str:
    base = f"zero{zero}" if engine_kind == "deepspeed" else "plain"
    return base + ("-compile" if compile_ else "-eager") + ("" if fused else "-unfused")


def _row_line(r: dict[str, Any]) -> str:
    if not r.get("ok"):
        return f"{r['name']:<22} FAILED {r.get('error', 'non-finite loss')}"
    mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "n/a"
    mem = f"{r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else "n/a"
    return (
        f"{r['name']:<22} {r['samples_per_s']:9.1f} samples/s  step {r['step_ms_median']:8.1f} ms  "
        f"MFU {mfu}  peak mem {mem}  first step {r['first_step_s']:.1f} s"
    )


# ----------------------------------------------------------------------------- main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, tiny model, 1 step: checks the script itself")
    ap.add_argument("--out", default=None, help="JSON summary path (default $OUT/gpu_check.json or /tmp)")
    ap.add_argument("--model", default="vit-b-16-random")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default 256; 8 with --dry)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; 1 with --dry)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 1 with --dry)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="wall seconds for this script's sections")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS, help="dense bf16 peak, TFLOP/s")
    ap.add_argument("--configs", default="", help="comma-separated subset, e.g. zero1-eager,plain-eager")
    ap.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    args = ap.parse_args(argv)
    args.batch = args.batch or (8 if DRY else 256)
    args.warmup = args.warmup or (1 if DRY else 3)
    args.steps = args.steps or (1 if DRY else 10)
    out = Path(args.out or Path(os.environ.get("OUT") or "/tmp") / "gpu_check.json")
    check = Check(out, args.budget_s)

    if not DRY and not torch.cuda.is_available():
        check.data.update(ok=False, error="CUDA is not available (torch.cuda.is_available() is False)")
        check.write()
        print(f"gpu_check: {check.data['error']}; use --dry on a CPU host", file=sys.stderr)
        return 1
    device = torch.device("cpu") if DRY else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    check.data["machine"] = machine(device)
    check.data["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    print("gpu_check:", json.dumps(check.data["machine"]), flush=True)
    check.write()

    sections = []
    if not args.skip_tests:
        sections.append(("gpu_tests", lambda: gpu_tests(timeout_s=120 if not DRY else 300)))
    aug = (8, 256, 224, 2) if DRY else (256, 256, 224, 20)
    sections.append(("augmentation", lambda: augmentation(device, *aug)))
    for name, fn in sections:
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - recorded; the training section still runs
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000]}
        result.setdefault("ok", True)
        result["section_s"] = round(time.perf_counter() - t0, 1)
        check.data[name] = result
        check.data["ok"] &= bool(result["ok"])
        print(
            f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'tail'}, default=str)}", flush=True
        )
        check.write()

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0")
    os.environ.update(WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        training(check, args, device)
    except Exception as e:  # noqa: BLE001 - the summary is still written
        check.data.update(ok=False, train_error=f"{type(e).__name__}: {e}"[:1000])
    finally:
        dist.destroy_process_group()
    check.write()
    s = check.data.get("train_summary", {})
    print(json.dumps({"ok": check.data["ok"], "train_summary": s}, indent=1, default=str), flush=True)
    print(f"summary written to {out}", flush=True)
    common.summary("gpu_check_best_samples_per_s", (s.get("best") or {}).get("samples_per_s") or float("nan"))
    return 0 if check.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
