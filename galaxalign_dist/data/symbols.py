"""Schematic galaxy symbols (Galaxy Zoo-style icons) drawn from symbol specs, plus contact sheets."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from galaxalign_dist.data.schemas import parse_symbol_spec

MIN_SIZE = 8  # below this the icons are a few grey pixels: refuse rather than train on mush
# Pitch angles (degrees) of the drawn logarithmic spiral arms. Observed spiral pitch angles run
# from ~5 deg (tight, Sa-like) to ~40 deg (loose, Sc/Sd-like); these sit well inside each regime.
ARM_PITCH_DEG = {"tight": 11.0, "medium": 19.0, "loose": 32.0}
_BG = np.array([8, 10, 20], np.float32)  # dark navy sky, like the icons' background
_FG = np.array([236, 240, 255], np.float32)  # light bluish white ink
# Greyscale ink level -> RGB, applied once per pixel with a table lookup (cheap).
_LUT = (_BG + (_FG - _BG) * np.linspace(0, 1, 256, dtype=np.float32)[:, None]).round().astype(np.uint8)
# A smooth blob is drawn as nested ellipses getting brighter inwards: a cheap stand-in for a
# centrally concentrated light profile that survives downsampling to 32 px.
_BLOB_RADII = (1.0, 0.8, 0.6, 0.42, 0.24)
_BLOB_LEVELS = (70, 110, 150, 195, 245)


class _Canvas:
    """Supersampled greyscale canvas in normalised coordinates: the frame spans [-1, 1] on both axes."""

    def __init__(
        self, size: int, rot: float, scale: float, shift: tuple[float, float], flip: bool, lw: float
    ):
        # 4x supersampling is enough anti-aliasing; above 128 px 3x keeps 224 px under ~10 ms.
        self.ss = 4 if size <= 128 else 3
        self.n = size * self.ss
        self.img = Image.new("L", (self.n, self.n), 0)
        self.draw = ImageDraw.Draw(self.img)
        c, s = math.cos(rot), math.sin(rot)
        mirror = -1.0 if flip else 1.0  # a mirrored spiral has the other chirality, equally real
        self.mat = scale * np.array([[c * mirror, -s], [s * mirror, c]], np.float64)
        self.shift = np.asarray(shift, np.float64)
        self.half = self.n / 2.0
        self.px_per_unit = self.half * scale * lw  # line widths scale with the drawing

    def _px(self, pts: np.ndarray) -> list[tuple[float, float]]:
        xy = (pts @ self.mat.T + self.shift) * self.half + self.half
        return [tuple(p) for p in xy.tolist()]

    def poly(self, pts: np.ndarray, level: int) -> None:
        self.draw.polygon(self._px(pts), fill=int(level))

    def line(self, pts: np.ndarray, width: float, level: int) -> None:
        w = max(1, round(width * self.px_per_unit))
        self.draw.line(self._px(pts), fill=int(level), width=w, joint="curve")

    def finish(self) -> np.ndarray:
        small = self.img.reduce(self.ss)  # box-filter downsample = area anti-aliasing
        return _LUT[np.asarray(small)]


def _ellipse(cx: float, cy: float, a: float, b: float, ang: float = 0.0, k: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = math.cos(ang), math.sin(ang)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


def _blob(cv: _Canvas, cx: float, cy: float, r: float, q: float, ang: float = 0.0) -> None:
    for f, lev in zip(_BLOB_RADII, _BLOB_LEVELS, strict=True):
        cv.poly(_ellipse(cx, cy, r * f, r * f * q, ang), lev)


def _tapered(cv: _Canvas, pts: np.ndarray, w0: float, w1: float, level: int, pieces: int = 8) -> None:
    """A polyline whose width falls from w0 to w1: arms and tails thin out as they fade."""
    idx = np.linspace(0, len(pts) - 1, pieces + 1).round().astype(int)
    for i in range(pieces):
        w = w0 + (w1 - w0) * i / max(pieces - 1, 1)
        cv.line(pts[idx[i] : idx[i + 1] + 1], w, level)


def _log_spiral(r0: float, r1: float, phase: float, pitch_deg: float, k: int = 48) -> np.ndarray:
    """Points on r = r0 exp(theta tan(pitch)) from r0 to r1: the shape real spiral arms follow."""
    b = math.tan(math.radians(pitch_deg))
    theta = np.linspace(0.0, math.log(r1 / r0) / b, k)
    r = r0 * np.exp(b * theta)
    return np.stack([r * np.cos(theta + phase), r * np.sin(theta + phase)], 1)


def _closed(pts: np.ndarray) -> np.ndarray:
    return np.vstack([pts, pts[:1]])


def _draw_arms_bar(cv: _Canvas, mods: dict[str, str], r_min: float) -> None:
    """Spiral arms and/or a bar; arms leave from the bar ends, else from radius r_min (bulge edge)."""
    bar_len = {"strong": 0.46, "weak": 0.3}.get(mods.get("bar", ""), 0.0)  # weak bar: shorter, thinner
    if "arms" in mods:
        n_arms = 4 if "arms4" in mods else 3 if "arms3" in mods else 2
        for j in range(n_arms):
            arm = _log_spiral(max(bar_len, r_min), 0.8, 2 * np.pi * j / n_arms, ARM_PITCH_DEG[mods["arms"]])
            _tapered(cv, arm, 0.06, 0.03, 232)
    if bar_len:
        cv.poly(_ellipse(0, 0, bar_len, 0.09 if mods["bar"] == "strong" else 0.055), 225)


def _draw_disk(cv: _Canvas, mods: dict[str, str]) -> None:
    rim = _ellipse(0, 0, 0.82, 0.82, k=64)
    cv.poly(rim, 38)  # faint face-on disk
    cv.line(_closed(rim), 0.025, 110)  # and its edge
    bulge_r = {"small": 0.17, "big": 0.3, "none": 0.0}[mods.get("bulge", "none")]
    _draw_arms_bar(cv, mods, max(bulge_r * 0.9, 0.12))
    if bulge_r:
        _blob(cv, 0, 0, bulge_r, 1.0)


def _draw_edgeon(cv: _Canvas, mods: dict[str, str]) -> None:
    cv.poly(_ellipse(0, 0, 0.88, 0.1), 100)
    cv.poly(_ellipse(0, 0, 0.74, 0.06), 175)
    cv.line(np.array([[-0.6, 0.0], [0.6, 0.0]]), 0.035, 240)  # the bright thin midplane
    bulge_r = {"small": 0.2, "big": 0.36, "none": 0.0}[mods.get("bulge", "none")]
    if bulge_r:
        _blob(cv, 0, 0, bulge_r, 0.8)


def _draw_merger(cv: _Canvas, mods: dict[str, str], jit: np.ndarray) -> None:
    a = (-0.26 + jit[0], 0.1 + jit[1])
    b = (0.28 + jit[2], -0.12 + jit[3])
    if "tidal" in mods:  # tails first so the bodies sit on top, as in a real merger's light
        _tapered(cv, _log_spiral(0.3, 0.92, math.pi * 0.95, 26.0), 0.07, 0.025, 150)
        _tapered(cv, _log_spiral(0.3, 0.85, -0.05, 26.0), 0.06, 0.02, 150)
    _blob(cv, *a, 0.36, 0.85, 0.4)
    _blob(cv, *b, 0.27, 0.75, -0.6)


def _draw_disturbed(cv: _Canvas, jit: np.ndarray) -> None:
    # An irregular lopsided outline from a few low-order harmonics, plus bright clumps: the
    # recognisable bits of a disturbed galaxy are asymmetry and knots, not a smooth profile.
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    r = 0.55 * (
        1
        + (0.22 + jit[0]) * np.cos(2 * t + 0.4)
        + (0.16 + jit[1]) * np.cos(3 * t + 2.1)
        + 0.1 * np.cos(5 * t + 1)
    )
    for f, lev, off in ((1.0, 70, 0.0), (0.72, 120, 0.08), (0.45, 180, 0.14)):
        pts = np.stack([off + f * r * np.cos(t), -0.5 * off + f * r * np.sin(t)], 1)
        cv.poly(pts, lev)
    for x, y, rr in ((0.22, -0.08, 0.09), (-0.25, 0.22, 0.07), (0.05, 0.3, 0.06), (-0.3, -0.2, 0.05)):
        cv.poly(_ellipse(x + jit[2], y + jit[3], rr, rr, k=20), 240)


def _draw_smooth(cv: _Canvas, shape: str) -> None:
    q = {"round": 1.0, "inbetween": 0.62, "cigar": 0.3}[shape]
    _blob(cv, 0, 0, 0.62 if shape != "cigar" else 0.8, q)


def _draw_tidal(cv: _Canvas) -> None:
    """A single faint tail off the main body, for 'tidal' on a non-merger shape."""
    _tapered(cv, _log_spiral(0.35, 0.95, 0.3, 24.0), 0.06, 0.02, 130)


def _render(spec: str, size: int, params: tuple[float, ...]) -> np.ndarray:
    shape, mods = parse_symbol_spec(spec)
    rot, scale, dx, dy, flip, lw, *jit = params
    cv = _Canvas(size, rot, scale, (dx, dy), bool(flip), lw)
    jit_arr = np.asarray(jit, np.float64)
    if "tidal" in mods and shape != "merger":
        _draw_tidal(cv)
    if shape in ("round", "inbetween", "cigar"):
        _draw_smooth(cv, shape)
    elif shape == "edgeon":
        _draw_edgeon(cv, mods)
    elif shape == "disk":
        _draw_disk(cv, mods)
    elif shape == "merger":
        _draw_merger(cv, mods, jit_arr)
    else:
        _draw_disturbed(cv, jit_arr)
    if shape != "disk":  # arms/bar asked for on another shape: drawn over it, without a disk
        _draw_arms_bar(cv, mods, 0.15)
    return cv.finish()


@functools.lru_cache(maxsize=256)
def _canonical(spec: str, size: int) -> np.ndarray:
    out = _render(spec, size, (0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0))
    out.flags.writeable = False  # cached: callers get copies
    return out


# Line widths of the pre-rendered variants of a symbol (data/symbol_bank.py); the middle one is canonical.
VARIANT_LINE_WIDTHS = (0.85, 1.0, 1.2)


def render_variant(spec: str, size: int, variant: int) -> np.ndarray:
    """Upright, unshifted symbol `variant` of `spec` (line width VARIANT_LINE_WIDTHS[variant]; irregular shapes
    get a fixed per-variant jitter) as uint8 (size, size, 3). The canonical variant equals render_symbol's."""
    lw = VARIANT_LINE_WIDTHS[variant]
    canonical = variant == VARIANT_LINE_WIDTHS.index(1.0)
    jit = [0.0] * 4 if canonical else np.random.default_rng([7, variant]).normal(0, 0.04, 4).tolist()
    if canonical:
        return render_symbol(spec, size)
    return _render(spec, int(size), (0.0, 1.0, 0.0, 0.0, 0.0, lw, *jit))


def render_symbol(
    spec: str, size: int = 64, rng: np.random.Generator | None = None, augment: bool = False
) -> np.ndarray:
    """Draw the symbol for `spec` (see schemas.py grammar) as uint8 (size, size, 3).

    augment=True applies a random rotation, scale 0.85-1.15, mirror, line-width jitter and a small
    shift drawn from `rng`, so one class is not one fixed picture; the same rng state gives the
    same picture. Without augment the canonical drawing is returned (cached).
    """
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"symbol size must be an integer >= {MIN_SIZE}, got {size!r}")
    parse_symbol_spec(spec)  # validate before touching the cache or the rng
    if not augment:
        return _canonical(spec, int(size)).copy()
    rng = rng if rng is not None else np.random.default_rng()
    rot = rng.uniform(0, 2 * np.pi)
    scale = rng.uniform(0.85, 1.15)
    dx, dy = np.clip(rng.normal(0, 0.04, 2), -0.08, 0.08)
    flip = float(rng.random() < 0.5)
    lw = rng.uniform(0.8, 1.25)
    jit = rng.normal(0, 0.04, 4)  # shape jitter used by the irregular shapes (merger, disturbed)
    return _render(spec, int(size), (rot, scale, dx, dy, flip, lw, *jit.tolist()))


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def contact_sheet(
    rows: Sequence[tuple[str, Sequence[np.ndarray]]],
    path: str | Path,
    header: str = "",
    col_titles: Sequence[tuple[int, str]] = (),
    gap_after: Sequence[int] = (),
    palette: bool = True,
) -> None:
    """Write a PNG grid: one row of equal-size RGB tiles per (title, tiles), the title on the left
    (multi-line titles allowed; the last of several lines is drawn dimmer, as a note).

    col_titles: (column index, text) labels above the grid; gap_after: columns followed by a gap.
    palette: save as a 256-colour palette PNG, a third to half the size and hard to tell apart by eye
    (sky noise makes full-colour PNGs of galaxies large).
    """
    if not rows or not rows[0][1]:
        raise ValueError("contact sheet needs at least one row with one tile")
    tile = rows[0][1][0].shape[0]
    pad, gap = 2, 10
    font = _font(12)
    lines = [t.split("\n") for t, _ in rows]
    label_w = 12 + max(int(font.getlength(s)) for ls in lines for s in ls)
    ncols = max(len(tiles) for _, tiles in rows)
    xs = [label_w + c * (tile + pad) + gap * sum(g < c for g in gap_after) for c in range(ncols)]
    top = (22 if header else 4) + (16 if col_titles else 0)
    sheet = Image.new("RGB", (xs[-1] + tile + 6, top + len(rows) * (tile + pad) + 4), (24, 24, 28))
    draw = ImageDraw.Draw(sheet)
    if header:
        draw.text((6, 4), header, fill=(235, 235, 235), font=_font(14))
    for c, text in col_titles:
        draw.text((xs[c], top - 15), text, fill=(200, 200, 200), font=font)
    for r, ((_, tiles), ls) in enumerate(zip(rows, lines, strict=True)):
        y = top + r * (tile + pad)
        for k, s in enumerate(ls):
            draw.text(
                (6, y + tile / 2 - 8 * len(ls) + 15 * k),
                s,
                fill=(150, 150, 160) if 0 < k == len(ls) - 1 else (220, 220, 220),  # last line: a note
                font=font,
            )
        for c, im in enumerate(tiles):
            sheet.paste(Image.fromarray(np.ascontiguousarray(im)), (xs[c], y))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if palette:
        sheet = sheet.quantize(colors=256, method=Image.Quantize.FASTOCTREE)  # no banding, unlike median cut
    sheet.save(path, optimize=True)


def symbol_sheet(
    specs_and_titles: list[tuple[str, str]],
    path: str | Path,
    size: int = 96,
    variants: int = 4,
    seed: int = 0,
) -> None:
    """Contact sheet PNG: one row per spec, the canonical drawing then `variants` augmented copies."""
    rows = []
    for r, (spec, title) in enumerate(specs_and_titles):
        rng = np.random.default_rng([seed, r])
        tiles = [render_symbol(spec, size)] + [
            render_symbol(spec, size, rng, augment=True) for _ in range(variants)
        ]
        rows.append((f"{title}\n{spec}", tiles))
    cols = [(0, "canonical")] + ([(1, "augmented")] if variants else [])
    contact_sheet(rows, path, header="GalaxAlign symbols", col_titles=cols, gap_after=(0,))
