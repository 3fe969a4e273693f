"""The search service's query logic without Ray: checks with clear messages, paging, self-exclusion, per-item errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from serve_helpers import build_world, corrupt_idat

from galaxalign_dist.evaluation.search_service import (
    MAX_K,
    MAX_RANK,
    IndexService,
    QueryEncoder,
    QueryError,
    check_image,
    check_text,
    parse_page,
)

pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_world(tmp_path_factory.mktemp("search_service"))


@pytest.fixture(scope="module")
def service(world: Path) -> IndexService:
    return IndexService(world / "index")


def _png(world: Path, row: int = 0) -> bytes:
    return pq.read_table(world / "data" / "test" / "part-00000.parquet").column("image")[row].as_py()


def test_page_parameters_default_and_bounds() -> None:
    assert parse_page() == (10, 1) and parse_page("5", "3") == (5, 3) and parse_page(MAX_K, 1) == (MAX_K, 1)
    for k, page, message in [
        ("0", None, f"k must be an integer from 1 to {MAX_K}, got 0"),
        (str(MAX_K + 1), None, f"got {MAX_K + 1}"),
        ("ten", None, "k must be an integer from 1 to 100, got 'ten'"),
        ("5", "0", "page must be an integer from 1, got 0"),
        ("100", "11", rf"k \* page must be at most {MAX_RANK}"),
    ]:
        with pytest.raises(QueryError, match=message) as e:
            parse_page(k, page)
        assert e.value.status == 400


def test_text_and_image_checks_say_what_is_wrong(world: Path) -> None:
    assert check_text("  a round galaxy ") == "a round galaxy"
    for bad in ("", "   ", None):
        with pytest.raises(QueryError, match="text is empty"):
            check_text(bad)
    with pytest.raises(QueryError, match="at most 500"):
        check_text("x" * 501)
    check_image(_png(world))
    with pytest.raises(QueryError, match="not an image: expected JPEG, PNG or WebP"):
        check_image(b"%PDF-1.7 certainly not a galaxy")
    with pytest.raises(QueryError, match="damaged or truncated"):
        check_image(_png(world)[:60])
    with pytest.raises(QueryError, match="damaged or truncated"):  # passes verify(); would crash torchvision
        check_image(corrupt_idat(_png(world)))
    with pytest.raises(QueryError, match="body is empty"):
        check_image(b"")


def test_id_search_pages_exclude_the_query_and_tile_the_full_ranking(service: IndexService) -> None:
    gid = service.sample(1, seed=3)[0]["id"]
    vector, pos = service.vector_of(gid)
    whole = service.search(vector, 12, 1, exclude=pos)
    pages = [service.search(vector, 4, p, exclude=pos) for p in (1, 2, 3)]
    assert [h["id"] for p in pages for h in p["hits"]] == [h["id"] for h in whole["hits"]]
    assert [h["rank"] for p in pages for h in p["hits"]] == list(range(1, 13))
    assert gid not in {h["id"] for h in whole["hits"]}
    scores = [h["score"] for h in whole["hits"]]
    assert scores == sorted(scores, reverse=True) and all(h["class_name"] for h in whole["hits"])
    last = service.search(vector, 10, 7, exclude=pos)  # 63 other galaxies: ranks 61-63, and no more
    assert [h["rank"] for h in last["hits"]] == [61, 62, 63] and not last["has_more"] and pages[0]["has_more"]


def test_unknown_id_is_a_404_and_thumbnails_are_pngs(service: IndexService) -> None:
    from PIL import Image

    with pytest.raises(QueryError, match="id 'no-such-galaxy' is not in the index") as e:
        service.vector_of("no-such-galaxy")
    assert e.value.status == 404
    with pytest.raises(QueryError):
        service.thumbnail_png("no-such-galaxy")
    gid = service.sample(1)[0]["id"]
    img = Image.open(io.BytesIO(service.thumbnail_png(gid)))
    assert img.size == (96, 96) and np.asarray(img).std() > 0  # real pixels, not the grey placeholder
    assert service.sample(5, seed=1) == service.sample(5, seed=1) != service.sample(5, seed=2)
    prov = service.provenance()
    assert prov["count"] == 64 and prov["recall_at_10"] == 1.0 and prov["model"] and prov["data"]


def test_a_bad_image_in_a_batch_fails_alone(world: Path, service: IndexService) -> None:
    encoder = QueryEncoder(world / "model")
    good = _png(world, 0)
    out = encoder.images([good, b"\x89PNG\r\n\x1a\n" + b"garbage" * 8, good])
    assert isinstance(out[1], str) and "could not be decoded" in out[1]
    np.testing.assert_allclose(out[0], out[2], atol=1e-6)
    np.testing.assert_allclose(out[0], encoder.images([good])[0], atol=1e-5)
    top = service.search(out[0], 1)["hits"][0]  # the galaxy itself, at cosine 1
    assert top["score"] == pytest.approx(1.0, abs=1e-4)
    assert encoder.provenance()["dim"] == service.dim == 64


def test_serve_binds_loopback_unless_told_otherwise() -> None:
    from galaxalign_dist.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--index", "idx"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
