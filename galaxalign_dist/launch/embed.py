"""Ray Data inference over a catalogue: read units -> decode -> an actor pool holding the model -> shards on the driver.

The pipeline (docs in README, "Embed, index and search catalogues"):

    from_items(units) --map_batches(read [+ decode])--> blocks of rows (Ray Data tasks, streamed)
        --map_batches(_EmbedActor, ActorPoolStrategy(size=N), num_gpus=...)--> embedded rows (the model lives in the actors)
        --iter_batches on the driver--> embed_store.UnitCollector: shard k written (tmp + rename) and its
        manifest recorded as soon as all of unit k's rows are in

Each unit is a row range of one input file (or a chunk of an image folder) and becomes one output shard, so
a rerun skips every shard already written and verified. Ray Data's write_parquet is not used: its files
are not one per input range and carry no manifest, so an interrupted job could not tell which rows it had.
Memory: read tasks stream a unit in batches, Ray Data backpressure bounds the blocks in flight, and the
driver holds only the units not yet complete (a few per actor), whatever the catalogue size.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from galaxalign_dist.evaluation.catalogue import Catalogue, Unit, read_unit
from galaxalign_dist.evaluation.embed_batch import BatchEmbedder, RowPixels
from galaxalign_dist.evaluation.embed_job import (
    EmbedJob,
    EmbedOptions,
    finish_job,
    prepare_job,
    progress_bar,
    run_local,
)

log = logging.getLogger(__name__)


def _read_units(
    items: dict[str, np.ndarray], cat: Catalogue, batch_rows: int, decode_cfg: dict | None, skip_bad: bool
):  # noqa: ANN202 - a generator of numpy batches
    """Ray Data read stage: each item is one unit; yields its rows in batches (decoded when decode_cfg,
    the export's config, is given: the eval transform then runs here, in a CPU task)."""
    decoder = RowPixels(decode_cfg, skip_bad) if decode_cfg else None
    for i in range(len(items["k"])):
        unit = Unit(
            k=int(items["k"][i]),
            split=str(items["split"][i]),
            file=str(items["file"][i]),
            first_row=int(items["first_row"][i]),
            rows=int(items["rows"][i]),
            row_groups=(int(items["g0"][i]), int(items["g1"][i])),
            names=tuple(str(items["names"][i]).split("\n")) if items["names"][i] else (),
        )
        for batch in read_unit(cat, unit, batch_rows):
            yield decoder(batch) if decoder else batch


class _EmbedActor:
    """One model per actor (a GPU each when the cluster has them), reused for every batch it is given."""

    def __init__(self, model_dir: str, opts: EmbedOptions, cpus: float, fault: dict | None = None) -> None:
        import ray
        import torch

        gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        self.embedder = BatchEmbedder(
            model_dir,
            opts.modalities,
            opts.dtype,
            device="cuda" if gpu else "cpu",
            skip_bad=opts.skip_bad,
            amp=opts.amp,
            threads=None if gpu else max(1, int(cpus)),  # torch would otherwise use every core of the node
        )
        self.fault, self.calls = fault, 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.fault and self.calls > self.fault["after_batches"]:
            _die_once(self.fault["marker"])
        return self.embedder(batch)


def _die_once(marker: str) -> None:
    """Fault injection (tests): the first actor to claim `marker` SIGKILLs its own process, mid-job."""
    try:
        os.rename(marker, f"{marker}.claimed-{os.getpid()}")  # atomic: exactly one actor wins
    except OSError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _unit_items(units: list[Unit]) -> list[dict[str, Any]]:
    return [
        {"k": u.k, "split": u.split, "file": u.file, "first_row": u.first_row, "rows": u.rows,
         "g0": u.row_groups[0], "g1": u.row_groups[1], "names": "\n".join(u.names)}
        for u in units
    ]  # fmt: skip


def _causes(e: BaseException) -> list[BaseException]:
    """`e` and what it wraps (Ray's `cause`, __cause__, __context__), outermost first."""
    seen, todo, out = set(), [e], []
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        out.append(x)
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return out


def _user_error(e: BaseException) -> BaseException | None:
    """The ValueError/OSError a UDF raised (bad row, unreadable file) under Ray's wrappers, if any."""
    import ray.exceptions

    return next(
        (
            x
            for x in _causes(e)
            if isinstance(x, (ValueError, OSError)) and not isinstance(x, ray.exceptions.RayError)
        ),
        None,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def resources(
    num_actors: int | None, cpus_per_actor: float, gpus_per_actor: float | None, decode: str
) -> dict[str, Any]:
    """Actor count and per-stage resources for the cluster Ray is connected to (see plan_resources)."""
    import ray

    return plan_resources(ray.cluster_resources(), num_actors, cpus_per_actor, gpus_per_actor, decode)


def plan_resources(
    total: dict[str, float],
    num_actors: int | None,
    cpus_per_actor: float,
    gpus_per_actor: float | None,
    decode: str,
) -> dict[str, Any]:
    """GPU actors when there are GPUs, else CPU ones; the default count leaves the read stage room to run.

    Read tasks must always find a CPU: an actor pool that reserves every CPU starves them and the job
    waits forever (Ray Data does not preempt actors for tasks).
    """
    gpus, cpus = float(total.get("GPU", 0)), float(total.get("CPU", 1))
    use_gpu = gpus > 0 if gpus_per_actor is None else gpus_per_actor > 0
    # GPU actors: decode in CPU tasks (one core each) so many cores feed each GPU, pixels via the object store.
    # CPU actors: decode in the actor itself (no pixels through the object store); read tasks only read
    # Parquet row groups, so a small CPU share each.
    where = decode if decode != "auto" else ("tasks" if use_gpu else "actor")
    if where not in ("tasks", "actor"):
        raise ValueError(f"--decode must be auto, tasks or actor, got {decode!r}")
    read_cpus = 1.0 if where == "tasks" else 0.25
    if use_gpu:
        gpus_per_actor = gpus_per_actor or 1.0
        n = num_actors or max(1, int(gpus // gpus_per_actor))
        actor_cpus = min(cpus_per_actor, max(0.0, (cpus - read_cpus) / n))  # a 1-CPU-per-GPU node too
    else:
        gpus_per_actor = None
        # The CPU actors get the cores: the read stage runs on what one actor leaves, i.e. the last
        # actor takes (cpus_per_actor - read_cpus) so the pool and one read task fit exactly.
        n = num_actors or max(1, int(cpus // cpus_per_actor))
        actor_cpus = cpus_per_actor
        if n * actor_cpus + read_cpus > cpus:
            actor_cpus = max(0.01, (cpus - read_cpus) / n)
    if num_actors and actor_cpus < cpus_per_actor:
        log.warning(
            "%d actors x %g CPUs and a read task need more than the cluster's %g CPUs: each actor asks "
            "for %.2f CPUs instead", num_actors, cpus_per_actor, cpus, actor_cpus,
        )  # fmt: skip
    return {
        "actors": n,
        "cpus_per_actor": cpus_per_actor,  # torch threads per CPU actor
        "actor_num_cpus": np.floor(actor_cpus * 1e4) / 1e4,  # the reservation Ray schedules by (rounded down)
        "gpus_per_actor": gpus_per_actor,
        "decode": where,
        "read_cpus": read_cpus,
        "cluster_cpus": cpus,
        "cluster_gpus": gpus,
    }


def run_ray(
    job: EmbedJob,
    res: dict[str, Any],
    fault: dict | None = None,
    actor_options: dict | None = None,
) -> None:
    """Stream the job's units through Ray Data; shards are written by the driver as units complete."""
    import ray.data

    from galaxalign_dist.launch.data import quiet_data_context

    quiet_data_context()
    opts = job.opts
    light = replace(job.cat, units=[])  # shipped to read tasks: the units travel as items
    ds = ray.data.from_items(_unit_items(job.todo), override_num_blocks=len(job.todo))
    ds = ds.map_batches(
        _read_units,
        batch_size=1,
        batch_format="numpy",
        num_cpus=res["read_cpus"],
        fn_kwargs={
            "cat": light,
            "batch_rows": opts.batch_size,
            "decode_cfg": job.embedder.bundle.config.to_dict() if res["decode"] == "tasks" else None,
            "skip_bad": opts.skip_bad,
        },
    )
    ds = ds.map_batches(
        _EmbedActor,
        batch_size=opts.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=res["actors"]),
        num_cpus=res["actor_num_cpus"],
        num_gpus=res["gpus_per_actor"],
        fn_constructor_kwargs={
            "model_dir": job.model_dir,
            "opts": opts,
            "cpus": res["cpus_per_actor"],
            "fault": fault,
        },
        **(actor_options or {}),
    )
    collector = job.collector()
    with progress_bar(job) as bar:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                for manifest in collector.add(batch):
                    job.done[manifest["k"]] = manifest
                bar.update(len(batch["id"]))
                job.took(len(batch["id"]))
        except Exception as e:  # noqa: BLE001 - re-raised: a user error as one line, anything else as is
            user = _user_error(e)
            written = len(job.done) - job.reused
            if user is not None:
                raise type(user)(str(user).strip().splitlines()[0]) from None
            root = _causes(e)[-1]
            raise RuntimeError(
                f"embedding job failed after writing {written} of {len(job.todo)} shards ({_first_line(root)}); "
                "rerun the same command to finish"
            ) from e


def embed_catalogue(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    opts: EmbedOptions,
    *,
    local: bool = False,
    num_actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = None,
    decode: str = "auto",
    fault: dict | None = None,
    actor_options: dict | None = None,
) -> dict[str, Any]:
    """`galaxalign embed`: check (no Ray), then the Ray Data job (or the local loop), then embeddings.json.

    `fault` and `actor_options` are test seams: {"after_batches": n, "marker": path} makes one actor
    SIGKILL itself; actor_options go to the actor stage's ray_remote_args (e.g. max_restarts=0).
    """
    job = prepare_job(model_dir, data, out, opts)  # before Ray: bad input fails here
    try:
        t0 = time.perf_counter()
        if local or not job.todo:
            run_local(job)
            return finish_job(job, time.perf_counter() - t0, engine="local")
        from galaxalign_dist.launch.train import init_ray

        init_ray()
        res = resources(num_actors, cpus_per_actor, gpus_per_actor, decode)
        log.info(
            "embedding %d rows in %d shards with %d %s actors (decode in %s)",
            job.todo_rows, len(job.todo), res["actors"], "GPU" if res["gpus_per_actor"] else "CPU", res["decode"],
        )  # fmt: skip
        t0 = time.perf_counter()
        run_ray(job, res, fault=fault, actor_options=actor_options)
        return finish_job(job, time.perf_counter() - t0, engine="ray", **res)
    finally:
        job.close()
