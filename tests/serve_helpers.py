"""Helpers shared by the search-service tests: a tiny catalogue world and a real local Ray Serve on loopback."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from embed_helpers import export_tiny


def build_world(root: Path, n: int = 64) -> Path:
    """root/{data, model, emb, index}: n synthetic galaxies, the tiny model at a seeded random init, its
    embeddings (single process) and a Flat index with its source.json, as `galaxalign index` writes them."""
    from galaxalign_dist.data.prepare import prepare
    from galaxalign_dist.evaluation.embed_job import EmbedOptions, embed_local
    from galaxalign_dist.evaluation.index_embeddings import index_embeddings

    prepare("synthetic:galaxymnist", root / "data", n=n, rows_per_file=32, row_group_rows=16, progress=False)
    export_tiny(root / "model")
    opts = EmbedOptions(batch_size=32, rows_per_shard=32, progress=False)
    embed_local(root / "model", root / "data", root / "emb", opts)
    index_embeddings(root / "emb", root / "index", progress=False)
    return root


def get(url: str, timeout: float = 30.0) -> tuple[int, Any]:
    """(status, parsed JSON or raw bytes) of a GET, 4xx/5xx included."""
    return request(url, timeout=timeout)


def request(
    url: str, body: bytes | None = None, content_type: str = "", timeout: float = 30.0
) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, kind, raw = r.status, r.headers.get_content_type(), r.read()
    except urllib.error.HTTPError as e:
        status, kind, raw = e.code, e.headers.get_content_type(), e.read()
    return status, json.loads(raw) if kind == "application/json" else raw


def start_serve(world: Path, port: int, ready_timeout_s: float = 180.0) -> str:
    """The app on a real local Ray Serve (ray.init by the caller) on its default host and `port`; waits for ready."""
    from galaxalign_dist.launch import serve_app

    url = serve_app.start(str(world / "model"), str(world / "index"), port=port)  # default host: loopback
    deadline = time.monotonic() + ready_timeout_s
    while True:
        try:
            if get(url + "api/ready", timeout=10)[0] == 200:
                return url
        except OSError:
            pass  # the HTTP proxy is still starting
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}api/ready did not answer 200 in {ready_timeout_s} s")
        time.sleep(0.5)


def corrupt_idat(png: bytes) -> bytes:
    """The PNG with its IDAT bytes scrambled and every chunk CRC recomputed: Pillow's verify() accepts it, a full
    decode fails, and torchvision 0.29.2's decoder segfaults on it (docs/upstream/torchvision_png_segfault.md)."""
    import struct
    import zlib

    out, i = bytearray(png[:8]), 8
    while i < len(png):
        n, kind = struct.unpack(">I4s", png[i : i + 8])
        data = png[i + 8 : i + 8 + n]
        if kind == b"IDAT":
            data = bytes(b ^ 0x5A for b in data)
        out += struct.pack(">I4s", n, kind) + data + struct.pack(">I", zlib.crc32(kind + data))
        i += 12 + n
    return bytes(out)
