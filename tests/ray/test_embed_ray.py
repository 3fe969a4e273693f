"""`galaxalign embed` on a real local Ray: the Ray Data job equals the single-process embedding, every row once,
also after an actor is SIGKILLed mid-job, and a rerun of an interrupted job completes it, skipping verified shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from embed_helpers import export_tiny

from galaxalign_dist.evaluation.embed_job import EmbedOptions
from galaxalign_dist.evaluation.embed_store import load_split, open_embeddings

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # 4 logical CPUs on a 2-core host (docs/design.md#ray-on-small-hosts): 2 actors + read tasks.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from galaxalign_dist.data.prepare import prepare

    root = tmp_path_factory.mktemp("embed_ray")
    prepare("synthetic:galaxymnist", root / "data", n=160, rows_per_file=32, row_group_rows=8, progress=False)
    export_tiny(root / "model")
    return root


def _opts(**kw) -> EmbedOptions:
    return EmbedOptions(**{"batch_size": 8, "rows_per_shard": 16, "progress": False, **kw})


def _check_against_single_process(world: Path, out: Path) -> None:
    from galaxalign_dist.evaluation.bundle import load_bundle
    from galaxalign_dist.evaluation.embed import embed

    bundle, emb = load_bundle(world / "model"), open_embeddings(out)
    for split in ("train", "test"):
        ref, got = embed(bundle, world / "data", split, batch_size=64, progress=False), load_split(emb, split)
        assert list(got.ids) == list(ref.ids), "every row exactly once, in catalogue order"
        for m in ("image", "symbol", "text"):
            np.testing.assert_allclose(getattr(got, m), getattr(ref, m), atol=1e-5)
    manifests = [json.loads(p.read_text()) for p in (out / "manifests").glob("part-*.json")]
    assert sum(m["rows"] for m in manifests) == emb.meta["num_rows"] == 160


@pytest.mark.timeout(900)
def test_ray_job_survives_a_killed_actor_and_equals_single_process(ray_local, world, tmp_path):
    from galaxalign_dist.launch.embed import embed_catalogue

    marker = tmp_path / "kill-one-actor"
    marker.touch()
    summary = embed_catalogue(
        world / "model", world / "data", tmp_path / "emb", _opts(), num_actors=2,
        fault={"after_batches": 3, "marker": str(marker)},
    )  # fmt: skip
    assert not marker.exists() and list(tmp_path.glob("kill-one-actor.claimed-*")), "no actor was killed"
    assert summary["engine"] == "ray" and summary["shards_written"] == summary["shards"] >= 10
    _check_against_single_process(world, tmp_path / "emb")


@pytest.mark.timeout(900)
def test_interrupted_job_is_completed_by_a_rerun_that_skips_verified_shards(ray_local, world, tmp_path):
    from galaxalign_dist.launch.embed import embed_catalogue

    out, marker = tmp_path / "emb", tmp_path / "kill"
    marker.touch()
    # No actor restarts: the SIGKILL ends the job part way, as losing the node would without retries.
    with pytest.raises(RuntimeError, match="embedding job failed after writing .*rerun the same command"):
        embed_catalogue(
            world / "model", world / "data", out, _opts(), num_actors=1, decode="tasks",
            fault={"after_batches": 8, "marker": str(marker)}, actor_options={"max_restarts": 0},
        )  # fmt: skip
    assert not (out / "embeddings.json").exists(), "an interrupted output must not look complete"
    written = sorted(out.glob("*/part-*.parquet"))
    assert written, "the first run wrote no shard before the kill: make the fault later"
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in written}
    summary = embed_catalogue(world / "model", world / "data", out, _opts(), num_actors=2)
    assert summary["shards_reused"] == len(written) and summary["shards_written"] == summary["shards"] - len(
        written
    )
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == stamps[p] for p in written), (
        "verified shards rewritten"
    )
    _check_against_single_process(world, out)
