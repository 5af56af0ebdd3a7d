"""The plan cache: plans (algorithm, blocking, threads) made once per shape.

Plans hold no weights and no inputs, so a cached plan is never stale; layers
(``lk.Conv2d``, ``lk.Linear``) keep their packed weights themselves. Networks
(``lk.Sequential``, and layers that run as one) keep their plans themselves,
one per input shape with the packed weights: their lookups count in the same
hits, misses and plan time, not in ``size``.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

from . import _core

__all__ = ["CacheInfo", "cache_info", "cache_clear", "set_cache_capacity"]


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    evictions: int
    size: int
    capacity: int
    plan_time_s: float  # total time spent creating plans, apart from running them


def cache_info() -> CacheInfo:
    """Counters of the plan cache since start (or the last cache_clear)."""
    return CacheInfo(*_core.plan_cache_info())


def cache_clear() -> None:
    """Drop every cached plan, reset the counters and return pooled output memory to the system."""
    _core.plan_cache_clear()


def set_cache_capacity(n: int) -> None:
    """Keep at most n plans (least recently used go first); 0 disables caching."""
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n: expected an int, got {type(n).__name__}") from None
    if n < 0:
        raise ValueError(f"n: must be non-negative, got {n}")
    _core.plan_cache_set_capacity(n)
