"""The plan cache, the scheduler's settings, explain(), and autotuning with its plan store.

Plans are keyed by everything that decides them (op, shapes, dtype, ISA
level, threads, scheduler settings): a new value of any of them is a new
plan, and a plan made once is served from the cache after. The scheduler
minimises predicted time + memory_weight * workspace among the candidates
whose workspace fits memory_budget; explain() shows its choice. Whatever
it chooses, results stay correct.

Every test here restores the settings it changes (see restore_settings):
the cache, the scheduler, the ISA level and the thread count are process
state shared with all other tests.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import lepton_kernels as lk
import reference as ref

LEVELS = ("generic", "avx2", "avx512")
AVAILABLE_LEVELS = LEVELS[: LEVELS.index(lk.get_config()["isa_detected"]) + 1]
ALGORITHMS = ("implicit_gemm", "im2col_gemm", "implicit_gemm_t", "direct")


@pytest.fixture(autouse=True)
def restore_settings():
    scheduler = lk.get_scheduler()
    isa, threads, capacity = lk.get_isa(), lk.get_num_threads(), lk.cache_info().capacity
    weights = lk.weight_cache_info().capacity
    yield
    lk.set_scheduler(**scheduler)
    lk.set_isa(isa)
    lk.set_num_threads(threads)
    lk.set_cache_capacity(capacity)
    lk.set_weight_cache_capacity(weights)


def check_conv(got, x, w, b=None, **kwargs):
    expected = ref.conv2d(x, w, b, **kwargs)
    plain = {k: v for k, v in kwargs.items() if k != "activation"}
    magnitude = ref.conv2d(np.abs(x), np.abs(w), None if b is None else np.abs(b), **plain)
    ref.assert_sum_close(got, expected, magnitude, w.shape[1] * w.shape[2] * w.shape[3] + (b is not None), w.dtype)


def check_linear(got, x, w, b=None):
    magnitude = ref.linear(np.abs(x), np.abs(w), None if b is None else np.abs(b))
    ref.assert_sum_close(got, ref.linear(x, w, b), magnitude, x.shape[-1] + (b is not None), w.dtype)


def chosen(text):
    """The key=value fields of the plan explain() describes (its first line)."""
    return dict(re.findall(r"(\w+)=([^\s\]]+)", text.splitlines()[0]))


def candidate_workspaces(text):
    """Workspace bytes of each candidate explain() lists after the chosen plan."""
    return [int(v) for v in re.findall(r"^\s+\S.*workspace_bytes=(\d+)", text, re.M)]


def counts():
    info = lk.cache_info()
    return info.hits, info.misses


# --------------------------------------------------------------------------
# Plan cache
# --------------------------------------------------------------------------

def make_ops(rng, dtype=np.float32):
    """name -> call(batch size), for each op and layer that plans through the cache."""
    x = ref.randn(rng, (4, 3, 12, 12), dtype)
    w = ref.randn(rng, (8, 3, 3, 3), dtype)
    a = ref.randn(rng, (4, 20), dtype)
    lw = ref.randn(rng, (7, 20), dtype)
    conv, fused, linear = lk.Conv2d(w, padding=1), lk.Conv2dMaxPool2d(w, padding=1), lk.Linear(lw)
    return {
        "conv2d": lambda n: lk.conv2d(x[:n], w, padding=1),
        "conv2d_max_pool2d": lambda n: lk.conv2d_max_pool2d(x[:n], w, padding=1),
        "linear": lambda n: lk.linear(a[:n], lw),
        "Conv2d": lambda n: conv(x[:n]),
        "Conv2dMaxPool2d": lambda n: fused(x[:n]),
        "Linear": lambda n: linear(a[:n]),
    }


def test_cache_info_is_a_named_tuple():
    info = lk.cache_info()
    assert isinstance(info, lk.CacheInfo) and isinstance(info, tuple)
    assert info._fields == ("hits", "misses", "evictions", "size", "capacity", "plan_time_s")
    assert all(isinstance(v, int) for v in info[:5]) and isinstance(info.plan_time_s, float)
    assert 0 <= info.size <= info.capacity


@pytest.mark.parametrize("op", ["conv2d", "conv2d_max_pool2d", "linear", "Conv2d", "Conv2dMaxPool2d", "Linear"])
def test_a_shape_misses_once_then_hits(op, rng):
    call = make_ops(rng)[op]
    lk.cache_clear()
    capacity = lk.cache_info().capacity
    assert lk.cache_info() == (0, 0, 0, 0, capacity, 0.0)
    first = call(2)
    info = lk.cache_info()
    assert (info.hits, info.misses, info.size) == (0, 1, 1)
    assert info.plan_time_s > 0
    for _ in range(3):
        ref.assert_identical(call(2), first)
    again = lk.cache_info()
    assert (again.hits, again.misses, again.size) == (3, 1, 1)
    assert again.plan_time_s == info.plan_time_s  # a hit makes no plan
    # A new batch size is a new shape.
    call(3)
    assert counts() == (3, 2) and lk.cache_info().size == 2
    call(2)
    call(3)
    assert counts() == (5, 2) and lk.cache_info().evictions == 0


def test_network_plans_count_in_the_statistics(rng):
    # A network (and a layer running as one: 16k filters on the direct kernels) keeps its plans, with its
    # packed weights, itself: its lookups count as hits and misses, its planning in plan_time_s, not in size.
    x = ref.randn(rng, (4, 3, 12, 12), np.float32)
    conv = lk.Conv2d(ref.randn(rng, (16, 3, 3, 3), np.float32), padding=1)
    seq = lk.Sequential([conv, lk.MaxPool2d(2)])
    assert "network plan" in conv.describe((1, 3, 12, 12))
    for call in (lambda n: conv(x[:n]), lambda n: seq(x[:n])):
        lk.cache_clear()
        call(2)
        info = lk.cache_info()
        assert (info.hits, info.misses, info.size) == (0, 1, 0) and info.plan_time_s > 0
        call(2)
        call(2)
        assert lk.cache_info() == (2, 1, 0, 0, info.capacity, info.plan_time_s)
        call(3)
        assert counts() == (2, 2) and lk.cache_info().plan_time_s > info.plan_time_s


def weight_counts():
    info = lk.weight_cache_info()
    return info.hits, info.misses, info.layers


@pytest.mark.parametrize("op", ["conv2d", "conv2d_max_pool2d"])
def test_weight_cache_runs_functional_calls_as_a_module(op, rng):
    # Off by default. With a capacity, a weight's first call makes its layer, later calls with the same values
    # reuse it (results equal the module's bit for bit), a weight changed in place makes a new one.
    lk.cache_clear()
    assert lk.weight_cache_info() == (0, 0, 0, 0, 0)
    x = ref.randn(rng, (2, 3, 30, 30), np.float32)
    w, b = ref.randn(rng, (16, 3, 3, 3), np.float32), ref.randn(rng, 16, np.float32)
    call = getattr(lk, op)
    module = (lk.Conv2d if op == "conv2d" else lk.Conv2dMaxPool2d)(w, b, padding=1, activation="relu")
    call(x, w, b, padding=1, activation="relu")
    assert weight_counts() == (0, 0, 0)
    lk.set_weight_cache_capacity(1 << 20)
    first = call(x, w, b, padding=1, activation="relu")
    ref.assert_identical(first, module(x))
    for _ in range(3):
        ref.assert_identical(call(x, w, b, padding=1, activation="relu"), first)
    assert weight_counts() == (3, 1, 1) and lk.weight_cache_info().bytes == (w.size + b.size) * 4
    w[5, 1, 2, 0] += 1.0  # in place: the kept layer no longer holds these values
    got = call(x, w, b, padding=1, activation="relu")
    ref.assert_identical(got, (lk.Conv2d if op == "conv2d" else lk.Conv2dMaxPool2d)(
        w, b, padding=1, activation="relu")(x))
    assert weight_counts() == (3, 2, 1)
    b[0] = -b[0]
    call(x, w, b, padding=1, activation="relu")
    assert weight_counts() == (3, 3, 1)
    # Other parameters or another array are other layers; a strided weight binds itself per call.
    call(x, w, b, padding=2, activation="relu")
    call(x, w.copy(), b, padding=1, activation="relu")
    assert weight_counts() == (3, 5, 3)
    strided = np.repeat(w, 2, axis=0)[::2]
    if op == "conv2d":
        check_conv(call(x, strided, b, padding=1, activation="relu"), x, w, b, padding=1, activation="relu")
    else:  # and indices come from the per-call path too
        y, _ = call(x, w, b, padding=1, activation="relu", return_indices=True)
        ref.assert_identical(y, lk.conv2d_max_pool2d(x, strided, b, padding=1, activation="relu"))
    assert weight_counts() == (3, 5, 3)
    lk.cache_clear()
    assert lk.weight_cache_info() == (0, 0, 0, 0, 1 << 20)


def test_weight_cache_keeps_the_most_recent_within_its_capacity(rng):
    x = ref.randn(rng, (1, 8, 12, 12), np.float32)
    ws = [ref.randn(rng, (32, 8, 3, 3), np.float32) for _ in range(3)]  # 9216 bytes each
    lk.cache_clear()
    lk.set_weight_cache_capacity(2 * 9216)
    for w in ws:
        check_conv(lk.conv2d(x, w), x, w)
    assert lk.weight_cache_info()[1:4] == (3, 2, 2 * 9216)
    lk.conv2d(x, ws[2])
    lk.conv2d(x, ws[1])
    assert weight_counts() == (2, 3, 2)
    lk.conv2d(x, ws[0])  # evicted: made again, and the least recently used goes
    lk.conv2d(x, ws[1])
    lk.conv2d(x, ws[2])
    assert weight_counts() == (3, 5, 2)
    lk.set_weight_cache_capacity(9216)
    assert lk.weight_cache_info()[2:] == (1, 9216, 9216)
    lk.set_weight_cache_capacity(0)
    assert lk.weight_cache_info()[2:] == (0, 0, 0)
    for bad, error in ((-1, ValueError), (1.5, TypeError), ("1", TypeError)):
        with pytest.raises(error, match="nbytes"):
            lk.set_weight_cache_capacity(bad)


def test_plans_hold_no_data(rng):
    # Same shapes, other values: the plan is reused and the result is for the new data.
    x1, x2 = ref.randn(rng, (2, 3, 10, 10), np.float32), ref.randn(rng, (2, 3, 10, 10), np.float32)
    w1, w2 = ref.randn(rng, (5, 3, 3, 3), np.float32), ref.randn(rng, (5, 3, 3, 3), np.float32)
    lk.cache_clear()
    lk.conv2d(x1, w1)
    got = lk.conv2d(x2, w2)
    assert counts() == (1, 1)
    check_conv(got, x2, w2)
    lk.conv2d(x1.astype(np.float64), w1.astype(np.float64))
    assert counts() == (1, 2)  # another dtype is another plan


def test_unbatched_input_shares_the_plan_of_batch_one(rng):
    x = ref.randn(rng, (3, 10, 10), np.float32)
    w = ref.randn(rng, (5, 3, 3, 3), np.float32)
    lk.cache_clear()
    lk.conv2d(x[None], w)
    lk.conv2d(x, w)
    assert counts() == (1, 1)


def test_capacity_bounds_the_cache_least_recently_used_first(rng):
    a = ref.randn(rng, (8, 16), np.float32)
    w = ref.randn(rng, (5, 16), np.float32)
    lk.set_cache_capacity(3)
    lk.cache_clear()
    for rows in (1, 2, 3, 4, 5):
        check_linear(lk.linear(a[:rows], w), a[:rows], w)
    info = lk.cache_info()
    assert (info.misses, info.size, info.evictions, info.capacity) == (5, 3, 2, 3)
    # The cache holds rows 3, 4, 5. Using 3 makes 4 the least recently used.
    lk.linear(a[:3], w)
    assert counts() == (1, 5)
    lk.linear(a[:6], w)
    assert lk.cache_info().evictions == 3
    lk.linear(a[:3], w)
    lk.linear(a[:5], w)
    assert counts() == (3, 6)
    lk.linear(a[:4], w)
    assert counts() == (3, 7)
    assert lk.cache_info().size == 3


def test_lowering_the_capacity_evicts_at_once(rng):
    a = ref.randn(rng, (8, 16), np.float32)
    w = ref.randn(rng, (5, 16), np.float32)
    lk.cache_clear()
    for rows in range(1, 7):
        lk.linear(a[:rows], w)
    lk.set_cache_capacity(2)
    info = lk.cache_info()
    assert (info.size, info.evictions, info.capacity) == (2, 4, 2)
    lk.linear(a[:6], w)
    lk.linear(a[:5], w)
    assert counts() == (2, 6)


def test_capacity_zero_disables_caching(rng):
    x = ref.randn(rng, (2, 3, 10, 10), np.float32)
    w = ref.randn(rng, (5, 3, 3, 3), np.float32)
    cached = lk.conv2d(x, w, padding=1)
    lk.set_cache_capacity(0)
    lk.cache_clear()
    for _ in range(3):
        ref.assert_identical(lk.conv2d(x, w, padding=1), cached)
        ref.assert_identical(lk.Conv2d(w, padding=1)(x), lk.Conv2d(w, padding=1)(x))
    info = lk.cache_info()
    assert (info.hits, info.misses, info.size, info.capacity) == (0, 9, 0, 0)
    check_conv(lk.conv2d_max_pool2d(x, w, padding=1, activation=None, kernel_size=1), x, w, padding=1)
    lk.set_cache_capacity(8)
    lk.conv2d(x, w, padding=1)
    lk.conv2d(x, w, padding=1)
    assert lk.cache_info().hits == 1


def test_cache_clear_resets_counters_and_keeps_capacity(rng):
    ops = make_ops(rng)
    lk.set_cache_capacity(3)
    for call in ops.values():
        call(1)
        call(2)
    assert lk.cache_info().evictions > 0
    lk.cache_clear()
    assert lk.cache_info() == (0, 0, 0, 0, 3, 0.0)
    ops["conv2d"](1)
    assert counts() == (0, 1)


@pytest.mark.parametrize(
    "value, exception",
    [(-1, ValueError), (2.0, TypeError), ("8", TypeError), (None, TypeError)],
)
def test_bad_capacity(value, exception):
    before = lk.cache_info().capacity
    with pytest.raises(exception, match="^n:"):
        lk.set_cache_capacity(value)
    assert lk.cache_info().capacity == before


def test_thread_count_is_part_of_the_key(rng):
    x = ref.randn(rng, (2, 16, 24, 24), np.float32)
    w = ref.randn(rng, (32, 16, 3, 3), np.float32)
    lk.cache_clear()
    for n in (1, 2):
        lk.set_num_threads(n)
        check_conv(lk.conv2d(x, w, padding=1), x, w, padding=1)
        assert int(chosen(lk.explain(lk.conv2d, x, w, padding=1))["threads"]) <= n
    assert lk.cache_info().misses >= 2
    lk.set_num_threads(1)
    hits, misses = counts()
    lk.conv2d(x, w, padding=1)
    assert counts() == (hits + 1, misses)


def test_isa_level_is_part_of_the_key(rng):
    x = ref.randn(rng, (2, 16, 24, 24), np.float32)
    w = ref.randn(rng, (32, 16, 3, 3), np.float32)
    a = ref.randn(rng, (64, 40), np.float32)
    lw = ref.randn(rng, (48, 40), np.float32)
    lk.cache_clear()
    for level in AVAILABLE_LEVELS:
        lk.set_isa(level)
        hits, misses = counts()
        check_conv(lk.conv2d(x, w, padding=1), x, w, padding=1)
        check_linear(lk.linear(a, lw), a, lw)
        assert counts() == (hits, misses + 2), level
        text = lk.explain(lk.conv2d, x, w, padding=1)
        assert f"isa={level}" in text.splitlines()[-1], text
        ukernel = chosen(text).get("ukernel")
        assert ukernel is None or ukernel.endswith(level), text
    lk.set_isa(AVAILABLE_LEVELS[0])
    hits, misses = counts()
    lk.conv2d(x, w, padding=1)
    assert counts() == (hits + 1, misses)


def concurrent_workload(rng):
    calls = []
    for dtype in (np.float32, np.float64):
        x = ref.randn(rng, (3, 8, 14, 14), dtype)
        w = ref.randn(rng, (12, 8, 3, 3), dtype)
        a = ref.randn(rng, (9, 30), dtype)
        lw = ref.randn(rng, (11, 30), dtype)
        layer = lk.Conv2d(w, padding=1)
        for n in (1, 2, 3):
            calls += [
                (lambda x=x[:n], w=w: lk.conv2d(x, w, padding=1)),
                (lambda x=x[:n], w=w: lk.conv2d_max_pool2d(x, w, padding=1)),
                (lambda x=x[:n], layer=layer: layer(x)),
                (lambda a=a[:3 * n], lw=lw: lk.linear(a, lw)),
            ]
    return calls


@pytest.mark.parametrize("capacity", [512, 4, 0])
def test_concurrent_calls_through_the_cache(capacity, rng):
    calls = concurrent_workload(rng)
    expected = [call() for call in calls]
    lk.set_cache_capacity(capacity)
    lk.cache_clear()
    jobs = [i % len(calls) for i in range(6 * len(calls))]
    rng.shuffle(jobs)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: calls[i](), jobs))
    for i, got in zip(jobs, results):
        ref.assert_identical(got, expected[i], f"call {i}")
    info = lk.cache_info()
    assert info.size <= capacity
    assert info.hits + info.misses >= len(jobs)
    assert info.misses >= 1
    assert info.evictions <= info.misses


def test_clearing_and_resizing_the_cache_during_calls(rng):
    calls = concurrent_workload(rng)
    expected = [call() for call in calls]
    stop = threading.Event()

    def churn():
        n = 0
        while not stop.is_set():
            if n % 3 == 0:
                lk.cache_clear()
            else:
                lk.set_cache_capacity((0, 2, 512)[n % 3])
            n += 1

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        jobs = [i % len(calls) for i in range(4 * len(calls))]
        with ThreadPoolExecutor(max_workers=6) as pool:
            for i, got in zip(jobs, pool.map(lambda i: calls[i](), jobs)):
                ref.assert_identical(got, expected[i], f"call {i}")
    finally:
        stop.set()
        churner.join()
    info = lk.cache_info()
    assert 0 <= info.size <= info.capacity


# --------------------------------------------------------------------------
# Scheduler settings
# --------------------------------------------------------------------------

def test_get_scheduler():
    settings = lk.get_scheduler()
    assert set(settings) == {"memory_budget", "memory_weight", "autotune"}
    assert settings["memory_budget"] is None or (isinstance(settings["memory_budget"], int)
                                                 and settings["memory_budget"] >= 0)
    assert isinstance(settings["memory_weight"], float) and settings["memory_weight"] >= 0
    assert isinstance(settings["autotune"], bool)
    assert lk.get_config()["scheduler"] == settings


def test_set_scheduler_changes_only_what_is_given():
    lk.set_scheduler(memory_budget=None, memory_weight=1e-12, autotune=False)
    lk.set_scheduler(memory_budget=4096)
    assert lk.get_scheduler() == {"memory_budget": 4096, "memory_weight": 1e-12, "autotune": False}
    lk.set_scheduler(memory_weight=2)
    assert lk.get_scheduler() == {"memory_budget": 4096, "memory_weight": 2.0, "autotune": False}
    lk.set_scheduler(autotune=True)
    assert lk.get_scheduler() == {"memory_budget": 4096, "memory_weight": 2.0, "autotune": True}
    lk.set_scheduler(memory_budget=None, memory_weight=0, autotune=False)
    assert lk.get_scheduler() == {"memory_budget": None, "memory_weight": 0.0, "autotune": False}
    lk.set_scheduler()
    assert lk.get_scheduler() == {"memory_budget": None, "memory_weight": 0.0, "autotune": False}
    lk.set_scheduler(memory_budget=0)
    assert lk.get_scheduler()["memory_budget"] == 0


@pytest.mark.parametrize(
    "kwargs, exception, name",
    [
        pytest.param(dict(memory_budget=-1), ValueError, "memory_budget", id="budget-negative"),
        pytest.param(dict(memory_budget=1.5), TypeError, "memory_budget", id="budget-float"),
        pytest.param(dict(memory_budget="1M"), TypeError, "memory_budget", id="budget-str"),
        pytest.param(dict(memory_budget=2**64), (ValueError, OverflowError), "memory_budget", id="budget-huge"),
        pytest.param(dict(memory_weight=-1e-12), ValueError, "memory_weight", id="weight-negative"),
        pytest.param(dict(memory_weight=math.nan), ValueError, "memory_weight", id="weight-nan"),
        pytest.param(dict(memory_weight="1e-9"), TypeError, "memory_weight", id="weight-str"),
        pytest.param(dict(memory_weight=None), TypeError, "memory_weight", id="weight-none"),
        pytest.param(dict(memory_weight=True), TypeError, "memory_weight", id="weight-bool"),
        # A bad value alongside good ones: nothing may change.
        pytest.param(dict(memory_budget=1024, memory_weight=-1.0, autotune=True), ValueError, "memory_weight",
                     id="partly-bad"),
    ],
)
def test_bad_scheduler_settings(kwargs, exception, name):
    before = lk.get_scheduler()
    with pytest.raises(exception, match=f"^{name}:"):
        lk.set_scheduler(**kwargs)
    assert lk.get_scheduler() == before


def test_set_scheduler_takes_keywords_only():
    with pytest.raises(TypeError):
        lk.set_scheduler(0)
    with pytest.raises(TypeError):
        lk.set_scheduler(budget=0)


# (input shape, weight shape, conv2d keyword arguments): one per kind of convolution the scheduler plans.
CONV_SHAPES = [
    pytest.param((2, 32, 28, 28), (64, 32, 3, 3), dict(padding=1), id="dense"),
    pytest.param((1, 256, 14, 14), (256, 256, 1, 1), dict(), id="pointwise"),
    pytest.param((2, 64, 20, 20), (64, 1, 3, 3), dict(groups=64, padding=1), id="depthwise"),
    pytest.param((2, 16, 17, 17), (32, 4, 3, 3), dict(groups=4, stride=2), id="grouped-strided"),
    pytest.param((4, 3, 32, 32), (16, 3, 5, 5), dict(padding=2), id="few-channels"),
]


@pytest.mark.parametrize("x_shape, w_shape, kwargs", CONV_SHAPES)
@pytest.mark.parametrize("budget", [0, 1])
def test_tiny_memory_budget_picks_no_workspace(budget, x_shape, w_shape, kwargs, rng):
    # The direct algorithm needs no workspace and handles every convolution,
    # so a plan fitting any budget always exists: the smallest is 0 bytes.
    x = ref.randn(rng, x_shape, np.float32)
    w = ref.randn(rng, w_shape, np.float32)
    b = ref.randn(rng, w_shape[0], np.float32)
    lk.set_scheduler(memory_budget=budget)
    text = lk.explain(lk.conv2d, x, w, b, **kwargs)
    assert chosen(text)["workspace_bytes"] == "0", text
    assert chosen(text)["algo"] in ALGORITHMS, text
    assert all(ws <= budget for ws in candidate_workspaces(text)), text
    check_conv(lk.conv2d(x, w, b, **kwargs, activation="relu"), x, w, b, **kwargs, activation="relu")
    check_conv(lk.Conv2d(w, b, **kwargs)(x), x, w, b, **kwargs)
    pooled_text = lk.explain(lk.conv2d_max_pool2d, x, w, b, **kwargs)
    assert chosen(pooled_text)["workspace_bytes"] == "0", pooled_text
    got = lk.conv2d_max_pool2d(x, w, b, **kwargs, activation=None, kernel_size=1)
    check_conv(got, x, w, b, **kwargs)


@pytest.mark.parametrize("x_shape, w_shape, kwargs", CONV_SHAPES)
def test_memory_budget_bounds_the_workspace(x_shape, w_shape, kwargs, rng):
    x = ref.randn(rng, x_shape, np.float32)
    w = ref.randn(rng, w_shape, np.float32)
    free = lk.explain(lk.conv2d, x, w, **kwargs)
    unbounded = int(chosen(free)["workspace_bytes"])
    for budget in sorted({unbounded // 2, unbounded // 8, 30000, 4096}):
        lk.set_scheduler(memory_budget=budget)
        text = lk.explain(lk.conv2d, x, w, **kwargs)
        assert int(chosen(text)["workspace_bytes"]) <= budget, text
        assert all(ws <= budget for ws in candidate_workspaces(text)), text
        check_conv(lk.conv2d(x, w, **kwargs), x, w, **kwargs)
    lk.set_scheduler(memory_budget=None)
    assert lk.explain(lk.conv2d, x, w, **kwargs) == free


@pytest.mark.parametrize("x_shape, w_shape, kwargs", CONV_SHAPES)
def test_heavy_memory_weight_prefers_small_workspaces(x_shape, w_shape, kwargs, rng):
    x = ref.randn(rng, x_shape, np.float32)
    w = ref.randn(rng, w_shape, np.float32)
    default = int(chosen(lk.explain(lk.conv2d, x, w, **kwargs))["workspace_bytes"])
    for weight in (1e-3, 1.0, math.inf):
        lk.set_scheduler(memory_weight=weight)
        text = lk.explain(lk.conv2d, x, w, **kwargs)
        workspace = int(chosen(text)["workspace_bytes"])
        # The least workspace any algorithm can run with, each planned under the same weight.
        least = min(int(chosen(lk.Conv2d(w, **kwargs, algorithm=a).describe(x))["workspace_bytes"])
                    for a in ALGORITHMS)
        assert workspace <= min([default, least] + candidate_workspaces(text)), f"memory_weight={weight}\n{text}"
        check_conv(lk.conv2d(x, w, **kwargs), x, w, **kwargs)


def test_scheduler_settings_are_part_of_the_key(rng):
    x = ref.randn(rng, (2, 32, 28, 28), np.float32)
    w = ref.randn(rng, (64, 32, 3, 3), np.float32)
    lk.cache_clear()
    lk.conv2d(x, w, padding=1)
    lk.set_scheduler(memory_budget=0)
    lk.conv2d(x, w, padding=1)
    lk.set_scheduler(memory_weight=1.0)
    lk.conv2d(x, w, padding=1)
    assert counts() == (0, 3)
    # Plans made under other settings stay cached under those settings.
    lk.set_scheduler(memory_budget=None, memory_weight=1e-3)
    lk.conv2d(x, w, padding=1)
    lk.set_scheduler(memory_budget=0, memory_weight=1.0)
    lk.conv2d(x, w, padding=1)
    assert counts() == (1, 4)


# --------------------------------------------------------------------------
# explain()
# --------------------------------------------------------------------------

def explain_calls(rng):
    x = ref.randn(rng, (2, 3, 16, 16), np.float32)
    w = ref.randn(rng, (8, 3, 3, 3), np.float32)
    b = ref.randn(rng, 8, np.float32)
    a = ref.randn(rng, (5, 27), np.float32)
    lw = ref.randn(rng, (10, 27), np.float32)
    lb = ref.randn(rng, 10, np.float32)
    return {
        "conv2d": lambda: lk.explain(lk.conv2d, x, w, b, padding=1, activation="relu"),
        "conv2d_max_pool2d": lambda: lk.explain(lk.conv2d_max_pool2d, x, w, b, padding=1, kernel_size=3,
                                                pool_stride=2),
        "linear": lambda: lk.explain(lk.linear, a, lw, lb, activation="relu"),
        "Conv2d": lambda: lk.explain(lk.Conv2d(w, b, padding=1), x),
        "Conv2dMaxPool2d": lambda: lk.explain(lk.Conv2dMaxPool2d(w, b, padding=1), x),
        "Linear": lambda: lk.explain(lk.Linear(lw, lb), a),
    }


@pytest.mark.parametrize("op", ["conv2d", "conv2d_max_pool2d", "linear", "Conv2d", "Conv2dMaxPool2d", "Linear"])
def test_explain_describes_plan_prediction_and_machine(op, rng):
    text = explain_calls(rng)[op]()
    assert isinstance(text, str)
    assert "algo=" in text.splitlines()[0], text
    assert re.search(r"predicted_\w+=\d", text), f"no predicted time in:\n{text}"
    machine = text.splitlines()[-1]
    assert machine.startswith("machine:") and f"isa={lk.get_isa()}" in machine, text


def test_explain_neither_runs_nor_writes(rng):
    x = ref.randn(rng, (2, 3, 16, 16), np.float32)
    w = ref.randn(rng, (8, 3, 3, 3), np.float32)
    copies = x.copy(), w.copy()
    out = ref.poisoned((2, 8, 16, 16), np.float32)
    lk.explain(lk.conv2d, x, w, padding=1, out=out)
    assert np.isnan(out).all()
    ref.assert_identical(x, copies[0])
    ref.assert_identical(w, copies[1])


def test_explain_takes_arguments_as_the_op_does(rng):
    x = ref.randn(rng, (2, 4, 16, 16), np.float32)
    w = ref.randn(rng, (8, 2, 3, 3), np.float32)
    b = ref.randn(rng, 8, np.float32)
    assert (lk.explain(lk.conv2d, x, w, b, 2, 1, 1, 2)
            == lk.explain(lk.conv2d, x, w, bias=b, stride=2, padding=1, dilation=1, groups=2))
    lk.set_num_threads(1)
    assert chosen(lk.explain(lk.conv2d, x, w, b, 2, 1, 1, 2))["threads"] == "1"


def test_explain_of_a_fixed_algorithm(rng):
    x = ref.randn(rng, (2, 8, 16, 16), np.float32)
    w = ref.randn(rng, (16, 8, 3, 3), np.float32)
    for algorithm in ALGORITHMS:
        assert chosen(lk.explain(lk.Conv2d(w, algorithm=algorithm), x))["algo"] == algorithm
        assert chosen(lk.explain(lk.Conv2dMaxPool2d(w, algorithm=algorithm), x))["algo"] == algorithm


def test_explain_of_linear_counts_every_row(rng):
    # A (..., K) input runs as prod(...) rows: the plan explained must be the one for that many rows.
    lw = ref.randn(rng, (64, 32), np.float32)
    x = ref.randn(rng, (2, 300, 32), np.float32)
    flat = x.reshape(600, 32)
    layer = lk.Linear(lw)
    assert lk.explain(layer, x) == lk.explain(layer, flat)
    assert lk.explain(lk.linear, x, lw) == lk.explain(lk.linear, flat, lw)
    assert lk.explain(layer, x[0, 0]) == lk.explain(layer, flat[:1])


def test_explain_rejects_other_callables(rng):
    with pytest.raises(TypeError, match="^op:"):
        lk.explain(lk.relu, ref.randn(rng, (3,), np.float32))
    with pytest.raises(TypeError, match="^op:"):
        lk.explain(lk.MaxPool2d(2), ref.randn(rng, (1, 1, 4, 4), np.float32))


# --------------------------------------------------------------------------
# Autotuning and the plan store (LEPTON_CACHE_DIR, read once per process)
# --------------------------------------------------------------------------

# Runs `how` ("functional" or "layer") convolutions on saved arrays, with or
# without autotuning, saves the results and prints what explain() says.
CHILD = """
import json, sys
import numpy as np
import lepton_kernels as lk

data = np.load(sys.argv[1])
how, tune, out = sys.argv[2], sys.argv[3] == "tune", sys.argv[4]
lk.set_scheduler(autotune=tune)
results, texts = {}, []
for i in range(int(data["count"])):
    x, w, b = data[f"x{i}"], data["w"], data["b"]
    if how == "layer":
        layer = lk.Conv2d(w, b, padding=1)
        results[f"y{i}"] = layer(x)
        texts.append(lk.explain(layer, x))
    else:
        results[f"y{i}"] = lk.conv2d(x, w, b, padding=1)
        texts.append(lk.explain(lk.conv2d, x, w, b, padding=1))
np.savez(out, **results)
print(json.dumps({"explain": texts, "store": lk.get_config()["plan_store"]}))
"""


def save_inputs(path, rng, batches):
    w = ref.randn(rng, (16, 8, 3, 3), np.float32)
    b = ref.randn(rng, 16, np.float32)
    xs = {f"x{i}": ref.randn(rng, (n, 8, 12, 12), np.float32) for i, n in enumerate(batches)}
    np.savez(path, w=w, b=b, count=len(batches), **xs)
    return w, b, list(xs.values())


def run_child(tmp_path, cache_dir, inputs, how, tune, name):
    """Runs CHILD in a fresh interpreter with LEPTON_CACHE_DIR=cache_dir; returns (report, results)."""
    env = dict(os.environ, LEPTON_CACHE_DIR=str(cache_dir))
    out = tmp_path / f"{name}.npz"
    done = subprocess.run([sys.executable, "-c", CHILD, str(inputs), how, "tune" if tune else "plain", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with np.load(out) as results:
        return json.loads(done.stdout.strip().splitlines()[-1]), [results[f"y{i}"] for i in range(len(results))]


def store_files(cache_dir):
    return sorted(Path(cache_dir).glob(f"plans-{lk.__version__}-*.txt"))


@pytest.mark.parametrize("how", ["functional", "layer"])
def test_autotune_keeps_the_winner_on_disk(how, tmp_path, rng):
    cache_dir = tmp_path / "plans"
    cache_dir.mkdir()
    inputs = tmp_path / "inputs.npz"
    w, b, xs = save_inputs(inputs, rng, [2])

    report, (tuned,) = run_child(tmp_path, cache_dir, inputs, how, True, "tuned")
    check_conv(tuned, xs[0], w, b, padding=1)
    (store,) = store_files(cache_dir)
    assert report["store"] == str(store)
    lines = store.read_text().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"-?\d+(,-?\d+)*:-?\d+(,-?\d+)*", lines[0]), lines

    # A new process, autotuning off: the measured choice comes from the store.
    report, (again,) = run_child(tmp_path, cache_dir, inputs, how, False, "again")
    assert "chosen_by=measurement" in report["explain"][0].splitlines()[0], report["explain"][0]
    ref.assert_identical(again, tuned)
    assert store.read_text().splitlines() == lines


def test_autotune_off_writes_nothing(tmp_path, rng):
    cache_dir = tmp_path / "plans"
    cache_dir.mkdir()
    inputs = tmp_path / "inputs.npz"
    w, b, xs = save_inputs(inputs, rng, [1, 2])
    report, results = run_child(tmp_path, cache_dir, inputs, "functional", False, "plain")
    for x, got in zip(xs, results):
        check_conv(got, x, w, b, padding=1)
    assert all(chosen(text)["chosen_by"] == "cost_model" for text in report["explain"])
    assert all(not f.read_text() for f in store_files(cache_dir))


# Values damaged in every way a reader must survive: each decodes to no
# valid plan (or to an absurd one) for the key it is stored under.
DAMAGED_VALUES = ["0,0,0,0,0", "3,-5,-5,-5,-5", "1,1000000000000,1,1,1", "9,1,1,1,1", "2,72,16,192",
                  "1,72,16,192,100000", "0,x,1,1,1", "99999999999999999999999,1,1,1,1", ""]
GARBAGE_LINES = ["", ":", "no colon here", "1,2,3:", ":1,2,3,4,5", "\x00\x01\x02:\x03", "1,2;3:4,5,6,7,8",
                 "-" * 5000 + ":1", "1,0,2,2:0,72,16,192,2,extra"]


@pytest.mark.parametrize("how", ["functional", "layer"])
def test_damaged_store_is_ignored(how, tmp_path, rng):
    cache_dir = tmp_path / "plans"
    cache_dir.mkdir()
    inputs = tmp_path / "inputs.npz"
    batches = list(range(1, len(DAMAGED_VALUES) + 1))
    w, b, xs = save_inputs(inputs, rng, batches)
    # Real keys for these calls come from an autotuning run; then every value is damaged.
    run_child(tmp_path, cache_dir, inputs, how, True, "tuned")
    (store,) = store_files(cache_dir)
    keys = [line.split(":")[0] for line in store.read_text().splitlines()]
    assert len(keys) == len(batches)
    lines = [f"{key}:{values}" for key, values in zip(keys, DAMAGED_VALUES)]
    store.write_bytes(("\n".join(GARBAGE_LINES[:4] + lines + GARBAGE_LINES[4:]) + "\n").encode("utf-8")
                      + b"\xff\xfe binary \x80\n")

    for tune in (False, True):
        report, results = run_child(tmp_path, cache_dir, inputs, how, tune, f"damaged-{tune}")
        for x, got, text in zip(xs, results, report["explain"]):
            check_conv(got, x, w, b, padding=1)
            assert "algo=" in text


def test_store_of_pure_garbage(tmp_path, rng):
    cache_dir = tmp_path / "plans"
    cache_dir.mkdir()
    inputs = tmp_path / "inputs.npz"
    w, b, xs = save_inputs(inputs, rng, [2])
    report, _ = run_child(tmp_path, cache_dir, inputs, "functional", False, "probe")
    Path(report["store"]).write_bytes(bytes(range(256)) * 64)
    for tune in (True, False):
        _, (got,) = run_child(tmp_path, cache_dir, inputs, "functional", tune, f"garbage-{tune}")
        check_conv(got, xs[0], w, b, padding=1)


@pytest.mark.parametrize("x_shape, w_shape, kwargs", CONV_SHAPES + [
    pytest.param((1, 64, 56, 56), (64, 64, 3, 3), dict(padding=1), id="r18-c2"),
    pytest.param((1, 3, 224, 224), (64, 3, 7, 7), dict(stride=2, padding=3), id="r18-stem"),
    pytest.param((1, 3, 8, 8), (256, 3, 3, 3), dict(padding=1), id="small-image-many-filters"),
])
def test_im2col_gemm_only_on_request(x_shape, w_shape, kwargs, rng):
    # It holds the whole image's im2col matrix (C*R*S times the input): even
    # with workspace free of charge the scheduler must not consider it.
    x = ref.randn(rng, x_shape, np.float32)
    w = ref.randn(rng, w_shape, np.float32)
    lk.set_scheduler(memory_weight=0.0)
    for text in (lk.explain(lk.conv2d, x, w, **kwargs), lk.Conv2d(w, **kwargs).describe(x),
                 lk.explain(lk.conv2d_max_pool2d, x, w, **kwargs)):
        assert "im2col_gemm" not in text, text
    pinned = lk.Conv2d(w, **kwargs, algorithm="im2col_gemm")
    assert chosen(pinned.describe(x))["algo"] == "im2col_gemm"
    check_conv(pinned(x), x, w, **kwargs)
