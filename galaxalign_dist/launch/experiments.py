"""Paper experiments on one dataset and seed: the ablation table (Table 4) and data-fraction curves (Figure 6)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from galaxalign_dist import config as config_mod
from galaxalign_dist.config import Config

log = logging.getLogger(__name__)


def variants(cfg: Config) -> dict[str, tuple[str, dict[str, Any]]]:
    """Variant name -> (what it is, dotted overrides). E1/E2 = the config's stage epochs."""
    e1, e2 = cfg.stages.stage1_epochs, cfg.stages.stage2_epochs
    total = e1 + e2
    return {
        # Image-text CLIP only: stage 1 without the symbol pair, so no symbol is ever encoded and
        # no symbol tower is ever built.
        "clip": (
            "CLIP image-text only",
            {"loss.use_symbols": False, "stages.stage1_epochs": total, "stages.stage2_epochs": 0},
        ),
        "v1": ("stage 1 warm-up only", {"stages.stage1_epochs": e1, "stages.stage2_epochs": 0}),
        "v2": ("stage 2 only", {"stages.stage1_epochs": 0, "stages.stage2_epochs": total}),
        "v3": ("stage 1 to convergence", {"stages.stage1_epochs": total, "stages.stage2_epochs": 0}),
        "scratch": ("both stages, random init", {"model.pretrained": "none"}),
        "galaxalign": ("both stages (the method)", {}),
        "class_aware": ("both stages, class-aware targets", {"loss.targets": "class_aware"}),
    }


def _variant_config(cfg: Config, name: str, overrides: dict[str, Any], out: Path) -> Config:
    data = config_mod.apply_overrides(cfg.to_dict(), {**overrides, "run.out_dir": str(out), "run.name": name})
    return config_mod.from_dict(data)


def run_identity(cfg: Config) -> str:
    """Everything that decides what a run trains (the config less its name): equal identity, equal run."""
    data = cfg.to_dict()
    return json.dumps({**data, "run": {**data["run"], "name": ""}}, sort_keys=True)


def _train_export_eval(cfg: Config, out: Path, eval_data: str | None = None) -> dict[str, Any]:
    from galaxalign_dist.evaluation.evaluate import evaluate_model
    from galaxalign_dist.launch.train import fit
    from galaxalign_dist.train.export import export

    result = fit(cfg)
    model_dir = export(result.checkpoint.path, out / f"{cfg.run.name}-export")
    return evaluate_model(
        model_dir, eval_data or cfg.data.path, out / f"{cfg.run.name}-eval", make_figures=False
    )


def _write_table(rows: list[dict[str, Any]], out: Path, stem: str, title: str) -> None:
    keys = list(rows[0])
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def ablate(cfg: Config, out: str | Path, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Train, export and evaluate each variant; writes ablation.csv/.md and each variant's config."""
    out = Path(out).resolve()
    table = variants(cfg)
    unknown = set(names or []) - set(table)
    if unknown:
        raise ValueError(f"unknown ablation variants {sorted(unknown)}; known: {', '.join(table)}")
    from galaxalign_dist.launch.train import check

    configs = {n: _variant_config(cfg, n, table[n][1], out) for n in names or table}
    for vcfg in configs.values():
        check(vcfg)  # every variant's config, model and dataset, before anything is written or trained
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    trained: dict[str, tuple[str, dict[str, Any]]] = {}  # config without its name -> (variant, metrics)
    for name, vcfg in configs.items():
        vcfg.save(out / f"{name}.yaml")
        key = run_identity(vcfg)
        if key in trained:
            # e.g. Scratch when the config already trains from random init: same config, same seed, so
            # the same run; reported, not retrained.
            same, m = trained[key]
            log.info("ablation %s: identical config to %s; not retrained", name, same)
            what = f"{table[name][0]} (= {same}: identical config)"
        else:
            log.info("ablation %s: %s", name, table[name][0])
            m = _train_export_eval(vcfg, out)
            trained[key] = (name, m)
            what = table[name][0]
        rows.append(
            {
                "variant": name,
                "what": what,
                "accuracy": m["accuracy"],
                "f1_macro": m["f1_macro"],
                "best_head": m["best_head"],
                "map_at_5": m["map_at_5"],
                "map": m["map"],
                "text_head_f1": m["heads"]["text"]["f1_macro"],
            }
        )
        _write_table(rows, out, "ablation", "Ablations")  # after every variant: partial results survive
    return rows


def fewshot(cfg: Config, out: str | Path, fractions: list[float]) -> list[dict[str, Any]]:
    """Train on stratified fractions of the train split (same test split); F1 against fraction."""
    from galaxalign_dist.data.shards import is_prepared, read_metadata, split_rows, write_subset

    out = Path(out).resolve()
    # Every check before anything is written: bad input leaves no --out directory behind.
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"fractions must be in (0, 1], got {fractions}")
    from galaxalign_dist.launch.train import ensure_dataset

    ensure_dataset(cfg)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for frac in sorted(fractions):
        name = f"fraction_{frac:g}"
        data_dir = out / f"{name}-data"
        if not is_prepared(data_dir):
            write_subset(cfg.data.path, data_dir, cfg.data.train_split, frac, seed=cfg.run.seed)
        n_train = split_rows(read_metadata(data_dir), cfg.data.train_split)
        # Keep the global batch no larger than the subset so every worker still gets a full batch.
        per_step = cfg.engine.num_workers * cfg.engine.grad_accum_steps
        batch = max(per_step, min(cfg.data.batch_size, (n_train // per_step) * per_step))
        vcfg = _variant_config(cfg, name, {"data.path": str(data_dir), "data.batch_size": batch}, out)
        vcfg.save(out / f"{name}.yaml")
        m = _train_export_eval(vcfg, out)
        rows.append(
            {
                "fraction": frac,
                "n_train": n_train,
                "f1_macro": m["f1_macro"],
                "accuracy": m["accuracy"],
                "best_head": m["best_head"],
            }
        )
        _write_table(rows, out, "fewshot", "F1 against training fraction")
    _plot(rows, out / "fewshot.png")
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["fraction"] for r in rows], [r["f1_macro"] for r in rows], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of training data")
    ax.set_ylabel("macro F1 (test)")
    ax.set_title("Data-fraction curve")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
