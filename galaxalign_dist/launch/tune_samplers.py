"""Samplers of a search space: `loguniform(1e-5, 1e-3)` text -> a checked Sampler -> a Ray Tune domain."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

from galaxalign_dist.config import ConfigError

SAMPLERS = ("loguniform", "uniform", "randint", "choice", "grid")


@dataclass(frozen=True)
class Sampler:
    """One parsed `kind(args)` entry of `space:`; `text` is what the user wrote (for messages and tables)."""

    kind: str
    args: tuple[Any, ...]
    text: str

    @property
    def values(self) -> list[Any]:
        return list(self.args[0]) if self.kind in ("choice", "grid") else []

    @property
    def categorical(self) -> bool:
        return self.kind in ("choice", "grid")

    def to_tune(self) -> Any:
        """The ray.tune domain (or grid_search dict) this sampler stands for."""
        from ray import tune  # here, not at import: parsing and checking a space start no Ray

        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "randint":
            return tune.randint(*self.args)  # Ray's convention: lo <= x < hi
        if self.kind == "choice":
            return tune.choice(self.values)
        return tune.grid_search(self.values)

    def probe_values(self) -> list[Any]:
        """Values that exercise the range in validation: ends of a range (just inside an open end), or every option."""
        if self.categorical:
            return self.values
        lo, hi = self.args[0], self.args[1]
        if self.kind == "randint":
            return [lo, hi - 1]
        # Continuous samplers never return `hi` itself; probe just below so an exclusive config bound
        # such as loss.init_temperature < 1 is not reported for a value that cannot occur.
        return [float(lo), float(hi) - (float(hi) - float(lo)) * 1e-9]


_CALL = re.compile(r"\s*([A-Za-z_]\w*)\s*\((.*)\)\s*", re.S)


def parse_sampler(key: str, text: Any) -> Sampler:
    """`loguniform(1e-5, 1e-3)` -> Sampler; arguments are Python literals read with ast.literal_eval (no eval)."""
    where = f"space.{key}"
    if not isinstance(text, str):
        raise ConfigError(
            f"{where}: expected a sampler such as loguniform(1e-5, 1e-3) or choice([1, 2]), got {text!r} "
            "(fixed values go under `overrides:`)"
        )
    m = _CALL.fullmatch(text)
    if not m:
        raise ConfigError(f"{where}: {text!r} is not a sampler call; use one of {', '.join(SAMPLERS)}")
    kind, body = m.group(1), m.group(2)
    if kind not in SAMPLERS:
        raise ConfigError(f"{where}: unknown sampler {kind!r}; use one of {', '.join(SAMPLERS)}")
    try:
        args = ast.literal_eval(f"({body},)") if body.strip() else ()
    except (ValueError, SyntaxError):
        raise ConfigError(f"{where}: cannot read the arguments of {text!r} (Python literals only)") from None
    if kind in ("choice", "grid"):
        if len(args) != 1 or not isinstance(args[0], (list, tuple)) or not args[0]:
            raise ConfigError(f"{where}: {kind} takes one non-empty list, e.g. {kind}([1, 2])")
        return Sampler(kind, (list(args[0]),), text.strip())
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}: {kind} takes two numbers (low, high), got {text!r}")
    lo, hi = args
    if not lo < hi:
        raise ConfigError(f"{where}: {kind} needs low < high, got {text!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {text!r}")
    if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise ConfigError(f"{where}: randint takes integers (low inclusive, high exclusive), got {text!r}")
    return Sampler(kind, (lo, hi), text.strip())
