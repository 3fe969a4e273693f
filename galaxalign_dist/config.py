"""Typed run configuration: dataclass sections, strict YAML loading, dotted overrides, validation."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem, always naming the dotted key (e.g. `engine.zero_stage`)."""


@dataclass
class DataConfig:
    path: str = "runs/demo/data"  # a directory written by `galaxalign prepare`
    # When `path` holds no dataset yet, `train` prepares it from this SOURCE first
    # (e.g. "synthetic:galaxymnist"); empty = the dataset must exist.
    prepare_source: str = ""
    prepare_n: int = 0  # rows for a synthetic prepare_source
    train_split: str = "train"
    val_split: str = "test"
    # Global batch per optimizer step (the paper's 256). Per step each worker runs
    # batch_size / (engine.num_workers * engine.grad_accum_steps) samples; see micro_batch_size.
    batch_size: int = 256
    augment: bool = True
    shuffle_buffer: int = 512  # rows in each worker's local shuffle buffer (Ray Data)
    # A training split at most this many GB decoded (rows x 3 x canvas^2 bytes) is decoded once and kept in Ray's
    # object store; a larger one (a catalogue) is read and decoded again each epoch. 0 = always stream.
    cache_decoded_gb: float = 1.0
    on_bad_image: str = "error"  # error: stop naming the row id | skip: drop it, counted in the logs
    max_train_rows: int = 0  # 0 = all; > 0 takes a stratified subset (few-shot curves)


@dataclass
class ModelConfig:
    # "tiny" (a small ViT + text transformer for CPU tests/demo) or any open_clip model name,
    # e.g. ViT-B-16 or convnext_base.
    name: str = "tiny"
    # "none" = random init (the Scratch ablation), an open_clip pretrained tag (e.g. "openai",
    # "laion2b_s34b_b88k"), or a path to a local open_clip checkpoint file.
    pretrained: str = "none"
    lock_image: bool = False  # freeze the image tower (as open_clip's --lock-image)
    lock_image_unlocked_groups: int = 0  # ...but leave the last N layer groups trainable
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    # Activation checkpointing in every tower (recompute each block in backward): less activation memory,
    # ~1/3 more compute. Only when memory needs it (a large micro batch on a small GPU).
    grad_checkpointing: bool = False
    # Image and symbol tower inputs in channels_last (NHWC), so convolutions run in the layout GPU tensor cores
    # are fastest in: for convolutional towers (ConvNeXt); a ViT has one convolution (the patch embedding).
    channels_last: bool = False


@dataclass
class LossConfig:
    init_temperature: float = 0.07  # open_clip/CLIP: logit_scale = ln(1/0.07) at init
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) at 100
    learn_temperature: bool = True
    # "diagonal": the paper's CLIP targets (the i-th image matches only the i-th caption).
    # "class_aware": every same-class pair in the global batch is a positive.
    targets: str = "diagonal"
    use_symbols: bool = True  # False = plain CLIP image-text only (an ablation)
    weight_image_text: float = 1.0
    weight_symbol_text: float = 1.0
    weight_image_symbol: float = 1.0  # stage 2 only


@dataclass
class StagesConfig:
    stage1_epochs: int = 10  # shared image/symbol encoder warm-up (paper: ~10)
    stage2_epochs: int = 10  # separate symbol tower, three pairwise losses


@dataclass
class LRConfig:
    image: float = 1e-5
    text: float = 1e-5
    symbol: float = 1e-5
    temperature: float = 1e-4


@dataclass
class OptimConfig:
    lr: LRConfig = field(default_factory=LRConfig)
    weight_decay: float = 0.2  # open_clip default; not applied to gains, biases, temperature
    beta1: float = 0.9
    beta2: float = 0.98  # CLIP's beta2 for ViTs
    eps: float = 1e-6
    warmup_fraction: float = 0.05  # of each stage's optimizer steps
    schedule: str = "cosine"  # cosine | constant (after warmup)
    grad_clip: float = 1.0  # 0 = off
    # torch's AdamW with fused=True (one kernel per parameter group instead of a loop of small ones), through
    # DeepSpeed's torch_adam path. Not with engine.offload_optimizer (DeepSpeed's CPU Adam steps then).
    fused: bool = False


@dataclass
class EngineConfig:
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    precision: str = "fp32"  # fp32 | bf16 | fp16
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU (stages 1-3)
    offload_params: bool = False  # parameters to CPU (stage 3 only)
    grad_accum_steps: int = 1  # adds samples per optimizer step, NOT contrastive negatives
    num_workers: int = 2  # Ray Train workers (one DeepSpeed rank each)
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional on small hosts so Ray Data tasks still get CPU
    gpus_per_worker: float = 1.0
    # torch.compile of each tower's forward (image, text, symbol; nn.Module.compile, so parameter names,
    # state_dict keys, checkpoints and export are unchanged). ZeRO 0-2 only: DeepSpeed's ZeRO-3 gathers
    # parameters in hooks that compiled graphs bypass. The first step of each stage pays the compilation.
    compile: bool = False
    # inductor (generates fused kernels: the fast one); aot_eager / eager trace without generating code
    # (debugging a graph break or a numerical difference, quick CPU tests).
    compile_backend: str = "inductor"


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    log_every_steps: int = 10
    progress: bool = True  # per-epoch progress bar on rank 0


@dataclass
class RunSection:
    name: str = "galaxalign"
    out_dir: str = "runs"  # Ray Train storage_path: local dir, NFS, s3://, gs://
    seed: int = 0
    checkpoint_every_epochs: int = 1
    keep_checkpoints: int = 2
    max_failures: int = 0  # Ray Train FailureConfig: restarts from the last checkpoint
    eval_every_epochs: int = 1  # validation F1/mAP per epoch (0 = only at the end)
    eval_max_rows: int = 2000  # validation rows used for per-epoch metrics
    # Fail when the loss turns NaN/inf: a clear message, last good checkpoint kept.
    stop_on_nan: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunSection = field(default_factory=RunSection)

    @property
    def micro_batch_size(self) -> int:
        """Samples per worker per forward; also the local share of the contrastive batch."""
        return self.data.batch_size // (self.engine.num_workers * self.engine.grad_accum_steps)

    @property
    def negatives_per_loss(self) -> int:
        """Rows in one contrastive softmax: micro batch x workers (accumulation adds none)."""
        return self.micro_batch_size * self.engine.num_workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_yaml())


# ----------------------------------------------------------------------------- loading


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Coerce/verify one leaf value against its annotated type; ConfigError naming `key`."""
    if tp in (float, int) and isinstance(value, str):
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept any numeric literal.
        try:
            value = float(value) if tp is float else int(value)
        except ValueError:
            raise ConfigError(
                f"{key}: expected {'an integer' if tp is int else 'a number'}, got {value!r}"
            ) from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {tp}")  # pragma: no cover - programming error


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where}: unknown config key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], key)
        else:
            kwargs[f.name] = _check_value(data[f.name], tp, key)
    return cls(**kwargs)


def from_dict(data: dict[str, Any], validate: bool = True) -> Config:
    """Build (and validate) a Config; unknown keys and wrong types raise ConfigError with the dotted key.

    validate=False is for a config that was validated where it was loaded and is only being shipped
    (to a Ray worker, a trial): one validation per run, in the driver, before any resources are taken.
    """
    cfg = _build(Config, data or {}, "")
    if validate:
        check(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr.image=1e-4` -> ("optim.lr.image", 1e-4); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. engine.zero_stage=3")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); unknown sections/keys are caught by from_dict."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {part} is a value, not a section")
        node[parts[-1]] = value
    return out


def packaged_config(name: str) -> Path:
    """Path of a config shipped in galaxalign_dist/configs (e.g. 'demo_cpu')."""
    path = Path(str(resources.files("galaxalign_dist") / "configs" / f"{name.removesuffix('.yaml')}.yaml"))
    if not path.exists():
        raise FileNotFoundError(f"no packaged config {name!r}; available: {', '.join(list_packaged())}")
    return path


def list_packaged() -> list[str]:
    root = Path(str(resources.files("galaxalign_dist") / "configs"))
    return sorted(p.stem for p in root.glob("*.yaml"))


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors name the file (shared by configs and search spaces)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)  # where the parser gave up, 0-based
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


def load(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load YAML (a file path or a packaged config name), apply `--set` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists() and not p.suffix:
            p = packaged_config(str(path))
        data = read_yaml_mapping(p)
    if overrides:
        pairs = dict(parse_override(o) for o in overrides) if isinstance(overrides, list) else overrides
        data = apply_overrides(data, pairs)
    return from_dict(data)


# ----------------------------------------------------------------------------- validation


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def check(cfg: Config) -> None:
    """Catch bad configs before any cluster resources are taken (from_dict and load call it)."""
    e, d, s = cfg.engine, cfg.data, cfg.stages
    if e.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage: {e.zero_stage} is not a DeepSpeed ZeRO stage (0, 1, 2 or 3)")
    _choice("engine.precision", e.precision, ("fp32", "bf16", "fp16"))
    _choice("loss.targets", cfg.loss.targets, ("diagonal", "class_aware"))
    _choice("optim.schedule", cfg.optim.schedule, ("cosine", "constant"))
    _choice("data.on_bad_image", d.on_bad_image, ("error", "skip"))
    for key, value in (
        ("engine.num_workers", e.num_workers),
        ("engine.grad_accum_steps", e.grad_accum_steps),
    ):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if d.batch_size < 1:
        raise ConfigError(f"data.batch_size: must be >= 1, got {d.batch_size}")
    if not math.isfinite(d.cache_decoded_gb) or d.cache_decoded_gb < 0:
        raise ConfigError(f"data.cache_decoded_gb: must be a finite number >= 0, got {d.cache_decoded_gb}")
    per_step = e.num_workers * e.grad_accum_steps
    if d.batch_size % per_step:
        raise ConfigError(
            f"data.batch_size: {d.batch_size} is not divisible by engine.num_workers x "
            f"engine.grad_accum_steps = {e.num_workers} x {e.grad_accum_steps}; every rank must get "
            "equal micro batches"
        )
    if s.stage1_epochs < 0 or s.stage2_epochs < 0:
        bad = "stages.stage1_epochs" if s.stage1_epochs < 0 else "stages.stage2_epochs"
        raise ConfigError(f"{bad}: must be >= 0")
    if s.stage1_epochs + s.stage2_epochs == 0:
        raise ConfigError("stages: stage1_epochs and stage2_epochs are both 0; nothing to train")
    if e.offload_params and e.zero_stage != 3:
        raise ConfigError("engine.offload_params: parameter offload needs engine.zero_stage=3")
    if e.offload_optimizer and e.zero_stage == 0:
        raise ConfigError("engine.offload_optimizer: optimizer offload needs engine.zero_stage >= 1")
    _choice("engine.compile_backend", e.compile_backend, ("inductor", "aot_eager", "eager"))
    if e.compile and e.zero_stage == 3:
        raise ConfigError(
            "engine.compile: not supported with engine.zero_stage=3: ZeRO-3 gathers each parameter in module "
            "hooks and on attribute access, which a compiled graph bypasses (it traces the empty partitions; "
            "open_clip's attention reads out_proj.weight without calling out_proj). Use engine.zero_stage 0-2 "
            "with compile, or engine.compile=false"
        )
    if cfg.optim.fused and e.offload_optimizer:
        raise ConfigError(
            "optim.fused: torch's fused AdamW steps on the device; with engine.offload_optimizer DeepSpeed's "
            "CPU Adam steps instead. Set optim.fused=false or engine.offload_optimizer=false"
        )
    if e.precision == "fp16" and not e.use_gpu:
        raise ConfigError("engine.precision: fp16 needs GPUs (engine.use_gpu=true); use fp32 or bf16 on CPU")
    lr = cfg.optim.lr
    for name in ("image", "text", "symbol", "temperature"):
        value = getattr(lr, name)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"optim.lr.{name}: must be a finite number >= 0, got {value}")
    if not 0 < cfg.loss.init_temperature < 1:
        raise ConfigError(f"loss.init_temperature: must be in (0, 1), got {cfg.loss.init_temperature}")
    if cfg.loss.max_logit_scale <= 1:
        raise ConfigError(f"loss.max_logit_scale: must be > 1, got {cfg.loss.max_logit_scale}")
    if not 0 <= cfg.optim.warmup_fraction < 1:
        raise ConfigError(f"optim.warmup_fraction: must be in [0, 1), got {cfg.optim.warmup_fraction}")
    if cfg.run.checkpoint_every_epochs < 1:
        raise ConfigError("run.checkpoint_every_epochs: must be >= 1")


def flat_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every leaf dotted key and its type, for validating search spaces and cluster YAMLs."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(flat_keys(tp, key))
        else:
            out[key] = tp
    return out
