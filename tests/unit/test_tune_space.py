"""Search spaces and cluster files, checked without Ray: samplers, dotted keys, sampled configs, cluster YAMLs."""

from __future__ import annotations

import copy
import csv
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from galaxalign_dist import config
from galaxalign_dist.config import ConfigError
from galaxalign_dist.launch import tune_report, tune_run, tune_samplers, tune_space

ROOT = Path(__file__).resolve().parents[2]
SPACES = sorted((ROOT / "tune").glob("*.yaml"))
CLUSTER_YAMLS = sorted((ROOT / "cluster").glob("*.yaml"))

SMOKE = {
    "base_config": "demo_cpu",
    "overrides": {"data.batch_size": 32, "stages.stage2_epochs": 1},
    "space": {
        "loss.init_temperature": "loguniform(0.02, 0.2)",
        "optim.lr.image": "loguniform(1e-4, 2e-3)",
        "stages.stage1_epochs": "choice([0, 1])",
    },
    "search": {"algorithm": "random", "seed": 0},
    "scheduler": {"type": "asha", "metric": "val_f1", "mode": "max", "grace_period": 1, "max_t": 2},
    "num_samples": 2,
}


def _spec(**changes):
    raw = copy.deepcopy(SMOKE)
    for key, value in changes.items():
        if key in ("space", "overrides", "scheduler", "search"):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return tune_space.spec_from_dict(raw)


# ----------------------------------------------------------------------------- tune/*.yaml


def test_there_are_search_spaces():
    assert {p.stem for p in SPACES} >= {"smoke_cpu", "galaxy10_gpu", "galaxymnist_gpu"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_space_parses_and_a_sampled_point_builds_a_config(path):
    spec = tune_space.load_spec(path)
    known = config.flat_keys()
    assert set(spec.space) <= set(known) and set(spec.overrides) <= set(known)
    cfg = tune_space.check_spec(spec)  # builds a trial Config from a sampled point
    point = tune_space.sample_point(spec)
    for key, value in point.items():
        section, _, leaf = key.rpartition(".")
        node = cfg
        for part in section.split("."):
            node = getattr(node, part)
        assert getattr(node, leaf) == pytest.approx(value), key
    trial = tune_run.trial_config(spec.base_dict(), point, "trial_x", "/tmp/search/trials")
    assert trial.run.name == "trial_x" and trial.run.out_dir == "/tmp/search/trials"
    if spec.scheduler == "asha":
        # Stage boundaries: no trial may be stopped inside its warm-up.
        assert spec.grace_period >= tune_space.max_stage1_epochs(
            spec, tune_space.load_base(spec.base_config, spec.overrides)
        )


def test_gpu_spaces_are_paper_scale():
    for name, base in (("galaxy10_gpu", "galaxy10_vitb16"), ("galaxymnist_gpu", "galaxymnist_convnext")):
        spec = tune_space.load_spec(ROOT / "tune" / f"{name}.yaml")
        assert spec.base_config == base and spec.algorithm == "optuna" and spec.scheduler == "asha"
        assert spec.metric == "val_f1" and spec.num_samples == 32
        assert spec.space["stages.stage1_epochs"].values == [2, 5, 10, 15]
        assert {"loss.init_temperature", "optim.lr.image", "optim.lr.text", "optim.lr.symbol"} <= set(
            spec.space
        )
        assert spec.overrides["engine.num_workers"] * spec.max_concurrent_trials == 16  # a 16-GPU cluster


def test_smoke_space_is_small():
    spec = tune_space.load_spec(ROOT / "tune" / "smoke_cpu.yaml")
    base = tune_space.load_base(spec.base_config, spec.overrides)
    assert spec.num_samples == 4 and spec.max_concurrent_trials == 1
    assert tune_space.max_total_epochs(spec, base) <= 2
    assert 800 <= base.data.prepare_n <= 1500 and 32 <= base.data.batch_size <= 64
    assert base.model.name == "tiny" and not base.engine.use_gpu


# ----------------------------------------------------------------------------- samplers


@pytest.mark.parametrize(
    "text, domain, sampler",
    [
        ("loguniform(1e-5, 1e-3)", "Float", "_LogUniform"),
        ("uniform(0.01, 0.2)", "Float", "_Uniform"),
        ("randint(1, 5)", "Integer", "_Uniform"),
        ("choice([2, 5, 10, 15])", "Categorical", "_Uniform"),
    ],
)
def test_samplers_map_to_ray_tune(text, domain, sampler):
    d = tune_samplers.parse_sampler("k", text).to_tune()
    assert type(d).__name__ == domain and type(d.sampler).__name__ == sampler


def test_sampler_arguments_and_grid():
    s = tune_samplers.parse_sampler("k", "loguniform(1.0e-5, 1.0e-3)")
    assert s.args == (1e-5, 1e-3)
    d = s.to_tune()
    assert (d.lower, d.upper) == (1e-5, 1e-3)
    assert tune_samplers.parse_sampler("k", "grid(['a', 'b'])").to_tune() == {"grid_search": ["a", "b"]}
    assert tune_samplers.parse_sampler("k", "randint(1, 5)").to_tune().upper == 5  # exclusive, as in Ray


@pytest.mark.parametrize(
    "text, message",
    [
        ("normal(0, 1)", "unknown sampler 'normal'"),
        ("loguniform(0, 1)", "loguniform needs low > 0"),
        ("uniform(2, 1)", "needs low < high"),
        ("choice([])", "one non-empty list"),
        ("choice(1, 2)", "one non-empty list"),
        ("randint(1.5, 3)", "randint takes integers"),
        ("__import__('os').system('true')", "unknown sampler '__import__'"),
        ("choice([__import__('os')])", "Python literals only"),
        ("0.1", "is not a sampler call"),
        (0.1, "fixed values go under `overrides:`"),
    ],
)
def test_bad_samplers_are_rejected_without_eval(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tune_samplers.parse_sampler("optim.lr.image", text)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"space": {"optim.lr.imag": "loguniform(1e-5, 1e-3)"}},
            "space.optim.lr.imag: not a run-config field; did you mean optim.lr.image?",
        ),
        ({"overrides": {"data.batchsize": 32}}, "overrides.data.batchsize: not a run-config field"),
        ({"space": {"stages.stage1_epochs": "loguniform(1, 10)"}}, "integer field"),
        ({"space": {"loss.targets": "uniform(0, 1)"}}, "use choice([...])"),
        (
            {"space": {"stages.stage1_epochs": "choice([1, 'two'])"}},
            "stages.stage1_epochs: expected an integer",
        ),
        (
            {"space": {"loss.init_temperature": "uniform(0.5, 2.0)"}},
            "loss.init_temperature: must be in (0, 1)",
        ),
        ({"space": {"loss.targets": "choice(['diagonal', 'classy'])"}}, "'classy' is not one of"),
        ({"space": {"run.name": "choice(['a', 'b'])"}}, "set per trial by the search"),
        ({"space": {"data.batch_size": "choice([32])"}}, "also fixed under overrides"),
        (
            {"scheduler": {"grace_period": 1}, "space": {"stages.stage1_epochs": "choice([1, 3])"}},
            "grace_period: 1 < the longest stage 1 (3 epochs)",
        ),
        ({"scheduler": {"metric": "val_f2"}}, "scheduler.metric: 'val_f2' is not one of"),
        ({"scheduler": {"type": "pbt"}}, "scheduler.type: 'pbt'"),
        ({"scheduler": {"patience": 3}}, "scheduler.patience: unknown key"),
        (
            {"search": {"algorithm": "optuna"}, "space": {"optim.lr.text": "grid([1e-4, 1e-3])"}},
            "grid([...]) needs search.algorithm: random",
        ),
        ({"resources_per_trial": {"cpu": 0}}, "resources_per_trial.cpu: must be > 0"),
        ({"num_samples": 0}, "num_samples: expected an integer >= 1"),
        ({"trials": 4}, "trials: unknown top-level key"),
        ({"overrides": {"run.eval_every_epochs": 2}}, "run.eval_every_epochs: ASHA ranks trials"),
        (
            {"points_to_evaluate": [{"optim.lr.text": 1e-4}]},
            "points_to_evaluate[0].optim.lr.text: not a searched key",
        ),
    ],
)
def test_bad_spaces_fail_before_ray_naming_the_key(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _spec(**changes)


def test_set_pairs_address_search_keys_and_pin_run_keys(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SMOKE))
    spec = tune_space.load_spec(
        path,
        [
            "num_samples=3",
            "scheduler.type=fifo",
            "search.seed=7",
            "space.optim.lr.text=loguniform(1e-4, 1e-3)",
            "stages.stage1_epochs=1",  # a run key that was searched: now fixed for every trial
            "data.prepare_n=900",
        ],
    )
    assert spec.num_samples == 3 and spec.scheduler == "fifo" and spec.seed == 7
    assert spec.space["optim.lr.text"].kind == "loguniform"
    assert "stages.stage1_epochs" not in spec.space and spec.overrides["stages.stage1_epochs"] == 1
    assert spec.overrides["data.prepare_n"] == 900
    with pytest.raises(ConfigError, match=re.escape("space.optim.lr.imge: not a run-config field")):
        tune_space.load_spec(path, ["space.optim.lr.imge=loguniform(1e-4, 1e-3)"])


def test_cli_check_rejects_a_typo_with_one_line(tmp_path, capsys):
    from galaxalign_dist.cli.main import main

    bad = copy.deepcopy(SMOKE)
    bad["space"]["optim.lr.imag"] = "loguniform(1e-5, 1e-3)"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["tune", "--config", str(path), "--check"]) == 2
    assert "optim.lr.imag" in capsys.readouterr().err


# ----------------------------------------------------------------------------- outputs (no Ray)


@pytest.mark.timeout(120)
def test_summary_table_best_config_and_plot(tmp_path):
    spec = _spec()
    base_cfg = tune_space.load_base(spec.base_config, spec.overrides)
    rows = [
        {
            "trial": "trial_a",
            "status": "completed",
            "val_f1": 0.41,
            "best_val_f1": 0.41,
            "epochs": 2,
            "loss.init_temperature": 0.05,
            "optim.lr.image": 1e-3,
            "stages.stage1_epochs": 1,
            "error": "",
        },
        {
            "trial": "trial_b",
            "status": "failed",
            "val_f1": None,
            "best_val_f1": None,
            "epochs": 0,
            "loss.init_temperature": 0.1,
            "optim.lr.image": 2e-4,
            "stages.stage1_epochs": 0,
            "error": "boom | x",
        },
        {
            "trial": "trial_c",
            "status": "stopped",
            "val_f1": 0.62,
            "best_val_f1": 0.62,
            "epochs": 1,
            "loss.init_temperature": 0.03,
            "optim.lr.image": 5e-4,
            "stages.stage1_epochs": 0,
            "error": "",
        },
    ]
    rows = tune_report.sort_rows(rows, "val_f1", "max")
    assert [r["trial"] for r in rows] == ["trial_c", "trial_a", "trial_b"]
    best = tune_report.write_summary(rows, spec, base_cfg.to_dict(), base_cfg, tmp_path)
    assert best["trial"] == "trial_c"
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["stopped", "completed", "failed"] and table[2][
        "error"
    ] == "boom | x"
    assert "boom \\| x" in (tmp_path / "results.md").read_text()
    cfg = config.load(tmp_path / "best_config.yaml")  # ready for `galaxalign train --config`
    assert cfg.loss.init_temperature == pytest.approx(0.03) and cfg.stages.stage1_epochs == 0
    assert cfg.run.name == f"{base_cfg.run.name}-tuned" and cfg.run.out_dir == base_cfg.run.out_dir
    assert (tmp_path / "metric_vs_params.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- cluster/


def test_cluster_files_exist():
    names = {p.name for p in (ROOT / "cluster").iterdir()}
    assert {
        "aws-gpu.yaml",
        "onprem.yaml",
        "kuberay-raycluster.yaml",
        "kuberay-rayjob.yaml",
        "runtime_env.yaml",
        "submit.sh",
        "README.md",
    } <= names


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yamls_parse(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "onprem.yaml"])
def test_cluster_launcher_configs_match_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster" / name).read_text())
    validate_config(prepare_config(cfg))  # jsonschema of this Ray's `ray up`: unknown keys fail
    text = (ROOT / "cluster" / name).read_text()
    # Installed as the Makefile does: the torch pair first, DeepSpeed without build isolation, then the package.
    order = [
        text.index(s)
        for s in ('"torch==2.15.0" "torchvision==0.29.2"', "--no-build-isolation", "pip install --quiet -e")
    ]
    assert order == sorted(order)
    # The dashboard / job API stays on loopback (reached through `ray dashboard`'s SSH tunnel).
    assert "--dashboard-host=127.0.0.1" in text and "0.0.0.0" not in text


def test_kuberay_manifests():
    cluster = [d for d in yaml.safe_load_all((ROOT / "cluster/kuberay-raycluster.yaml").read_text()) if d]
    rc = next(d for d in cluster if d["kind"] == "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["spec"]["authOptions"]["mode"] == "token"
    assert rc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"  # never exposed publicly
    gpu = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" in gpu
    job = yaml.safe_load((ROOT / "cluster/kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("galaxalign train --config")
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    env = yaml.safe_load((ROOT / "cluster/runtime_env.yaml").read_text())
    for pattern in (".venv/", "runs/", "data/", "checkpoints/", "*.parquet"):
        assert pattern in env["excludes"]


def _galaxalign_commands(text: str) -> list[list[str]]:
    """Every `galaxalign train|tune ...` command line mentioned in a file (YAML values and comments)."""
    cmds = []
    joined = re.sub(r"\n\s*(?:#\s*)?(?=--)", " ", text)  # folded YAML / continued comment lines
    for m in re.finditer(r"galaxalign (train|tune)\b([^\n]*)", joined):
        try:
            tokens = shlex.split(m.group(2), comments=False)
        except ValueError:
            tokens = m.group(2).split()
        cmds.append([m.group(1), *tokens])
    return cmds


def _submit_commands(text: str) -> list[list[str]]:
    """`cluster/submit.sh train|tune CONFIG ...` mentions: the same arguments as galaxalign's."""
    return [
        [m.group(1), "--config", *m.group(2).split()]
        for m in re.finditer(r"submit\.sh (train|tune) ([^\n]*)", text)
    ]


@pytest.mark.parametrize("path", [*CLUSTER_YAMLS, ROOT / "cluster" / "submit.sh"], ids=lambda p: p.name)
def test_commands_in_cluster_files_reference_real_configs_and_keys(path):
    text = path.read_text()
    known = config.flat_keys()
    cmds = _galaxalign_commands(text) + _submit_commands(text)
    for cmd in cmds:
        sub, args = cmd[0], cmd[1:]
        for flag, value in zip(args, args[1:], strict=False):
            if flag == "--config":
                if value in ("CONFIG", "SPACE.yaml"):
                    continue  # usage placeholders
                if sub == "train":
                    assert value in config.list_packaged() or (ROOT / value).exists(), f"{path.name}: {value}"
                else:
                    assert (ROOT / value).exists(), f"{path.name}: no search space {value}"
            if flag == "--set":
                key = value.split("=", 1)[0]
                search_key = key.split(".", 1)[0] in tune_space.TOP_LEVEL
                assert key in known or (sub == "tune" and search_key), f"{path.name}: --set {key}"
    if path.name != "runtime_env.yaml":
        assert cmds, f"{path.name} shows no galaxalign command"


def test_submit_sh_is_valid_bash():
    script = ROOT / "cluster" / "submit.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "ray_bin=${RAY:-ray}" in text and "${RAY_ADDRESS:-http://127.0.0.1:8265}" in text
    assert "--runtime-env cluster/runtime_env.yaml" in text and "--working-dir ." in text
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "submit.sh train CONFIG" in usage.stderr
