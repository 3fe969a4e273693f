"""The tri-modal CLIP: image, text and symbol towers built with open_clip, plus a learnable temperature."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from galaxalign_dist.config import Config, LossConfig, ModelConfig
from galaxalign_dist.data.decode import DecodeTransform
from galaxalign_dist.data.preprocess import DevicePreprocess
from galaxalign_dist.data.transform import TripletTransform

log = logging.getLogger(__name__)

# Models as data: small flavours by name; anything else is an open_clip model name.
FLAVOURS: dict[str, dict[str, Any]] = {
    # ~3.5M parameters, most of them the 49k-token embedding: fast enough for CPU tests and the demo.
    "tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    # ViT-B-16-sized towers (same widths/depths as open_clip's ViT-B-16) with random init; used by
    # benchmarks where the real pretrained weights cannot be downloaded.
    "vit-b-16-random": dict(open_clip.get_model_config("ViT-B-16") or {}),
    # A ConvNeXt image tower (timm's convnext_atto, 3.4M parameters, random init) with the tiny text tower: CPU
    # tests of the convolutional path (channels_last, timm's grad checkpointing) that convnext_base takes.
    "tiny-convnext": {
        "embed_dim": 64,
        "vision_cfg": {
            "timm_model_name": "convnext_atto",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "timm_drop": 0.0,
            "timm_drop_path": 0.0,
            "image_size": 64,
        },
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}

TOWERS = ("image", "text", "symbol")


def _open_clip_cfg(name: str) -> dict[str, Any] | None:
    return FLAVOURS.get(name) or open_clip.get_model_config(name)


def check_model_name(name: str) -> None:
    """Fail before any cluster resources are taken when the model name is unknown."""
    if name not in FLAVOURS and name not in open_clip.list_models():
        raise ValueError(
            f"model.name: {name!r} is neither a flavour ({', '.join(FLAVOURS)}) nor an open_clip model "
            "(see open_clip.list_models())"
        )


def build_clip(cfg: ModelConfig, load_pretrained: bool = True) -> open_clip.CustomTextCLIP:
    """An open_clip CLIP with the text tower as a module (`.text`), pretrained weights if asked."""
    check_model_name(cfg.name)
    pretrained = None if cfg.pretrained in ("", "none") or not load_pretrained else cfg.pretrained
    if cfg.name in FLAVOURS:
        model = open_clip.CustomTextCLIP(**FLAVOURS[cfg.name])
        if pretrained:
            # A flavour has no published weights: `pretrained` must be a local checkpoint path.
            open_clip.load_checkpoint(model, pretrained, weights_only=True)
    else:
        # force_custom_text puts the text transformer in its own module; open_clip converts
        # classic CLIP checkpoints (e.g. OpenAI's) to that layout when loading.
        model = open_clip.create_model(cfg.name, pretrained=pretrained, force_custom_text=True)
    if not isinstance(model, open_clip.CustomTextCLIP):
        raise ValueError(
            f"model.name: {cfg.name!r} does not build a two-tower CLIP (got {type(model).__name__})"
        )
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


class TriModalCLIP(nn.Module):
    """Three towers and one temperature; `symbol` is None in stage 1, where symbols use the image tower."""

    def __init__(self, clip: open_clip.CustomTextCLIP, loss_cfg: LossConfig) -> None:
        super().__init__()
        self.image = clip.visual
        self.text = clip.text
        self.symbol: nn.Module | None = None
        # A 1-element 1-D parameter, not open_clip's 0-dim one: ZeRO-3 cannot partition 0-dim tensors.
        init = math.log(1.0 / loss_cfg.init_temperature)
        self.logit_scale = nn.Parameter(torch.full((1,), init), requires_grad=loss_cfg.learn_temperature)
        self.max_log_scale = math.log(loss_cfg.max_logit_scale)
        self.preprocess_cfg: dict[str, Any] = dict(open_clip.get_model_preprocess_cfg(clip))
        self.compile_backend: str | None = None  # set by compile_towers

    @property
    def has_symbol_tower(self) -> bool:
        return self.symbol is not None

    def add_symbol_tower(self) -> None:
        """Stage 2: the symbol tower starts as an exact copy of the (stage-1) image tower."""
        self.symbol = copy.deepcopy(self.image)
        for p in self.symbol.parameters():
            p.requires_grad_(True)  # a locked image tower does not lock the new symbol tower
        if self.compile_backend is not None:
            # The copy would call the image tower's compiled forward (bound to the image tower): its own.
            self.symbol._compiled_call_impl = None
            self.symbol.compile(backend=self.compile_backend)

    def temperature_scale(self) -> torch.Tensor:
        # Clamped here, inside forward, so the bound holds whatever the optimizer/precision does.
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def encode_symbol(self, symbols: torch.Tensor) -> torch.Tensor:
        tower = self.symbol if self.symbol is not None else self.image
        return F.normalize(tower(symbols), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, symbols: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """images, symbols: (B, 3, S, S); tokens: (B, L). Returns L2-normalised (B, D) features."""
        out = {"text": self.encode_text(tokens), "logit_scale": self.temperature_scale()}
        if symbols is None:
            out["image"] = self.encode_image(images)
        elif self.symbol is None:
            # Stage 1: one shared encoder, one forward over the concatenated batch (one ZeRO-3 gather).
            both = self.encode_image(torch.cat([images, symbols], dim=0))
            out["image"], out["symbol"] = both.split(images.shape[0], dim=0)
        else:
            out["image"] = self.encode_image(images)
            out["symbol"] = self.encode_symbol(symbols)
        return out

    def tower_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named trainable parameters per optimizer group: image, text, symbol, temperature."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {t: [] for t in (*TOWERS, "temperature")}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups["temperature" if name == "logit_scale" else name.split(".", 1)[0]].append((name, p))
        return groups


def build_model(
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    with_symbol_tower: bool = False,
    load_pretrained: bool = True,
) -> TriModalCLIP:
    model = TriModalCLIP(build_clip(model_cfg, load_pretrained=load_pretrained), loss_cfg)
    if model_cfg.channels_last:
        set_channels_last(model.image)  # before the copy: the symbol tower inherits it
    if with_symbol_tower:
        model.add_symbol_tower()
    return model


def _inputs_channels_last(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def set_channels_last(tower: nn.Module) -> None:
    """An image tower's inputs in channels_last (NHWC), the layout GPU convolutions run fastest in.

    Inputs only, by a forward pre-hook: a convolution with an NHWC input runs in NHWC (cuDNN converts the
    weight, a small copy for ConvNeXt, whose convolutions are the stem, the downsamplers and the depthwise
    7x7s). The weights stay contiguous because DeepSpeed 0.19.8 cannot hold channels_last parameters: its
    initial broadcast views each parameter as bytes (`p.data.view(torch.uint8)` needs stride(-1) == 1) and
    ZeRO 1-2 flatten them into contiguous buffers. Values are unchanged; a deep copy keeps the hook.
    """
    tower.register_forward_pre_hook(_inputs_channels_last)


def compile_towers(model: TriModalCLIP, backend: str = "inductor") -> None:
    """torch.compile each tower's forward in place (nn.Module.compile): parameter names and state_dict keys
    stay as they are, so DeepSpeed's ZeRO partitioning (0-2), checkpoints and export see the same module.

    A symbol tower added later (stage 2) is compiled as it is created. The loss and the glue between towers
    stay eager.
    """
    model.compile_backend = backend
    for name in TOWERS:
        tower = getattr(model, name)
        if tower is not None:
            tower.compile(backend=backend)


def build_tokenizer(model_cfg: ModelConfig) -> Tokenizer:
    """open_clip's tokenizer for the model (the BPE vocabulary ships with open_clip: no download)."""
    return Tokenizer(model_cfg.name)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """open_clip's tokenizer of a model, shipped by name and built once per process.

    Why not the tokenizer object itself: its BPE tables pickle to 2 MB that take ~30 ms to unpickle, and
    Ray Data unpickles a task's transform in every task (seen: 47 decode tasks a 1,600-row epoch, 1.5 s of
    CPU); a name costs nothing to ship.
    """

    name: str

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return _open_clip_tokenizer(self.name)(texts)


@functools.lru_cache(maxsize=4)
def _open_clip_tokenizer(name: str) -> Callable[[list[str]], torch.Tensor]:
    cfg = _open_clip_cfg(name) or {}
    context_length = cfg.get("text_cfg", {}).get("context_length", 77)
    if name in FLAVOURS:
        return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    return open_clip.get_tokenizer(name, context_length=context_length)


def build_transform(cfg: Config, train: bool, keep_ids: bool = False) -> TripletTransform:
    """The one factory of the model's data transform (train: augmentation; eval: open_clip's preprocessing)."""
    return TripletTransform(
        image_size=image_size(cfg.model),
        train=train and cfg.data.augment,
        tokenizer=build_tokenizer(cfg.model),
        seed=cfg.run.seed,
        on_bad_image=cfg.data.on_bad_image,
        keep_ids=keep_ids,
    )


def build_decode(cfg: Config, canvas: int, keep_ids: bool = False) -> DecodeTransform:
    """The data-side half of the training pipeline (decode to a `canvas` square, tokens), for Ray Data tasks."""
    return DecodeTransform(canvas, build_tokenizer(cfg.model), cfg.data.on_bad_image, keep_ids)


def build_preprocess(cfg: Config, device: torch.device | str, dtype: torch.dtype) -> DevicePreprocess:
    """The device-side half (augmentation warp, symbol bank, normalisation), on the worker."""
    return DevicePreprocess(image_size(cfg.model), cfg.run.seed, device, dtype, symbols=cfg.loss.use_symbols)


def image_size(model_cfg: ModelConfig) -> int:
    """The model's input size (the one rule: open_clip's vision config of the model or flavour)."""
    cfg = _open_clip_cfg(model_cfg.name) or {}
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def embed_dim(model_cfg: ModelConfig) -> int | None:
    """The width of the shared embedding space from the model's config alone (no weights): lets a server check
    that a model and an index agree before it loads either. None for a name open_clip does not know."""
    cfg = _open_clip_cfg(model_cfg.name)
    return int(cfg["embed_dim"]) if cfg and "embed_dim" in cfg else None
