"""Typed configs: strict YAML, dotted overrides with type checks, validation before Ray starts."""

from __future__ import annotations

import pytest
import yaml

from galaxalign_dist import config
from galaxalign_dist.config import ConfigError


def test_packaged_configs_load_and_round_trip(tmp_path):
    for name in config.list_packaged():
        cfg = config.load(name)
        cfg.save(tmp_path / f"{name}.yaml")
        assert config.load(tmp_path / f"{name}.yaml") == cfg  # dumped YAML is a loadable config
    assert {"demo_cpu", "galaxy10_vitb16", "galaxymnist_convnext", "gzdesi_vitb16"} <= set(
        config.list_packaged()
    )


def test_overrides_are_typed_and_dotted():
    cfg = config.load("demo_cpu", ["optim.lr.image=1e-4", "engine.zero_stage=3", "loss.targets=class_aware"])
    assert cfg.optim.lr.image == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string: accepted
    assert cfg.engine.zero_stage == 3 and cfg.loss.targets == "class_aware"
    assert config.load("demo_cpu", {"model.lock_image": True}).model.lock_image is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["engine.zero_stage=4"], "engine.zero_stage: 4 is not a DeepSpeed ZeRO stage"),
        (["optim.lr.imag=1"], "optim.lr.imag: unknown config key"),
        (["nosuch.key=1"], "nosuch: unknown config key"),
        (["data.batch_size=65"], "data.batch_size: 65 is not divisible"),
        (["stages.stage1_epochs=-1"], "stages.stage1_epochs: must be >= 0"),
        (["stages.stage1_epochs=0", "stages.stage2_epochs=0"], "nothing to train"),
        (["engine.zero_stage=three"], "engine.zero_stage: expected an integer"),
        (["model.lock_image=3"], "model.lock_image: expected true/false"),
        (["engine.precision=fp8"], "engine.precision: 'fp8' is not one of"),
        (["engine.offload_params=true"], "engine.offload_params: parameter offload needs"),
        (["optim.lr.text=-1"], "optim.lr.text: must be a finite number"),
        (["data.cache_decoded_gb=-1"], "data.cache_decoded_gb: must be a finite number >= 0"),
        (["engine"], "expected KEY=VALUE"),
    ],
)
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config.load("demo_cpu", overrides)


def test_unknown_key_in_yaml_file_names_dotted_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": {"image": 1e-4, "vision": 1e-4}}}))
    with pytest.raises(ConfigError, match=r"optim\.lr\.vision: unknown config key"):
        config.load(path)
    path.write_text("engine: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(path)


def test_batch_arithmetic():
    cfg = config.load("demo_cpu", ["data.batch_size=64", "engine.num_workers=2", "engine.grad_accum_steps=2"])
    assert cfg.micro_batch_size == 16
    assert cfg.negatives_per_loss == 32  # accumulation adds samples per step, not negatives


def test_flat_keys_cover_tune_paths():
    keys = config.flat_keys()
    for k in (
        "optim.lr.image",
        "optim.lr.text",
        "optim.lr.symbol",
        "loss.init_temperature",
        "stages.stage1_epochs",
    ):
        assert k in keys


def test_cli_rejects_bad_config_before_ray(capsys):
    from galaxalign_dist.cli.main import main

    assert main(["train", "--config", "demo_cpu", "--set", "engine.zero_stage=4"]) == 2
    assert "engine.zero_stage" in capsys.readouterr().err
    assert main(["train", "--config", "demo_cpu", "--set", "model.name=ViT-Nope"]) == 2
    assert "model.name" in capsys.readouterr().err


def test_workers_get_absolute_local_paths(tmp_path, monkeypatch):
    # Ray workers run in their own directories: a relative data.path (as in demo_cpu) must reach them
    # resolved against the driver's cwd; URIs pass through untouched.
    from galaxalign_dist.paths import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(config.load("demo_cpu", {"run.out_dir": "s3://bucket/runs"}))
    assert cfg.data.path == str(tmp_path / "runs" / "demo" / "data")
    assert cfg.run.out_dir == "s3://bucket/runs"


def test_every_packaged_config_restarts_a_dead_worker():
    # A worker killed by the machine (OOM, preemption, a native crash) must not end the run: Ray Train
    # restarts it from the last checkpoint, a bounded number of times.
    for name in config.list_packaged():
        cfg = config.load(name)
        assert 1 <= cfg.run.max_failures <= 5, name
        assert cfg.run.checkpoint_every_epochs >= 1, name
