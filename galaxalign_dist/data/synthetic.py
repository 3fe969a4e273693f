"""Procedural synthetic galaxy images for the GalaxyMNIST and Galaxy10 schemas (the built-in dataset)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter  # scipy comes with scikit-learn, a dependency already

from galaxalign_dist.data.schemas import SCHEMAS, ClassSchema, get_schema, parse_symbol_spec

GalaxyParams = dict[
    str, Any
]  # plain lists/floats (loggable as JSON): {"components": [...], "stars": [...], ...}
_LABEL_TAG = 0x1AB  # extra seed word: label shuffles never share a stream with image samples

# Colours, as linear RGB weights for DECaLS grz shown as (z, r, g) -> (R, G, B) with the Legacy
# Survey viewer's band scales (z 2.2, r 3.4, g 6.0). An old population (g-r ~ 0.8, r-z ~ 0.9, an
# elliptical or bulge at z ~ 0.05) comes out cream-yellow; a star-forming one (g-r ~ 0.4,
# r-z ~ 0.4) comes out blue-white. Each is scaled to mean 1 so colour does not change brightness.
_OLD = np.array([1.0, 0.8, 0.55], np.float32)
_YOUNG = np.array([0.62, 0.78, 1.0], np.float32)
_OLD, _YOUNG = _OLD / _OLD.mean(), _YOUNG / _YOUNG.mean()
_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))  # Gaussian PSF: FWHM = 2.355 sigma


@dataclass(frozen=True)
class Framing:
    """How a survey cutout frames its galaxies: sizes are fractions of the frame width."""

    scale: float  # galaxy size relative to a GalaxyMNIST cutout (those are zoomed to the galaxy)
    stars: float  # mean number of field stars and faint background galaxies per frame
    sky: tuple[float, float, float]  # stretched sky level per channel (0-255), measured on real cutouts
    noise: float  # sky noise sigma in stretched levels near the sky, measured the same way
    psf_fwhm: tuple[float, float]  # seeing FWHM range, fraction of the frame width
    saturation: float  # colour saturation of the survey's RGB rendering (1 = the colours above)


# Measured on ../shared/data/real-galaxies: GalaxyMNIST corners have median sky ~(20, 18, 19) and a
# MAD-sigma of ~6 levels; Galaxy10 DECaLS (256 px at 0.262"/px, galaxies ~25% of the frame, more
# field objects) ~(34, 33, 33) and ~10. DECaLS seeing ~1.0-1.6" -> 4-6 px of a 256 px frame.
FRAMINGS = {
    "galaxymnist": Framing(1.0, 4.0, (20.0, 18.0, 19.0), 6.0, (0.018, 0.032), 0.5),
    "galaxy10": Framing(0.62, 9.0, (34.0, 33.0, 33.0), 9.0, (0.016, 0.024), 1.0),
}


def _colour(rng: np.random.Generator, young: float) -> list[float]:
    """Mix of the old and young colours (0 = old, 1 = young) with a little per-galaxy scatter."""
    c = _OLD * (1 - young) + _YOUNG * young
    return (c * rng.uniform(0.93, 1.07, 3)).tolist()


def _logu(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# ----------------------------------------------------------------------------------- sampling
# Each sampler returns components in frame units; fluxes are fractions of the galaxy's total.
def _sersic(x: float, y: float, re: float, n: float, q: float, pa: float, flux: float, col: list) -> dict:
    return dict(kind="sersic", x=x, y=y, re=re, n=n, q=q, pa=pa, flux=flux, color=col)


def _bulge_fraction(rng: np.random.Generator, mods: dict[str, str]) -> float:
    """Bulge-to-total light ratio; the small and big ranges meet, so some cases are ambiguous."""
    ranges = {"none": (0.0, 0.03), "small": (0.08, 0.32), "big": (0.32, 0.6)}
    return rng.uniform(*ranges[mods.get("bulge", "none")])


def _disk(rng: np.random.Generator, mods: dict[str, str], s: float, x: float, y: float) -> list:
    u, h = rng.uniform, s * _logu(rng, 0.028, 0.06)  # h: exponential scale length
    # Thick-disk projection, q^2 = cos^2 i (1 - q0^2) + q0^2, with intrinsic thickness q0 = 0.15.
    cosi, bt, pa = u(0.3, 1.0), _bulge_fraction(rng, mods), u(0, np.pi)
    geo = dict(x=x, y=y, pa=pa, q=math.sqrt(cosi**2 * (1 - 0.15**2) + 0.15**2), h=h)
    comps, bar_len, arm_frac, angle = [], 0.0, 0.0, u(0, 2 * np.pi)
    if "bar" in mods:  # weak bars: shorter, fatter, fainter
        strong = mods["bar"] == "strong"
        bar_len = h * (u(1.5, 2.6) if strong else u(0.8, 1.4))
        frac, bq = (u(0.12, 0.25), u(0.16, 0.28)) if strong else (u(0.04, 0.1), u(0.3, 0.45))
        bar = dict(kind="bar", **geo, length=bar_len, bq=bq, angle=angle, flux=frac)
        comps.append({**bar, "color": _colour(rng, u(0.1, 0.4))})
    if "arms" in mods:
        # Pitch angles (Kennicutt 1981; Davis et al. 2014): tight Sa/Sb arms ~5-15 deg, loose Sc/Sd ~20-40.
        pitch = {"tight": (6.0, 14.0), "medium": (11.0, 24.0), "loose": (20.0, 36.0)}[mods["arms"]]
        m = 4 if "arms4" in mods else 3 if "arms3" in mods else int(rng.choice([2, 2, 2, 3, 4]))
        arm_frac = u(0.12, 0.45)  # some spirals have faint arms: the hard cases
        comps.append(dict(kind="arms", **geo, m=m, pitch=math.radians(u(*pitch)), phase=angle,
                          r_in=max(bar_len, 1.2 * h * u(0.5, 1.0)), sharp=u(1.5, 4.0), knots=u(0.4, 1.1),
                          flux=arm_frac * (1 - bt), color=_colour(rng, u(0.75, 1.0))))  # fmt: skip
    # re of an exponential disk is 1.678 h; bulges are ~0.2-0.5 of it, rounder and redder.
    disk_flux = (1 - bt) * (1 - arm_frac)
    comps.append(_sersic(x, y, h / 0.5958, 1.0, geo["q"], pa, disk_flux, _colour(rng, u(0.3, 0.7))))
    if bt > 0:
        bre, bq = h * u(0.35, 0.8), max(geo["q"], u(0.7, 1.0))
        comps.append(_sersic(x, y, bre, u(1.5, 4.0), bq, pa, bt, _colour(rng, u(0, 0.2))))
    return comps


def _edgeon(rng: np.random.Generator, mods: dict[str, str], s: float, x: float, y: float) -> list:
    u, h, pa, bt = rng.uniform, s * _logu(rng, 0.045, 0.1), rng.uniform(0, np.pi), _bulge_fraction(rng, mods)
    q = u(0.08, 0.27)  # an edge-on disk shows its thickness q0 ~ 0.1-0.2, a bit more if i < 90 deg
    comps = [_sersic(x, y, h / 0.5958, u(0.6, 1.2), q, pa, 1 - bt, _colour(rng, u(0.5, 0.9)))]
    if bt > 0:
        bre = h * u(0.3, 0.7) * (1 + bt)
        comps.append(_sersic(x, y, bre, u(1.5, 4), u(0.6, 0.95), pa, bt, _colour(rng, 0.1)))
    if rng.random() < 0.5:  # a dust lane in the midplane, often a little offset as i < 90 deg
        w = q * h * u(0.4, 0.8)
        comps.append(dict(kind="dust", x=x, y=y, pa=pa, w=w, off=u(-0.6, 0.6) * w, h=3 * h, tau=u(0.3, 0.8)))
    return comps


def _tail(rng: np.random.Generator, x: float, y: float, re: float, direction: float, flux: float) -> dict:
    # A tidal tail as a chain of Gaussian knots along a curved path leaving the galaxy, widening
    # and fading outwards.
    t = np.linspace(0.0, 1.0, 12)
    ang = direction + rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 2.0) * t
    r = re * (0.8 + rng.uniform(4.0, 8.0) * t)
    fl = flux * np.exp(-2 * t) / np.exp(-2 * t).sum()
    xs, ys, sig = x + r * np.cos(ang), y + r * np.sin(ang), re * (0.35 + 0.6 * t)
    col = _colour(rng, rng.uniform(0.5, 1.0))
    return dict(kind="blobs", xs=xs.tolist(), ys=ys.tolist(), sig=sig.tolist(), fl=fl.tolist(), color=col)


def _merger(rng: np.random.Generator, mods: dict[str, str], s: float, x: float, y: float) -> list:
    u, ratio = rng.uniform, rng.uniform(0.3, 1.0)  # flux ratio of the secondary
    re1, re2 = s * _logu(rng, 0.03, 0.06), s * _logu(rng, 0.02, 0.05)
    sep, ang = (re1 + re2) * u(0.8, 2.5), u(0, 2 * np.pi)
    x1, y1 = x - sep * math.cos(ang) * ratio / (1 + ratio), y - sep * math.sin(ang) * ratio / (1 + ratio)
    x2, y2 = x + sep * math.cos(ang) / (1 + ratio), y + sep * math.sin(ang) / (1 + ratio)
    comps = [
        _sersic(x1, y1, re1, u(1, 4), u(0.45, 1), u(0, np.pi), 1 / (1 + ratio), _colour(rng, u(0, 0.6))),
        _sersic(x2, y2, re2, u(1, 4), u(0.45, 1), u(0, np.pi), ratio / (1 + ratio), _colour(rng, u(0, 0.6))),
        # a faint common envelope of the interacting pair
        _sersic(x, y, 2.5 * (re1 + re2), 1.0, u(0.5, 1), u(0, np.pi), u(0.02, 0.1), _colour(rng, 0.5)),
    ]
    if "tidal" in mods:  # both tails of a pair curve the same way (a shared orbital sense)
        tf = u(0.1, 0.3)
        comps.append(_tail(rng, x1, y1, re1, ang + np.pi + rng.normal(0, 0.5), tf))
        if rng.random() < 0.7:
            comps.append(_tail(rng, x2, y2, re2, ang + rng.normal(0, 0.5), tf * u(0.4, 1.0)))
    return comps


def _disturbed(rng: np.random.Generator, s: float, x: float, y: float) -> list:
    # A lopsided low-surface-brightness disk plus scattered star-forming clumps: asymmetry, not a
    # smooth profile, is what identifies the class.
    u, h, k = rng.uniform, s * _logu(rng, 0.035, 0.08), int(rng.integers(3, 10))
    comps = [dict(kind="lopsided", x=x, y=y, h=h, q=u(0.4, 1), pa=u(0, np.pi), a1=u(0.4, 1), a2=u(0.1, 0.6),
                  ph=u(0, 2 * np.pi, 2).tolist(), flux=0.75, color=_colour(rng, u(0.6, 1.1)))]  # fmt: skip
    r, a = h * u(0.3, 2.5, k), u(0, 2 * np.pi, k)
    comps.append(dict(kind="blobs", xs=(x + r * np.cos(a)).tolist(), ys=(y + r * np.sin(a)).tolist(),
                      sig=(h * u(0.12, 0.35, k)).tolist(), fl=(rng.dirichlet(np.ones(k)) * 0.25).tolist(),
                      color=_colour(rng, 1.0)))  # fmt: skip
    if rng.random() < 0.3:
        comps.append(_tail(rng, x, y, h, u(0, 2 * np.pi), 0.08))
    return comps


def sample_params(
    spec: str, rng: np.random.Generator, framing: Framing = FRAMINGS["galaxymnist"]
) -> GalaxyParams:
    """Draw one galaxy's physical parameters for a symbol spec (the morphology the class stands for)."""
    shape, mods = parse_symbol_spec(spec)
    u, s = rng.uniform, framing.scale
    x, y = np.clip(rng.normal(0, 0.015 * s, 2), -0.04, 0.04).tolist()  # cutouts are centred on the galaxy
    if shape in ("round", "inbetween", "cigar"):
        # Smooth early types: Sersic n ~ 1.5-4.5 (de Vaucouleurs' law is n = 4), old colours. Only
        # the axis ratio tells round from in-between, and the ranges overlap, as in Galaxy Zoo votes.
        q = u(*{"round": (0.75, 1.0), "inbetween": (0.48, 0.8), "cigar": (0.22, 0.55)}[shape])
        n = u(1.5 if shape == "cigar" else 2.0, 4.5)
        comps = [_sersic(x, y, s * _logu(rng, 0.027, 0.07), n, q, u(0, np.pi), 1.0, _colour(rng, u(0, 0.4)))]
    elif shape in ("disk", "edgeon", "merger"):
        comps = {"disk": _disk, "edgeon": _edgeon, "merger": _merger}[shape](rng, mods, s, x, y)
    else:
        comps = _disturbed(rng, s, x, y)
    if "tidal" in mods and shape != "merger":
        comps.append(_tail(rng, x, y, s * 0.05, u(0, 2 * np.pi), 0.1))
    # A galaxy-wide colour shift (redshift, dust, metallicity) so colour alone does not give the class away.
    shift = rng.normal(0.0, 0.3) * (_YOUNG - _OLD)
    for c in comps:
        if "color" in c:
            c["color"] = np.clip(np.asarray(c["color"]) + shift, 0.15, None).tolist()
    stars = []
    for _ in range(int(rng.poisson(framing.stars))):
        sx, sy = u(-0.48, 0.48, 2)
        if math.hypot(sx - x, sy - y) < 0.1:  # keep the target itself unobscured
            continue
        # About a third are compact background galaxies (resolved, size re), the rest point sources.
        re = _logu(rng, 0.004, 0.012) if rng.random() < 0.3 else 0.0
        stars.append((sx, sy, _logu(rng, 0.0005, 0.15), _colour(rng, u(-0.6, 1.6)), re))
    faint = 0.45 if shape == "disturbed" else 1.0  # disturbed galaxies are mostly low surface brightness
    return dict(
        components=comps,
        flux=faint * s * s * _logu(rng, 4.0, 40.0),  # sky-sigma x frame^2; x s^2 keeps S/N framing-free
        stars=stars,
        psf_fwhm=u(*framing.psf_fwhm),
        soft=u(2.5, 5.0),  # asinh softening, in sky sigmas (Lupton et al. 2004 stretch)
        gain=_logu(rng, 20.0, 200.0),  # source counts per sky-sigma: sets the Poisson term
        noise=framing.noise * u(0.8, 1.2),
        sky=(np.asarray(framing.sky) + rng.normal(0, 2.0)).tolist(),
        saturation=framing.saturation,
    )


# ---------------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in frame units: row vector X, column vector Y (broadcast to a grid)."""
    u = (np.arange(size, dtype=np.float32) - (size - 1) / 2) / size
    return u[None, :], u[:, None]


def _rot(c: dict, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along the component's major (xr) and minor (yr) axes."""
    dx, dy = X - c["x"], Y - c["y"]
    cs, sn = math.cos(c["pa"]), math.sin(c["pa"])
    return dx * cs + dy * sn, dy * cs - dx * sn


def _disk_plane(
    c: dict, X: np.ndarray, Y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Deprojected (face-on) coordinates: the sky's minor axis is stretched by 1/q."""
    xd, yd = _rot(c, X, Y)
    yd = yd / c["q"]
    return xd, yd, np.sqrt(xd * xd + yd * yd) + 1e-6, np.arctan2(yd, xd)


def _component_map(c: dict, X: np.ndarray, Y: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    kind = c["kind"]
    if kind == "sersic":
        xr, yr = _rot(c, X, Y)
        r = np.sqrt(xr * xr + (yr / c["q"]) ** 2)
        n = c["n"]
        bn = 2 * n - 1 / 3 + 4 / (405 * n)  # Ciotti & Bertin (1999): re encloses half the light
        return np.exp(-bn * (r / c["re"]) ** (1 / n))
    if kind == "arms":
        _, _, R, th = _disk_plane(c, X, Y)
        # Logarithmic spiral R = r_in exp((theta - phase) tan(pitch)): constant phase along an arm.
        phi = th - np.log(R / c["r_in"]) / math.tan(c["pitch"]) - c["phase"]
        pattern = (0.5 + 0.5 * np.cos(c["m"] * phi)) ** c["sharp"]
        radial = np.exp(-R / c["h"]) * (1 - np.exp(-((R / c["r_in"]) ** 3)))  # arms start at r_in
        cell = max(1, round(size * 0.025))  # HII-region knots ~2.5% of the frame, any resolution
        k = int(math.ceil(size / cell))
        field = np.repeat(np.repeat(rng.standard_normal((k, k), np.float32), cell, 0), cell, 1)[:size, :size]
        return pattern * radial * np.exp(c["knots"] * field - c["knots"] ** 2 / 2)  # lognormal, mean 1
    if kind == "bar":
        xd, yd, _, _ = _disk_plane(c, X, Y)
        ca, sa = math.cos(c["angle"]), math.sin(c["angle"])
        xb, yb = xd * ca + yd * sa, (yd * ca - xd * sa) / c["bq"]
        return np.clip(1 - (xb * xb + yb * yb) / c["length"] ** 2, 0, None) ** 2  # Ferrers (n = 2) bar
    if kind == "lopsided":
        _, _, R, th = _disk_plane(c, X, Y)
        grow = R / (R + c["h"])  # asymmetry grows outwards; the centre stays a single peak
        mod = 1 + grow * (c["a1"] * np.cos(th - c["ph"][0]) + c["a2"] * np.cos(2 * th - c["ph"][1]))
        return np.exp(-R / c["h"]) * np.clip(mod, 0, None)
    raise ValueError(f"unknown galaxy component kind {kind!r}")


def _blobs(xs: list, ys: list, sig: list, fl: list, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Sum of round Gaussians with given fluxes (frame units), vectorised over the blobs."""
    xs_, ys_, s_, f_ = (np.asarray(v, np.float32)[:, None, None] for v in (xs, ys, sig, fl))
    g = np.exp(-((X[None] - xs_) ** 2 + (Y[None] - ys_) ** 2) / (2 * s_ * s_))
    return (g * (f_ / (2 * np.pi * s_ * s_))).sum(0)  # SB per pixel: sums to flux x pixels per frame^2


def render_params(params: GalaxyParams, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render sampled parameters to a uint8 (size, size, 3) image (rng drives knots and noise)."""
    if size < 8:
        raise ValueError(f"image size must be >= 8, got {size}")
    X, Y = _grid(size)
    lin = np.zeros((3, size, size), np.float32)  # linear flux per pixel in units of the sky sigma
    area = float(size * size)  # map sums are per pixel; SB x pixel area = flux
    sat = params.get("saturation", 1.0)

    def tint(col: list) -> np.ndarray:  # colour desaturated toward grey by the survey's rendering
        return (1 + sat * (np.asarray(col, np.float32) - 1))[:, None, None]

    dust = []
    for c in params["components"]:
        if c["kind"] == "dust":
            dust.append(c)
            continue
        if c["kind"] == "blobs":
            m = _blobs(c["xs"], c["ys"], c["sig"], c["fl"], X, Y)
        else:
            m = _component_map(c, X, Y, size, rng)
            m *= c["flux"] * area / max(float(m.sum()), 1e-12)  # numerical normalisation to the flux
        lin += tint(c["color"]) * m
    lin *= params["flux"]
    for c in dust:  # dust absorbs blue more than red (R, G, B optical depths ~ 0.75 : 0.88 : 1)
        xr, yr = _rot(c, X, Y)
        depth = np.exp(-0.5 * ((yr - c["off"]) / c["w"]) ** 2 - 0.5 * (xr / c["h"]) ** 2)
        lin *= np.exp(-c["tau"] * np.array([0.75, 0.88, 1.0], np.float32)[:, None, None] * depth)
    for sx, sy, f, col, re in params["stars"]:
        if re > 0:  # a faint compact background galaxy
            lin += tint(col) * _blobs([sx], [sy], [re], [f], X, Y)
        else:  # a point source: all flux in one pixel, the PSF spreads it below
            i, j = min(int((sy + 0.5) * size), size - 1), min(int((sx + 0.5) * size), size - 1)
            lin[:, i, j] += tint(col)[:, 0, 0] * f * area
    # Gaussian PSF, separable and truncated at 4 sigma; flux falling off the frame is lost, as in a cutout.
    sigma = max(params["psf_fwhm"] * size * _FWHM_TO_SIGMA, 0.5)
    lin = gaussian_filter(lin, (0, sigma, sigma), mode="constant")
    # Sky noise plus the source's own Poisson noise (variance grows with counts / gain).
    lin += rng.standard_normal(lin.shape, np.float32) * np.sqrt(1 + np.clip(lin, 0, None) / params["gain"])
    # Lupton et al. (2004) asinh stretch on the mean intensity, the same factor for all channels:
    # colour ratios survive into bright cores (as in Legacy Survey images) until they clip.
    x = np.abs(lin.mean(0)) / params["soft"] + 1e-6
    lin *= params["noise"] * np.arcsinh(x) / x
    out = np.asarray(params["sky"], np.float32)[:, None, None] + lin
    return np.ascontiguousarray(np.clip(out, 0, 255).astype(np.uint8).transpose(1, 2, 0))


# --------------------------------------------------------------------------------- public API
def _resolve(class_key_or_spec: str) -> tuple[str, Framing]:
    """A class key of either schema (with that schema's framing), or a bare symbol spec."""
    for schema in SCHEMAS.values():
        for c in schema.classes:
            if c.key == class_key_or_spec:
                return c.symbol, FRAMINGS[schema.name]
    parse_symbol_spec(class_key_or_spec)  # raises ValueError naming the bad part
    return class_key_or_spec, FRAMINGS["galaxymnist"]


def render_galaxy(
    class_key_or_params: str | GalaxyParams, rng: np.random.Generator, size: int = 64
) -> np.ndarray:
    """One synthetic galaxy, uint8 (size, size, 3): from a class key ('barred_spiral'), a symbol spec
    ('disk+bulge:small+arms:tight') or parameters from sample_params()."""
    if isinstance(class_key_or_params, str):
        spec, framing = _resolve(class_key_or_params)
        class_key_or_params = sample_params(spec, rng, framing)
    return render_params(class_key_or_params, rng, size)


def default_labels(num_classes: int, n: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """Balanced, shuffled labels where label i depends only on (seed, i): each block of
    num_classes consecutive samples is a permutation of the classes, so any chunk is balanced."""
    idx = np.arange(start, start + n)
    blocks = {
        b: np.random.default_rng([seed, b, _LABEL_TAG]).permutation(num_classes)
        for b in np.unique(idx // num_classes)
    }
    return np.array([blocks[i // num_classes][i % num_classes] for i in idx], np.int64)


def generate(
    schema: str | ClassSchema,
    n: int,
    seed: int = 0,
    size: int = 64,
    labels: np.ndarray | None = None,
    start: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic images uint8 (n, size, size, 3) and labels int64 (n,).

    Sample i uses np.random.default_rng([seed, start + i]) only, so chunked or parallel
    generation (via `start`) reproduces a one-shot run byte for byte.
    """
    schema = get_schema(schema) if isinstance(schema, str) else schema
    if n < 0 or size < 8:
        raise ValueError(f"need n >= 0 and size >= 8, got n={n}, size={size}")
    if labels is None:
        labels = default_labels(schema.num_classes, n, seed, start)
    labels = np.asarray(labels, np.int64)
    if labels.shape != (n,) or (n and (labels.min() < 0 or labels.max() >= schema.num_classes)):
        raise ValueError(f"labels must be shape ({n},) with values in 0..{schema.num_classes - 1}")
    framing = FRAMINGS.get(schema.name, FRAMINGS["galaxymnist"])
    specs = [c.symbol for c in schema.classes]
    images = np.empty((n, size, size, 3), np.uint8)
    for k in range(n):
        rng = np.random.default_rng([seed, start + k])
        images[k] = render_params(sample_params(specs[labels[k]], rng, framing), rng, size)
    return images, labels


def iter_chunks(
    schema: str | ClassSchema, n: int, seed: int = 0, size: int = 64, chunk: int = 1024
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(images, labels, start index) chunks of a dataset identical to generate(schema, n, seed, size)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    for start in range(0, n, chunk):
        images, labels = generate(schema, min(chunk, n - start), seed, size, start=start)
        yield images, labels, start


def synthetic_sheet(
    schema: str | ClassSchema,
    path: str | Path,
    per_class: int = 8,
    size: int = 96,
    seed: int = 0,
    real: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """PNG contact sheet, one row per class labelled with its name. With real=(images, labels),
    each row starts with up to per_class real images of that class, for a side-by-side check."""
    from PIL import Image

    from galaxalign_dist.data.symbols import contact_sheet

    schema = get_schema(schema) if isinstance(schema, str) else schema
    labels = np.repeat(np.arange(schema.num_classes), per_class)
    images, _ = generate(schema, len(labels), seed, size, labels=labels)
    rows = []
    for c in schema.classes:
        tiles = list(images[labels == c.index])
        if real is not None:
            picked = [
                np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                for im in real[0][real[1] == c.index][:per_class]
            ]
            tiles = picked + [np.zeros_like(tiles[0])] * (per_class - len(picked)) + tiles
        rows.append((c.name, tiles))
    cols = [(0, "real"), (per_class, "synthetic")] if real is not None else [(0, "synthetic")]
    contact_sheet(
        rows,
        path,
        header=("real vs " if real is not None else "") + f"synthetic {schema.name} (seed {seed})",
        col_titles=cols,
        gap_after=(per_class - 1,) if real is not None else (),
    )
