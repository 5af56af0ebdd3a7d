"""The CUDA kernels, run on the CPU, against the CPU library.

``lepton_kernels._cuda_emu`` is built from the same csrc/cuda/*.cu sources
that nvcc compiles, as plain C++, and runs them under an emulation of the
CUDA execution model (csrc/cuda/emulator.h): every CUDA thread a fiber,
__syncthreads a real barrier among the block's fibers, shared memory per
block and poisoned with NaN. So these tests need no GPU and never skip.

The emulator also fences every buffer: inputs with NaN (a kernel reading
past an input computes NaN), outputs start as NaN (an element the kernel
does not write stays NaN) and their guard zones are checked after the launch
(a kernel writing past its output raises).

Shapes sit on the edges of each kernel's tiles: one below, on and above the
64 x 64 GEMM block tile and its reduction step of 8, the 256 threads of the
element-wise kernels, the 4 rows of the linear dot kernel and the pooled tile
of the fused kernel; plus primes, 1 and batch 0.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lepton_kernels as lk
import reference as ref
from lepton_kernels import _cuda_emu as emu

DTYPES = [np.float32, np.float64]
BM, BN, BK = emu.GEMM_TILE
ROOT = Path(__file__).resolve().parents[1]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def assert_within(got, want, tol, context=""):
    """|got - want| <= tol element-wise; NaN and infinities must match exactly."""
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}; {context}"
    assert got.dtype == want.dtype, f"dtype {got.dtype} != {want.dtype}; {context}"
    g, w = got.astype(np.float64), want.astype(np.float64)
    with np.errstate(invalid="ignore"):
        same = (g == w) | (np.isnan(g) & np.isnan(w))
        bad = ~(same | (np.abs(g - w) <= tol))
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        t = np.broadcast_to(tol, w.shape)[i]
        raise AssertionError(f"{int(bad.sum())} of {bad.size} elements differ; first at {i}: got {g[i]!r}, "
                             f"expected {w[i]!r} (tolerance {t:.3g}); {context}")


def sum_tolerance(magnitude, length, dtype):
    """Tolerance between two results that each add up `length` products (plus a bias).

    Each result, in whatever order it sums, is within gamma_length * magnitude
    of the exact value, where magnitude is the same sum over absolute values
    and gamma_n = n u / (1 - n u) <= n eps (u = eps / 2, n eps < 1), so the
    two differ by at most 2 gamma_n magnitude <= length * eps * magnitude.
    A rigorous bound (it holds for every summation order and FMA use), so the
    test is never flaky; a wrong tap, bias or pixel costs about
    magnitude / sqrt(length), orders of magnitude above it. ReLU and max
    pooling are 1-Lipschitz and keep it.
    """
    return length * np.finfo(dtype).eps * np.asarray(magnitude, np.float64)


# --------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------

# (x shape, weight shape, stride, (top, bottom, left, right) padding, dilation, groups).
# GEMM rows are the filters of a group (Kg), columns the output pixels of
# the whole batch (N * P * Q), the reduction C/groups * R * S.
CONV_CASES = {
    "single-output": ((1, 1, 3, 3), (1, 1, 3, 3), 1, (0, 0, 0, 0), 1, 1),
    "rows63-cols64-k7": ((1, 7, 8, 8), (BM - 1, 7, 1, 1), 1, (0, 0, 0, 0), 1, 1),
    "rows64-cols64-k72": ((1, 8, 10, 10), (BM, 8, 3, 3), 1, (0, 0, 0, 0), 1, 1),
    "rows65-cols65-k9": ((1, 1, 7, 15), (BM + 1, 1, 3, 3), 1, (0, 0, 0, 0), 1, 1),
    "k8-cols63": ((1, 2, 9, 7), (20, 2, 2, 2), 1, (0, 1, 0, 1), 1, 1),
    "batch-across-tiles": ((3, 3, 9, 10), (17, 3, 2, 2), 1, (0, 0, 0, 0), 1, 1),
    "stride-pad-dilation": ((3, 5, 13, 11), (31, 5, 3, 3), (2, 3), (1, 2, 0, 3), (2, 1), 1),
    "even-kernel-same": ((1, 2, 30, 30), (32, 2, 4, 4), 1, (1, 2, 1, 2), 1, 1),
    "grouped": ((2, 6, 11, 13), (12, 2, 3, 2), 2, (2, 0, 1, 1), (1, 2), 3),
    "grouped-wide": ((2, 16, 9, 9), (96, 4, 3, 3), 1, (1, 1, 1, 1), 1, 4),
    "depthwise": ((2, 8, 12, 9), (8, 1, 3, 3), 1, (1, 1, 1, 1), 1, 8),
    "depthwise-x2": ((1, 5, 9, 9), (10, 1, 5, 5), 1, (2, 2, 2, 2), 1, 5),
    "image-1x1": ((1, 3, 1, 1), (70, 3, 1, 1), 1, (0, 0, 0, 0), 1, 1),
    "prime-channels": ((2, 11, 7, 5), (13, 11, 3, 3), 1, (1, 1, 1, 1), 1, 1),
    "batch-0": ((0, 3, 8, 8), (16, 3, 3, 3), 1, (1, 1, 1, 1), 1, 1),
}


def conv_reference(x, w, b, stride, pads, dilation, groups, relu):
    """lk.conv2d, which has no asymmetric padding: pad the input with zeros instead."""
    top, bottom, left, right = pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    return lk.conv2d(xp, w, b, stride=stride, padding=0, dilation=dilation, groups=groups,
                     activation="relu" if relu else None)


def conv_tolerance(x, w, b, stride, pads, dilation, groups):
    """sum_tolerance of a convolution: its magnitude is the convolution of |x|, |w|, |b|."""
    a = lambda v: None if v is None else np.abs(v).astype(np.float64)  # noqa: E731
    magnitude = conv_reference(a(x), a(w), a(b), stride, pads, dilation, groups, False)
    length = w.shape[1] * w.shape[2] * w.shape[3] + (b is not None)
    return sum_tolerance(magnitude, length, x.dtype)


@pytest.mark.parametrize("bias,relu", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("kernel", ["implicit_gemm", "direct", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=list(CONV_CASES))
def test_conv2d(rng, case, dtype, kernel, bias, relu):
    x_shape, w_shape, stride, pads, dilation, groups = CONV_CASES[case]
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    stride, dilation = _pair(stride), _pair(dilation)
    got = emu.conv2d(x, w, b, stride, pads, dilation, groups, relu, kernel)
    want = conv_reference(x, w, b, stride, pads, dilation, groups, relu)
    tol = conv_tolerance(x, w, b, stride, pads, dilation, groups)
    assert_within(got, want, tol, f"{case}, {kernel}")


def launcher_conv_args(x_shape, w_shape, kwargs):
    """ref.conv_cases' torch-style arguments as the launcher takes them."""
    dilation = _pair(kwargs["dilation"])
    pads = ref.conv_paddings(kwargs["padding"], w_shape[2:], dilation)
    x_shape = tuple(x_shape) if len(x_shape) == 4 else (1, *x_shape)
    return x_shape, _pair(kwargs["stride"]), pads, dilation, kwargs["groups"], kwargs["activation"] == "relu"


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=ref.conv_cases(), kernel=st.sampled_from(["implicit_gemm", "direct"]), seed=ref.SEEDS)
def test_conv2d_random_cases(dtype, case, kernel, seed):
    """The suite's random convolutions (every padding mode, stride, dilation, groups)."""
    x_shape, w_shape, has_bias, kwargs = case
    x_shape, stride, pads, dilation, groups, relu = launcher_conv_args(x_shape, w_shape, kwargs)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if has_bias else None
    got = emu.conv2d(x, w, b, stride, pads, dilation, groups, relu, kernel)
    want = conv_reference(x, w, b, stride, pads, dilation, groups, relu)
    assert_within(got, want, conv_tolerance(x, w, b, stride, pads, dilation, groups), f"{case}, {kernel}")


def test_conv2d_cases_reach_both_kernels():
    picked = {emu.conv2d_kernel(np.zeros(c[0], np.float32), np.zeros(c[1], np.float32), c[5])
              for c in CONV_CASES.values()}
    assert picked == {"implicit_gemm", "direct"}


# --------------------------------------------------------------------------
# max_pool2d
# --------------------------------------------------------------------------

# (x shape, kernel, stride, padding, dilation, ceil_mode). One thread per
# output, 256 per block, blocks along each plane: planes of 255, 256 and 257
# outputs, and many small planes.
POOL_CASES = {
    "2x2": ((2, 3, 8, 8), 2, 2, 0, 1, False),
    "r18-pool": ((1, 2, 9, 11), 3, 2, 1, 1, False),
    "r18-pool-ceil": ((1, 2, 10, 12), 3, 2, 1, 1, True),
    "asymmetric-dilated": ((1, 2, 16, 33), (2, 3), (1, 2), (1, 1), (2, 1), True),
    "ceil-odd": ((2, 1, 7, 9), 2, 2, 0, 1, True),
    "window-1": ((1, 1, 1, 1), 1, 1, 0, 1, False),
    "outputs-255": ((1, 2, 15, 17), 1, 1, 0, 1, False),
    "outputs-256": ((1, 2, 32, 32), 2, 2, 0, 1, False),
    "outputs-257": ((1, 1, 257, 2), (1, 2), 1, 0, 1, False),
    "many-planes": ((3, 97, 5, 4), 3, 1, 1, 1, False),
    "batch-0": ((0, 2, 5, 5), 2, 2, 0, 1, False),
}
FLAVOURS = ["normal", "ties", "nan", "inf", "all_neg_inf"]


def pool_input(rng, shape, dtype, flavour):
    if flavour == "ties":
        return rng.integers(-2, 3, size=shape).astype(dtype)
    x = rng.standard_normal(shape).astype(dtype)
    if flavour == "nan":
        x[rng.random(shape) < 0.2] = np.nan
    elif flavour == "inf":
        x[rng.random(shape) < 0.3] = -np.inf
        x[rng.random(shape) < 0.05] = np.inf
    elif flavour == "all_neg_inf":
        x[...] = -np.inf
    return x


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES, ids=list(POOL_CASES))
def test_max_pool2d(rng, case, dtype, flavour):
    shape, kernel, stride, padding, dilation, ceil_mode = POOL_CASES[case]
    x = pool_input(rng, shape, dtype, flavour)
    args = (_pair(kernel), _pair(stride), _pair(padding), _pair(dilation), ceil_mode)
    got, got_idx = emu.max_pool2d(x, *args, True)
    want, want_idx = lk.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    # Selection, not arithmetic: values and indices match exactly, NaN included.
    np.testing.assert_array_equal(got, want, err_msg=case)
    np.testing.assert_array_equal(got_idx, want_idx, err_msg=case)
    assert got_idx.dtype == np.int64
    np.testing.assert_array_equal(emu.max_pool2d(x, *args, False), want, err_msg=f"{case}, no indices")


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=ref.pool_cases(), flavour=st.sampled_from(FLAVOURS), seed=ref.SEEDS)
def test_max_pool2d_random_cases(dtype, case, flavour, seed):
    shape, kwargs = case
    x = pool_input(np.random.default_rng(seed), shape if len(shape) == 4 else (1, *shape), dtype, flavour)
    kernel = _pair(kwargs["kernel_size"])
    stride = kernel if kwargs["stride"] is None else _pair(kwargs["stride"])
    got, got_idx = emu.max_pool2d(x, kernel, stride, _pair(kwargs["padding"]), _pair(kwargs["dilation"]),
                                  kwargs["ceil_mode"], True)
    want, want_idx = lk.max_pool2d(x, **kwargs, return_indices=True)
    np.testing.assert_array_equal(got, want, err_msg=str(case))
    np.testing.assert_array_equal(got_idx, want_idx, err_msg=str(case))


# --------------------------------------------------------------------------
# conv2d -> bias -> ReLU -> max_pool2d, fused
# --------------------------------------------------------------------------

# (x shape, w shape, stride, padding, dilation, groups), (kernel, stride, padding, dilation, ceil_mode).
FUSED_CASES = {
    "mnist": (((2, 1, 28, 28), (32, 1, 3, 3), 1, (0, 0, 0, 0), 1, 1), (2, 2, 0, 1, False)),
    "c2-like": (((1, 16, 20, 20), (64, 16, 3, 3), 1, (1, 1, 1, 1), 1, 1), (2, 2, 0, 1, False)),
    "rows65-overlapping": (((1, 3, 17, 19), (BM + 1, 3, 3, 3), 1, (1, 1, 1, 1), 1, 1), (3, 2, 1, 1, False)),
    "ceil-odd": (((2, 4, 9, 11), (9, 4, 3, 3), 1, (0, 0, 0, 0), 1, 1), (2, 2, 0, 1, True)),
    "pool-stride1-dilated": (((1, 3, 12, 13), (7, 3, 2, 2), 1, (0, 1, 1, 0), 1, 1), (3, 1, 1, 2, False)),
    "asymmetric-pool": (((1, 2, 14, 19), (5, 2, 3, 3), (1, 2), (1, 1, 0, 2), (2, 1), 1), ((2, 3), (1, 2), (1, 1), 1, True)),
    "grouped": (((2, 6, 12, 12), (18, 2, 3, 3), 1, (1, 1, 1, 1), 1, 3), (2, 2, 0, 1, False)),
    "depthwise": (((1, 5, 11, 10), (5, 1, 3, 3), 1, (1, 1, 1, 1), 1, 5), (3, 2, 1, 1, True)),
    "wide-row": (((1, 2, 8, 150), (8, 2, 3, 3), 1, (1, 1, 1, 1), 1, 1), (2, 2, 0, 1, False)),
    # Windows wider than tall and taller than wide, over several tiles each way.
    "wide-window-tiles": (((1, 2, 12, 140), (8, 2, 3, 3), 1, (1, 1, 1, 1), 1, 1), ((2, 3), 2, (0, 1), 1, False)),
    "tall-window-tiles": (((1, 2, 140, 12), (8, 2, 3, 3), 1, (1, 1, 1, 1), 1, 1), ((3, 2), 2, (1, 0), 1, True)),
    # A 12 x 12 window reads more conv outputs than a block keeps (128 float):
    # the unfused path.
    "window-beyond-footprint": (((1, 2, 16, 16), (4, 2, 3, 3), 1, (0, 0, 0, 0), 1, 1), (12, 2, 0, 1, False)),
    "batch-0": (((0, 3, 8, 8), (4, 3, 3, 3), 1, (0, 0, 0, 0), 1, 1), (2, 2, 0, 1, False)),
}


def check_fused(rng, conv, pool, dtype, bias, relu, context):
    x_shape, w_shape, stride, pads, dilation, groups = conv
    pk, ps, pp, pd, ceil_mode = pool
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    stride, dilation = _pair(stride), _pair(dilation)
    pool_args = (_pair(pk), _pair(ps), _pair(pp), _pair(pd), ceil_mode)
    got = emu.conv2d_max_pool2d(x, w, b, stride, pads, dilation, groups, relu, *pool_args)
    xp = np.pad(x, ((0, 0), (0, 0), pads[:2], pads[2:]))
    want = lk.conv2d_max_pool2d(xp, w, b, stride, 0, dilation, groups, activation="relu" if relu else None,
                                kernel_size=pk, pool_stride=ps, pool_padding=pp, pool_dilation=pd,
                                ceil_mode=ceil_mode)
    # |max a - max b| <= max |a - b|: the pooled tolerance is the pool of the conv's.
    tol = lk.max_pool2d(conv_tolerance(x, w, b, stride, pads, dilation, groups), pk, ps, pp, pd, ceil_mode)
    assert_within(got, want, tol, context)


@pytest.mark.parametrize("bias,relu", [(True, True), (False, False)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FUSED_CASES, ids=list(FUSED_CASES))
def test_conv2d_max_pool2d(rng, case, dtype, bias, relu):
    conv, pool = FUSED_CASES[case]
    check_fused(rng, conv, pool, dtype, bias, relu, case)


def pooled_size(n, k, s, p, d, ceil_mode):
    """torch's max_pool2d output size, or 0 when the input is too small."""
    span = n + 2 * p - d * (k - 1) - 1
    if span < 0:
        return 0
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


@st.composite
def pool_after(draw, P, Q):
    """Pooling arguments valid on a P x Q convolution output: (kernel, stride, padding, dilation, ceil_mode)."""
    kernel, stride, padding, dilation = [], [], [], []
    for n in (P, Q):
        d = draw(st.integers(1, 2))
        # The window with its most padding must fit: n + 2 (k // 2) >= d (k - 1) + 1.
        k = draw(st.sampled_from([k for k in range(1, 5) if n + 2 * (k // 2) >= d * (k - 1) + 1]))
        p = draw(st.integers(max(0, -(-(d * (k - 1) + 1 - n) // 2)), k // 2))
        kernel.append(k), stride.append(draw(st.integers(1, 3))), padding.append(p), dilation.append(d)
    return tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), draw(st.booleans())


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=ref.conv_cases(), data=st.data(), seed=ref.SEEDS)
def test_conv2d_max_pool2d_random_cases(dtype, case, data, seed):
    x_shape, w_shape, has_bias, kwargs = case
    x_shape, stride, pads, dilation, groups, relu = launcher_conv_args(x_shape, w_shape, kwargs)
    P = (x_shape[2] + pads[0] + pads[1] - dilation[0] * (w_shape[2] - 1) - 1) // stride[0] + 1
    Q = (x_shape[3] + pads[2] + pads[3] - dilation[1] * (w_shape[3] - 1) - 1) // stride[1] + 1
    pool = data.draw(pool_after(P, Q))
    conv = (x_shape, w_shape, stride, pads, dilation, groups)
    check_fused(np.random.default_rng(seed), conv, pool, dtype, has_bias, relu, f"{case}, pool {pool}")


def fused_tile(conv, pool, dtype):
    x_shape, w_shape, stride, pads, dilation, groups = conv
    pk, ps, pp, pd, ceil_mode = pool
    return emu.conv_pool_tile(np.zeros(x_shape, dtype), np.zeros(w_shape, dtype), _pair(stride), pads,
                              _pair(dilation), groups, _pair(pk), _pair(ps), _pair(pp), _pair(pd), ceil_mode)


# Pooled extents (rows, cols) for the tile-edge sweep below.
POOLED_EXTENTS = [(1, 1), (2, 3), (3, 5), (5, 8), (7, 9), (8, 16), (9, 17), (13, 31), (16, 33), (17, 7), (32, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool", [(2, 2, 0, 1, False), (3, 2, 1, 1, False), (3, 2, 1, 1, True), (2, 1, 0, 2, False)],
                         ids=["2x2", "3x3s2", "3x3s2-ceil", "2x2s1-dilated"])
def test_conv2d_max_pool2d_tile_edges(rng, dtype, pool):
    """The pooled tile depends on the shape: sweep extents so that some end in a partial
    tile, some in whole tiles, both ways, with two blocks of filters."""
    k, s, p, d, ceil_mode = pool

    def conv_size(pooled):
        """The smallest convolution output (3x3 conv, pad 1: the input size) pooled to `pooled`."""
        size = 1
        while pooled_size(size, k, s, p, d, ceil_mode) < pooled:
            size += 1
        return size

    seen = set()
    for pr, pc in POOLED_EXTENTS:
        conv = ((1, 2, conv_size(pr), conv_size(pc)), (BM + 1, 2, 3, 3), 1, (1, 1, 1, 1), 1, 1)
        rows, cols = fused_tile(conv, pool, dtype)
        assert rows >= 1 and cols >= 1
        seen |= {("partial rows", pr > rows and pr % rows != 0), ("partial cols", pc > cols and pc % cols != 0),
                 ("whole tiles", (pr > rows or pc > cols) and pr % rows == 0 and pc % cols == 0)}
        check_fused(rng, conv, pool, dtype, True, True, f"pooled {pr} x {pc}, tile {rows} x {cols}")
    assert {("partial rows", True), ("partial cols", True), ("whole tiles", True)} <= seen


def test_conv2d_max_pool2d_fallback_is_taken():
    conv, pool = FUSED_CASES["window-beyond-footprint"]
    assert fused_tile(conv, pool, np.float32) == (0, 0)
    conv, pool = FUSED_CASES["mnist"]
    assert fused_tile(conv, pool, np.float32) != (0, 0)


# --------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------

# (M, N, K): rows, features, in_features. The GEMM tile is BM x BN with
# steps of BK; the dot kernel takes 4 rows per block.
LINEAR_SHAPES = [
    (1, 1, 1), (3, 5, 7), (4, 16, 9), (5, 15, BK), (15, 17, 64), (16, 16, 16), (17, BN - 1, 33),
    (BM - 1, BN, BK - 1), (BM, BN + 1, BK + 1), (BM + 1, 2 * BN + 1, 100), (130, 10, 300),
    (1, 1000, 512), (0, 8, 4), (6, 9, 0),
]


@pytest.mark.parametrize("bias,relu", [(True, False), (False, True)])
@pytest.mark.parametrize("kernel", ["gemm", "dot", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in LINEAR_SHAPES])
def test_linear(rng, shape, dtype, kernel, bias, relu):
    M, N, K = shape
    x = rng.standard_normal((M, K)).astype(dtype)
    w = rng.standard_normal((N, K)).astype(dtype)
    b = rng.standard_normal(N).astype(dtype) if bias else None
    got = emu.linear(x, w, b, relu, kernel)
    want = lk.linear(x, w, b, activation="relu" if relu else None)
    a = np.abs
    magnitude = lk.linear(a(x).astype(np.float64), a(w).astype(np.float64), None if b is None else a(b).astype(np.float64))
    assert_within(got, want, sum_tolerance(magnitude, K + bias, dtype), f"{shape}, {kernel}")


def test_linear_shapes_reach_both_kernels():
    assert {emu.linear_kernel(m, n, k) for m, n, k in LINEAR_SHAPES} == {"gemm", "dot"}


# --------------------------------------------------------------------------
# relu, softmax, log_softmax
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (255,), (256,), (257,), (3, 1000), (2, 3, 4, 5)])
def test_relu(rng, shape, dtype):
    x = rng.standard_normal(shape).astype(dtype)
    if x.size:
        x.flat[:: 7] = np.nan
        x.flat[1:: 11] = -0.0
    got = emu.relu(x)
    np.testing.assert_array_equal(got, lk.relu(x))
    # -0 stays -0 (x < 0 is false), as in the CPU library.
    np.testing.assert_array_equal(np.signbit(got), np.signbit(lk.relu(x)))


# (shape, dim). The block kernel reduces with 256 threads: lines of 255, 256, 257.
SOFTMAX_CASES = [
    ((7, 1), 1), ((3, 63), 1), ((2, 64), 1), ((2, 255), 1), ((1, 256), 1), ((3, 257), -1), ((2, 1000), 1),
    ((4, 5, 6), 1), ((3, 300, 2), 1), ((5, 3), 0), ((0, 5), 1), ((5,), 0), ((), 0),
]


def softmax_tolerance(x, dim, want, log):
    """Each element: the rounding of x - max (relative eps to exp's argument), of exp (a few
    ulps), of a float sum of n terms (n eps relative), of the division or log, in both
    results. So eps * (8 + n + |x - max|), relative to the output for softmax and to
    1 + |output| for log-softmax, which also rounds its own magnitude."""
    eps = np.finfo(x.dtype).eps
    x64 = x.astype(np.float64)
    n = x.shape[dim] if x.ndim else 1
    if x.ndim == 0:
        return eps
    with np.errstate(invalid="ignore"):
        spread = np.abs(x64 - np.max(x64, axis=dim, keepdims=True, initial=-np.inf))
        scale = 1.0 + np.abs(want.astype(np.float64)) if log else np.abs(want.astype(np.float64))
        tol = eps * (8 + n + spread) * scale
    return np.nan_to_num(tol, nan=0.0, posinf=0.0) + np.finfo(x.dtype).tiny


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("kernel", ["block_per_line", "thread_per_line", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=[f"{s}-{d}" for s, d in SOFTMAX_CASES])
def test_softmax(rng, case, dtype, kernel, log):
    shape, dim = case
    x = np.asarray(3 * rng.standard_normal(shape), dtype)
    got = emu.softmax(x, dim, log, kernel)
    want = (lk.log_softmax if log else lk.softmax)(x, dim)
    assert_within(got, want, softmax_tolerance(x, dim, want, log), f"{case}, {kernel}")


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("kernel", ["block_per_line", "thread_per_line"])
def test_softmax_special_values(log, kernel):
    """A NaN anywhere in a line, or +inf, or a line of -inf, makes the whole line NaN; -inf alone gives 0."""
    x = np.array([[1.0, np.nan, 2.0], [-np.inf, -np.inf, -np.inf], [np.inf, 1.0, 2.0], [-np.inf, 0.0, 1.0]],
                 np.float32)
    got = emu.softmax(x, 1, log, kernel)
    want = (lk.log_softmax if log else lk.softmax)(x, 1)
    assert_within(got, want, 4 * np.finfo(np.float32).eps * (1 + np.abs(np.nan_to_num(want))), kernel)


def test_softmax_cases_reach_both_kernels():
    kernels = set()
    for shape, dim in SOFTMAX_CASES:
        d = dim % max(len(shape), 1)
        outer = int(np.prod(shape[:d])) if shape else 1
        inner = int(np.prod(shape[d + 1:])) if shape else 1
        kernels.add(emu.softmax_kernel(outer, shape[d] if shape else 1, inner))
    assert kernels == {"block_per_line", "thread_per_line"}


# --------------------------------------------------------------------------
# Arguments the launchers refuse
# --------------------------------------------------------------------------

def test_launchers_reject_bad_arguments():
    x = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(ValueError, match="groups"):
        emu.conv2d(x, np.zeros((6, 4, 3, 3), np.float32), None, (1, 1), (0, 0, 0, 0), (1, 1), 3, False)
    with pytest.raises(ValueError, match="stride"):
        emu.conv2d(x, np.zeros((6, 4, 3, 3), np.float32), None, (0, 1), (0, 0, 0, 0), (1, 1), 1, False)
    with pytest.raises(ValueError, match="kernel size"):
        emu.conv2d(x, np.zeros((6, 4, 9, 3), np.float32), None, (1, 1), (0, 0, 0, 0), (1, 1), 1, False)
    with pytest.raises(ValueError, match="padding"):
        emu.max_pool2d(x, (2, 2), (2, 2), (2, 0), (1, 1), False, False)
    with pytest.raises(TypeError):
        emu.relu(np.zeros(3, np.int32))


# --------------------------------------------------------------------------
# The emulator itself: it must notice what a real GPU would get wrong
# --------------------------------------------------------------------------

def test_emulator_barrier_orders_shared_memory():
    out = emu.selftest("reverse", blocks=3)
    expected = np.concatenate([np.arange(64 * b + 63, 64 * b - 1, -1) for b in range(3)]).astype(np.float32)
    np.testing.assert_array_equal(out, expected)


def test_emulator_missing_barrier_gives_wrong_results():
    # Each thread reads a neighbour's element before that neighbour wrote it.
    out = emu.selftest("reverse_without_barrier")
    assert np.isnan(out).any()


def test_emulator_reads_of_unwritten_shared_memory_are_nan():
    assert np.isnan(emu.selftest("uninitialised_shared")).all()


@pytest.mark.parametrize("name,message", [
    ("barrier_at_two_places", "barrier divergence.*waits at __syncthreads #1 at .*emu_bindings.cpp"),
    ("early_return", "barrier divergence.*returned while"),
    ("shared_out_of_bounds", "shared memory index 64 out of bounds"),
    ("too_many_threads", "too many threads per block"),
])
def test_emulator_reports_misuse(name, message):
    with pytest.raises(emu.KernelError, match=message):
        emu.selftest(name)


def test_emulator_runs_blocks_on_several_threads():
    previous = emu.threads()
    try:
        for n in (1, 3):
            emu.set_threads(n)
            np.testing.assert_array_equal(emu.selftest("reverse", blocks=7), emu.selftest("reverse", blocks=7))
    finally:
        emu.set_threads(previous)


# --------------------------------------------------------------------------
# The resource report kept in the repository
# --------------------------------------------------------------------------

def test_resource_report_lists_every_kernel_without_spills():
    """docs/cuda-resources.txt comes from ptxas (a CUDA build writes it, see
    csrc/cuda/resource_report.py): it must name every kernel of csrc/cuda and
    report no spills, so a new or changed kernel comes with a fresh report."""
    report = (ROOT / "docs" / "cuda-resources.txt").read_text().splitlines()
    rows = [line.split() for line in report if line and not line.startswith("#")][1:]
    assert rows, "empty report"
    kernels = {r[0].split("<")[0] for r in rows}
    source = "\n".join(p.read_text() for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    defined = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", source))
    assert defined and defined <= kernels, f"missing from the report: {sorted(defined - kernels)}"
    for r in rows:
        assert r[-2:] == ["0", "0"], f"{r[0]} on {r[1]} spills registers"
