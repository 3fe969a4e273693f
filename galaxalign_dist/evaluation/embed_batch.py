"""One batch of catalogue rows through the towers, with the export's own eval transform (as `galaxalign eval`).

Used the same way by `galaxalign embed --local` (a plain loop) and by the Ray Data actors of
launch/embed.py, so both give the numbers evaluation/embed.py gives for the same rows. Captions and
symbols repeat (a few per class, a few hundred rich ones): their embeddings are computed once per distinct
string and cached, so a row costs one image forward whatever the modalities.
"""

from __future__ import annotations

import functools
import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from galaxalign_dist import config as config_mod
from galaxalign_dist.config import Config
from galaxalign_dist.evaluation.bundle import Bundle, load_bundle
from galaxalign_dist.train.model import build_transform

OUTPUT_DTYPES = {"float32": np.float32, "float16": np.float16}
PLACEHOLDER_SYMBOL = "round"  # fed to the transform where only the image is wanted (its symbol is discarded)


@functools.cache
def _placeholder_png() -> bytes:
    """A tiny valid image: the transform needs one per row, and caption/symbol rows need none of their own."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


def eval_transform(cfg: Config, skip_bad: bool) -> Any:
    """The export's eval TripletTransform (no augmentation), keeping ids so dropped rows can be told apart."""
    data = cfg.to_dict()
    data["data"]["on_bad_image"] = "skip" if skip_bad else "error"
    return build_transform(config_mod.from_dict(data, validate=False), train=False, keep_ids=True)


class RowPixels:
    """Stored rows -> normalised float32 pixels (B, 3, S, S) by the eval transform; undecodable rows raise
    naming the id and source row, or (skip_bad) come back zero with ``bad`` / ``reason`` set."""

    def __init__(self, cfg: Config | dict, skip_bad: bool = False) -> None:
        cfg = cfg if isinstance(cfg, Config) else config_mod.from_dict(cfg, validate=False)
        self.transform, self.skip_bad = eval_transform(cfg, skip_bad), skip_bad

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        ids = np.asarray(batch["id"], dtype=object)
        images = np.array([b if b is not None else b"" for b in batch["image"]], dtype=object)
        rows = {
            "id": ids,
            "image": images,
            "label": np.zeros(n, np.int64),
            "text": np.full(n, "", dtype=object),
            "symbol": np.full(n, PLACEHOLDER_SYMBOL, dtype=object),
        }
        try:
            out = self.transform(rows)
        except ValueError as e:
            where = {
                str(i): (s, r) for i, s, r in zip(ids, batch["source"], batch["source_row"], strict=True)
            }
            gid = str(e).split(":", 1)[0].removeprefix("row id ")
            src = f"; source {where[gid][0]} row {where[gid][1]}" if gid in where else ""
            raise ValueError(f"{e}{src} (pass --skip-bad to skip such rows)") from None
        kept = {str(i): j for j, i in enumerate(out["id"])}
        pixels = np.zeros((n, *out["image"].shape[1:]), np.float32)
        bad = np.array([str(i) not in kept for i in ids])
        for i in np.flatnonzero(~bad):
            pixels[i] = out["image"][kept[str(ids[i])]]
        reason = np.where(bad, "image does not decode", "").astype(object)
        result = {k: v for k, v in batch.items() if k != "image"}
        result.update(pixels=pixels, bad=bad, reason=reason)
        return result


class BatchEmbedder:
    """Holds a model (built once per process or actor) and embeds batches of catalogue rows.

    Input: the columns of catalogue.read_unit (``image`` bytes, or ``pixels`` when RowPixels ran
    elsewhere), ``text`` / ``symbol`` when those modalities are asked. Output: the bookkeeping columns
    (unit, pos, id, source, source_row, label, class_name, bad, reason) plus ``{m}_embedding`` (B, D)
    in `dtype` for each modality, and ``{m}_valid`` for text/symbol (False where a row has no caption
    or symbol: the output column is null there).
    """

    def __init__(
        self,
        model_dir: str | Path,
        modalities: list[str],
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        skip_bad: bool = False,
        amp: bool = False,
        threads: int | None = None,
        cache_size: int = 16_384,
        bundle: Bundle | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.bundle = bundle if bundle is not None else load_bundle(model_dir, device)
        self.device = self.bundle.device
        self.modalities = list(modalities)
        self.dtype = OUTPUT_DTYPES[dtype]
        self.pixels = RowPixels(self.bundle.config, skip_bad)
        self.amp = amp and self.device.type == "cuda"
        self.cache: dict[str, OrderedDict[str, np.ndarray]] = {"text": OrderedDict(), "symbol": OrderedDict()}
        self.cache_size = cache_size
        self.rows = 0
        self.dim = int(self.bundle.embed_texts(["x"]).shape[1])  # the towers' shared output width

    def _run(self, tower: str, x: np.ndarray) -> np.ndarray:
        model = self.bundle.model
        fn = {"image": model.encode_image, "symbol": model.encode_symbol, "text": model.encode_text}[tower]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            out = fn(torch.from_numpy(x).to(self.device, non_blocking=True))
        return out.float().cpu().numpy()

    def _strings(self, modality: str, values: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) embeddings of each row's caption or symbol spec (cached per distinct string), valid mask."""
        cache = self.cache[modality]
        strings = ["" if v is None else str(v) for v in values]
        valid = np.array([bool(s) for s in strings], dtype=bool)
        new = sorted({s for s in strings if s and s not in cache})
        if new:
            n = len(new)
            rows = {
                "id": np.array([ids[strings.index(s)] for s in new], dtype=object),  # names a bad spec's row
                "image": np.full(n, _placeholder_png(), dtype=object),
                "label": np.zeros(n, np.int64),
                "text": np.array(new if modality == "text" else [""] * n, dtype=object),
                "symbol": np.array(new if modality == "symbol" else [PLACEHOLDER_SYMBOL] * n, dtype=object),
            }
            try:
                ready = self.pixels.transform(rows)  # the same tokens / symbol pictures as embed() makes
            except ValueError as e:  # a symbol spec the grammar rejects: name the first row carrying it
                bad = next(s for s in new if not self._transforms(modality, s))
                raise ValueError(
                    f"row id {ids[strings.index(bad)]}: {modality} {bad!r} is not valid ({e})"
                ) from None
            emb = self._run(modality, ready["tokens"] if modality == "text" else ready["symbol"])
            for s, e in zip(new, emb, strict=True):
                cache[s] = e
            while len(cache) > self.cache_size:
                cache.popitem(last=False)
        out = np.zeros((len(strings), self.dim), np.float32)
        for i, s in enumerate(strings):
            if s:
                out[i] = cache[s]
                cache.move_to_end(s)
        return out, valid

    def _transforms(self, modality: str, value: str) -> bool:
        row = {"id": np.array(["x"], dtype=object), "image": np.array([_placeholder_png()], dtype=object),
               "label": np.zeros(1, np.int64), "text": np.array([value if modality == "text" else ""], dtype=object),
               "symbol": np.array([value if modality == "symbol" else PLACEHOLDER_SYMBOL], dtype=object)}  # fmt: skip
        try:
            self.pixels.transform(row)
        except ValueError:
            return False
        return True

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" in self.modalities and "pixels" not in batch:
            batch = self.pixels(batch)
        n = len(batch["id"])
        out: dict[str, Any] = {
            k: v for k, v in batch.items() if k not in ("pixels", "image", "text", "symbol")
        }
        out.setdefault("bad", np.zeros(n, bool))
        out.setdefault("reason", np.full(n, "", dtype=object))
        if "image" in self.modalities:
            good = np.flatnonzero(~out["bad"])
            full = np.zeros((n, self.dim), self.dtype)
            if len(good):
                full[good] = self._run("image", np.ascontiguousarray(batch["pixels"][good]))
            out["image_embedding"] = full
        for m in ("text", "symbol"):
            if m in self.modalities:
                emb, valid = self._strings(m, batch[m], batch["id"])
                out[f"{m}_embedding"] = emb.astype(self.dtype)
                out[f"{m}_valid"] = valid
        self.rows += n
        return out
