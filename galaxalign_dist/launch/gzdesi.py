"""Ray runner for `prepare gzdesi:` shards, and the choice between Ray and local processes (`--workers`, `--ray`)."""

from __future__ import annotations

import importlib.util
import logging
import os

from galaxalign_dist.data.gzdesi_convert import ShardJob, convert_shard
from galaxalign_dist.data.gzdesi_runners import Done, Progress, Runner, local_runner
from galaxalign_dist.data.options import GZDesiOptions

log = logging.getLogger(__name__)


def have_ray() -> bool:
    """Whether Ray is installed (found without importing it: `import ray` alone takes seconds)."""
    return importlib.util.find_spec("ray") is not None


def ray_runner(workers: int | None) -> Runner:
    """One Ray task per shard, at most `workers` at once (default: the cluster's CPUs)."""

    def run(job: ShardJob, todo: list[int], done: Done, progress: Progress) -> None:
        import ray  # here, not at import: `galaxalign prepare` without Ray must not pay for it

        started = not ray.is_initialized()
        if started:
            # With RAY_ADDRESS set (e.g. `auto` on a cluster head) this joins the cluster; else a local one.
            ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": workers or os.cpu_count()}))
        try:
            limit = workers or int(ray.cluster_resources().get("CPU", 1))
            # One task per shard, 1 CPU each; retried if a node dies (a shard is rebuilt from scratch).
            task = ray.remote(num_cpus=1, max_retries=3)(convert_shard)
            queue, running = list(todo), []
            while queue or running:
                while (
                    queue and len(running) < limit
                ):  # bounded in flight: results are small, but keep it tidy
                    running.append(task.remote(job, queue.pop(0)))
                ready, running = ray.wait(running, num_returns=1)
                try:
                    manifest = ray.get(ready[0])
                except ray.exceptions.RayTaskError as e:
                    for ref in running:
                        ray.cancel(ref)
                    cause = getattr(e, "cause", None)
                    raise (cause if isinstance(cause, Exception) else e) from None
                done(manifest)
                progress(manifest["rows_in"])
        finally:
            if started:
                ray.shutdown()

    return run


def choose_runner(options: GZDesiOptions) -> Runner:
    """`use_ray` forces Ray; otherwise more than one worker uses Ray when installed, else local processes."""
    workers, use_ray = options.workers, options.use_ray
    if use_ray:
        return ray_runner(workers)
    if workers is not None and workers > 1 and use_ray is None:
        if have_ray():
            return ray_runner(workers)
        log.info("Ray is not installed: converting shards in %d local processes", workers)
    return local_runner(workers)
