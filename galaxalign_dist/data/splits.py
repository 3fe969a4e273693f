"""Seeded id hashes: the train/test split of every prepared dataset, few-shot subsets, augmentation seeds."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any


def stable_hash(text: str) -> int:
    """64-bit blake2b of `text`, little-endian: the same on every machine and run (hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def id_hash(seed: int, row_id: Any) -> int:
    """The seeded hash of one row id, in [0, 2**64): decides its split (hash_split) and few-shot rank."""
    return stable_hash(f"{seed}:{row_id}")


def hash_split(ids: Iterable[Any], seed: int, test_fraction: float) -> list[str]:
    """'test' for ids whose seeded hash falls below test_fraction, else 'train'.

    A function of (seed, id) only: the same galaxy lands in the same split however the source
    is ordered, chunked or filtered, and no pass over all rows is needed. Class fractions match
    test_fraction in expectation (binomial scatter per class, ~sqrt(n_class * f) rows).
    """
    return ["test" if id_hash(seed, i) / 2.0**64 < test_fraction else "train" for i in ids]
