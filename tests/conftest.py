"""Test-wide settings: offline hub, CPU DeepSpeed, and shared helpers."""

from __future__ import annotations

import os
import socket

# Set before anything imports open_clip / deepspeed: no hub retries, no accelerator probing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "real-galaxies")
REAL_GALAXIES = os.path.abspath(os.environ.get("GALAXALIGN_REAL_GALAXIES", REAL))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
