"""Tests for galaxalign_dist.data.symbols: symbols draw, parts differ, augmentation is seeded, bad specs fail."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from galaxalign_dist.cli.main import main
from galaxalign_dist.data.schemas import GALAXY10, GALAXY_MNIST
from galaxalign_dist.data.symbols import render_symbol, symbol_sheet

ALL_SPECS = sorted({c.symbol for s in (GALAXY10, GALAXY_MNIST) for c in s.classes})


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.mark.parametrize("size", [8, 32, 64, 224])
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_every_class_symbol_renders(spec: str, size: int) -> None:
    img = render_symbol(spec, size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    lit = img.mean(-1) > 80  # light ink on a dark (~10) background
    peak = 150 if size >= 32 else 90  # at 8 px thin lines average down with the dark sky
    assert img.max() > peak and 0.01 < lit.mean() < 0.8, (spec, size, lit.mean())
    # The frame border stays background for unaugmented drawings (nothing clipped off the icon).
    assert img[0].mean() < 40 and img[:, 0].mean() < 40


@pytest.mark.parametrize(
    "a, b",
    [
        ("disk+bulge:small+arms:tight", "disk+bulge:small+arms:loose"),
        ("disk+bulge:small+arms:medium", "disk+bulge:small+bar:strong+arms:medium"),
        ("disk+bar:strong", "disk+bar:weak"),
        ("round", "inbetween"),
        ("inbetween", "cigar"),
        ("edgeon+bulge:none", "edgeon+bulge:big"),
        ("merger", "merger+tidal"),
        ("disk", "disk+bulge:big"),
        ("disk+arms", "disk+arms+arms4"),
        ("round", "disturbed"),
    ],
)
def test_different_specs_draw_different_pictures(a: str, b: str) -> None:
    assert _diff(render_symbol(a, 64), render_symbol(b, 64)) > 2.0


def test_weak_bar_is_smaller_than_strong_bar() -> None:
    disk = render_symbol("disk", 96).mean(-1)
    strong = (render_symbol("disk+bar:strong", 96).mean(-1) - disk > 60).sum()
    weak = (render_symbol("disk+bar:weak", 96).mean(-1) - disk > 60).sum()
    assert 0 < weak < 0.7 * strong


def test_augmentation_is_seeded_and_varied() -> None:
    spec = "disk+bulge:small+bar:strong+arms:medium"
    a = render_symbol(spec, 64, np.random.default_rng(1), augment=True)
    b = render_symbol(spec, 64, np.random.default_rng(1), augment=True)
    c = render_symbol(spec, 64, np.random.default_rng(2), augment=True)
    assert np.array_equal(a, b)
    assert _diff(a, c) > 1.0
    rng = np.random.default_rng(3)
    draws = [render_symbol("cigar", 48, rng, augment=True) for _ in range(6)]
    assert len({d.tobytes() for d in draws}) == 6  # one rng stream gives a new picture each call
    assert _diff(draws[0], render_symbol("cigar", 48)) > 0.5


def test_canonical_drawing_ignores_rng_and_cache_is_safe() -> None:
    a = render_symbol("round", 32, np.random.default_rng(0))
    b = render_symbol("round", 32, np.random.default_rng(9))
    assert np.array_equal(a, b)
    a[:] = 0  # callers get copies: mutating one must not poison the cache
    assert render_symbol("round", 32).max() > 150


@pytest.mark.parametrize(
    "spec, named",
    [("disk+spokes", "spokes"), ("blob", "shape"), ("disk+arms:wiggly", "wiggly"), ("", "shape")],
)
def test_bad_spec_raises_naming_the_part(spec: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        render_symbol(spec)


def test_bad_size_raises() -> None:
    with pytest.raises(ValueError, match="size"):
        render_symbol("round", 4)


def test_symbol_sheet_and_cli(tmp_path) -> None:
    path = tmp_path / "s.png"
    symbol_sheet([("round", "round"), ("disk+arms:tight", "tight")], path, size=40, variants=2)
    im = Image.open(path)
    assert im.height >= 2 * 40 and im.width >= 3 * 40
    out = tmp_path / "cli.png"
    assert (
        main(["symbols", "--out", str(out), "--schema", "galaxymnist", "--size", "32", "--variants", "1"])
        == 0
    )
    assert Image.open(out).format == "PNG"
    assert main(["symbols", "--out", str(out), "--size", "4"]) == 2  # a one-line error, not a traceback
