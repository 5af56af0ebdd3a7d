"""lk.Sequential: whole networks as one native call, against float64 references.

Each network is described once as a list of layer recipes; the recipe builds
both the lk modules and a float64 composition of the reference ops in
tests/reference.py, so a fused or re-laid-out stage is checked against the
plain definition of every layer.

Tolerance: the output of a chain carries the float32 rounding of each of its
sums; each sum of L terms contributes errors growing like sqrt(L) eps
relative to the magnitude of its terms, not of its result (a sum that cancels
to a small value keeps the absolute error of its terms). The reference
therefore carries, beside each value, that magnitude: the same chain on |x|
with |weights| (through a softmax, the output times twice the largest logit
magnitude of its row). 8 eps sqrt(sum of the chain's reduction lengths)
times (magnitude + |output| + the output's RMS) is well clear of blocked/FMA
summation orders, while a wrong tap, a missed bias, a shifted pooling window
or a permuted weight column costs O(1/sqrt(L)) of the output, far above it
(weights drawn like torch's default initialisation keep activations O(1)).
"""

from __future__ import annotations

import math
import pickle
import tracemalloc

import numpy as np
import pytest

import lepton_kernels as lk
from lepton_kernels import _core

import reference as ref

EPS32 = float(np.finfo(np.float32).eps)


# --- recipes -------------------------------------------------------------------


def _uniform(rng, shape, fan_in):
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


class Net:
    """A network from recipes: the lk modules, the float64 reference, the total reduction length."""

    def __init__(self, rng, in_shape, recipe):
        self.in_shape = in_shape  # per image
        self.modules, self.steps, self.mags = [], [], []
        self.reduction = 0
        shape = in_shape
        for kind, args in recipe:
            shape = getattr(self, "_" + kind)(rng, shape, **args)
        self.out_shape = shape

    def _conv(self, rng, shape, k, kernel=3, stride=1, padding=0, relu=False, pool=None, fused=False, bias=True):
        c, h, w = shape
        weight = _uniform(rng, (k, c, kernel, kernel), c * kernel * kernel)
        b = _uniform(rng, (k,), c * kernel * kernel) if bias else None
        act = "relu" if relu else None
        self.reduction += c * kernel * kernel
        p = (h + 2 * padding - kernel) // stride + 1
        q = (w + 2 * padding - kernel) // stride + 1
        if pool and fused:
            pk, ps = pool
            self.modules.append(lk.Conv2dMaxPool2d(weight, b, stride=stride, padding=padding, activation=act,
                                                   kernel_size=pk, pool_stride=ps))
        else:
            self.modules.append(lk.Conv2d(weight, b, stride=stride, padding=padding, activation=act))
        self.steps.append(lambda x: ref.conv2d(x, weight, b, stride=stride, padding=padding, activation=act))
        self.mags.append(lambda m: ref.conv2d(m, np.abs(weight), None if b is None else np.abs(b), stride=stride,
                                              padding=padding))
        if pool:
            pk, ps = pool
            if not fused:
                self.modules.append(lk.MaxPool2d(pk, ps))
            self.steps.append(lambda x: ref.max_pool2d(x, pk, ps)[0])
            self.mags.append(lambda m: ref.max_pool2d(m, pk, ps)[0])
            p, q = (p - pk) // ps + 1, (q - pk) // ps + 1
        return (k, p, q)

    def _pool(self, rng, shape, kernel, stride):
        self.modules.append(lk.MaxPool2d(kernel, stride))
        self.steps.append(lambda x: ref.max_pool2d(x, kernel, stride)[0])
        self.mags.append(lambda m: ref.max_pool2d(m, kernel, stride)[0])
        c, h, w = shape
        return (c, (h - kernel) // stride + 1, (w - kernel) // stride + 1)

    def _relu(self, rng, shape):
        self.modules.append(lk.ReLU())
        self.steps.append(ref.relu)
        self.mags.append(lambda m: m)
        return shape

    def _flatten(self, rng, shape):
        self.modules.append(lk.Flatten())
        self.steps.append(lambda x: x.reshape(x.shape[0], -1))
        self.mags.append(lambda m: m.reshape(m.shape[0], -1))
        return (math.prod(shape),)

    def _linear(self, rng, shape, n, relu=False, bias=True):
        k = shape[-1]
        weight = _uniform(rng, (n, k), k)
        b = _uniform(rng, (n,), k) if bias else None
        act = "relu" if relu else None
        self.reduction += k
        self.modules.append(lk.Linear(weight, b, activation=act))
        self.steps.append(lambda x: ref.linear(x, weight, b, activation=act))
        self.mags.append(lambda m: ref.linear(m, np.abs(weight), None if b is None else np.abs(b)))
        return shape[:-1] + (n,)

    def _softmax(self, rng, shape, log=False):
        self.modules.append(lk.LogSoftmax(1) if log else lk.Softmax(1))
        self.steps.append(lambda x: ref.log_softmax(x, 1) if log else ref.softmax(x, 1))
        self.mags.append("log_softmax" if log else "softmax")  # needs the values: see magnitude()
        return shape

    def _dropout(self, rng, shape):
        self.modules.append(lk.Dropout(0.3))
        return shape

    def sequential(self, **kwargs):
        return lk.Sequential(self.modules, **kwargs)

    def reference(self, x):
        return self.reference_and_magnitude(x)[0]

    def reference_and_magnitude(self, x):
        """The float64 output, and the magnitude its float32 rounding errors scale with (module docstring)."""
        y = x.astype(np.float64)
        m = np.abs(y)
        for step, mag in zip(self.steps, self.mags):
            y = step(y)
            if isinstance(mag, str):
                # A logit error d moves softmax output p by about p * d, log-softmax by d (and by the row's
                # weighted mean of d): twice the row's largest logit magnitude bounds both.
                worst = 2 * m.max(axis=1, keepdims=True)
                m = y * worst if mag == "softmax" else np.broadcast_to(worst, y.shape)
            else:
                m = mag(m)
        return y, m

    def check(self, got, x, context=""):
        expected, magnitude = self.reference_and_magnitude(x)
        assert got.shape == expected.shape, f"shape {got.shape} != {expected.shape}; {context}"
        assert got.dtype == np.float32
        tol = 8 * EPS32 * math.sqrt(max(self.reduction, 1))
        scale = float(np.sqrt(np.mean(np.square(expected)))) if expected.size else 1.0
        ref._assert_within(got, expected, tol * (magnitude + np.abs(expected) + scale), context)


MNIST = [("conv", dict(k=32, relu=True)), ("pool", dict(kernel=2, stride=2)), ("flatten", {}),
         ("linear", dict(n=10)), ("softmax", {})]
CIFAR = [("conv", dict(k=32, padding=1, relu=True)), ("pool", dict(kernel=2, stride=2)),
         ("conv", dict(k=64, padding=1, relu=True)), ("pool", dict(kernel=2, stride=2)), ("flatten", {}),
         ("linear", dict(n=128, relu=True)), ("linear", dict(n=10))]


def mnist(rng):
    return Net(rng, (1, 28, 28), MNIST)


def cifar(rng):
    return Net(rng, (3, 32, 32), CIFAR)


def _input(rng, net, n):
    return rng.standard_normal((n,) + net.in_shape).astype(np.float32)


# --- the reference networks ------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 16, 33])
def test_mnist(rng, n):
    net = mnist(rng)
    seq = net.sequential()
    x = _input(rng, net, n)
    net.check(seq(x), x, f"batch {n}")


@pytest.mark.parametrize("n", [1, 5, 64])
def test_cifar(rng, n):
    net = cifar(rng)
    seq = net.sequential()
    x = _input(rng, net, n)
    net.check(seq(x), x, f"batch {n}")


def test_mnist_large_batch(rng):
    net = mnist(rng)
    x = _input(rng, net, 256)
    net.check(net.sequential()(x), x)


@pytest.mark.parametrize("n", [1, 7])
def test_every_isa_level(rng, isa, n):
    for make in (mnist, cifar):
        net = make(rng)
        x = _input(rng, net, n)
        net.check(net.sequential()(x), x, f"{make.__name__} at {isa}")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts(rng, restore_threads, threads):
    lk.set_num_threads(threads)
    for make, n in ((mnist, 1), (mnist, 9), (cifar, 2), (cifar, 8)):
        net = make(rng)
        x = _input(rng, net, n)
        net.check(net.sequential()(x), x, f"{make.__name__} batch {n} on {threads} threads")


# Winograd F(4x4, 3x3) with the pool fused: a 3x3 stride-1 convolution,
# channels a multiple of 16, a 2x2 pool; 2x2 pooled outputs per tile, partial
# tiles at odd pooled sizes. After a direct stage (channels interleaved) with
# a linear after it (pixels x channels out), or last (channel planes out), or
# on channel planes (interleaved by the band copy).
# Filter counts on and off its 32-filter blocks, widths on and off its 8- and
# 4-tile blocks (pooled widths 1, 4, 7, 8, 9, 17), odd sizes that drop the
# last convolution row or column, padding 0 and 1, with and without bias and
# ReLU, the pool as its own layer or fused; every ISA level.
WINO_CASES = [  # (channels, filters, H, W, padding, relu, bias, fused)
    (16, 16, 6, 6, 1, True, True, False),
    (32, 64, 16, 16, 1, True, True, False),
    (16, 48, 11, 19, 0, False, True, True),
    (48, 80, 17, 15, 1, True, False, False),
    (32, 32, 9, 36, 1, False, False, True),
    (16, 16, 4, 18, 1, True, True, False),
]


def test_stem_stage_on_winograd_column_phases(rng, isa):
    # A ResNet-like head: the 7x7 stride-2 stem (F(4, 4) on the column phases with AVX-512) with ReLU, a 3x3
    # pool, a 3x3 convolution and a linear; image by image in lanes (tile mode) and over the batch (layer mode).
    recipe = [("conv", dict(k=16, kernel=7, stride=2, padding=3, relu=True)), ("pool", dict(kernel=3, stride=2)),
              ("conv", dict(k=16, padding=1, relu=True)), ("flatten", {}), ("linear", dict(n=10))]
    net = Net(rng, (3, 30, 180), recipe)
    seq = net.sequential()
    for n in (1, 3, 8):
        assert ("F(4,4) on column phases" in seq.describe((n, 3, 30, 180))) == (isa == "avx512")
        x = _input(rng, net, n)
        net.check(seq(x), x, f"batch {n} at {isa}")


@pytest.mark.parametrize("case", range(len(WINO_CASES)))
def test_winograd_stage(rng, isa, case):
    c, k, h, w, padding, relu, bias, fused = WINO_CASES[case]
    recipe = [("conv", dict(k=c, padding=1, relu=True, pool=(2, 2), fused=True)),
              ("conv", dict(k=k, padding=padding, relu=relu, bias=bias, pool=(2, 2), fused=fused)),
              ("flatten", {}), ("linear", dict(n=10))]
    net = Net(rng, (3, 2 * h, 2 * w), recipe)
    seq = net.sequential()
    for n in (1, 3, 8):
        assert "winograd F(4x4,3x3)" in seq.describe((n, 3, 2 * h, 2 * w)), seq.describe((n, 3, 2 * h, 2 * w))
        x = _input(rng, net, n)
        net.check(seq(x), x, f"case {WINO_CASES[case]}, batch {n} at {isa}")
    # A NaN in the input reaches exactly the outputs whose windows hold it.
    x = _input(rng, net, 2)
    x[1, :, 5, 7] = np.nan
    y = seq(x)
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all()
    # Spatial only: the last stage writes channel planes.
    spatial = Net(rng, (3, 2 * h, 2 * w), recipe[:2])
    x = _input(rng, spatial, 3)
    assert "winograd F(4x4,3x3)" in spatial.sequential().describe(x.shape)
    spatial.check(spatial.sequential()(x), x, f"case {WINO_CASES[case]}, spatial only at {isa}")
    # The second layer alone, on channel planes, and with a linear after it.
    for second in (recipe[1:2], recipe[1:]):
        planes = Net(rng, (c, h, w), second)
        x = _input(rng, planes, 3)
        x[1] = x[1, :, ::-1]  # strided rows in the batch's middle image are read the same
        assert "winograd F(4x4,3x3)" in planes.sequential().describe(x.shape)
        planes.check(planes.sequential()(x), x, f"case {WINO_CASES[case]}, on planes at {isa}")


# Winograd F(2, 3) along rows for a first layer (1 to 4 planes), the pool
# fused: pooled widths on and off its 2-tile blocks and 16-tile chunks (1, 4,
# 13, 16, 34), odd sizes that drop the last convolution row or column,
# filters on and off the vector widths, padding 0 and 1, with and without
# bias and ReLU; pixels x channels out (a linear after it: fused into the
# kernel's epilogue at batches of a few) and channel planes out.
WINO_ROW_CASES = [  # (planes, filters, H, W, padding, relu, bias)
    (1, 32, 28, 28, 0, True, True),
    (3, 32, 32, 32, 1, True, True),
    (2, 48, 11, 70, 0, False, True),
    (4, 16, 9, 8, 1, True, False),
    (1, 16, 5, 4, 0, False, False),
]


# Below AVX-512 the taps are faster (conv_direct.inc's kWinoRowTiles).
ROWS_KERNEL = {"avx512": "winograd F(2,3) on rows", "avx2": "f32_conv_direct_", "generic": "f32_conv_direct_"}


@pytest.mark.parametrize("case", range(len(WINO_ROW_CASES)))
def test_winograd_rows_stage(rng, restore_threads, isa, case):
    c, k, h, w, padding, relu, bias = WINO_ROW_CASES[case]
    conv = [("conv", dict(k=k, padding=padding, relu=relu, bias=bias, pool=(2, 2), fused=True))]
    for recipe in (conv + [("flatten", {}), ("linear", dict(n=10))], conv):
        net = Net(rng, (c, h, w), recipe)
        seq = net.sequential()
        for threads, n in ((2, 1), (2, 3), (1, 2), (2, 8)):
            lk.set_num_threads(threads)
            assert ROWS_KERNEL[isa] in seq.describe((n, c, h, w)), seq.describe((n, c, h, w))
            x = _input(rng, net, n)
            net.check(seq(x), x, f"case {WINO_ROW_CASES[case]}, {recipe[-1][0]} last, batch {n} at {isa}")


def test_winograd_rows_near_overflow(rng, isa):
    # Inputs up to the direct kernel's bound (1e37 over the largest sum of
    # |weights|: no sum of a filter overflows) go through the transforms,
    # whose sums stay within 4x that; larger finite ones take the taps. Both
    # give the convolution's values.
    w = _uniform(rng, (16, 1, 3, 3), 9)
    seq = lk.Sequential([lk.Conv2d(w), lk.MaxPool2d(2)])
    assert ROWS_KERNEL[isa] in seq.describe((2, 1, 12, 12))
    bound = 1e37 / float(np.abs(w).reshape(16, -1).sum(axis=1).max())
    x = rng.uniform(-1, 1, (2, 1, 12, 12)).astype(np.float32)
    for top in (bound / 4, bound * 0.999, bound * 4):
        xs = (x / np.abs(x).max() * np.float32(top)).astype(np.float32)
        expected = ref.max_pool2d(ref.conv2d(xs.astype(np.float64), w), 2)[0]
        magnitude = ref.conv2d(np.abs(xs).astype(np.float64), np.abs(w))
        tol = 8 * EPS32 * 3 * ref.max_pool2d(magnitude, 2)[0]
        ref._assert_within(seq(xs), expected, tol, f"inputs up to {top:.3g} at {isa}")
    # F(4x4, 3x3), whose transforms grow magnitudes more, takes inputs up to 1e-5 of that bound.
    w = _uniform(rng, (16, 16, 3, 3), 144)
    seq = lk.Sequential([lk.Conv2d(w, padding=1), lk.MaxPool2d(2)])
    assert "winograd F(4x4,3x3)" in seq.describe((2, 16, 8, 8))
    bound = 1e37 / float(np.abs(w).reshape(16, -1).sum(axis=1).max())
    x = rng.uniform(-1, 1, (2, 16, 8, 8)).astype(np.float32)
    for top in (bound * 1e-6, bound * 1e-4, bound * 0.999):
        xs = (x / np.abs(x).max() * np.float32(top)).astype(np.float32)
        expected = ref.max_pool2d(ref.conv2d(xs.astype(np.float64), w, padding=1), 2)[0]
        magnitude = ref.conv2d(np.abs(xs).astype(np.float64), np.abs(w), padding=1)
        tol = 8 * EPS32 * 12 * ref.max_pool2d(magnitude, 2)[0]
        ref._assert_within(seq(xs), expected, tol, f"F(4x4): inputs up to {top:.3g} at {isa}")
    # The input transform's worst case: filters of one tap (the corner that meets element (5, 5) of
    # B^T d B) and an input whose signs follow that row of B^T in every tile (tiles 4 pixels apart,
    # from the padding): that element is 100x the input, its products 100x the taps' largest sum,
    # which overflows near the bound while every sum of the taps stays within it.
    w = np.zeros((16, 16, 3, 3), np.float32)
    w[:, :, 2, 2] = rng.uniform(0.5, 1.0, (16, 16)).astype(np.float32)
    seq = lk.Sequential([lk.Conv2d(w, padding=1), lk.MaxPool2d(2)])
    bound = 1e37 / float(np.abs(w).reshape(16, -1).sum(axis=1).max())
    sign = np.array([0, 1, 0, -1], np.float64)[(np.arange(16) + 1) % 4]
    xs = (np.float32(bound * 0.999) * np.outer(sign, sign)).astype(np.float32)[None, None].repeat(16, axis=1)
    expected = ref.max_pool2d(ref.conv2d(xs.astype(np.float64), w, padding=1), 2)[0]
    magnitude = ref.max_pool2d(ref.conv2d(np.abs(xs).astype(np.float64), np.abs(w), padding=1), 2)[0]
    assert np.isfinite(expected).all() and np.abs(expected).max() > 1e36
    ref._assert_within(seq(xs), expected, 8 * EPS32 * 12 * magnitude, f"F(4x4): the transforms' worst case at {isa}")


@pytest.mark.parametrize("h,w", [(12, 12), (9, 14), (5, 7)])
def test_winograd_unpooled_stages(rng, isa, h, w):
    # Unpooled, F(2x2, 3x3) (4 outputs per tile, partial tiles at odd sizes): channel planes out,
    # pixels x channels out (to a linear, or to a pooled direct stage), and on pixels x channels in
    # after a direct stage.
    conv = ("conv", dict(k=32, padding=1, relu=True))
    pooled = ("conv", dict(k=16, padding=1, relu=True, pool=(2, 2), fused=True))
    for recipe in ([conv], [conv, ("flatten", {}), ("linear", dict(n=10))], [conv, pooled, ("flatten", {}),
                   ("linear", dict(n=5))], [pooled, conv]):
        net = Net(rng, (16, h, w), recipe)
        seq = net.sequential()
        assert "winograd F(2x2,3x3) ukernel" in seq.describe((3, 16, h, w)), seq.describe((3, 16, h, w))
        for n in (1, 3, 8):
            x = _input(rng, net, n)
            net.check(seq(x), x, f"recipe {recipe}, batch {n} at {isa}")


@pytest.mark.parametrize("threads", [2, 3])
def test_winograd_filter_groups_and_blocks(rng, restore_threads, isa, threads):
    # F(2x2) takes a band's tiles in blocks across tile rows (more tiles than one block holds, partial tiles at
    # odd sizes), and where images and rows are few the threads split the filters (512 -> 512 channels on 7x7,
    # smaller): each group's tiles, output transposes and, for bands holding a NaN, taps stay within its filters.
    lk.set_num_threads(threads)
    cases = [((64, 7, 7), [64]), ((128, 21, 23), [32]), ((32, 5, 9), [96]), ((64, 6, 6), [128, 64])]
    for shape, filters in cases:
        net = Net(rng, shape, [("conv", dict(k=k, padding=1, relu=i == 0)) for i, k in enumerate(filters)])
        seq = net.sequential()
        plan = seq.describe((1,) + shape)
        assert plan.count("winograd F(2x2,3x3) ukernel") == len(filters), plan
        if shape[1] <= 7 and any(filters[0] % (32 * g) == 0 for g in range(2, threads + 1)):
            assert "filter_groups=" in plan, plan  # one band of the image, its filters in equal groups of 32s
        for n in (1, 2):
            x = _input(rng, net, n)
            net.check(seq(x), x, f"{shape} -> {filters}, batch {n}, {threads} threads at {isa}")
            x[n - 1, 0, 2, 3] = np.nan
            y = seq(x)
            with np.errstate(invalid="ignore"):
                expected = net.reference(x)
            assert np.isnan(expected).any()
            assert np.array_equal(np.isnan(y), np.isnan(expected)), f"{shape}: NaN positions at {isa}"
            fine = ~np.isnan(expected)
            ref._assert_within(y[fine], expected[fine], 8 * EPS32 * math.sqrt(net.reduction) * (1 + np.abs(expected[fine])),
                               f"{shape} -> {filters} with a NaN at {isa}")


def test_outputs_past_the_cache_stream_image_by_image(rng, restore_threads):
    # A tile-mode output over 16 MB goes to memory with streaming stores, from each lane's buffer; the values
    # are those of the same images in batches that do not stream, into out= arrays however aligned.
    lk.set_num_threads(2)
    x = ref.randn(rng, (300, 1, 28, 28), np.float32)  # 300 x 32 x 26 x 26 floats: 26 MB
    w, b = ref.randn(rng, (32, 1, 3, 3), np.float32), ref.randn(rng, 32, np.float32)
    layer = lk.Conv2d(w, b, activation="relu")
    assert "streamed" in layer.describe(x)
    assert "streamed" not in layer.describe(x[:30])
    y = layer(x)
    ref.assert_identical(y, np.concatenate([layer(x[i:i + 30]) for i in range(0, 300, 30)]))
    for shift in (1, 2, 3):  # out= starting 4, 8 and 12 bytes past a 16-byte boundary
        buf = np.full(y.size + 4, np.nan, np.float32)
        start = (-buf.ctypes.data // 4) % 4 + shift
        out = buf[start:start + y.size].reshape(y.shape)
        assert layer(x, out=out) is out
        ref.assert_identical(out, y, f"out= shifted by {shift}")
    magnitude = ref.conv2d(np.abs(x[:4]), np.abs(w), np.abs(b))
    ref.assert_sum_close(y[:4], ref.conv2d(x[:4], w, b, activation="relu"), magnitude, 10, np.float32)


@pytest.mark.parametrize("channels,padding,relu,dense", [(1, 0, True, False), (3, 1, False, False),
                                                         (32, 1, True, False), (32, 0, False, True)])
def test_pooled_nan_and_inf(rng, isa, channels, padding, relu, dense):
    # The direct and Winograd kernels pool in registers with torch's rule (a
    # NaN in a window wins); infinities give the reference's infinities, or its
    # NaN where they meet with opposite signs. The 32-channel layer runs after
    # a direct stage, so it reaches the Winograd kernel (where an infinity of
    # the first layer meets filters of both signs: NaN, as in the reference).
    recipe = [("conv", dict(k=channels, padding=1, relu=True, pool=(2, 2)))] if channels > 3 else []
    recipe.append(("conv", dict(k=32, padding=padding, relu=relu, pool=(2, 2))))
    if dense:  # F(4x4, 3x3) for the 32-channel layer
        recipe += [("flatten", {}), ("linear", dict(n=5))]
    c0 = 3 if channels > 3 else channels
    net = Net(rng, (c0, 24, 24), recipe)
    seq = net.sequential()
    x = _input(rng, net, 5)
    x[0, 0, 3, 4] = np.nan
    x[1, -1, 6, 6] = np.inf
    x[2, 0, 0, 0] = -np.inf
    x[3, 0, 23, 23] = np.nan
    x[4, 0, 9, 9], x[4, 0, 9, 10] = np.inf, -np.inf
    y = seq(x)
    with np.errstate(invalid="ignore"):  # inf - inf in the reference's sums
        expected = net.reference(x)
    assert np.isnan(expected).any() and (channels > 3 or np.isinf(expected).any())
    ref._assert_within(y, expected, 8 * EPS32 * math.sqrt(net.reduction) * (1 + np.abs(np.nan_to_num(expected))),
                       f"at {isa}")


@pytest.mark.parametrize("threads", [2, 3])
def test_split_direct_and_linear(rng, restore_threads, isa, threads):
    # A few images in layer mode: the direct stage's output pixels and the
    # linear's features split among the threads in one hand-off, partial sums
    # added after (with the bias, ReLU and softmax). Runs of pixels starting and
    # ending inside rows, pooled and not, batches 1-4, every ISA level. A
    # linear of up to 16 outputs runs in the direct kernel's epilogue (filters
    # in one block of 32 or 16, or several; a 17-output one after the stage).
    lk.set_num_threads(threads)
    small = Net(rng, (2, 7, 40), [("conv", dict(k=32, relu=True, pool=(2, 2), fused=True)), ("flatten", {}),
                                  ("linear", dict(n=7, relu=True)), ("linear", dict(n=3)), ("softmax", {})])
    plain = Net(rng, (3, 9, 23), [("conv", dict(k=16, padding=1)), ("flatten", {}), ("linear", dict(n=5))])
    wide = Net(rng, (1, 12, 30), [("conv", dict(k=64, relu=True, pool=(2, 2), fused=True)), ("flatten", {}),
                                  ("linear", dict(n=16))])
    odd = Net(rng, (2, 10, 17), [("conv", dict(k=48, padding=1, relu=True)), ("flatten", {}),
                                 ("linear", dict(n=17)), ("softmax", {})])
    for net, outputs in ((mnist(rng), 10), (small, 7), (plain, 5), (wide, 16), (odd, 17)):
        seq = net.sequential()
        for n in (1, 2, 3, 4):
            x = _input(rng, net, n)
            net.check(seq(x), x, f"batch {n} on {threads} threads")
        stage0 = next(line for line in seq.describe((1,) + net.in_shape).splitlines() if "stage 0" in line)
        if "split with" in stage0:
            assert ("which it takes in its epilogue" in stage0) == (outputs <= 16), stage0
    # The split rides on the direct stage's own hand-off: it is there whenever
    # the cost model (the pool's measured hand-off time) runs that stage on
    # several threads.
    d = mnist(rng).sequential().describe((1, 1, 28, 28))
    stage0 = next(line for line in d.splitlines() if "stage 0" in line)
    assert ("split with the next stage's features" in stage0) == (" threads=1 " not in stage0), d


@pytest.mark.parametrize("threads", [2, 3])
def test_dense_stages_in_the_lanes(rng, restore_threads, isa, threads):
    # Tile mode with small linears after the spatial stages: each lane runs
    # every 4 images it takes through them (two linears: the lane's own
    # buffers between them; ReLU, softmax; lanes ending with a short block;
    # 13 outputs: passes of the dense kernel; 13 features: its scalar tail). Linears the batch's plan gives the GEMM
    # (a 2 MB one here) stay stages of their own.
    lk.set_num_threads(threads)
    net = Net(rng, (3, 14, 14), [("conv", dict(k=16, padding=1, relu=True, pool=(2, 2))), ("flatten", {}),
                                 ("linear", dict(n=13, relu=True)), ("linear", dict(n=10, bias=False)),
                                 ("softmax", dict(log=True))])
    seq = net.sequential()
    for n in (2 * threads, 9, 16, 33):
        x = _input(rng, net, n)
        net.check(seq(x), x, f"batch {n} on {threads} threads")
        # In the lanes when the batch's plans give both linears the dot kernel
        # (always with AVX-512's 32-wide GEMM tiles; narrower ones may take the GEMM).
        d = seq.describe(x.shape)
        dot = all("algo=dot" in line for line in d.splitlines() if "] linear" in line)
        assert ("run in the lanes" in d) == dot and (dot or isa != "avx512"), d
    net = mnist(rng)
    x = _input(rng, net, 17)
    net.check(net.sequential()(x), x)
    assert "run in the lanes" not in cifar(rng).sequential().describe((8, 3, 32, 32))


# --- random chains -------------------------------------------------------------------


def _random_chain(rng):
    """A random CNN: 1-2 conv blocks (filters on and off the direct kernel's multiples of 16, paddings,
    strides, pools fused or separate, ReLU as activation or module), then dense layers and maybe a softmax."""
    c = int(rng.choice([1, 2, 3, 5]))
    h, w = int(rng.integers(9, 22)), int(rng.integers(9, 22))
    recipe, shape = [], (c, h, w)
    for _ in range(int(rng.integers(1, 3))):
        kernel = int(rng.choice([1, 2, 3, 5]))
        padding = int(rng.integers(0, kernel // 2 + 1))
        stride = int(rng.choice([1, 1, 2]))
        k = int(rng.choice([16, 32, 48, 5, 24]))
        p = (shape[1] + 2 * padding - kernel) // stride + 1
        q = (shape[2] + 2 * padding - kernel) // stride + 1
        if min(p, q) < 1:
            break
        pool = None
        if min(p, q) >= 4 and rng.random() < 0.7:
            pool = [(2, 2), (3, 2), (2, 1)][int(rng.integers(0, 3))]
        relu = rng.random() < 0.7
        fused = bool(pool) and rng.random() < 0.5
        recipe.append(("conv", dict(k=k, kernel=kernel, stride=stride, padding=padding, relu=relu and not fused,
                                    pool=pool, fused=fused)))
        if relu and fused:
            recipe[-1][1]["relu"] = True
        elif not relu and rng.random() < 0.5:
            recipe.append(("relu", {}))
        shape = (k, p, q) if not pool else (k, (p - pool[0]) // pool[1] + 1, (q - pool[0]) // pool[1] + 1)
    recipe.append(("flatten", {}))
    if rng.random() < 0.3:
        recipe.append(("dropout", {}))
    for _ in range(int(rng.integers(1, 3))):
        recipe.append(("linear", dict(n=int(rng.choice([1, 10, 17, 64])), relu=rng.random() < 0.5,
                                      bias=rng.random() < 0.8)))
    r = rng.random()
    if r < 0.25:
        recipe.append(("softmax", {}))
    elif r < 0.4:
        recipe.append(("softmax", dict(log=True)))
    return (c, h, w), recipe


@pytest.mark.parametrize("case", range(24))
def test_random_chains(seed, case):
    rng = np.random.default_rng([seed, case])
    in_shape, recipe = _random_chain(rng)
    net = Net(rng, in_shape, recipe)
    seq = net.sequential()
    for n in (1, int(rng.choice([2, 3, 5])), int(rng.choice([8, 17, 40]))):
        x = _input(rng, net, n)
        net.check(seq(x), x, f"recipe {recipe}, input {(n,) + in_shape}")


def test_mlp_and_spatial_only_chains(rng):
    mlp = Net(rng, (37,), [("linear", dict(n=64, relu=True)), ("linear", dict(n=10)), ("softmax", dict(log=True))])
    x = rng.standard_normal((11, 37)).astype(np.float32)
    mlp.check(mlp.sequential()(x), x)
    conv = Net(rng, (3, 12, 12), [("conv", dict(k=16, padding=1)), ("relu", {}), ("pool", dict(kernel=2, stride=2)),
                                  ("conv", dict(k=8, kernel=3))])
    x = rng.standard_normal((6, 3, 12, 12)).astype(np.float32)
    conv.check(conv.sequential()(x), x)


def test_standalone_softmax_and_relu_stages(rng):
    # A softmax over channels of a feature map, a ReLU after a pool: stages of their own.
    w = _uniform(rng, (16, 2, 3, 3), 18)
    seq = lk.Sequential([lk.Conv2d(w), lk.MaxPool2d(2), lk.ReLU(), lk.Softmax(dim=1)])
    x = rng.standard_normal((3, 2, 10, 10)).astype(np.float32)
    expected = ref.softmax(ref.relu(ref.max_pool2d(ref.conv2d(x.astype(np.float64), w), 2)[0]), 1)
    ref._assert_within(seq(x), expected, 64 * EPS32, "softmax over channels")


def test_overflowing_sums_keep_the_nan_rule(isa):
    # Finite inputs whose products overflow float32. Without fused
    # multiply-adds (the generic level) a window meeting +inf and -inf products
    # sums to NaN, which the pool must pass on (a NaN wins); with them a sum
    # that overflowed stays infinite. The direct kernel's shortcut for inputs
    # too small to overflow (a plain maximum) must not apply to these.
    w = np.zeros((16, 1, 3, 3), np.float32)
    w[:, 0, 0, 0] = 2
    w[:, 0, 0, 1] = np.linspace(1, 2, 16, dtype=np.float32)
    x = np.zeros((2, 1, 10, 10), np.float32)
    x[0, 0, 2, 2], x[0, 0, 2, 3] = 3e38, -3e38
    x[1, 0, 5, 6] = 3e38
    seq = lk.Sequential([lk.Conv2d(w), lk.ReLU(), lk.MaxPool2d(2)])
    assert ROWS_KERNEL[isa] in seq.describe(x.shape)  # F(2, 3) takes the taps for these inputs
    fused = isa != "generic"
    with np.errstate(over="ignore", invalid="ignore"):
        conv = np.zeros((2, 16, 8, 8), np.float32)
        for r in range(3):  # the kernel's order of taps
            for c in range(3):
                product = w[None, :, 0, r, c, None, None].astype(np.float64) * x[:, :, r:r + 8, c:c + 8]
                if fused:  # rounded once, after the addition
                    conv = (conv + product).astype(np.float32)
                else:
                    conv = conv + product.astype(np.float32)
        conv = np.where(np.isnan(conv), conv, np.maximum(conv, 0))
        expected = conv.reshape(2, 16, 4, 2, 4, 2).max(axis=(3, 5))
    assert np.isinf(expected).any() and (fused or np.isnan(expected).any())
    np.testing.assert_array_equal(seq(x), expected, err_msg=f"at {isa}")


# --- arrays --------------------------------------------------------------------------


def test_input_layouts_and_unmodified(rng):
    net = mnist(rng)
    seq = net.sequential()
    base = rng.standard_normal((6, 28, 2, 28)).astype(np.float32)
    planes = rng.standard_normal((6, 2, 28, 28)).astype(np.float32)
    for x in (base[:, :, :1].transpose(0, 2, 1, 3),            # non-contiguous
              planes[:, 1:],                                    # contiguous rows read in place, images apart
              np.asfortranarray(base[:, :, :1].transpose(0, 2, 1, 3)),
              base[::-1, :, 1:].transpose(0, 2, 1, 3)[:, :, ::-1, ::-1]):  # negative strides
        before = x.copy()
        net.check(seq(x), x, f"strides {x.strides}")
        np.testing.assert_array_equal(x, before)
    mlp = Net(rng, (9,), [("linear", dict(n=4))])
    x = rng.standard_normal((9, 5)).astype(np.float32).T
    before = x.copy()
    mlp.check(mlp.sequential()(x), x, "transposed rows")
    np.testing.assert_array_equal(x, before)


def test_unbatched_out_and_empty_batch(rng):
    net = mnist(rng)
    seq = net.sequential()
    x = rng.standard_normal((1, 28, 28)).astype(np.float32)
    y = seq(x)
    assert y.shape == (10,)
    net.check(y[None], x[None])
    out = ref.poisoned((4, 10), np.float32)
    xb = _input(rng, net, 4)
    assert seq(xb, out=out) is out
    net.check(out, xb)
    with pytest.raises(ValueError, match="out"):
        seq(xb, out=np.empty((4, 11), np.float32))
    y0 = seq(np.empty((0, 1, 28, 28), np.float32))
    assert y0.shape == (0, 10)


def test_fresh_outputs(rng):
    net = mnist(rng)
    seq = net.sequential()
    x = _input(rng, net, 3)
    a, b = seq(x), seq(x)
    assert not np.may_share_memory(a, b)
    np.testing.assert_array_equal(a, b)
    a[:] = np.nan
    net.check(seq(x), x)


# --- plans ---------------------------------------------------------------------------


def test_describe(rng, restore_threads):
    lk.set_num_threads(2)
    seq = mnist(rng).sequential()
    with pytest.raises(ValueError, match="no call yet"):
        seq.describe()
    d1 = seq.describe((1, 1, 28, 28))
    first = "conv2d(winograd)" if lk.get_isa() == "avx512" else "conv2d(direct)"  # F(2, 3) on rows
    for part in ("stage 0 [layers 0-1]", first + "+relu+max_pool2d", "linear+softmax", "mode: layer",
                 "arena_bytes=", "predicted_us=", "threads=2"):
        assert part in d1, (part, d1)
    d64 = seq.describe(np.zeros((64, 1, 28, 28), np.float32))
    assert "mode: tile" in d64 and "2 lanes" in d64 and "about 32 images each" in d64, d64
    assert "out=pixels_x_channels" in d64 and "in=pixels_x_channels" in d64
    seq(np.zeros((5, 1, 28, 28), np.float32))
    assert "with N=5" in seq.describe()
    cif = cifar(rng).sequential().describe((64, 3, 32, 32))
    assert "[layers 2-3] conv2d(winograd)+relu+max_pool2d" in cif and "linear+relu" in cif, cif
    # Filters not a multiple of 16: the GEMM convolution with pooling fused band by band.
    gemm = Net(rng, (3, 12, 12), [("conv", dict(k=24, padding=1)), ("relu", {}), ("pool", dict(kernel=2, stride=2)),
                                  ("flatten", {}), ("linear", dict(n=5))])
    gseq = gemm.sequential()
    d = gseq.describe((2, 3, 12, 12))
    assert "[layers 0-2] conv2d+max_pool2d+relu" in d and "pooled_rows_per_band=" in d, d
    x = _input(rng, gemm, 2)
    gemm.check(gseq(x), x)
    assert seq.arena_bytes((64, 1, 28, 28)) > 0


def test_replans_once_per_batch_size(rng):
    net = mnist(rng)
    seq = net.sequential()
    assert seq.plans_made == 0
    for n in (1, 4, 1, 4, 4, 1):
        x = _input(rng, net, n)
        net.check(seq(x), x)
    assert seq.plans_made == 2
    seq(_input(rng, net, 9))
    assert seq.plans_made == 3
    assert seq.output_shape((7, 1, 28, 28)) == (7, 10)


def test_no_allocation_per_call(rng):
    net = cifar(rng)
    seq = net.sequential()
    for n in (1, 8):
        x = _input(rng, net, n)
        seq(x)
        arenas = _core.network_arena_allocations()
        tracemalloc.start()
        try:
            seq(x)
            base, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            for _ in range(20):
                y = seq(x)
                del y
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Per call: the output array (n x 10 floats) and Python's small objects, nothing batch-sized.
        assert peak - base < 4096 + 2 * n * 10 * 4, (n, peak - base)
        assert _core.network_arena_allocations() == arenas


# --- errors --------------------------------------------------------------------------


def test_errors(rng):
    w = _uniform(rng, (32, 1, 3, 3), 9)
    lin = lk.Linear(_uniform(rng, (10, 100), 100))
    seq = lk.Sequential([lk.Conv2d(w), lk.MaxPool2d(2), lk.Flatten(), lin])
    with pytest.raises(ValueError, match=r"layer 3 \(Linear\).*100 input features.*5408"):
        seq(np.zeros((2, 1, 28, 28), np.float32))
    seq2 = lk.Sequential([lk.Conv2d(w), lk.Conv2d(w)])
    with pytest.raises(ValueError, match=r"layer 1 \(Conv2d\).*1 input channels, got 32"):
        seq2(np.zeros((1, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"layer 0 \(Conv2d\)"):
        lk.Sequential([lk.Conv2d(w)])(np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"layer 0 \(Linear\).*100 input features"):
        lk.Sequential([lin])(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"layer 1 \(Linear\).*Flatten"):
        lk.Sequential([lk.Conv2d(w), lin])(np.zeros((1, 1, 12, 12), np.float32))
    with pytest.raises(TypeError, match=r"layer 1 \(str\)"):
        lk.Sequential([lk.ReLU(), "relu"])
    with pytest.raises(TypeError, match=r"layer 0 \(Conv2d\).*float32"):
        lk.Sequential([lk.Conv2d(w.astype(np.float64))])
    with pytest.raises(ValueError, match=r"layer 0 \(MaxPool2d\).*return_indices"):
        lk.Sequential([lk.MaxPool2d(2, return_indices=True)])
    with pytest.raises(ValueError, match=r"layer 1 \(Flatten\).*start_dim"):
        lk.Sequential([lk.ReLU(), lk.Flatten(0)])
    with pytest.raises(ValueError, match=r"layer 0 \(Softmax\).*batch"):
        lk.Sequential([lk.Softmax(0)])(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="single layer"):
        lk.Sequential(lk.ReLU())
    with pytest.raises(TypeError, match="float32"):
        seq2(np.zeros((1, 1, 28, 28), np.float64))
    with pytest.raises(TypeError, match="input"):
        seq2([[1.0]])
    with pytest.raises(ValueError, match="input"):
        lk.Sequential([lk.Conv2d(w)])(np.zeros((28, 28), np.float32))
    with pytest.raises(ValueError, match="max_bytes"):
        lk.Sequential([lk.ReLU()], result_cache=-1)
    with pytest.raises(ValueError, match="p"):
        lk.Dropout(1.5)


# --- result cache ---------------------------------------------------------------------


def test_result_cache(rng):
    net = mnist(rng)
    out_bytes = 4 * 10 * 4
    seq = net.sequential(result_cache=2 * out_bytes)
    xs = [_input(rng, net, 4) for _ in range(3)]
    y0 = seq(xs[0])
    net.check(y0, xs[0])
    assert seq.result_cache_info() == lk.ResultCacheInfo(0, 1, out_bytes, 1, 2 * out_bytes)
    y0b = seq(xs[0].copy())  # same content, another array: a hit
    np.testing.assert_array_equal(y0b, y0)
    assert not np.may_share_memory(y0, y0b)
    assert seq.result_cache_info().hits == 1
    # No aliasing: changing what was returned does not reach the cache.
    y0b[:] = -1.0
    np.testing.assert_array_equal(seq(xs[0]), y0)
    # Mutating the input: new content, computed afresh.
    x = xs[0].copy()
    seq(x)
    x[0, 0, 5, 5] += 1.0
    y_new = seq(x)
    net.check(y_new, x)
    assert not np.array_equal(y_new, y0)
    # Bounded in bytes, least recently used evicted first.
    seq.result_cache_clear()
    assert seq.result_cache_info() == lk.ResultCacheInfo(0, 0, 0, 0, 2 * out_bytes)
    seq(xs[0]), seq(xs[1]), seq(xs[0]), seq(xs[2])  # xs[1] is the least recently used when xs[2] arrives
    info = seq.result_cache_info()
    assert info.entries == 2 and info.bytes == 2 * out_bytes and info.misses == 3 and info.hits == 1
    seq(xs[0])
    assert seq.result_cache_info().hits == 2
    seq(xs[1])
    assert seq.result_cache_info().misses == 4
    # Same bytes, another shape: another key.
    flat = xs[2][:2]
    seq(flat)
    assert seq.result_cache_info().misses == 5
    # Shrinking the bound evicts down to it (the 2-image output stays); outputs larger than it are not stored.
    seq.enable_result_cache(out_bytes - 1)
    assert seq.result_cache_info()[2:4] == (out_bytes // 2, 1)
    seq(xs[0])
    assert seq.result_cache_info()[2:4] == (out_bytes // 2, 1)


def test_result_cache_opt_in_and_unbatched(rng):
    net = mnist(rng)
    seq = net.sequential()
    assert seq.result_cache_info() == lk.ResultCacheInfo(0, 0, 0, 0, 0)
    seq.enable_result_cache(1 << 20)
    x = rng.standard_normal((1, 28, 28)).astype(np.float32)
    a, b = seq(x), seq(x)
    assert a.shape == (10,) and seq.result_cache_info().hits == 1
    np.testing.assert_array_equal(a, b)
    out = np.empty(10, np.float32)
    assert seq(x, out=out) is out
    np.testing.assert_array_equal(out, a)


# --- pickling ---------------------------------------------------------------------------


def test_pickle_round_trip(rng):
    for make, n in ((mnist, 3), (cifar, 2)):
        net = make(rng)
        seq = net.sequential(result_cache=1 << 16)
        x = _input(rng, net, n)
        y = seq(x)
        clone = pickle.loads(pickle.dumps(seq))
        np.testing.assert_array_equal(clone(x), y)
        assert clone.result_cache_info().max_bytes == 1 << 16
        assert clone.result_cache_info().entries == 1  # its own call above; nothing carried over
        assert len(clone) == len(seq) and [type(m) for m in clone] == [type(m) for m in seq]
    fused = Net(rng, (2, 10, 10), [("conv", dict(k=16, padding=1, pool=(2, 2), fused=True, relu=True)),
                                   ("flatten", {}), ("dropout", {}), ("linear", dict(n=3)),
                                   ("softmax", dict(log=True))])
    seq = fused.sequential()
    x = rng.standard_normal((2, 2, 10, 10)).astype(np.float32)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(seq))(x), seq(x))


# --- modules on their own -----------------------------------------------------------------


def test_modules_standalone(rng):
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(lk.ReLU()(x), np.maximum(x, 0))
    assert lk.Flatten()(x).shape == (3, 20) and lk.Flatten(0)(x).shape == (60,)
    ref.assert_softmax_close(lk.Softmax(1)(x), x, 1, log=False)
    ref.assert_softmax_close(lk.LogSoftmax(-1)(x), x, -1, log=True)
    assert lk.Dropout(0.2)(x) is x
    inner = lk.Sequential([lk.ReLU(), lk.Flatten()])
    outer = lk.Sequential([inner, lk.Softmax(1)])
    assert len(outer) == 3
    x2 = x.reshape(3, 20)
    ref.assert_softmax_close(outer(x2), np.maximum(x2, 0), 1, log=False)
    assert "Softmax(dim=1)" in repr(outer)


def test_memory_budget_moves_to_tile_mode(rng, restore_threads):
    lk.set_num_threads(2)
    net = cifar(rng)
    seq = net.sequential()
    assert "mode: layer" in seq.describe((3, 3, 32, 32))
    before = lk.get_scheduler()
    lk.set_scheduler(memory_budget=4096)
    try:
        d = seq.describe((3, 3, 32, 32))
        assert "mode: tile" in d and "memory budget" in d, d
        x = _input(rng, net, 3)
        net.check(seq(x), x)
    finally:
        lk.set_scheduler(memory_budget=before["memory_budget"])


def test_concurrent_calls(rng):
    import threading

    net = mnist(rng)
    seq = net.sequential()
    xs = [_input(rng, net, n) for n in (1, 8, 8, 3)]
    expected = [seq(x) for x in xs]
    errors = []

    def work(i):
        try:
            for _ in range(30):
                np.testing.assert_array_equal(seq(xs[i]), expected[i])
        except Exception as e:  # reported below: an assertion in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_degenerate_linear_shapes(rng):
    # in_features 0 (the bias alone), rows of several dimensions, a single feature.
    b = _uniform(rng, (4,), 1)
    seq = lk.Sequential([lk.Linear(np.zeros((4, 0), np.float32), b, activation="relu")])
    np.testing.assert_array_equal(seq(np.zeros((3, 0), np.float32)), np.broadcast_to(np.maximum(b, 0), (3, 4)))
    net = Net(rng, (5, 7), [("linear", dict(n=3, relu=True)), ("linear", dict(n=2))])
    x = rng.standard_normal((4, 5, 7)).astype(np.float32)
    net.check(net.sequential()(x), x)
    net = Net(rng, (1,), [("linear", dict(n=1))])
    x = rng.standard_normal((6, 1)).astype(np.float32)
    net.check(net.sequential()(x), x)
