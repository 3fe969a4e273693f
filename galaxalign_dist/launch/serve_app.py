"""Ray Serve application of `galaxalign serve`: the FastAPI ingress (page + JSON API), the app graph, start/stop."""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations at runtime, and
# through @serve.ingress the string forms do not resolve (a `request: Request` became a query parameter).
import asyncio
import logging
import os
import time
from importlib import resources
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from galaxalign_dist.evaluation.search_service import (
    MAX_IMAGE_BYTES,
    MAX_K,
    MAX_RANK,
    QueryError,
    check_image,
    check_text,
    integer,
    parse_page,
)
from galaxalign_dist.launch.serve_deployments import IndexServer, ModelServer

log = logging.getLogger(__name__)

APP_NAME = "galaxalign"
PAGE = "search.html"  # galaxalign_dist/launch/web/, package data: the page has no build step
READY_TIMEOUT_S = 5.0
# Serve's default is 5 requests in flight per replica; the ingress only awaits the model and the index.
INGRESS_MAX_ONGOING = 256


app = FastAPI(title="galaxalign search", docs_url=None, redoc_url=None)  # no docs pages: they load a CDN


@app.exception_handler(Exception)
async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    # Still JSON, so the page can show it; the replica logs the traceback.
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse(
        {"error": f"internal error ({type(e).__name__}); see the server log", "status": 500}, 500
    )


@app.exception_handler(QueryError)
async def _query_error(request: Request, e: QueryError) -> JSONResponse:
    return JSONResponse({"error": str(e), "status": e.status}, status_code=e.status)


def _checked(result: Any) -> Any:
    if isinstance(result, dict) and "error" in result:
        raise QueryError(result["error"], result["status"])
    return result


def _with_urls(result: dict[str, Any], t0: float) -> dict[str, Any]:
    # Relative URLs: the page keeps working behind a reverse proxy that mounts it under a path prefix.
    for hit in [*result["hits"], result.get("query") or {}]:
        if "id" in hit:
            hit["thumbnail"] = f"api/thumbnail?id={quote(hit['id'], safe='')}"
    return {**result, "ms": round((time.perf_counter() - t0) * 1e3, 2)}


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING)
@serve.ingress(app)
class Ingress:
    """HTTP: the web page and the JSON API (queries by image, id and text; health, readiness, provenance)."""

    def __init__(self, model: DeploymentHandle, index: DeploymentHandle) -> None:
        self.model, self.index = model, index
        self.page = resources.files("galaxalign_dist.launch").joinpath("web", PAGE).read_text()

    @app.get("/", response_class=HTMLResponse)
    async def home(self) -> str:
        return self.page

    @app.get("/api/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}  # the ingress answers; /api/ready also asks the model and the index

    @app.get("/api/ready")
    async def ready(self) -> JSONResponse:
        try:
            await asyncio.wait_for(
                asyncio.gather(self.model.provenance.remote(), self.index.provenance.remote()),
                READY_TIMEOUT_S,
            )
        except Exception as e:  # noqa: BLE001 - any failure means not ready, and says why
            return JSONResponse({"ready": False, "error": f"{type(e).__name__}: {e}"}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get("/api/info")
    async def info(self) -> dict[str, Any]:
        model, index = await asyncio.gather(self.model.provenance.remote(), self.index.provenance.remote())
        return {
            "model": model,
            "index": index,
            "limits": {"k": [1, MAX_K], "max_rank": MAX_RANK, "max_image_bytes": MAX_IMAGE_BYTES},
        }

    @app.get("/api/search/text")
    async def by_text(self, request: Request) -> dict[str, Any]:
        t0, params = time.perf_counter(), request.query_params
        k, page = parse_page(params.get("k"), params.get("page"))
        text = check_text(params.get("q"))
        vector = await self.model.embed_texts.remote(text)
        result = _checked(await self.index.search.remote(vector, k, page))
        return _with_urls({**result, "query": {"kind": "text", "text": text}}, t0)

    @app.get("/api/search/id")
    async def by_id(self, request: Request) -> dict[str, Any]:
        t0, params = time.perf_counter(), request.query_params
        k, page = parse_page(params.get("k"), params.get("page"))
        gid = (params.get("id") or "").strip()
        if not gid:
            raise QueryError("id is empty: give a catalogue id, e.g. from /api/sample")
        return _with_urls(_checked(await self.index.search_id.remote(gid, k, page)), t0)

    @app.post("/api/search/image")
    async def by_image(self, request: Request) -> dict[str, Any]:
        t0, params = time.perf_counter(), request.query_params
        k, page = parse_page(params.get("k"), params.get("page"))
        length = int(request.headers.get("content-length") or 0)
        if length > MAX_IMAGE_BYTES:  # refuse before reading the body
            raise QueryError(f"the image is {length:,} bytes; at most {MAX_IMAGE_BYTES:,} are accepted", 413)
        blob = await request.body()
        check_image(blob)
        vector = await self.model.embed_images.remote(blob)
        if isinstance(vector, str):  # Pillow read it, the model's transform did not
            raise QueryError(vector)
        result = _checked(await self.index.search.remote(vector, k, page))
        return _with_urls({**result, "query": {"kind": "image", "bytes": len(blob)}}, t0)

    @app.get("/api/thumbnail")
    async def thumbnail(self, request: Request) -> Response:
        png = _checked(await self.index.thumbnail.remote(request.query_params.get("id") or ""))
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    @app.get("/api/sample")
    async def sample(self, request: Request) -> dict[str, Any]:
        n = integer("n", request.query_params.get("n"), 12, 1, MAX_K)
        seed = integer("seed", request.query_params.get("seed"), 0, 0)
        cards = await self.index.sample.remote(n, seed)
        return _with_urls({"hits": cards}, time.perf_counter())


def build_app(
    model_dir: str,
    index_dir: str,
    data: str | None = None,
    *,
    replicas: int = 1,
    gpus_per_replica: float = 0.0,
    model_cpus: float = 1.0,
    index_cpus: float = 0.5,
    nprobe: int | None = None,
) -> Any:
    """The application graph: Ingress(ModelServer x replicas, IndexServer)."""
    model = ModelServer.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": model_cpus, "num_gpus": gpus_per_replica}
    ).bind(model_dir, model_cpus, gpus_per_replica > 0)
    index = IndexServer.options(ray_actor_options={"num_cpus": index_cpus}).bind(
        index_dir, data, nprobe, index_cpus
    )
    return Ingress.options(ray_actor_options={"num_cpus": 0.25}).bind(model, index)


def start(
    model_dir: str,
    index_dir: str,
    data: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    use_gpu: bool | None = None,
    nprobe: int | None = None,
) -> str:
    """Start (or connect to) Ray, start Serve's HTTP proxy on host:port and run the app; returns its URL.

    A local Ray is started without its dashboard: that port (jobs API included) runs code for whoever reaches
    it, and a search service has no use for it (docs/cluster.md). use_gpu None: a GPU per model replica when
    the cluster has GPUs.
    """
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, **({} if address else {"include_dashboard": False}))
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    # One HTTP proxy, on the head node: one URL for the catalogue, and the one place to put an authenticating
    # reverse proxy (docs/cluster.md); Serve's default would open the port on every node with a replica.
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    app = build_app(
        str(model_dir),
        str(index_dir),
        data,
        replicas=replicas,
        gpus_per_replica=1.0 if use_gpu else 0.0,
        nprobe=nprobe,
    )
    serve.run(app, name=APP_NAME, route_prefix="/")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}/"


def stop() -> None:
    """Remove this app (its replicas free their CPUs and GPUs), not Serve: other apps on the cluster keep running."""
    serve.delete(APP_NAME)
