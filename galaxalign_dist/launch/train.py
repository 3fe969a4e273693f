"""Ray Train launch: checks before Ray starts, the TorchTrainer, and the per-worker function that runs the loop."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from galaxalign_dist import config as config_mod
from galaxalign_dist.config import Config
from galaxalign_dist.data import shards
from galaxalign_dist.paths import RunPaths, absolute_paths, is_uri

if TYPE_CHECKING:
    from galaxalign_dist.train.trainer import TrainData

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- before Ray


def ensure_dataset(cfg: Config) -> dict[str, Any]:
    """Prepare the dataset if asked and absent; validate it. Runs in the driver, before any worker."""
    # A URI (s3://, gs://, ...) stays a string: shards reads it through pyarrow's filesystems.
    path = cfg.data.path if is_uri(cfg.data.path) else Path(cfg.data.path)
    if not shards.is_prepared(path) and cfg.data.prepare_source:  # prepare() refuses a URI
        from galaxalign_dist.data.prepare import prepare

        log.info("preparing %s into %s", cfg.data.prepare_source, path)
        prepare(cfg.data.prepare_source, path, n=cfg.data.prepare_n or None, seed=cfg.run.seed)
    meta = shards.read_metadata(path)  # clear error when missing or invalid
    for split in (cfg.data.train_split, cfg.data.val_split):
        if not shards.split_files(path, split):
            raise FileNotFoundError(f"data.path: {path} has no '{split}' split (see its _metadata.json)")
        shards.check_split_files(path, split, meta)  # a truncated/missing shard fails here, not in a worker
    n_train = shards.split_rows(meta, cfg.data.train_split)
    per_rank = n_train // cfg.engine.num_workers
    if per_rank < cfg.micro_batch_size:
        raise ValueError(
            f"data.batch_size: each of {cfg.engine.num_workers} workers gets {per_rank} training rows, fewer "
            f"than one micro batch of {cfg.micro_batch_size}; lower data.batch_size or add data"
        )
    return meta


def check(cfg: Config) -> dict[str, Any]:
    """Everything that can be checked without a cluster: model name, dataset (the config was checked on load)."""
    from galaxalign_dist.train.model import check_model_name

    check_model_name(cfg.model.name)
    return ensure_dataset(cfg)


# ----------------------------------------------------------------------------- on each worker


class RayReporter:
    """ray.train.report / get_checkpoint behind the loop's Reporter protocol."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)  # a barrier: every rank calls it once per epoch

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt is not None else contextlib.nullcontext(None)


def worker_data(cfg: Config) -> TrainData:
    """This worker's batches: its Ray Data shard of the train split, and its slice of the validation split."""
    import ray.train

    from galaxalign_dist.data.reader import iter_batches
    from galaxalign_dist.launch.data import canvas, epoch_batches, steps_per_epoch
    from galaxalign_dist.train.model import build_decode, build_tokenizer
    from galaxalign_dist.train.trainer import TrainData

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    meta = shards.read_metadata(cfg.data.path)
    mb = cfg.micro_batch_size
    # Validation reads its split directly (pyarrow, rank-sharded): a few thousand rows at most.
    n_val = min(shards.split_rows(meta, cfg.data.val_split), cfg.run.eval_max_rows)
    val_bs = max(1, min(mb, n_val // world))
    val_batches_per_rank = (n_val // world) // val_bs
    val_decode = build_decode(cfg, canvas(cfg, meta))  # eval geometry is applied on the device

    def val_batches():  # noqa: ANN202
        it = iter_batches(
            cfg.data.path,
            cfg.data.val_split,
            val_bs,
            val_decode,
            drop_last=True,
            rank=rank,
            world_size=world,
        )
        return itertools.islice(it, val_batches_per_rank)

    return TrainData(
        train=epoch_batches(cfg, meta),
        steps_per_epoch=steps_per_epoch(cfg, meta, world),
        val=val_batches if val_batches_per_rank > 0 else None,
        class_tokens=build_tokenizer(cfg.model)(list(meta["captions"])),
        decoded=True,
    )


def train_loop_per_worker(loop_config: dict[str, Any], **trainer_seams: Any) -> None:
    """What every Ray Train worker runs: one DeepSpeed rank. `trainer_seams` go to Trainer (fault injection)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_mod.from_dict(loop_config["config"], validate=False)  # checked in the driver
    from galaxalign_dist.train.engine import set_accelerator

    set_accelerator(cfg.engine.use_gpu)  # before anything imports deepspeed
    from galaxalign_dist.train.trainer import Trainer

    Trainer(
        cfg,
        worker_data(cfg),
        RayReporter(),
        log_dir=loop_config.get("log_dir"),
        metrics_file=loop_config.get("metrics_file"),
        **trainer_seams,
    ).fit()


# ----------------------------------------------------------------------------- the driver


def build_trainer(cfg: Config, callbacks: list[Any] | None = None, train_loop=None):  # noqa: ANN001, ANN201
    """A TorchTrainer for the run; Tune trials call this too, each with its own run name.

    `train_loop` replaces the per-worker function (fault-injection tests wrap the real one).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from galaxalign_dist.launch.data import quiet_data_context, train_datasets

    quiet_data_context()
    cfg = absolute_paths(cfg)
    paths = RunPaths.of(cfg)
    e = cfg.engine
    resources = {"CPU": e.cpus_per_worker, **({"GPU": e.gpus_per_worker} if e.use_gpu else {})}
    loop_config = {
        "config": cfg.to_dict(),
        "log_dir": paths.tensorboard if paths.local else None,
        "metrics_file": paths.metrics_file if paths.local else None,
    }
    return TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=e.num_workers, use_gpu=e.use_gpu, resources_per_worker=resources
        ),
        # gloo on CPU, nccl on GPU: the same loop code either way.
        torch_config=TorchConfig(backend="nccl" if e.use_gpu else "gloo"),
        datasets=train_datasets(cfg, shards.read_metadata(cfg.data.path)),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=paths.storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=callbacks,
        ),
    )


# Forwarded to every worker: no hub lookups on offline machines that set HF_HUB_OFFLINE, one shared
# DeepSpeed op cache, the accelerator DeepSpeed should use.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a dashboard, a head, a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_ray() -> None:
    """Connect to RAY_ADDRESS (as `ray job submit` sets) or start a local Ray; tell actors its State API.

    Why the State API address: when a run is stopped early (an ASHA-stopped trial, a failed driver), Train V2
    frees its placement group from a detached cleaner actor that asks the State API whether the controller
    is alive. Inside actors that API finds "the" cluster from RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else by
    scanning the machine; with no address and more than one Ray on the host it fails, the placement group is
    never freed and its CPUs/GPUs stay reserved (seen here: later Tune trials then wait forever).
    """
    import ray

    if ray.is_initialized():
        return  # the caller's Ray (tests, notebooks): its runtime_env is already fixed
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    address = os.environ.get("RAY_ADDRESS")
    api = os.environ.get("RAY_API_SERVER_ADDRESS")
    port = None
    if not api and address:
        try:
            from ray.dashboard.utils import get_address_for_submission_client

            api = get_address_for_submission_client(address)  # the cluster's dashboard, via its GCS
        except Exception as e:  # noqa: BLE001 - best effort; training itself does not need it
            log.warning(
                "cannot resolve the dashboard of %s (%s); a stopped run may hold resources", address, e
            )
    elif not api:
        port = free_port()  # not the default 8265, which another Ray on this host may hold
        api = f"http://127.0.0.1:{port}"
    if api:
        env["RAY_API_SERVER_ADDRESS"] = api
    kwargs: dict[str, Any] = {"dashboard_port": port, "include_dashboard": True} if port else {}
    ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, **kwargs)


def fit(cfg: Config):  # noqa: ANN201
    """Check, then train with Ray Train; returns the ray.train.Result (raises if the run failed)."""
    check(cfg)
    paths = RunPaths.of(cfg)
    if paths.local:
        cfg.save(paths.config_file)  # the resolved config next to the run's outputs
    init_ray()
    result = build_trainer(cfg).fit()
    if result.error is not None:
        raise result.error
    return result
