"""Helpers shared by the embedding tests: a tiny exported model at a seeded random init."""

from __future__ import annotations

import json
from pathlib import Path


def export_tiny(out: Path, seed: int = 0) -> Path:
    """An export as `galaxalign export` writes it: the tiny model at a seeded random init."""
    import torch
    from safetensors.torch import save_file

    from galaxalign_dist import config as config_mod
    from galaxalign_dist.train.export import INFO, WEIGHTS
    from galaxalign_dist.train.model import build_model

    torch.manual_seed(seed)
    cfg = config_mod.load("demo_cpu")
    model = build_model(cfg.model, cfg.loss, with_symbol_tower=True, load_pretrained=False)
    out.mkdir(parents=True)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
    cfg.save(out / "config.yaml")
    (out / INFO).write_text(json.dumps({"has_symbol_tower": True}))
    return out
