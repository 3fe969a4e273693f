"""An exported model as one bundle: the model, its run config, tokenizer and eval transform (no DeepSpeed, no Ray)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from galaxalign_dist.config import Config
from galaxalign_dist.data.transform import TripletTransform
from galaxalign_dist.train import checkpoint
from galaxalign_dist.train.export import INFO, WEIGHTS
from galaxalign_dist.train.model import (
    TriModalCLIP,
    build_model,
    build_tokenizer,
    build_transform,
    image_size,
)


@dataclass
class Bundle:
    """What inference needs from an export, built from one config (open_clip's create_model_and_transforms)."""

    path: Path
    model: TriModalCLIP  # eval mode
    config: Config
    tokenizer: Callable[[list[str]], torch.Tensor]
    info: dict[str, Any]  # export.json: stage, epoch, step, source checkpoint

    @property
    def image_size(self) -> int:
        return image_size(self.config.model)

    def transform(self, keep_ids: bool = True) -> TripletTransform:
        """The eval preprocessing (shortest side, bicubic, centre crop, CLIP mean/std) for shard rows."""
        return build_transform(self.config, train=False, keep_ids=keep_ids)

    @torch.no_grad()
    def embed_images(self, encoded: list[bytes]) -> np.ndarray:
        """(N, D) L2-normalised image embeddings of encoded image files (JPEG/PNG/WEBP bytes)."""
        n = len(encoded)
        rows = {
            "id": np.array([f"query-{i}" for i in range(n)], dtype=object),
            "image": np.array(encoded, dtype=object),
            "label": np.zeros(n, np.int64),
            "text": np.array([""] * n, dtype=object),
            "symbol": np.array(["round"] * n, dtype=object),  # unused: only the image tower runs
        }
        pixels = torch.as_tensor(self._query_transform(rows)["image"])
        return self.model.encode_image(pixels.to(self.device)).float().cpu().numpy()

    @functools.cached_property
    def _query_transform(self) -> TripletTransform:
        # Built once per bundle: building one (tokenizer, symbol renderer) took ~60 ms on the development VM,
        # 8x the decode and forward pass of a 64 px query image, and a search service embeds one per request.
        return self.transform(keep_ids=False)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(N, D) L2-normalised text embeddings (e.g. captions for zero-shot search)."""
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu().numpy()

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load an export directory: safetensors only (no pickle), strict key match, model in eval mode."""
    path = Path(path)
    for name in (WEIGHTS, checkpoint.CONFIG_FILE, INFO):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path}: not an exported galaxalign model (missing {name})")
    cfg = checkpoint.read_config(path)
    try:
        info: dict[str, Any] = json.loads((path / INFO).read_text())
        with_symbol_tower = bool(info["has_symbol_tower"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path / INFO}: not a valid export info file ({type(e).__name__}: {e})") from None
    model = build_model(cfg.model, cfg.loss, with_symbol_tower=with_symbol_tower, load_pretrained=False)
    try:
        weights = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path / WEIGHTS}: not a readable safetensors file ({e})") from None
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:  # size mismatch / missing or unexpected keys
        raise ValueError(
            f"{path / WEIGHTS}: does not fit the model in {path / checkpoint.CONFIG_FILE} ({e})"
        ) from None
    return Bundle(path, model.to(device).eval(), cfg, build_tokenizer(cfg.model), info)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> TriModalCLIP:
    """Just the model of an export (see load_bundle)."""
    return load_bundle(path, device).model
