"""`galaxalign serve` on a real local Ray Serve: each query kind, paging, bad input as a clear 4xx, and the service
keeps answering; the API's answers equal the in-process search service's."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from serve_helpers import build_world, corrupt_idat, get, request, start_serve

from conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_world(tmp_path_factory.mktemp("serve_api"))


@pytest.fixture(scope="module")
def url(world: Path):
    import ray

    # 4 logical CPUs on a 2-core host (docs/design.md#ray-on-small-hosts): model 1 + index 0.5 + ingress 0.25.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield start_serve(world, free_port())
    finally:
        from galaxalign_dist.launch import serve_app

        serve_app.stop()
        ray.shutdown()


def _png(world: Path, row: int) -> bytes:
    return pq.read_table(world / "data" / "test" / "part-00000.parquet").column("image")[row].as_py()


def _ids(answer: dict) -> list[str]:
    return [h["id"] for h in answer["hits"]]


def test_health_ready_and_provenance(url: str, world: Path) -> None:
    assert get(url + "api/health") == (200, {"status": "ok"})
    assert get(url + "api/ready") == (200, {"ready": True})
    status, info = get(url + "api/info")
    assert status == 200
    assert info["model"]["path"] == str(world / "model") and info["model"]["dim"] == 64
    assert info["index"]["count"] == 64 and info["index"]["recall_at_10"] == 1.0
    assert info["index"]["model"] and info["index"]["data"] and info["index"]["factory"] == "Flat"
    status, page = get(url)
    assert status == 200 and b"<title>galaxalign" in page


def _outward_address() -> str | None:
    """This host's address on its default route (a UDP connect sends nothing), or None when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere, only used to pick an interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_binds_loopback_only_by_default(url: str) -> None:
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    assert url.startswith("http://127.0.0.1:")
    address = _outward_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to try")
    with pytest.raises(OSError):  # connection refused: nothing listens on that interface
        socket.create_connection((address, port), timeout=5).close()


def test_each_query_kind_equals_the_in_process_search(url: str, world: Path) -> None:
    from galaxalign_dist.evaluation.search_service import IndexService, QueryEncoder

    service, encoder = IndexService(world / "index"), QueryEncoder(world / "model")
    gid = get(url + "api/sample?n=1&seed=4")[1]["hits"][0]["id"]
    status, by_id = get(url + f"api/search/id?id={gid}&k=5")
    vector, pos = service.vector_of(gid)
    assert status == 200 and by_id["query"]["id"] == gid and by_id["query"]["class_name"]
    assert _ids(by_id) == _ids(service.search(vector, 5, exclude=pos)) and gid not in _ids(by_id)
    hit = by_id["hits"][0]
    assert set(hit) >= {"rank", "id", "score", "class_name", "thumbnail"} and hit["rank"] == 1
    status, png = get(url + hit["thumbnail"])
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"

    text = "a barred spiral galaxy with tight arms"
    status, by_text = get(url + "api/search/text?q=" + text.replace(" ", "+") + "&k=7")
    assert status == 200 and by_text["query"] == {"kind": "text", "text": text} and len(by_text["hits"]) == 7
    ref = service.search(encoder.texts([text])[0], 7)
    assert _ids(by_text) == _ids(ref)
    np.testing.assert_allclose(
        [h["score"] for h in by_text["hits"]], [h["score"] for h in ref["hits"]], atol=1e-4
    )

    status, by_image = request(url + "api/search/image?k=3", _png(world, 2), "image/png")
    assert status == 200 and by_image["query"]["kind"] == "image" and len(by_image["hits"]) == 3
    assert by_image["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)  # the uploaded galaxy is in the index


def test_concurrent_queries_share_model_batches(url: str) -> None:
    texts = [f"a galaxy number {i}" for i in range(32)]
    with ThreadPoolExecutor(16) as pool:
        statuses = list(
            pool.map(lambda t: get(url + "api/search/text?k=2&q=" + t.replace(" ", "+"))[0], texts)
        )
    assert statuses == [200] * 32
    batching = get(url + "api/info")[1]["model"]["batching"]["texts"]
    assert batching["items"] >= 32 and 1 < batching["largest"] <= 16, (
        batching
    )  # @serve.batch's max_batch_size


def test_paging(url: str) -> None:
    gid = get(url + "api/sample?n=1&seed=5")[1]["hits"][0]["id"]
    whole = get(url + f"api/search/id?id={gid}&k=9")[1]
    pages = [get(url + f"api/search/id?id={gid}&k=3&page={p}")[1] for p in (1, 2, 3)]
    assert [i for p in pages for i in _ids(p)] == _ids(whole)
    assert [h["rank"] for p in pages for h in p["hits"]] == list(range(1, 10)) and pages[2]["has_more"]
    last = get(url + f"api/search/id?id={gid}&k=20&page=4")[1]  # 63 others: ranks 61-63
    assert [h["rank"] for h in last["hits"]] == [61, 62, 63] and not last["has_more"]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        (
            "api/search/image?k=3",
            b"%PDF-1.7 not an image at all",
            400,
            "not an image: expected JPEG, PNG or WebP",
        ),
        ("api/search/image?k=3", b"", 400, "body is empty"),
        ("api/search/id?id=no-such-galaxy", None, 404, "id 'no-such-galaxy' is not in the index"),
        ("api/search/id?id=", None, 400, "id is empty"),
        ("api/search/text?q=++&k=3", None, 400, "text is empty"),
        ("api/search/text?q=round&k=0", None, 400, "k must be an integer from 1 to 100, got 0"),
        ("api/search/text?q=round&k=101", None, 400, "k must be an integer from 1 to 100, got 101"),
        ("api/search/text?q=round&k=many", None, 400, "k must be an integer from 1 to 100, got 'many'"),
        ("api/search/text?q=round&k=10&page=0", None, 400, "page must be an integer from 1, got 0"),
        ("api/search/text?q=round&k=100&page=11", None, 400, "k * page must be at most 1000"),
        ("api/thumbnail?id=no-such-galaxy", None, 404, "not in the index"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_the_service_keeps_answering(
    url: str, path: str, body: bytes | None, status: int, message: str
) -> None:
    got, answer = request(url + path, body, "application/octet-stream" if body is not None else "")
    assert got == status and message in answer["error"], answer
    assert get(url + "api/search/text?q=round&k=2")[0] == 200
    assert get(url + "api/ready")[0] == 200


def test_damaged_uploads_among_good_ones_get_their_400_and_the_rest_answers(url: str, world: Path) -> None:
    """Concurrent uploads (batched together by @serve.batch when they reach the model): a truncated PNG, a PNG
    whose pixel stream is corrupt (it segfaulted torchvision's decoder in the model replica before the ingress
    decoded uploads with Pillow) and a non-image each get a 400; the good ones their answers, also afterwards."""
    good = _png(world, 1)
    bodies = [good, good[: len(good) // 2], good, corrupt_idat(good), b"GIF89a" + b"x" * 64] * 3
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: request(url + "api/search/image?k=2", b, "image/png"), bodies))
    for body, (status, answer) in zip(bodies, answers, strict=True):
        if body is good:
            assert status == 200 and answer["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        else:
            assert status == 400 and answer["error"].startswith("the uploaded"), answer
    assert request(url + "api/search/image?k=2", good, "image/png")[0] == 200
