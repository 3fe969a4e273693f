"""Every symbol a run draws, rendered once into a small bank on the training device; rows are looked up by spec."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from galaxalign_dist.data.symbols import VARIANT_LINE_WIDTHS, render_variant


class SymbolBank:
    """(specs x variants, 3, S, S) uint8 on one device, grown when a batch brings a spec not seen yet.

    A dataset has few distinct symbol specs (one per class, or a few hundred feature combinations for
    Galaxy Zoo DESI's rich symbols), so rendering each once (a few ms) replaces per-sample rendering; the
    per-sample jitter (rotation, zoom, shift, mirror) is the batched warp of data/warp.py.
    """

    variants = len(VARIANT_LINE_WIDTHS)

    def __init__(self, size: int, device: torch.device | str = "cpu") -> None:
        self.size, self.device = size, torch.device(device)
        self.rows: dict[str, int] = {}  # spec -> row of its first variant
        self.images = torch.zeros((0, 3, size, size), dtype=torch.uint8, device=self.device)

    def _add(self, specs: list[str]) -> None:
        drawn = [render_variant(spec, self.size, v) for spec in specs for v in range(self.variants)]
        new = torch.from_numpy(np.stack(drawn)).permute(0, 3, 1, 2).to(self.device)
        for spec in specs:
            self.rows[spec] = len(self.rows) * self.variants
        self.images = torch.cat([self.images, new])

    def indices(self, specs: Sequence[str], variants: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Bank rows of (spec, variant) pairs, rendering specs seen for the first time."""
        missing = sorted({str(s) for s in specs} - self.rows.keys())
        if missing:
            self._add(missing)
        base = torch.tensor([self.rows[str(s)] for s in specs], dtype=torch.long)
        return (base + torch.as_tensor(variants, dtype=torch.long).cpu()).to(self.device)

    def lookup(self, specs: Sequence[str], variants: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) symbols for a batch."""
        rows = self.indices(specs, variants)  # first: it may grow the bank
        return self.images.index_select(0, rows)
