"""Reliability without Ray: untrusted files refused, NaN loss stops cleanly, resume is bit-for-bit."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from galaxalign_dist import config
from galaxalign_dist.train import checkpoint
from galaxalign_dist.train.checkpoint import LocalReporter, UnsafeCheckpointError
from galaxalign_dist.train.trainer import NonFiniteLossError, TrainData, Trainer

N, B = 48, 16
pytestmark = pytest.mark.usefixtures("single_rank_group")  # one DeepSpeed process group (conftest)


def _cfg(**overrides):
    base = {
        "engine.num_workers": 1,
        "data.batch_size": B,
        "stages.stage1_epochs": 2,
        "stages.stage2_epochs": 2,
        "logging.progress": False,
        "optim.lr.image": 1e-3,
        "optim.lr.text": 1e-3,
        "optim.lr.symbol": 1e-3,
    }
    return config.load("demo_cpu", {**base, **overrides})


def _data(cfg, nan_from_epoch: int | None = None) -> TrainData:
    from galaxalign_dist.train.model import build_tokenizer

    g = torch.Generator().manual_seed(0)
    images = torch.randn(N, 3, 64, 64, generator=g)
    labels = torch.randint(0, 4, (N,), generator=g)
    captions = build_tokenizer(cfg.model)([f"A picture of a class {i} galaxy" for i in range(4)])

    def batches(epoch: int):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(epoch))  # new order each epoch
        for i in range(0, N, B):
            idx = order[i : i + B]
            x = images[idx] * (
                float("nan") if nan_from_epoch is not None and epoch >= nan_from_epoch else 1.0
            )
            yield {"image": x, "symbol": x.flip(-1), "tokens": captions[labels[idx]], "label": labels[idx]}

    return TrainData(train=batches, steps_per_epoch=N // B)


class _StopAfter(LocalReporter):
    """Stands in for a killed job: raises once `stop_after` epochs have been reported."""

    def __init__(self, root, stop_after: int) -> None:
        super().__init__(root, keep=10)
        self.stop_after = stop_after

    def report(self, metrics, checkpoint_dir):  # noqa: ANN001
        super().report(metrics, checkpoint_dir)
        if len(self.history) == self.stop_after:
            raise KeyboardInterrupt("simulated stop")


def _final_weights(root) -> dict[str, torch.Tensor]:
    from galaxalign_dist.train.export import consolidate

    with LocalReporter(root).latest_checkpoint() as ckpt:
        return consolidate(ckpt)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "zero_stage, stop_after", [(2, 3), (3, 1)], ids=["zero2-stop-in-stage2", "zero3-stop-in-stage1"]
)
def test_resume_after_stop_equals_uninterrupted_run(tmp_path, zero_stage, stop_after):
    cfg = _cfg(**{"engine.zero_stage": zero_stage})
    Trainer(cfg, _data(cfg), LocalReporter(tmp_path / "full", keep=10)).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, _data(cfg), _StopAfter(tmp_path / "resumed", stop_after)).fit()
    resumed = LocalReporter(tmp_path / "resumed", keep=10)
    Trainer(cfg, _data(cfg), resumed).fit()  # picks up the latest checkpoint
    assert [h["epoch_index"] for h in resumed.history] == list(range(stop_after + 1, 5))
    full, again = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "resumed")
    assert full.keys() == again.keys()
    # fp32 on CPU, fixed seeds and data order: the resumed run retraces the uninterrupted one bit for bit
    # (model, fp32 master weights, Adam moments and the lr schedule all come back from the checkpoint).
    differ = [k for k in full if not torch.equal(full[k], again[k])]
    assert not differ, differ
    assert (
        checkpoint.read_state(LocalReporter(tmp_path / "resumed").latest_checkpoint().__enter__())["step"]
        == 4 * N // B
    )


@pytest.mark.timeout(300)
def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path):
    cfg = _cfg(**{"engine.zero_stage": 2})
    reporter = LocalReporter(tmp_path, keep=10)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2 .*last good checkpoint is kept"):
        Trainer(cfg, _data(cfg, nan_from_epoch=1), reporter).fit()
    assert len(reporter.history) == 1  # epoch 1 reported; the NaN epoch never became a checkpoint
    with reporter.latest_checkpoint() as ckpt:
        assert checkpoint.read_state(ckpt)["epoch"] == 1
        weights = _final_weights(tmp_path)
    assert all(torch.isfinite(v).all() for v in weights.values())


class _Exploit:
    """A pickle payload that would run code on load (here: create a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_code_is_refused_before_anything_runs(tmp_path):
    cfg = _cfg(**{"stages.stage1_epochs": 2, "stages.stage2_epochs": 0})
    reporter = _StopAfter(tmp_path / "run", stop_after=1)  # a run stopped after epoch 1's checkpoint
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, _data(cfg), reporter).fit()
    with LocalReporter(tmp_path / "run").latest_checkpoint() as ckpt:
        checkpoint.verify_safe(ckpt)  # a genuine checkpoint passes
        marker = tmp_path / "pwned"
        target = next(Path(ckpt).rglob("mp_rank_00_model_states.pt"))
        with open(target, "wb") as f:
            pickle.dump({"module": _Exploit(str(marker))}, f)
        with pytest.raises(UnsafeCheckpointError, match="refused to load"):
            checkpoint.verify_safe(ckpt)
        from galaxalign_dist.train.export import export

        with pytest.raises(UnsafeCheckpointError, match="refused to load"):
            export(ckpt, tmp_path / "export")
    # The trainer itself resumes from that checkpoint (the latest one): it refuses it before DeepSpeed's
    # full-pickle loader sees it, and trains nothing.
    resumed = LocalReporter(tmp_path / "run")
    with pytest.raises(UnsafeCheckpointError, match=f"{target}: refused to load"):
        Trainer(cfg, _data(cfg), resumed).fit()
    assert resumed.history == []
    assert not marker.exists()  # the payload never ran


def test_exported_weights_are_safetensors_only(tmp_path):
    from safetensors.torch import save_file

    from galaxalign_dist.evaluation.bundle import load_model
    from galaxalign_dist.train.model import build_model

    cfg = _cfg()
    model = build_model(cfg.model, cfg.loss)
    out = tmp_path / "export"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    cfg.save(out / "config.yaml")
    (out / "export.json").write_text('{"has_symbol_tower": false}')
    assert load_model(out).logit_scale.shape == (1,)
    (out / "model.safetensors").write_bytes(pickle.dumps(_Exploit(str(tmp_path / "pwned"))))
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_model(out)
    assert not (tmp_path / "pwned").exists()
