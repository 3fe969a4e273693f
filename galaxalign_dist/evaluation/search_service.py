"""Similarity search as a service, without Ray: checked queries, paged top-k over an index, thumbnails, provenance."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from galaxalign_dist.evaluation.index import (
    IDS_FILE,
    INDEX_FILE,
    META_FILE,
    LoadedIndex,
    load_index,
    search_arrays,
)
from galaxalign_dist.evaluation.index_embeddings import read_source, stored_vector, thumbnails_of

MAX_K = 100  # results per page: a screenful of tiles; more is a second page, not a bigger one
MAX_RANK = 1000  # the deepest rank paging reaches (k * page): past it, neighbours stop meaning much
MAX_TEXT = 500  # characters; the text tower reads a few dozen tokens, longer text is truncated by it anyway
MAX_IMAGE_BYTES = 16 * 2**20  # a survey cutout is tens of KB; this bounds what one request can make us decode
MAX_PIXELS = 25_000_000  # 5000 x 5000: ~75 MB decoded, far above any survey cutout
THUMB_SIZE = 96  # px, the page's tile size


class QueryError(ValueError):
    """A query the caller must fix; `status` is the HTTP status that says so (400, 404, 413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_page(k: Any = None, page: Any = None) -> tuple[int, int]:
    """(k, page) from query-string values (strings, ints or None): k in [1, MAX_K], page >= 1, k*page <= MAX_RANK."""
    k_int, page_int = integer("k", k, 10, 1, MAX_K), integer("page", page, 1, 1)
    if k_int * page_int > MAX_RANK:
        raise QueryError(f"k * page must be at most {MAX_RANK} (got k={k_int}, page={page_int})")
    return k_int, page_int


def integer(name: str, value: Any, default: int, lo: int, hi: int | None = None) -> int:
    """An integer query parameter in [lo, hi] (`default` when absent); QueryError naming it otherwise."""
    if value is None or value == "":
        return default
    span = f"from {lo} to {hi}" if hi is not None else f"from {lo}"
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise QueryError(f"{name} must be an integer {span}, got {value!r}") from None
    if out < lo or (hi is not None and out > hi):
        raise QueryError(f"{name} must be an integer {span}, got {out}")
    return out


def check_text(text: str | None) -> str:
    """The stripped query text; empty or overlong text is the caller's to fix."""
    text = (text or "").strip()
    if not text:
        raise QueryError('text is empty: describe a galaxy, e.g. "a barred spiral galaxy with tight arms"')
    if len(text) > MAX_TEXT:
        raise QueryError(f"text is {len(text)} characters long; at most {MAX_TEXT} are accepted")
    return text


def check_image(blob: bytes) -> None:
    """Reject an upload that is empty, too large or not an image Pillow decodes, before the model sees it.

    A full decode, not Pillow's verify(): a PNG with a corrupt IDAT stream (valid chunk CRCs) passes verify()
    and then segfaulted the process in torchvision 0.29.2's PNG decoder, which the model's transform uses
    (docs/upstream/torchvision_png_segfault.md). Pillow raises instead, so such an upload stays a 400.
    """
    from PIL import Image, UnidentifiedImageError

    if not blob:
        raise QueryError("the request body is empty: upload a JPEG, PNG or WebP image")
    if len(blob) > MAX_IMAGE_BYTES:
        raise QueryError(f"the image is {len(blob):,} bytes; at most {MAX_IMAGE_BYTES:,} are accepted", 413)
    damaged = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
    try:
        img = Image.open(io.BytesIO(blob))
    except UnidentifiedImageError:
        raise QueryError("the uploaded file is not an image: expected JPEG, PNG or WebP") from None
    except damaged as e:
        raise QueryError(f"the uploaded image is damaged or truncated ({e})") from None
    with img:
        if img.width * img.height > MAX_PIXELS:  # from the header, before decoding
            raise QueryError(
                f"the image is {img.width}x{img.height} pixels; at most {MAX_PIXELS:,} are accepted", 413
            )
        try:
            img.load()
        except damaged as e:
            raise QueryError(f"the uploaded image is damaged or truncated ({e})") from None


def top_k(
    index: LoadedIndex,
    query: np.ndarray,
    k: int,
    offset: int = 0,
    exclude: int = -1,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions and scores of ranks offset+1 .. offset+k for one (1, D) query, `exclude` (the query's own row
    when it is in the index) dropped: the search asks FAISS for one more so that a page is still k long."""
    want = min(offset + k + (exclude >= 0), index.index.ntotal)
    if want <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    scores, pos = search_arrays(index, query, k=want, nprobe=nprobe)
    keep = (pos[0] >= 0) & (pos[0] != exclude)
    return pos[0][keep][offset : offset + k], scores[0][keep][offset : offset + k]


def thumbnails(index: LoadedIndex, records: list[dict], data: str | None, size: int = 64) -> np.ndarray:
    """(N, size, size, 3) uint8 pictures of index rows: read by catalogue source and row when the index records
    them, else found by id in the prepared dataset `data` (an index built from in-memory arrays)."""
    if "source" in index.table.column_names or not data:
        return thumbnails_of(records, data, size)
    from galaxalign_dist.data import shards
    from galaxalign_dist.evaluation.embed import thumbnails as by_id

    ids = np.array([str(r["id"]) for r in records])
    thumbs = np.full((len(ids), 64, 64, 3), 127, np.uint8)
    for split in shards.read_metadata(data)["splits"]:
        found = by_id(data, split, ids)
        thumbs = np.where(found.any(axis=(1, 2, 3), keepdims=True), found, thumbs)
    if size != 64:
        from PIL import Image

        thumbs = np.stack([np.asarray(Image.fromarray(t).resize((size, size))) for t in thumbs])
    return thumbs


def check_index_dir(index_dir: str | Path) -> dict[str, Any]:
    """index.json of a complete index directory, or FileNotFoundError naming what is missing (no FAISS load)."""
    d = Path(index_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"index directory {d} does not exist (build it with `galaxalign index`)")
    for name in (META_FILE, INDEX_FILE, IDS_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(
                f"index directory {d} is missing {name} (build it with `galaxalign index`)"
            )
    try:
        return json.loads((d / META_FILE).read_text())
    except ValueError as e:
        raise ValueError(f"{d / META_FILE}: not valid JSON ({e})") from None


class IndexService:
    """The index side of the service: one loaded index, its catalogue for thumbnails, paged searches."""

    def __init__(self, index_dir: str | Path, data: str | None = None, nprobe: int | None = None) -> None:
        self.index = load_index(index_dir)
        self.source = read_source(index_dir)
        self.data = data or self.source.get("data")
        self.nprobe = nprobe
        self._thumb = functools.lru_cache(maxsize=4096)(self._thumbnail_png)  # tiles repeat across queries

    @property
    def dim(self) -> int:
        return self.index.dim

    def position(self, gid: str) -> int:
        try:
            return self.index.position(gid)
        except ValueError:
            raise QueryError(
                f"id {gid!r} is not in the index ({self.index.table.num_rows:,} galaxies)", 404
            ) from None

    def vector_of(self, gid: str) -> tuple[np.ndarray, int]:
        """The stored (1, D) embedding of catalogue id `gid` and its row (QueryError 404 when unknown)."""
        pos = self.position(gid)
        return stored_vector(self.index, pos)[None, :], pos

    def search(self, query: np.ndarray, k: int, page: int = 1, exclude: int = -1) -> dict[str, Any]:
        """Page `page` of k hits for a (1, D) query: rank, id, score, class_name (and label) when known."""
        query = np.asarray(query, np.float32).reshape(1, -1)
        if query.shape[1] != self.dim:
            raise QueryError(
                f"the query is {query.shape[1]}-d but the index holds {self.dim}-d embeddings", 500
            )
        offset = (page - 1) * k
        pos, scores = top_k(self.index, query, k, offset, exclude, self.nprobe)
        hits = [
            {"rank": offset + i + 1, **self._card(r), "score": round(float(s), 6)}
            for i, (r, s) in enumerate(zip(self.index.records(pos), scores, strict=True))
        ]
        total = self.index.index.ntotal - (exclude >= 0)
        return {"k": k, "page": page, "hits": hits, "has_more": offset + k < min(total, MAX_RANK)}

    def card(self, gid: str) -> dict[str, Any]:
        """id, class_name (and label) of one catalogue galaxy: the query card of a search by id."""
        return self._card(self.index.records(np.array([self.position(gid)]))[0])

    @staticmethod
    def _card(record: dict) -> dict[str, Any]:
        out = {"id": str(record["id"]), "class_name": record.get("class_name") or None}
        label = record.get("label")
        if label is not None and int(label) >= 0:  # -1 marks an unlabelled catalogue row
            out["label"] = int(label)
        return out

    def sample(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """n catalogue galaxies drawn at random (seeded): something to pick a first query from."""
        count = self.index.table.num_rows
        pos = np.sort(np.random.default_rng(seed).choice(count, size=min(n, count), replace=False))
        return [self._card(r) for r in self.index.records(pos)]

    def thumbnail_png(self, gid: str) -> bytes:
        """A THUMB_SIZE px PNG of catalogue galaxy `gid` (grey when its catalogue cannot be read)."""
        self.position(gid)  # an unknown id is a 404, not a grey square
        return self._thumb(gid)

    def _thumbnail_png(self, gid: str) -> bytes:
        from PIL import Image

        record = self.index.records(np.array([self.position(gid)]))
        buf = io.BytesIO()
        Image.fromarray(thumbnails(self.index, record, self.data, THUMB_SIZE)[0]).save(buf, format="PNG")
        return buf.getvalue()

    def provenance(self) -> dict[str, Any]:
        """Where the index came from and how good it is: build metadata, measured recall@10, its catalogue."""
        meta = self.index.meta
        keys = (
            "path",
            "count",
            "dim",
            "factory",
            "nprobe",
            "recall_at_10",
            "modality",
            "model",
            "data",
            "embeddings",
        )
        return {**{k: meta.get(k) for k in keys}, "thumbnails_from": self.data, "source": self.source}


class QueryEncoder:
    """The model side of the service: query images and texts to embeddings, one result or error per item."""

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        from galaxalign_dist.evaluation.bundle import load_bundle

        self.bundle = load_bundle(model_dir, device)
        self.dim = int(self.bundle.embed_texts(["a galaxy"]).shape[1])

    def images(self, blobs: list[bytes]) -> list[np.ndarray | str]:
        """(D,) embedding per encoded image, or an error message for an image the transform rejects: one bad
        upload in a batch must not fail the others, so a failed batch is retried one image at a time."""
        try:
            return list(self.bundle.embed_images(blobs))
        except ValueError as e:
            if len(blobs) == 1:
                return [f"the uploaded image could not be decoded: {str(e).split(': ', 1)[-1]}"]
        return [one for blob in blobs for one in self.images([blob])]

    def texts(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.bundle.embed_texts(texts))

    def provenance(self) -> dict[str, Any]:
        """The export: its directory, model name, embedding width, input size, device and export.json."""
        return {
            "path": str(self.bundle.path),
            "name": self.bundle.config.model.name,
            "dim": self.dim,
            "image_size": self.bundle.image_size,
            "device": str(self.bundle.device),
            "export": self.bundle.info,
        }
