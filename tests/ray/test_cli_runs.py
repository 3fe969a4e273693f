"""Happy paths of the subcommands that train, through the CLI on a real local Ray: train (and its rerun
resuming), export, eval, ablate (with its dedupe) and fewshot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from galaxalign_dist.cli.main import main

pytestmark = [pytest.mark.slow]

TINY = [
    "--config",
    "demo_cpu",
    "--set",
    "data.batch_size=16",
    "--set",
    "stages.stage1_epochs=1",
    "--set",
    "stages.stage2_epochs=1",
    "--set",
    "run.eval_max_rows=32",
    "--set",
    "logging.progress=false",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    import ray

    from galaxalign_dist.data.prepare import prepare

    root = tmp_path_factory.mktemp("cli_runs")
    prepare("synthetic:galaxymnist", root / "data", n=160, seed=0, progress=False)
    # 4 logical CPUs on a 2-core host: 2 workers x 0.5 CPU leave room for Ray Data's tasks
    # (docs/design.md#ray-on-small-hosts). The commands find this Ray and use it.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield root
    ray.shutdown()


def _args(world: Path, *extra: str) -> list[str]:
    return [*TINY, "--set", f"data.path={world / 'data'}", "--set", f"run.out_dir={world / 'runs'}", *extra]


def _history(run: Path) -> list[int]:
    return [json.loads(line)["epoch_index"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)
def test_train_rerun_export_eval(world: Path, tmp_path: Path) -> None:
    train = ["train", *_args(world), "--name", "happy"]
    assert main(train) == 0
    run = world / "runs" / "happy"
    assert _history(run) == [1, 2]
    ckpts = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    # The same command again resumes from the last checkpoint: nothing is left to train, nothing is re-run.
    assert main(train) == 0
    assert _history(run) == [1, 2]
    assert sorted(p for p in run.glob("checkpoint_*") if p.is_dir()) == ckpts

    assert main(["export", str(ckpts[-1]), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.safetensors").exists()
    assert json.loads((tmp_path / "export" / "export.json").read_text())["has_symbol_tower"] is True

    assert (
        main(["eval", str(tmp_path / "export"), "--data", str(world / "data"), "--out", str(tmp_path / "ev")])
        == 0
    )
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    # The reported head is chosen on held-out train rows; every head's test figures stay in the file.
    assert metrics["best_head"] in metrics["heads"] and {"text", "linear_probe"} <= set(metrics["heads"])
    assert metrics["f1_macro"] == metrics["heads"][metrics["best_head"]]["f1_macro"]
    assert metrics["n_test"] > 0 and 0.0 <= metrics["map_at_5"] <= 1.0
    assert (tmp_path / "ev" / "prototypes.npz").exists()
    assert list((tmp_path / "ev").glob("*.png")), "figures"


@pytest.mark.timeout(900)
def test_ablate_reports_an_identical_variant_once(world: Path, tmp_path: Path) -> None:
    # demo_cpu trains from random init, so `scratch` is the `galaxalign` run: trained once, reported twice.
    out = tmp_path / "ablate"
    assert main(["ablate", *_args(world), "--variants", "galaxalign,scratch", "--out", str(out)]) == 0
    with open(out / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["galaxalign", "scratch"]
    assert "(= galaxalign: identical config)" in rows[1]["what"]
    assert rows[0]["f1_macro"] == rows[1]["f1_macro"]
    assert (out / "galaxalign-export" / "model.safetensors").exists()
    assert not (out / "scratch-export").exists(), "the identical variant was trained again"


@pytest.mark.timeout(900)
def test_fewshot_trains_on_a_stratified_fraction(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "fewshot"
    assert main(["fewshot", *_args(world), "--fractions", "0.5", "--out", str(out)]) == 0
    with open(out / "fewshot.csv") as f:
        (row,) = list(csv.DictReader(f))
    full = json.loads(next((world / "data").glob("*metadata.json")).read_text())["splits"]["train"]["rows"]
    assert float(row["fraction"]) == 0.5 and int(row["n_train"]) == pytest.approx(
        full / 2, abs=4
    )  # rounded per class
    assert 0.0 <= float(row["f1_macro"]) <= 1.0
    assert (out / "fewshot.png").stat().st_size > 1000
