"""Training checkpoints: every rank's DeepSpeed ZeRO shard plus the run state, verified before loading."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from galaxalign_dist.config import Config

TAG = "zero"  # DeepSpeed checkpoint tag: files live in CKPT/zero/
STATE_FILE = "state.json"  # stage, epoch, step: where to resume
CONFIG_FILE = "config.yaml"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file would need arbitrary pickled code to load."""


def _safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed writes into its shards; nothing else may be unpickled."""
    import collections

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address, collections.OrderedDict, torch.Size]


def verify_safe(ckpt_dir: str | Path) -> None:
    """Load every .pt under ckpt_dir with torch's weights-only unpickler (no code runs).

    DeepSpeed's own loader uses full pickle; running this first means it only ever sees files that
    hold tensors and the few allow-listed DeepSpeed types.
    """
    for path in sorted(Path(ckpt_dir).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here means: do not unpickle it for real
            raise UnsafeCheckpointError(
                f"{path}: refused to load, it is not a plain tensor checkpoint ({e})"
            ) from e


def save(engine, cfg: Config, state: dict[str, Any], rank: int, ckpt_dir: str | None = None) -> str:  # noqa: ANN001
    """Every rank writes its shard (by default into its own local temp dir; Ray merges them into one)."""
    ckpt_dir = ckpt_dir or tempfile.mkdtemp(prefix="galaxalign-ckpt-")
    engine.save_checkpoint(ckpt_dir, tag=TAG)
    if rank == 0:
        Path(ckpt_dir, STATE_FILE).write_text(json.dumps(state, indent=2))
        cfg.save(Path(ckpt_dir, CONFIG_FILE))
    return ckpt_dir


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir, STATE_FILE)
    if not path.exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a galaxalign checkpoint (no {STATE_FILE})")
    return json.loads(path.read_text())


def read_config(ckpt_dir: str | Path) -> Config:
    """The run config saved with a checkpoint (or an export); errors name the file."""
    from galaxalign_dist import config as config_mod

    file = Path(ckpt_dir) / CONFIG_FILE
    try:
        return config_mod.load(file)
    except config_mod.ConfigError as e:
        if str(e).startswith(str(file)):  # YAML syntax errors already name it
            raise
        raise config_mod.ConfigError(f"{file}: {e}") from None


def load(engine, ckpt_dir: str | Path) -> dict[str, Any]:  # noqa: ANN001
    """Restore model, optimizer and scheduler state into an engine built for the checkpoint's stage."""
    verify_safe(ckpt_dir)
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=TAG)
    if load_path is None:
        raise FileNotFoundError(f"{ckpt_dir}: DeepSpeed found no checkpoint under tag {TAG!r}")
    return read_state(ckpt_dir)


class LocalReporter:
    """Reporter for runs without Ray (tests, benchmarks): keeps checkpoints under a local directory."""

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root, self.keep = Path(root), keep
        self.history: list[dict[str, Any]] = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import shutil

        self.history.append(dict(metrics))
        if checkpoint_dir is None:
            return
        # Number after what is on disk, not this process's history: a resumed run keeps counting.
        existing = [int(p.name.split("_")[1]) for p in self.root.glob("checkpoint_??????")]
        dest = self.root / f"checkpoint_{max(existing, default=0) + 1:06d}"
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)  # merges ranks' files, as Ray does
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            tmp.rename(dest)  # atomic: a checkpoint either exists whole or not at all
            for old in sorted(self.root.glob("checkpoint_??????"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def latest_checkpoint(self):  # noqa: ANN201
        import contextlib

        found = sorted(self.root.glob("checkpoint_??????"))
        return contextlib.nullcontext(str(found[-1]) if found else None)
