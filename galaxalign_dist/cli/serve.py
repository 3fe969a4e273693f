"""`galaxalign serve`: a catalogue's index behind one URL (Ray Serve): JSON API and a search page."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

HELP = "serve similarity search over an index (Ray Serve): a JSON API and a web page, on 127.0.0.1 by default"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="index directory (galaxalign index --out)")
    p.add_argument("--model", help="exported model (default: the one the index was built with)")
    p.add_argument("--data", help="catalogue for thumbnails (default: the one the index was built from)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1: this machine only; see docs/cluster.md before widening it)",
    )
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument(
        "--replicas", type=int, default=1, help="model replicas (each takes a GPU when there is one)"
    )
    p.add_argument("--cpu", action="store_true", help="keep the model on CPU even when the cluster has GPUs")
    p.add_argument("--nprobe", type=int, help="IVF lists probed (default: the value index.json records)")


def check(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """(model, index, data) after every check that needs no Ray: bad input fails here, before a cluster starts."""
    from galaxalign_dist.evaluation.index_embeddings import read_source
    from galaxalign_dist.evaluation.search_service import check_index_dir

    meta = check_index_dir(args.index)
    source = read_source(args.index)
    model = args.model or source.get("model")
    if not model:
        raise ValueError(
            f"--model is required: {args.index} does not name the model the index was built with"
        )
    _check_model(model, int(meta["dim"]), args.index)
    data = args.data or source.get("data")
    if args.data and not Path(args.data).is_dir() and "://" not in args.data:
        raise FileNotFoundError(f"--data {args.data} does not exist (the prepared catalogue, for thumbnails)")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be from 1 to 65535, got {args.port}")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be positive, got {args.replicas}")
    return _absolute(str(model)), _absolute(str(args.index)), _absolute(data) if data else None


def _absolute(path: str) -> str:
    # The replicas open these paths from their own working directories, on any node.
    return path if "://" in path else str(Path(path).resolve())


def _check_model(model: str, index_dim: int, index: str) -> None:
    from galaxalign_dist.train import checkpoint
    from galaxalign_dist.train.export import INFO, WEIGHTS
    from galaxalign_dist.train.model import embed_dim

    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {model} does not exist (an export: galaxalign export --out)"
        )
    for name in (WEIGHTS, checkpoint.CONFIG_FILE, INFO):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{model}: not an exported galaxalign model (missing {name})")
    dim = embed_dim(checkpoint.read_config(path).model)
    if dim is not None and dim != index_dim:
        raise ValueError(
            f"index {index} holds {index_dim}-d embeddings but model {model} makes {dim}-d ones; "
            "serve the model the index was built with (--model)"
        )


def run(args: argparse.Namespace) -> int:
    model, index, data = check(args)
    from galaxalign_dist.launch import serve_app

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: binding {args.host}: the service has no authentication of its own; put it behind an "
            "authenticating reverse proxy (docs/cluster.md)",
            file=sys.stderr,
        )
    url = serve_app.start(
        model, index, data, host=args.host, port=args.port, replicas=args.replicas,
        use_gpu=False if args.cpu else None, nprobe=args.nprobe,
    )  # fmt: skip
    print(f"serving {index} at {url} (API under {url}api/; Ctrl-C to stop)", flush=True)
    # `ray job stop` and container shutdowns send SIGTERM: stop the app then too, as on Ctrl-C, or its
    # replicas (Serve apps outlive their driver) would keep holding the cluster's CPUs and GPU.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        serve_app.stop()
    return 0
