"""The per-worker train loop: stage 1, copy image tower to symbol tower, stage 2; report and checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from galaxalign_dist.config import Config
from galaxalign_dist.data.preprocess import DevicePreprocess
from galaxalign_dist.evaluation import metrics
from galaxalign_dist.train import checkpoint
from galaxalign_dist.train import engine as engine_mod
from galaxalign_dist.train.collectives import gather_no_grad, world
from galaxalign_dist.train.engine import full_fp32_state_dict, partition_report
from galaxalign_dist.train.loss import Pair, TriModalLoss, pairs_for
from galaxalign_dist.train.model import TriModalCLIP, build_model, build_preprocess
from galaxalign_dist.train.step import DTYPES, Batch, batch_to_device, forward_backward

log = logging.getLogger(__name__)
EngineBuilder = Callable[[TriModalCLIP, Config, int, int], Any]  # (model, cfg, world, total_steps) -> engine
CheckpointSaver = Callable[[Any, Config, dict[str, Any], int], str]  # (engine, cfg, state, rank) -> dir


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: training stops, the last good checkpoint is kept."""


class Reporter(Protocol):
    """How the loop talks to its launcher (Ray Train, or a plain process in tests/benchmarks)."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]: ...


@dataclass
class TrainData:
    """Batches for the loop. train(epoch) must yield the same number of batches on every rank."""

    train: Callable[[int], Iterable[Batch]]
    steps_per_epoch: int  # micro-batches per rank per epoch (for the lr schedule and progress)
    val: Callable[[], Iterable[Batch]] | None = None
    class_tokens: torch.Tensor | None = None  # (C, L) tokenized class captions, for zero-shot F1
    # True: batches are decoded uint8 rows (data/decode.py) that the loop finishes on its device
    # (data/preprocess.py: augmentation warp, symbols, normalisation); False: ready model inputs.
    decoded: bool = False


class Trainer:
    def __init__(
        self,
        cfg: Config,
        data: TrainData,
        reporter: Reporter,
        log_dir: str | None = None,
        metrics_file: str | None = None,
        *,
        build_engine: EngineBuilder = engine_mod.build_engine,
        save_checkpoint: CheckpointSaver = checkpoint.save,
    ) -> None:
        """`build_engine` and `save_checkpoint` are seams: benchmarks time or skip them, tests inject faults."""
        self.cfg, self.data, self.reporter = cfg, data, reporter
        self.build_engine, self.save_checkpoint = build_engine, save_checkpoint
        self.rank, self.world = world()
        self.metrics_file = metrics_file if self.rank == 0 else None  # one JSON line per epoch
        self.loss_fn = TriModalLoss(cfg.loss)
        self.dtype = DTYPES[cfg.engine.precision]
        self._preprocess: DevicePreprocess | None = None  # built for the engine's device on first use
        self.step = 0  # optimizer steps over the whole run
        self.writer = None
        if log_dir and self.rank == 0 and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir)

    # ------------------------------------------------------------------ stages

    def fit(self) -> dict[str, Any]:
        """Run (or resume) both stages; returns the last epoch's metrics."""
        stage, epoch, engine = self._restore()
        last: dict[str, Any] = {}
        for s in (1, 2):
            n_epochs = self.cfg.stages.stage1_epochs if s == 1 else self.cfg.stages.stage2_epochs
            if s < stage or n_epochs == 0:
                continue
            if engine is None or s != stage:
                engine = self._new_stage_engine(s, previous=engine)
                epoch = 0
            for e in range(epoch, n_epochs):
                last = self._epoch(engine, s, e, n_epochs)
            stage, epoch = s, n_epochs
        if self.writer:
            self.writer.close()
        return last

    def _total_steps(self, stage: int) -> int:
        n_epochs = self.cfg.stages.stage1_epochs if stage == 1 else self.cfg.stages.stage2_epochs
        return max(1, n_epochs * self.data.steps_per_epoch // self.cfg.engine.grad_accum_steps)

    def _new_stage_engine(self, stage: int, previous=None):  # noqa: ANN001, ANN202
        # Same seed on every rank: ZeRO-3 keeps each rank's slice of its own initial weights.
        torch.manual_seed(self.cfg.run.seed)
        if stage == 2 and previous is not None:
            # Stage 1 -> 2: the full fp32 stage-1 weights (gathered from the ZeRO shards) seed a fresh
            # model whose symbol tower is an exact copy of the image tower; fresh optimizer too.
            weights = full_fp32_state_dict(previous)
            model = build_model(self.cfg.model, self.cfg.loss, load_pretrained=False)
            model.load_state_dict(weights, strict=True)
            model.add_symbol_tower()
            if hasattr(previous, "destroy"):
                previous.destroy()
        else:
            # Stage 1, or stage 2 alone (ablation v2): start from the (pre)trained CLIP.
            model = build_model(self.cfg.model, self.cfg.loss, with_symbol_tower=stage == 2)
        return self.build_engine(model, self.cfg, self.world, self._total_steps(stage))

    def _restore(self) -> tuple[int, int, Any]:
        with self.reporter.latest_checkpoint() as ckpt_dir:
            if ckpt_dir is None:
                return 1, 0, None
            state = checkpoint.read_state(ckpt_dir)
            stage = int(state["stage"])
            model = build_model(
                self.cfg.model, self.cfg.loss, with_symbol_tower=stage == 2, load_pretrained=False
            )
            engine = self.build_engine(model, self.cfg, self.world, self._total_steps(stage))
            checkpoint.load(engine, ckpt_dir)
        self.step = int(state["step"])
        log.info("resumed from stage %d epoch %d (step %d)", stage, state["epoch"], self.step)
        return stage, int(state["epoch"]), engine

    # ------------------------------------------------------------------ one epoch

    def _batches(self, epoch_index: int) -> Iterator[Batch]:
        it: Iterable[Batch] = self.data.train(epoch_index)
        if self.rank == 0 and self.cfg.logging.progress:
            from tqdm.auto import tqdm

            it = tqdm(
                it, total=self.data.steps_per_epoch, desc=f"epoch {epoch_index}", leave=False, mininterval=2
            )
        return iter(it)

    def inputs(self, engine: Any, batch: Batch, epoch: int | None) -> Batch:
        """Model inputs on the engine's device: decoded rows are augmented (epoch) or eval-cropped (None) there."""
        if self.data.decoded:
            if self._preprocess is None or self._preprocess.device != torch.device(engine.device):
                self._preprocess = build_preprocess(self.cfg, engine.device, self.dtype)
            batch = self._preprocess(batch, epoch if self.cfg.data.augment else None)
        return batch_to_device(batch, engine.device, self.dtype, self.cfg.loss.use_symbols)

    def train_step(
        self, engine: Any, batch: Batch, pairs: tuple[Pair, ...], epoch: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro step: inputs on the device, forward, gathered loss, backward, optimizer step."""
        batch = self.inputs(engine, batch, epoch)
        loss, parts = forward_backward(engine, self.loss_fn, batch, pairs)
        if engine.is_gradient_accumulation_boundary():
            self.step += 1  # optimizer steps over the whole run (DeepSpeed's count restarts per stage)
        engine.step()
        return loss, parts

    def _epoch(self, engine, stage: int, epoch: int, n_epochs: int) -> dict[str, Any]:  # noqa: ANN001
        engine.train()
        pairs = pairs_for(stage, self.cfg.loss)
        epoch_index = epoch + (self.cfg.stages.stage1_epochs if stage == 2 else 0)
        sums: dict[str, torch.Tensor] = {}
        n_batches, samples, data_wait, first_batch = 0, 0, 0.0, float("nan")
        t_start = t_last = time.perf_counter()
        for batch in self._batches(epoch_index):
            data_wait += time.perf_counter() - t_last
            if n_batches == 0:
                first_batch = data_wait  # the epoch's start-up: how long the first batch took to arrive
            loss, parts = self.train_step(engine, batch, pairs, epoch_index)
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0) + v.float()
            n_batches += 1
            samples += batch["label"].shape[0]
            if n_batches % self.cfg.logging.log_every_steps == 0:
                self._log_step(loss, parts)  # host sync: once per log interval only
            t_last = time.perf_counter()
        if n_batches == 0:
            raise RuntimeError(
                f"epoch {epoch_index}: rank {self.rank} got no batches (dataset smaller than a batch?)"
            )
        elapsed = time.perf_counter() - t_start
        result = self._epoch_metrics(engine, sums, n_batches, samples, elapsed, data_wait, stage, epoch)
        result["first_batch_s"] = first_batch
        self._check_finite(result["loss"], epoch_index + 1)  # 1-based, as in every log line
        is_last = epoch == n_epochs - 1
        every = self.cfg.run.eval_every_epochs
        if self.data.val is not None and (is_last or (every and (epoch + 1) % every == 0)):
            result.update(self.validate(engine))
        ckpt_dir = None
        if is_last or (epoch + 1) % self.cfg.run.checkpoint_every_epochs == 0:
            state = {"stage": stage, "epoch": epoch + 1, "step": self.step, "epoch_index": epoch_index + 1}
            ckpt_dir = self.save_checkpoint(engine, self.cfg, state, self.rank)
        self._log_epoch(result)
        try:
            self.reporter.report(result, ckpt_dir)
        finally:
            if ckpt_dir:
                shutil.rmtree(ckpt_dir, ignore_errors=True)  # the reporter has copied it to storage
        return result

    def _epoch_metrics(self, engine, sums, n_batches, samples, elapsed, data_wait, stage, epoch):  # noqa: ANN001, ANN202
        # One all-reduce per epoch: mean of the ranks' losses = the global-batch loss.
        keys = sorted(sums)
        vec = torch.stack([sums[k] / n_batches for k in keys]).to(engine.device)
        if self.world > 1:
            dist.all_reduce(vec)
            vec /= self.world
        values = dict(zip(keys, vec.tolist(), strict=True))  # host sync (once per epoch)
        out: dict[str, Any] = {"loss": values.pop("loss"), **{f"loss_{k}": v for k, v in values.items()}}
        out["temperature"] = self._temperature(engine)
        for tower, sizes in partition_report(engine).items():
            # Share of each tower's parameters this rank holds: ~1/world under ZeRO-3, 1.0 otherwise.
            out[f"shard_fraction_{tower}"] = sizes["local"] / max(1, sizes["full"])
        for group in engine.optimizer.param_groups:
            out[f"lr_{group.get('name', 'group')}"] = float(group["lr"])
        out.update(
            stage=stage,
            epoch=epoch + 1,
            epoch_index=epoch + 1 + (self.cfg.stages.stage1_epochs if stage == 2 else 0),
            step=self.step,
            samples_per_s=samples * self.world / elapsed,
            data_wait_s=data_wait,
            epoch_time_s=elapsed,
        )
        return out

    @staticmethod
    def _temperature(engine) -> float:  # noqa: ANN001
        p = engine.module.logit_scale
        with contextlib.ExitStack() as stack:
            if hasattr(p, "ds_id"):  # ZeRO-3 partitions even this 1-element parameter: gather (collective)
                import deepspeed

                stack.enter_context(deepspeed.zero.GatheredParameters([p]))
            return 1.0 / float(engine.module.temperature_scale().detach().float().reshape(()))

    def _check_finite(self, value: float, epoch_index: int) -> None:
        if self.cfg.run.stop_on_nan and not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss is {value} at epoch {epoch_index} (step {self.step}); stopping. The last good "
                "checkpoint is kept; lower the learning rates or use fp32/bf16."
            )

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self, engine) -> dict[str, float]:  # noqa: ANN001
        """Zero-shot F1/accuracy by caption and mAP@5/mAP on the validation split (all ranks take part)."""
        engine.eval()
        model: TriModalCLIP = engine.module
        images, labels = [], []
        for batch in self.data.val():
            batch = self.inputs(engine, batch, epoch=None)
            images.append(model.encode_image(batch["image"]).float())
            labels.append(batch["label"])
        text = model.encode_text(self.data.class_tokens.to(engine.device)).float().cpu().numpy()
        engine.train()
        if not images:
            return {}
        # Every rank ran the same number of batches (ZeRO-3 forwards are collective): gather all.
        emb = gather_no_grad(torch.cat(images)).cpu().numpy()
        y = gather_no_grad(torch.cat(labels)).cpu().numpy()
        pred = metrics.zero_shot(emb, text)
        cls = metrics.classification_report(y, pred, num_classes=text.shape[0])
        ret = metrics.retrieval_map(emb, y, k=5)
        return {
            "val_accuracy": cls["accuracy"],
            "val_f1": cls["f1_macro"],
            "val_map_at_5": ret["map_at_5"],
            "val_map": ret["map"],
            "val_n": int(len(y)),
        }

    # ------------------------------------------------------------------ logging

    def _log_step(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("train/loss_step", float(loss), self.step)
        for k, v in parts.items():
            self.writer.add_scalar(f"train/loss_{k}_step", float(v), self.step)

    def _log_epoch(self, result: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        keys = ("loss", "temperature", "val_f1", "val_map", "samples_per_s", "data_wait_s")
        shown = " ".join(f"{k}={result[k]:.4g}" for k in keys if k in result)
        log.info("stage %d epoch %d step %d: %s", result["stage"], result["epoch"], self.step, shown)
        if self.metrics_file:
            with open(self.metrics_file, "a") as f:
                f.write(
                    json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}) + "\n"
                )
        if self.writer is not None:
            for k, v in result.items():
                if isinstance(v, (int, float, np.floating)) and k not in ("stage", "epoch", "epoch_index"):
                    self.writer.add_scalar(f"epoch/{k}", float(v), result["epoch_index"])
            self.writer.flush()
