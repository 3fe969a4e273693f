"""Ray Serve deployments of `galaxalign serve` behind the ingress: the model (batched) and the FAISS index."""

from __future__ import annotations

from typing import Any

from ray import serve

from galaxalign_dist.evaluation.search_service import IndexService, QueryEncoder, QueryError

# Serve's default is 5 requests in flight per replica: the model replica must take in more than a batch's
# worth at once for @serve.batch to fill batches; the index replica sees the same flow of requests.
MODEL_MAX_ONGOING = 64
BATCH = {"max_batch_size": 16, "batch_wait_timeout_s": 0.005}  # 5 ms: invisible next to a model call on CPU


def _threads(cpus: float) -> int:
    return max(1, int(cpus))


@serve.deployment(max_ongoing_requests=MODEL_MAX_ONGOING)
class ModelServer:
    """The exported model: query images and texts to embeddings, requests batched by @serve.batch."""

    def __init__(self, model_dir: str, cpus: float = 1.0, use_gpu: bool = False) -> None:
        import torch

        # One torch thread per CPU Ray gave the replica: the default (every core) oversubscribes a node that
        # runs several replicas and the index beside them.
        torch.set_num_threads(_threads(cpus))
        # From the request, not torch.cuda.is_available(): a CPU replica on a GPU node may still see the GPUs.
        device = "cuda" if use_gpu else "cpu"
        self.encoder = QueryEncoder(model_dir, device)
        # Per kind: batches run, items embedded, largest batch. Shows whether @serve.batch is batching at all
        # (it only does when requests overlap), in /api/info; per replica, of the one that answered.
        self.batching = {kind: {"batches": 0, "items": 0, "largest": 0} for kind in ("images", "texts")}

    def _count(self, kind: str, n: int) -> None:
        stats = self.batching[kind]
        stats["batches"], stats["items"], stats["largest"] = (
            stats["batches"] + 1, stats["items"] + n, max(stats["largest"], n),
        )  # fmt: skip

    @serve.batch(**BATCH)
    async def embed_images(self, blobs: list[bytes]) -> list[Any]:
        self._count("images", len(blobs))
        return self.encoder.images(blobs)

    @serve.batch(**BATCH)
    async def embed_texts(self, texts: list[str]) -> list[Any]:
        self._count("texts", len(texts))
        return self.encoder.texts(texts)

    def provenance(self) -> dict[str, Any]:
        return {**self.encoder.provenance(), "batching": self.batching}


def _answer(fn: Any, *args: Any) -> Any:
    """fn(*args), or {"error", "status"} for a QueryError: plain data crosses the handle, whatever Ray does to
    exception types on the way."""
    try:
        return fn(*args)
    except QueryError as e:
        return {"error": str(e), "status": e.status}


@serve.deployment(max_ongoing_requests=MODEL_MAX_ONGOING)
class IndexServer:
    """The FAISS index and its catalogue: paged top-k, vectors and cards by id, thumbnails, provenance."""

    def __init__(
        self, index_dir: str, data: str | None, nprobe: int | None = None, cpus: float = 0.5
    ) -> None:
        import faiss

        faiss.omp_set_num_threads(_threads(cpus))  # one query at a time: threads only contend
        self.service = IndexService(index_dir, data, nprobe)

    def search(self, vector: Any, k: int, page: int) -> dict[str, Any]:
        return _answer(self.service.search, vector, k, page)

    def search_id(self, gid: str, k: int, page: int) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            vector, pos = self.service.vector_of(gid)
            return {
                **self.service.search(vector, k, page, exclude=pos),
                "query": {"kind": "id", **self.service.card(gid)},
            }

        return _answer(run)

    def thumbnail(self, gid: str) -> Any:
        return _answer(self.service.thumbnail_png, gid)

    def sample(self, n: int, seed: int) -> list[dict[str, Any]]:
        return self.service.sample(n, seed)

    def provenance(self) -> dict[str, Any]:
        return self.service.provenance()
