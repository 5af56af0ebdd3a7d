"""The plan cache, and the weight cache of functional calls.

Plans (algorithm, blocking, threads) are made once per shape. They hold no
weights and no inputs, so a cached plan is never stale; layers
(``lk.Conv2d``, ``lk.Linear``) keep their packed weights themselves. Networks
(``lk.Sequential``, and layers that run as one) keep their plans themselves,
one per input shape with the packed weights: their lookups count in the same
hits, misses and plan time, not in ``size``.

With a weight cache capacity set (``lk.set_weight_cache_capacity``; off by
default), ``lk.conv2d`` and ``lk.conv2d_max_pool2d`` run on a layer made for
their weight array, as a module would, and calls repeating the weight reuse
it: weights packed once, on the kernels that need them packed (the direct
ones, Winograd). Each call compares its weight and bias with the layer's
copies in full, so a weight changed in place gets a new layer and the new
result. Results then are the modules': they may differ in rounding from the
cache off (other kernels), and a fused call from the unfused sequence (the
pooled Winograd kernel), never between calls.
"""

from __future__ import annotations

from typing import NamedTuple

from . import _core
from ._args import int_param

__all__ = ["CacheInfo", "WeightCacheInfo", "cache_info", "cache_clear", "set_cache_capacity", "weight_cache_info",
           "set_weight_cache_capacity"]


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


class WeightCacheInfo(NamedTuple):
    hits: int      # functional calls that ran on a layer kept for their weight
    misses: int    # and those that made one (a weight's first call, or changed values)
    layers: int    # layers kept
    bytes: int     # bytes of the weights and biases they keep
    capacity: int  # bytes


def weight_cache_info() -> WeightCacheInfo:
    """Counters of the functional calls' weight cache since start (or the last cache_clear)."""
    return WeightCacheInfo(*_core.layer_cache_info())


def cache_clear() -> None:
    """Drop every cached plan and layer, reset the counters and return pooled output memory to the system."""
    _core.plan_cache_clear()
    _core.layer_cache_clear()


def set_cache_capacity(n: int) -> None:
    """Keep at most n plans (least recently used go first); 0 disables caching."""
    _core.plan_cache_set_capacity(int_param(n, "n", minimum=0))


def set_weight_cache_capacity(nbytes: int) -> None:
    """Keep layers for functional calls' weights, up to nbytes of them (least recently used go first);
    0 (the default): every call binds its weights itself."""
    _core.layer_cache_set_capacity(int_param(nbytes, "nbytes", minimum=0))
