"""Float64 reference implementations, tolerances, and argument cases.

The references follow the definitions in torch.nn.functional's documentation
and are written for clarity, not speed: convolution adds up, tap by tap, the
input pixel each kernel tap reads for every output pixel; pooling visits the
taps of each window in the order torch does. They share no code with the
library.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st


def _pair(v):
    return tuple(v) * (2 if len(v) == 1 else 1) if isinstance(v, (tuple, list)) else (v, v)


# --------------------------------------------------------------------------
# Reference ops
# --------------------------------------------------------------------------

def conv_paddings(padding, kernel, dilation):
    """(top, bottom, left, right) for an int, pair, 'valid' or 'same' padding."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            # torch puts the odd row/column at the bottom/right.
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


def _taps(out_size, stride, offset, size):
    """Input positions tap `offset` reads for each output position, and which are inside the input."""
    pos = np.arange(out_size) * stride + offset
    return np.clip(pos, 0, size - 1), (pos >= 0) & (pos < size)


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """Cross-correlation as in torch.nn.functional.conv2d, in float64.

    For each kernel tap (r, s), gathers the input pixel it reads for every
    output pixel (zero where that falls in the padding) and adds its product
    with the tap's weights. Only gathered pixels are touched, so huge inputs
    with zero strides work.
    """
    batched = x.ndim == 4
    x = x if batched else x[None]
    w = np.asarray(w, np.float64)
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    top, bottom, left, right = conv_paddings(padding, (R, S), (dh, dw))
    P = (H + top + bottom - dh * (R - 1) - 1) // sh + 1
    Q = (W + left + right - dw * (S - 1) - 1) // sw + 1
    G, Kg = groups, K // groups
    y = np.zeros((N, G, Kg, P, Q))
    for r in range(R):
        rows, row_ok = _taps(P, sh, r * dh - top, H)
        for s in range(S):
            cols, col_ok = _taps(Q, sw, s * dw - left, W)
            inside = row_ok[:, None] & col_ok[None, :]
            window = np.where(inside, np.asarray(x[:, :, rows][:, :, :, cols], np.float64), 0.0)
            y += np.einsum("ngcpq,gkc->ngkpq", window.reshape(N, G, Cg, P, Q), w[:, :, r, s].reshape(G, Kg, Cg))
    y = y.reshape(N, K, P, Q)
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y if batched else y[0]


def pool_output_size(size, kernel, stride, padding, dilation, ceil_mode):
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # With ceil_mode the last window must start inside the input or the left padding.
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Values and int64 indices (flattened per H*W plane) of torch's max_pool2d.

    A window takes a value when it is greater than the current maximum or NaN
    (so the last NaN wins, and the first of equal values wins); it starts at
    -inf with the index of its first tap inside the input rows and columns.
    """
    batched = x.ndim == 4
    x = x if batched else x[None]
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    N, C, H, W = x.shape
    P = pool_output_size(H, kh, sh, ph, dh, ceil_mode)
    Q = pool_output_size(W, kw, sw, pw, dw, ceil_mode)

    def first_tap(start, step):
        while start < 0:
            start += step
        return start

    rows0 = np.array([first_tap(p * sh - ph, dh) for p in range(P)], dtype=np.int64)
    cols0 = np.array([first_tap(q * sw - pw, dw) for q in range(Q)], dtype=np.int64)
    best = np.full((N, C, P, Q), -np.inf, dtype=x.dtype)
    index = np.broadcast_to(rows0[:, None] * W + cols0[None, :], (N, C, P, Q)).copy()
    for i in range(kh):
        rows, row_ok = _taps(P, sh, i * dh - ph, H)
        for j in range(kw):
            cols, col_ok = _taps(Q, sw, j * dw - pw, W)
            vals = x[:, :, rows][:, :, :, cols]
            take = (row_ok[:, None] & col_ok[None, :]) & ((vals > best) | np.isnan(vals))
            best = np.where(take, vals, best)
            index = np.where(take, rows[:, None] * W + cols[None, :], index)
    return (best, index) if batched else (best[0], index[0])


def linear(x, w, b=None, activation=None):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    y = np.einsum("...k,nk->...n", x, np.atleast_2d(w))
    if b is not None:
        y = y + np.asarray(b, np.float64)
    if w.ndim == 1:
        y = y[..., 0]
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y


def relu(x):
    # NaN < 0 is False, so NaN passes through as in torch.
    return np.where(x < 0, np.zeros_like(x), x)


def log_softmax(x, dim):
    x = np.asarray(x, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        shifted = x - np.max(x, axis=dim, keepdims=True, initial=-np.inf)
        return shifted - np.log(np.sum(np.exp(shifted), axis=dim, keepdims=True))


def softmax(x, dim):
    x = np.asarray(x, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.exp(x - np.max(x, axis=dim, keepdims=True, initial=-np.inf))
        return e / np.sum(e, axis=dim, keepdims=True)


# --------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------

def randn(rng, shape, dtype):
    """Standard normal data: no zeros, mixed signs, so sign and offset bugs show."""
    return rng.standard_normal(shape).astype(dtype)


def poisoned(shape, dtype):
    """An output buffer full of NaN: an element the op does not write stays NaN."""
    return np.full(shape, np.nan, dtype=dtype)


def assert_sum_close(got, ref, magnitude, length, dtype, context=""):
    """Element-wise check of a result that is a sum of `length` products.

    `magnitude` is the same sum over absolute values (plus |bias|). Rounding
    each partial sum of a float sum of `length` terms costs at most eps/2 of
    `magnitude`; treating those errors as independent, their total grows like
    sqrt(length) (the worst case, `length` * eps, needs every rounding to go
    the same way). Four times that is well clear of what blocked and FMA
    summation orders produce, and far below what a wrong tap, a missed bias or
    a shifted window costs (about magnitude / sqrt(length)). The float64
    reference's own error is of the same form at eps64, inside the bound.
    """
    got = np.asarray(got)
    assert got.shape == np.shape(ref), f"shape {got.shape} != {np.shape(ref)}; {context}"
    assert got.dtype == np.dtype(dtype), f"dtype {got.dtype} != {np.dtype(dtype)}; {context}"
    tol = 4.0 * np.finfo(dtype).eps * math.sqrt(max(length, 1)) * np.asarray(magnitude)
    _assert_within(got, ref, tol, context)


def assert_softmax_close(got, x, dim, log, context=""):
    """Softmax and log-softmax against the float64 reference.

    The input is exact; what rounds is x - max (an absolute error of
    eps/2 * |x - max| in the exponent, so that relative error in exp), the
    sum of n positive terms (relative error growing like sqrt(n) * eps) and
    the output. So an element is off by a few eps times
    (1 + |x - max| + sqrt(n)), relatively for softmax, absolutely for
    log-softmax (which also rounds its own magnitude). Results below the
    dtype's smallest normal number only keep an absolute accuracy.
    """
    dtype = np.asarray(got).dtype
    assert dtype == x.dtype, f"dtype {dtype} != {x.dtype}; {context}"
    eps = np.finfo(dtype).eps
    x64 = x.astype(np.float64)
    n = x.shape[dim] if x.ndim else 1
    with np.errstate(invalid="ignore"):
        error_terms = 1.0 + np.abs(x64 - np.max(x64, axis=dim, keepdims=True, initial=-np.inf)) + math.sqrt(n)
        if log:
            ref = log_softmax(x64, dim)
            scale = error_terms + np.abs(ref)
        else:
            ref = softmax(x64, dim)
            scale = error_terms * np.abs(ref)
    # Where the reference is NaN or infinite only an exact match passes.
    tol = 8.0 * eps * np.nan_to_num(scale, nan=0.0, posinf=0.0) + np.finfo(dtype).tiny
    _assert_within(got, ref, tol, context)


def _assert_within(got, ref, tol, context):
    got64 = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    tol = np.broadcast_to(tol, ref.shape)
    with np.errstate(invalid="ignore"):
        err = np.abs(got64 - ref)
        # Equal infinities and NaN where the reference has NaN count as exact.
        same = (got64 == ref) | (np.isnan(got64) & np.isnan(ref))
        bad = ~(same | (err <= tol))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = err[bad] / tol[bad]
        worst = np.max(np.where(np.isnan(ratio), np.inf, ratio))  # a NaN result is infinitely wrong
        raise AssertionError(
            f"{int(bad.sum())} of {bad.size} elements out of tolerance "
            f"(worst error/tolerance {worst:.3g}); first at {where}: got {float(got64[where])!r}, "
            f"expected {float(ref[where])!r}, tolerance {tol[where]:.3g}; {context}")


def assert_identical(got, expected, context=""):
    """Same shape, dtype and values (NaN matching NaN)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, f"shape {got.shape} != {expected.shape}; {context}"
    assert got.dtype == expected.dtype, f"dtype {got.dtype} != {expected.dtype}; {context}"
    np.testing.assert_array_equal(got, expected, err_msg=context)


# --------------------------------------------------------------------------
# Argument cases for hypothesis
# --------------------------------------------------------------------------

# The GEMM microkernel tiles are 8x48 (avx512), 4x24 (avx2) and 4x12 (generic)
# in float32 and half as many columns in float64: rows are output channels,
# columns output pixels (convolution) or output features (linear). Sizes one
# below, on and one above each tile edge, plus 1 and primes.
TILE_ROWS = (1, 2, 3, 4, 5, 7, 8, 9, 11, 13, 15, 16, 17)
TILE_COLS = (1, 2, 5, 6, 7, 11, 12, 13, 23, 24, 25, 47, 48, 49, 95, 96, 97)
SEEDS = st.integers(0, 2**63 - 1)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_cases(draw):
    """(input shape, weight shape, has bias, keyword arguments) of a valid conv2d."""
    kind = draw(st.sampled_from(["dense", "dense", "grouped", "depthwise"]))
    if kind == "dense":
        groups, cg, kg = 1, draw(st.sampled_from([1, 2, 3, 5, 8])), draw(st.sampled_from(TILE_ROWS))
    elif kind == "grouped":
        groups, cg, kg = draw(st.integers(2, 3)), draw(st.integers(1, 4)), draw(st.sampled_from(TILE_ROWS[:9]))
    else:  # depthwise, with a channel multiplier
        groups, cg, kg = draw(st.integers(1, 7)), 1, draw(st.integers(1, 2))
    R, S = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    eff = (dilation[0] * (R - 1) + 1, dilation[1] * (S - 1) + 1)
    # Choose the output size, so the pixel count lands on tile edges, then
    # the input size (and padding) that produces it.
    pixels = draw(st.sampled_from(TILE_COLS))
    P = draw(st.sampled_from(_divisors(pixels)))
    Q = pixels // P
    modes = ["int", "pair", "valid"] + (["same"] if stride == (1, 1) else [])
    mode = draw(st.sampled_from(modes))
    if mode == "same":
        H, W, padding = P, Q, "same"
    else:
        # The most padding that still leaves the input at least one pixel.
        most = [0 if mode == "valid" else min(3, ((out - 1) * s + e - 1) // 2)
                for out, s, e in zip((P, Q), stride, eff)]
        pads = [draw(st.integers(0, min(most)))] * 2 if mode == "int" else [draw(st.integers(0, m)) for m in most]
        # Input sizes up to stride - 1 larger give the same output size.
        H, W = [(out - 1) * s + e - 2 * pad + draw(st.integers(0, s - 1))
                for out, s, e, pad in zip((P, Q), stride, eff, pads)]
        padding = {"int": pads[0], "pair": tuple(pads), "valid": "valid"}[mode]
    N = draw(st.sampled_from([0, 1, 1, 2, 3]))
    batched = N != 1 or draw(st.booleans())
    x_shape = (N, groups * cg, H, W) if batched else (groups * cg, H, W)
    kwargs = dict(stride=draw(st.sampled_from([stride, list(stride)])) if stride[0] != stride[1] else stride[0],
                  padding=padding, dilation=dilation, groups=groups,
                  activation=draw(st.sampled_from([None, "relu"])))
    return x_shape, (groups * kg, cg, R, S), draw(st.booleans()), kwargs


@st.composite
def pool_cases(draw):
    """(input shape, keyword arguments) of a valid max_pool2d."""
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 4))))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    size = []
    for k, p, d in zip(kernel, padding, dilation):
        smallest = max(1, d * (k - 1) + 1 - 2 * p)
        # Wide rows too: the vector kernels cover a row 4 to 16 outputs at a time.
        size.append(draw(st.one_of(st.integers(smallest, smallest + 14), st.integers(smallest + 15, smallest + 70))))
    N = draw(st.integers(0, 3))
    C = draw(st.integers(1, 5))
    batched = N != 1 or draw(st.booleans())
    shape = (N, C, *size) if batched else (C, *size)
    kwargs = dict(kernel_size=kernel if kernel[0] != kernel[1] else kernel[0], stride=stride,
                  padding=padding, dilation=dilation, ceil_mode=draw(st.booleans()))
    return shape, kwargs


@st.composite
def linear_cases(draw):
    """(input shape, weight shape, has bias, activation) of a valid linear."""
    rows = draw(st.sampled_from((0,) + TILE_ROWS))
    lead = draw(st.sampled_from([(rows,), (rows,), (), (1, rows), (2, rows), (rows, 2, 1)]))
    in_features = draw(st.sampled_from([1, 2, 3, 7, 16, 31, 64, 97]))
    vector_weight = draw(st.integers(0, 7)) == 0
    w_shape = (in_features,) if vector_weight else (draw(st.sampled_from((0,) + TILE_COLS)), in_features)
    return lead + (in_features,), w_shape, draw(st.booleans()), draw(st.sampled_from([None, "relu"]))


def fill_pool_input(rng, shape, dtype, kind):
    """Pool input of a given flavour: plain, many ties, NaN or infinities sprinkled."""
    if kind == "ties":
        return rng.integers(-2, 3, size=shape).astype(dtype)
    x = randn(rng, shape, dtype)
    if kind == "nan":
        x[rng.random(shape) < 0.2] = np.nan
    elif kind == "inf":
        x[rng.random(shape) < 0.3] = -np.inf
        x[rng.random(shape) < 0.05] = np.inf
    elif kind == "all_neg_inf":
        x[...] = -np.inf
    return x


# Every (algorithm, microkernel shape) a convolution layer can be pinned to:
# lk.conv2d lets the cost model pick one per shape, so only pinned layers
# reach every kernel on every case.
CONV_KERNELS = tuple((a, u) for a in ("implicit_gemm", "im2col_gemm", "implicit_gemm_t", "indirect_gemm")
                     for u in ("wide", "tall", "narrow")) + (("direct", "auto"),)
