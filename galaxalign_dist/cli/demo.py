"""`galaxalign demo`: synthetic data -> stage 1 -> stage 2 (tiny model, 2 CPU workers, ZeRO-2) -> export -> eval."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HELP = "end-to-end CPU demo on built-in synthetic galaxies: prepare, train both stages, export, evaluate"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="runs/demo", help="everything the demo writes goes here (default runs/demo)"
    )
    p.add_argument(
        "--config", default="demo_cpu", help="run config to start from (default: packaged demo_cpu)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run(args: argparse.Namespace) -> int:
    from galaxalign_dist import config as config_mod

    out = Path(args.out).resolve()
    pairs = {"data.path": str(out / "data"), "run.out_dir": str(out), "run.name": "train"}
    pairs.update(dict(config_mod.parse_override(o) for o in args.overrides))
    cfg = config_mod.load(args.config, pairs)

    from galaxalign_dist.evaluation.evaluate import evaluate_model
    from galaxalign_dist.launch.train import fit
    from galaxalign_dist.paths import RunPaths
    from galaxalign_dist.train.export import export

    t0 = time.perf_counter()
    result = fit(cfg)  # prepares the synthetic dataset first when it is not there yet
    t_train = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    model_dir = export(result.checkpoint.path, out / "export")
    metrics = evaluate_model(model_dir, cfg.data.path, out / "eval")
    print()
    print(f"demo finished in {time.perf_counter() - t0:.0f} s (training {t_train:.0f} s)")
    print(f"  data:         {cfg.data.path}")
    paths = RunPaths.of(cfg)
    print(f"  run:          {paths.run_dir}")
    print(f"  tensorboard:  tensorboard --logdir {paths.tensorboard}")
    print(f"  export:       {model_dir}  (galaxalign_dist.load_model)")
    print(f"  evaluation:   {out / 'eval' / 'metrics.json'}")
    summary = {
        k: metrics[k]
        for k in ("accuracy", "f1_macro", "best_head", "map_at_5", "map", "n_test")
        if k in metrics
    }
    print(json.dumps(summary, indent=2))
    return 0
