"""Every `galaxalign` subcommand given bad input: a one-line error naming what and where, and nothing lost.

Each case runs the real CLI in a subprocess and checks: exit code 2 (a user error), exactly one
`galaxalign CMD: error: ...` line on stderr containing the file path / row id / dotted key at fault,
no Python traceback, no file that existed before changed or removed (inputs and a pre-existing
`--out` directory with a file in it), no new files left behind (no half-written outputs), and no Ray
started: train, demo, ablate, fewshot and tune must fail in their checks before Ray. RAY_ADDRESS points
at a closed port, so a regression that gets past the checks cannot start a local cluster: it waits to
connect and the case fails on its timeout (and on the run directory it wrote, if it gets an answer).

`data.on_bad_image=skip` vs `error` on corrupt image bytes inside a shard is covered at the data
level by tests/test_data.py::test_bad_image_bytes (error names the row id, skip logs the count and
ids); here the CLI side: `embed` on a shard with a corrupt image fails naming the row id.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import galaxy_jpegs

# About 50 subprocesses, most of them importing torch: a few CPU-minutes, more on a busy host.
pytestmark = [pytest.mark.slow]

CLI = [sys.executable, "-m", "galaxalign_dist.cli.main"]
RUN_TIMEOUT_S = 300  # one subprocess; each imports torch, on a host that may be busy training


# ----------------------------------------------------------------------------- valid inputs, built once


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A prepared dataset, an exported (random-init, untrained) tiny model, an index and a query image."""
    from safetensors.torch import save_file

    from galaxalign_dist import config as config_mod
    from galaxalign_dist.data.prepare import prepare
    from galaxalign_dist.evaluation.index import build_index
    from galaxalign_dist.train.export import INFO, WEIGHTS
    from galaxalign_dist.train.model import build_model

    root = tmp_path_factory.mktemp("world")
    # 40 synthetic galaxies, several files per split (the corrupt-shard cases damage one of them).
    prepare("synthetic:galaxymnist", root / "data", n=40, rows_per_file=16, row_group_rows=8, progress=False)
    # An export as `galaxalign export` writes it, without training: the tiny model at random init.
    cfg = config_mod.load("demo_cpu")
    model = build_model(cfg.model, cfg.loss, with_symbol_tower=True, load_pretrained=False)
    (root / "model").mkdir()
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(root / "model" / WEIGHTS), metadata={"format": "galaxalign_dist"})
    cfg.save(root / "model" / "config.yaml")
    (root / "model" / INFO).write_text(json.dumps({"has_symbol_tower": True}))
    # An index of the model's 64-d space (random vectors stand in for embeddings), as `index` writes it.
    ids = [f"synthetic-{i:07d}" for i in range(40)]
    rng = np.random.default_rng(0)
    build_index(rng.normal(size=(40, 64)).astype(np.float32), ids, root / "index")
    source = {"model": str(root / "model"), "data": str(root / "data"), "splits": ["train", "test"]}
    (root / "index" / "source.json").write_text(json.dumps(source))
    shutil.copy(galaxy_jpegs(3, root / "jpegs")[0], root / "galaxy.jpg")  # a galaxy as query
    return root


# ----------------------------------------------------------------------------- ways to break inputs
# Each takes the world and the case directory, builds the bad input there and returns extra
# placeholders for the case's arguments and expected message.


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def truncated_shard(w: Path, d: Path) -> None:
    _truncate(_copy(w / "data", d / "data") / "train" / "part-00001.parquet")


def damaged_page(w: Path, d: Path) -> None:
    """Footer intact (the files open), the first page header of the test split's image column overwritten."""
    f = _copy(w / "data", d / "data") / "test" / "part-00000.parquet"
    group = pq.ParquetFile(f).metadata.row_group(0)
    col = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == "image")
    data = bytearray(f.read_bytes())
    data[col.data_page_offset : col.data_page_offset + 64] = b"\xff" * 64
    f.write_bytes(bytes(data))


def corrupt_image_in_shard(w: Path, d: Path) -> dict[str, str]:
    """Row 1 of the test split keeps its id and label but its PNG bytes become garbage."""
    f = _copy(w / "data", d / "data") / "test" / "part-00000.parquet"
    table = pq.read_table(f)
    images = table.column("image").to_pylist()
    images[1] = b"\x89PNG\r\n\x1a\n" + b"not an image" * 8
    i = table.schema.get_field_index("image")
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array(images, pa.binary())), f)
    return {"bad_id": table.column("id")[1].as_py()}


def demo_out_with_truncated_shard(w: Path, d: Path) -> None:
    """`demo --out DIR` where DIR/data is an existing dataset (so demo does not prepare) with a bad shard."""
    _truncate(_copy(w / "data", d / "out" / "data") / "train" / "part-00000.parquet")


def bad_metadata_json(w: Path, d: Path) -> None:
    (_copy(w / "data", d / "data") / "_metadata.json").write_text('{"format_version": 1, "splits": ')


def model_with(mutate: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    def make(w: Path, d: Path) -> None:
        mutate(_copy(w / "model", d / "model"))

    make.__name__ = f"model_with_{mutate.__name__}"
    return make


def wrong_shaped_tensor(m: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(m / "model.safetensors")
    weights["image.proj"] = weights["image.proj"][:, :32].contiguous()  # (64, 64) -> (64, 32)
    save_file(weights, str(m / "model.safetensors"))


def truncated_weights(m: Path) -> None:
    _truncate(m / "model.safetensors")


def unknown_config_key(m: Path) -> None:
    (m / "config.yaml").write_text(
        (m / "config.yaml").read_text().replace("model:\n", "model:\n  nme: tiny\n")
    )


def checkpoint_with_corrupt_shard(w: Path, d: Path) -> None:
    """A checkpoint directory (state.json, config.yaml, zero/...) whose rank-0 shard is not a torch file."""
    ckpt = d / "ckpt"
    (ckpt / "zero").mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"stage": 2, "epoch": 1, "step": 4}))
    shutil.copy(w / "model" / "config.yaml", ckpt / "config.yaml")
    (ckpt / "zero" / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 this is not a torch file")


def index32(w: Path, d: Path) -> None:
    """An index of 32-d vectors: not the space of the 64-d model named in its source.json."""
    from galaxalign_dist.evaluation.index import build_index

    ids = [f"synthetic-{i:07d}" for i in range(40)]
    build_index(np.ones((40, 32), np.float32), ids, d / "index32")
    (d / "index32" / "source.json").write_text(json.dumps({"model": str(w / "model")}))


def garbage_jpeg(w: Path, d: Path) -> None:
    (d / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 32)


def png_with_corrupt_pixels(w: Path, d: Path) -> None:
    """Valid PNG chunks (CRCs right) around a scrambled pixel stream: it segfaulted torchvision's decoder."""
    from serve_helpers import corrupt_idat

    png = pq.read_table(w / "data" / "test" / "part-00000.parquet").column("image")[0].as_py()
    (d / "pixels.png").write_bytes(corrupt_idat(png))


def catalogue(rows: list[str], header: str = "id,path,label") -> Callable[[Path, Path], None]:
    """A catalogue CSV (cat.csv) next to img/a.jpg, img/b.jpg (galaxies) and img/trunc.jpg (half a JPEG)."""

    def make(w: Path, d: Path) -> None:
        (d / "img").mkdir()
        jpgs = galaxy_jpegs(3, w / "jpegs")
        shutil.copy(jpgs[0], d / "img" / "a.jpg")
        shutil.copy(jpgs[1], d / "img" / "b.jpg")
        (d / "img" / "trunc.jpg").write_bytes(jpgs[2].read_bytes()[:3000])
        (d / "cat.csv").write_text("\n".join([header, *rows]) + "\n")

    return make


def labels_mismatch_npz(w: Path, d: Path) -> None:
    np.savez(d / "real.npz", images=np.zeros((4, 16, 16, 3), np.uint8), labels=np.zeros(3, np.int64))


def file(name: str, text: str) -> Callable[[Path, Path], None]:
    def make(w: Path, d: Path) -> None:
        (d / name).write_text(text)

    return make


BROKEN_YAML = "data:\n  path: x\n engine: {zero_stage: 2\n"  # line 3: indentation + unclosed flow mapping
NO_DATA = "--set data.path={tmp}/nodata --set data.prepare_source="  # and no source to prepare it from
SPACE = "base_config: demo_cpu\nspace:\n  optim.lr.image: loguniform(1.0e-4, 1.0e-3)\n"


# ----------------------------------------------------------------------------- embed / index / search at scale
# (issue 15) Each fails in the driver's checks, before any Ray: metadata, footers, the output's plan.


def _world_embeddings(w: Path) -> Path:
    """A `galaxalign embed --local` output of the world's test split, made once and copied per case."""
    from galaxalign_dist.evaluation.embed_job import EmbedOptions, embed_local

    emb = w / "embeddings"
    if not (emb / "embeddings.json").exists():
        embed_local(w / "model", w / "data", emb, EmbedOptions(splits=["test"], progress=False))
    return emb


def shard_without_symbol(w: Path, d: Path) -> None:
    f = _copy(w / "data", d / "data") / "test" / "part-00000.parquet"
    pq.write_table(pq.read_table(f).drop_columns(["symbol"]), f)


def empty_val_split(w: Path, d: Path) -> None:
    data = _copy(w / "data", d / "data")
    meta_file = next(p for p in data.iterdir() if p.name.endswith("metadata.json"))
    meta = json.loads(meta_file.read_text())
    meta["splits"]["val"] = {"rows": 0, "files": [], "per_class": {}}
    meta_file.write_text(json.dumps(meta))


def folder_without_images(w: Path, d: Path) -> None:
    (d / "imgs" / "sub").mkdir(parents=True)
    (d / "imgs" / "sub" / "notes.txt").write_text("no pictures here\n")


def embeddings_copy(w: Path, d: Path) -> None:
    _copy(_world_embeddings(w), d / "emb")


def embeddings_of_32_d(w: Path, d: Path) -> None:
    meta = _copy(_world_embeddings(w), d / "emb") / "embeddings.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "dim": 32}))


def unfinished_embeddings(w: Path, d: Path) -> None:
    (_copy(_world_embeddings(w), d / "emb") / "embeddings.json").unlink()


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    args: str  # after `galaxalign`; {world}, {tmp} and the setup's placeholders are filled in
    expect: tuple[str, ...]  # substrings of the one error line (same placeholders)
    setup: Callable[[Path, Path], dict[str, str] | None] | None = None
    leaves: tuple[str, ...] = ()  # new files (relative to the case dir) the command may leave behind


CASES = [
    # prepare: catalogue columns, class names and images; an existing output
    Case(
        "prepare-catalog-missing-label-column",
        "prepare catalog:{tmp}/cat.csv --out {tmp}/out/ds",
        ("catalogue {tmp}/cat.csv has no label column", "pass --label-column"),
        catalogue(["g1,img/a.jpg"], header="id,file_loc"),
    ),
    Case(
        "prepare-catalog-unknown-class",
        "prepare catalog:{tmp}/cat.csv --schema galaxymnist --out {tmp}/out/ds",
        ("{tmp}/cat.csv row 1 (id g2)", "unknown class 'spiral_blob'"),
        catalogue(["g1,img/a.jpg,smooth_round", "g2,img/b.jpg,spiral_blob"]),
    ),
    Case(
        "prepare-catalog-missing-image",
        "prepare catalog:{tmp}/cat.csv --schema galaxymnist --out {tmp}/out/ds",
        ("{tmp}/cat.csv row 1 (id g2)", "missing image file {tmp}/img/missing.jpg"),
        catalogue(["g1,img/a.jpg,smooth_round", "g2,img/missing.jpg,smooth_round"]),
    ),
    Case(
        "prepare-catalog-corrupt-image",
        "prepare catalog:{tmp}/cat.csv --schema galaxymnist --out {tmp}/out/ds",
        ("{tmp}/cat.csv row 1 (id g2)", "image does not decode", "--skip-bad"),
        catalogue(["g1,img/a.jpg,smooth_round", "g2,img/trunc.jpg,smooth_cigar"]),
    ),
    Case(
        "prepare-out-exists",
        "prepare synthetic:galaxymnist --n 8 --out {tmp}/out",
        ("output directory {tmp}/out exists and is not empty", "--overwrite"),
    ),
    # symbols, synthetic
    Case(
        "symbols-unknown-schema",
        "symbols --out {tmp}/out/s.png --schema nosuch",
        ("unknown schema 'nosuch'",),
    ),
    Case(
        "synthetic-real-labels-wrong-shape",
        "synthetic --out {tmp}/out/s.png --real {tmp}/real.npz",
        ("{tmp}/real.npz: 'labels' has shape (3,), expected (4,)",),
        labels_mismatch_npz,
    ),
    # train: config problems, then dataset problems found by the pre-Ray check
    Case(
        "train-malformed-yaml",
        "train --config {tmp}/bad.yaml",
        ("{tmp}/bad.yaml:3:2: not valid YAML",),
        file("bad.yaml", BROKEN_YAML),
    ),
    Case(
        "train-unknown-config-key",
        "train --config {tmp}/typo.yaml",
        ("engine.zero_stagee: unknown config key",),
        file("typo.yaml", "engine:\n  zero_stagee: 3\n"),
    ),
    Case(
        "train-set-wrong-type",
        "train --set engine.num_workers=two",
        ("engine.num_workers: expected an integer, got 'two'",),
    ),
    Case("train-missing-data-dir", "train " + NO_DATA, ("dataset directory {tmp}/nodata does not exist",)),
    Case(
        "train-truncated-shard",
        "train --set data.path={tmp}/data --set data.batch_size=8",
        ("{tmp}/data/train/part-00001.parquet: not a readable Parquet shard",),
        truncated_shard,
    ),
    # demo
    Case(
        "demo-set-unknown-key",
        "demo --out {tmp}/out --set model.nme=tiny",
        ("model.nme: unknown config key",),
    ),
    Case(
        "demo-existing-data-truncated-shard",
        "demo --out {tmp}/out --set data.batch_size=8",
        ("{tmp}/out/data/train/part-00000.parquet: not a readable Parquet shard",),
        demo_out_with_truncated_shard,
    ),
    # export
    Case(
        "export-missing-checkpoint",
        "export {tmp}/nockpt --out {tmp}/out",
        ("{tmp}/nockpt: not a galaxalign checkpoint (no state.json)",),
    ),
    Case(
        "export-corrupt-checkpoint-shard",
        "export {tmp}/ckpt --out {tmp}/out",
        ("{tmp}/ckpt/zero/mp_rank_00_model_states.pt: refused to load",),
        checkpoint_with_corrupt_shard,
    ),
    # embed
    Case(
        "embed-missing-model",
        "embed {tmp}/nomodel --data {world}/data --out {tmp}/out/e.parquet",
        ("{tmp}/nomodel: not an exported galaxalign model (missing model.safetensors)",),
    ),
    Case(
        "embed-wrong-shaped-tensor",
        "embed {tmp}/model --data {world}/data --out {tmp}/out/e.parquet",
        ("{tmp}/model/model.safetensors: does not fit the model in {tmp}/model/config.yaml", "image.proj"),
        model_with(wrong_shaped_tensor),
    ),
    Case(
        "embed-corrupt-image-in-shard",
        "embed {world}/model --data {tmp}/data --out {tmp}/out/e.parquet",
        ("row id {bad_id}: image does not decode",),
        corrupt_image_in_shard,
    ),
    # eval
    Case(
        "eval-missing-data-dir",
        "eval {world}/model --data {tmp}/nodata --out {tmp}/out --no-figures",
        ("dataset directory {tmp}/nodata does not exist",),
    ),
    Case(
        "eval-damaged-shard-page",
        "eval {world}/model --data {tmp}/data --out {tmp}/out --no-figures",
        ("{tmp}/data/test/part-00000.parquet: damaged Parquet shard",),
        damaged_page,
    ),
    Case(
        "eval-truncated-weights",
        "eval {tmp}/model --data {world}/data --out {tmp}/out --no-figures",
        ("{tmp}/model/model.safetensors: not a readable safetensors file",),
        model_with(truncated_weights),
    ),
    # index
    Case(
        "index-bad-metadata-json",
        "index {world}/model --data {tmp}/data --out {tmp}/out",
        ("{tmp}/data/_metadata.json is not valid JSON",),
        bad_metadata_json,
    ),
    Case(
        "index-export-config-unknown-key",
        "index {tmp}/model --data {world}/data --out {tmp}/out",
        ("{tmp}/model/config.yaml: model.nme: unknown config key",),
        model_with(unknown_config_key),
    ),
    # search
    Case(
        "search-missing-image",
        "search {tmp}/nope.jpg --index {world}/index",
        ("query image not found: {tmp}/nope.jpg",),
    ),
    Case(
        "search-missing-index-dir",
        "search {world}/galaxy.jpg --index {tmp}/noindex",
        ("index directory {tmp}/noindex does not exist",),
    ),
    Case(
        "search-corrupt-image",
        "search {tmp}/garbage.jpg --index {world}/index",
        ("query image {tmp}/garbage.jpg: image does not decode",),
        garbage_jpeg,
    ),
    Case(
        "search-png-with-corrupt-pixels",
        "search {tmp}/pixels.png --index {world}/index",
        ("query image {tmp}/pixels.png: image does not decode",),
        png_with_corrupt_pixels,
    ),
    Case(
        "search-index-of-other-dim",
        "search {world}/galaxy.jpg --index {tmp}/index32",
        ("index {tmp}/index32 holds 32-d embeddings but model {world}/model makes 64-d ones",),
        index32,
    ),
    # serve: every check before Ray (RAY_ADDRESS points at a closed port) and before any port is bound
    Case(
        "serve-missing-index-dir",
        "serve --index {tmp}/noindex",
        ("index directory {tmp}/noindex does not exist",),
    ),
    Case(
        "serve-missing-model-dir",
        "serve --index {world}/index --model {tmp}/nomodel",
        ("model directory {tmp}/nomodel does not exist",),
    ),
    Case(
        "serve-index-of-other-dim",
        "serve --index {tmp}/index32",
        ("index {tmp}/index32 holds 32-d embeddings but model {world}/model makes 64-d ones",),
        index32,
    ),
    Case(
        "serve-missing-data-dir",
        "serve --index {world}/index --data {tmp}/nodata",
        ("--data {tmp}/nodata does not exist",),
    ),
    # ablate, fewshot: fail in the pre-Ray dataset check
    Case(
        "ablate-missing-data-dir",
        "ablate --out {tmp}/out --variants clip " + NO_DATA,
        ("dataset directory {tmp}/nodata does not exist",),
    ),
    Case(
        "fewshot-fractions-out-of-range",
        # A fresh --out (the test pre-creates {tmp}/out): the fractions are refused before it is made
        # (tests/unit/test_cli_experiments.py checks that the directory is never created).
        "fewshot --out {tmp}/fewshot-out --fractions 0,2 --set data.path={world}/data",
        ("fractions must be in (0, 1], got [0.0, 2.0]",),
    ),
    Case(
        "fewshot-truncated-shard",
        "fewshot --out {tmp}/out --fractions 0.5 --set data.path={tmp}/data --set data.batch_size=8",
        ("{tmp}/data/train/part-00001.parquet: not a readable Parquet shard",),
        truncated_shard,
    ),
    # tune: the search space file, --set, then the base config's dataset
    Case(
        "tune-malformed-yaml",
        "tune --config {tmp}/bad.yaml --out {tmp}/out",
        ("{tmp}/bad.yaml:3:2: not valid YAML",),
        file("bad.yaml", BROKEN_YAML),
    ),
    Case(
        "tune-unknown-space-key",
        "tune --config {tmp}/space.yaml --out {tmp}/out",
        ("space.optim.lr.imagee: not a run-config field",),
        file("space.yaml", SPACE.replace("lr.image", "lr.imagee")),
    ),
    Case(
        "tune-set-wrong-type",
        "tune --config {tmp}/space.yaml --out {tmp}/out --set num_samples=many",
        ("num_samples: expected an integer >= 1, got 'many'",),
        file("space.yaml", SPACE),
    ),
    Case(
        "tune-missing-data-dir",
        "tune --config {tmp}/space.yaml --out {tmp}/out " + NO_DATA,
        ("dataset directory {tmp}/nodata does not exist",),
        file("space.yaml", SPACE),
    ),
    # embed / index / search / eval --embeddings (issue 15): each fails in the driver's checks, before Ray
    Case(
        "embed-missing-column",
        "embed {world}/model --data {tmp}/data --out {tmp}/out/emb",
        (
            "{tmp}/data/test/part-00000.parquet: no column 'symbol' (needed for --modalities image,text,symbol)",
        ),
        shard_without_symbol,
    ),
    Case(
        "embed-empty-split",
        "embed {world}/model --data {tmp}/data --split val --out {tmp}/out/emb",
        ("{tmp}/data: split 'val' has no rows to embed",),
        empty_val_split,
    ),
    Case(
        "embed-folder-without-images",
        "embed {world}/model --data {tmp}/imgs --modalities image --out {tmp}/out/emb",
        ("{tmp}/imgs: no image files",),
        folder_without_images,
    ),
    Case(
        "embed-text-of-image-folder",
        "embed {world}/model --data {tmp}/imgs --out {tmp}/out/emb",
        ("{tmp}/imgs is a folder of images (no captions or symbols)", "--modalities image"),
        folder_without_images,
    ),
    Case(
        "embed-resume-with-other-settings",
        "embed {world}/model --data {world}/data --split test --dtype float16 --out {tmp}/emb",
        ("{tmp}/emb holds embeddings made with other settings (dtype)", "--overwrite"),
        embeddings_copy,
    ),
    Case(
        "eval-embeddings-dim-mismatch",
        "eval {world}/model --data {world}/data --embeddings {tmp}/emb --out {tmp}/out --no-figures",
        ("embeddings {tmp}/emb are 32-d but model {world}/model makes 64-d ones",),
        embeddings_of_32_d,
    ),
    Case(
        "index-unfinished-embeddings",
        "index {tmp}/emb --out {tmp}/out/idx",
        ("{tmp}/emb is not a finished `galaxalign embed` output: no embeddings.json", "rerun"),
        unfinished_embeddings,
    ),
    Case(
        "index-bad-factory",
        "index {tmp}/emb --out {tmp}/out/idx --factory IVFx,PQ",
        ("--factory 'IVFx,PQ': not a faiss index_factory string for 64-d vectors",),
        embeddings_copy,
    ),
    Case(
        "search-unknown-id",
        "search --id no-such-galaxy --index {world}/index",
        ("id 'no-such-galaxy' is not in index",),
    ),
    Case(
        "search-two-queries",
        "search {world}/galaxy.jpg --text 'a barred spiral galaxy' --index {world}/index",
        ("give exactly one query",),
    ),
]


# ----------------------------------------------------------------------------- the test


def _snapshot(*roots: Path) -> dict[Path, str]:
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.mark.timeout(60)
def test_every_subcommand_has_a_case():
    from galaxalign_dist.cli.main import COMMANDS

    covered = {c.args.split()[0] for c in CASES}
    assert covered == {name for name, _ in COMMANDS}


@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: Path, tmp_path: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("written before the command ran\n")  # must survive
    fill = {"world": str(world), "tmp": str(tmp_path)}
    fill.update((case.setup(world, tmp_path) if case.setup else None) or {})
    before = _snapshot(world, tmp_path)

    env = {
        **os.environ,
        "RAY_ADDRESS": "127.0.0.1:9",  # never start a local Ray: a regression only tries to connect
        "HF_HUB_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    try:
        proc = subprocess.run(
            [*CLI, *shlex.split(case.args.format(**fill))],
            cwd=tmp_path,  # relative defaults (runs/...) land in the case directory, watched below
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        # e.g. it passed its checks and now waits for the Ray at RAY_ADDRESS
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        pytest.fail(f"no answer in {RUN_TIMEOUT_S} s; bad input should fail at once:\n{stderr}")
    err = proc.stderr
    command = case.args.split()[0]
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{err}"
    assert "Traceback (most recent call last)" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"galaxalign {command}: error: ")]
    assert len(lines) == 1, err
    for want in case.expect:
        assert want.format(**fill) in lines[0], f"{want.format(**fill)!r} not in:\n{lines[0]}"
    for sign in ("Started a local Ray instance", "Connecting to existing Ray cluster"):
        assert sign not in err, f"Ray was reached before the input was rejected:\n{err}"

    after = _snapshot(world, tmp_path)
    changed = sorted(str(p) for p, h in before.items() if after.get(p) != h)
    assert not changed, f"inputs modified or deleted: {changed}"
    new = sorted(
        str(p.relative_to(tmp_path)) if tmp_path in p.parents else str(p) for p in set(after) - set(before)
    )
    assert new == sorted(case.leaves), f"left behind: {new}"
