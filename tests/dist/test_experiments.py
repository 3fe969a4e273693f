"""Ablation variants train what they claim; stratified subsets for data-fraction curves."""

from __future__ import annotations

import pytest
import torch

from galaxalign_dist import config
from galaxalign_dist.launch.experiments import _variant_config, run_identity, variants
from galaxalign_dist.train.checkpoint import LocalReporter
from galaxalign_dist.train.trainer import TrainData, Trainer


def test_variant_configs():
    cfg = config.load("demo_cpu", {"stages.stage1_epochs": 2, "stages.stage2_epochs": 3})
    v = {name: _variant_config(cfg, name, o, "/tmp/x") for name, (_, o) in variants(cfg).items()}
    assert not v["clip"].loss.use_symbols and (
        v["clip"].stages.stage1_epochs,
        v["clip"].stages.stage2_epochs,
    ) == (5, 0)
    assert (v["v1"].stages.stage1_epochs, v["v1"].stages.stage2_epochs) == (2, 0)
    assert (v["v2"].stages.stage1_epochs, v["v2"].stages.stage2_epochs) == (0, 5)
    assert (v["v3"].stages.stage1_epochs, v["v3"].stages.stage2_epochs) == (5, 0)
    assert v["scratch"].model.pretrained == "none"
    assert v["class_aware"].loss.targets == "class_aware" and v["galaxalign"].loss.targets == "diagonal"
    assert {c.run.name for c in v.values()} == set(v)  # separate runs, never resumed into each other
    # demo_cpu already trains from random init: Scratch is the same run as GalaxAlign, so ablate reports it
    # once; with pretrained weights it is a different run.
    identity = {name: run_identity(c) for name, c in v.items()}
    assert identity["scratch"] == identity["galaxalign"]
    assert len(set(identity.values())) == len(identity) - 1
    tagged = config.load("demo_cpu", {"model.pretrained": "/weights/tiny.pt"})
    assert run_identity(_variant_config(tagged, "scratch", variants(tagged)["scratch"][1], "/tmp/x")) != (
        run_identity(_variant_config(tagged, "galaxalign", {}, "/tmp/x"))
    )


def _nan_symbol_data(cfg) -> TrainData:
    """Symbols are NaN: any run that encodes a symbol gets a NaN loss."""
    from galaxalign_dist.train.model import build_tokenizer

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 3, 64, 64, generator=g), torch.randint(0, 4, (32,), generator=g)
    tokens = build_tokenizer(cfg.model)([f"A picture of a class {i} galaxy" for i in range(4)])

    def batches(epoch):  # noqa: ANN001, ANN202
        for i in range(0, 32, 16):
            yield {"image": images[i : i + 16], "symbol": torch.full_like(images[i : i + 16], float("nan")),
                   "tokens": tokens[labels[i : i + 16]], "label": labels[i : i + 16]}  # fmt: skip

    return TrainData(train=batches, steps_per_epoch=2)


@pytest.mark.timeout(300)
def test_clip_variant_never_sees_a_symbol_and_v1_never_builds_a_symbol_tower(single_rank_group, tmp_path):
    from galaxalign_dist.train.export import consolidate

    base = config.load(
        "demo_cpu",
        {
            "engine.num_workers": 1,
            "data.batch_size": 16,
            "stages.stage1_epochs": 1,
            "stages.stage2_epochs": 1,
            "logging.progress": False,
        },
    )
    clip = _variant_config(base, "clip", variants(base)["clip"][1], tmp_path)
    rep = LocalReporter(tmp_path / "clip")
    Trainer(clip, _nan_symbol_data(clip), rep).fit()  # finite: NonFiniteLossError otherwise
    assert all(set(k for k in h if k.startswith("loss_")) == {"loss_image_text"} for h in rep.history)
    with rep.latest_checkpoint() as ckpt:
        assert not any(k.startswith("symbol.") for k in consolidate(ckpt))
    v1 = _variant_config(base, "v1", variants(base)["v1"][1], tmp_path)
    rep = LocalReporter(tmp_path / "v1")
    from galaxalign_dist.train.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError):  # v1 does encode symbols (with the image tower)...
        Trainer(v1, _nan_symbol_data(v1), rep).fit()
    assert rep.history == []


def test_write_subset_is_stratified_and_nested(tmp_path):
    from galaxalign_dist.data.prepare import prepare
    from galaxalign_dist.data.shards import dataset, read_metadata, write_subset

    prepare("synthetic:galaxymnist", tmp_path / "full", n=200, seed=0, progress=False)
    small = write_subset(tmp_path / "full", tmp_path / "small", "train", 0.1)
    big = write_subset(tmp_path / "full", tmp_path / "big", "train", 0.5)
    n_classes = len(
        set(dataset(tmp_path / "full", "train").to_table(columns=["label"]).column("label").to_pylist())
    )
    assert sum(small["splits"]["train"]["per_class"].values()) == small["splits"]["train"]["rows"]
    assert len(small["splits"]["train"]["per_class"]) == n_classes  # every class kept
    ids = lambda d: set(dataset(d, "train").to_table(columns=["id"]).column("id").to_pylist())  # noqa: E731
    assert ids(tmp_path / "small") < ids(tmp_path / "big") < ids(tmp_path / "full")
    assert big["splits"]["test"] == read_metadata(tmp_path / "full")["splits"]["test"]  # test split whole
