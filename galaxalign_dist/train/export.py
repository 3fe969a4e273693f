"""Export: consolidate a ZeRO checkpoint into plain fp32 safetensors + config (loaded by evaluation.bundle)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from galaxalign_dist.train import checkpoint

log = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"
INFO = "export.json"


def consolidate(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from every rank's shard (DeepSpeed's zero_to_fp32 for ZeRO 1-3)."""
    ckpt_dir = Path(ckpt_dir)
    checkpoint.verify_safe(ckpt_dir)  # zero_to_fp32 unpickles fully: only after this check
    cfg = checkpoint.read_config(ckpt_dir)
    if cfg.engine.zero_stage == 0:
        # No ZeRO: rank 0's module file holds the whole model (fp32 masters when training in fp32).
        states = torch.load(ckpt_dir / checkpoint.TAG / "mp_rank_00_model_states.pt", weights_only=False)
        state = states["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=checkpoint.TAG)
    return {k: v.detach().float().contiguous() for k, v in state.items()}


def export(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """Write OUT/model.safetensors, OUT/config.yaml, OUT/export.json; returns OUT."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    state_info = checkpoint.read_state(ckpt_dir)
    weights = consolidate(ckpt_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / WEIGHTS), metadata={"format": "galaxalign_dist"})
    shutil.copy(ckpt_dir / checkpoint.CONFIG_FILE, tmp / checkpoint.CONFIG_FILE)
    info = {
        **state_info,
        "has_symbol_tower": any(k.startswith("symbol.") for k in weights),
        "num_parameters": int(sum(v.numel() for v in weights.values())),
        "source_checkpoint": str(ckpt_dir),
    }
    (tmp / INFO).write_text(json.dumps(info, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)  # an export directory is complete or absent
    log.info("exported %s parameters to %s", f"{info['num_parameters']:,}", out_dir)
    return out_dir
