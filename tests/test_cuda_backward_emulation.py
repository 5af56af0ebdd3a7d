"""The CUDA backward kernels (csrc/cuda/*backward*), run by the CPU emulator, against float64 NumPy.

As in test_cuda_emulation.py, ``lepton_kernels._cuda_emu`` runs the same
.cu sources nvcc compiles, every CUDA thread a fiber and __syncthreads a
real barrier, with inputs fenced by NaN, outputs poisoned with NaN and
their guard zones checked after each launch. Blocks run on several OS
threads at once, so the max-pool backward's atomicAdd is exercised for real
where windows overlap.

Shapes sit on the kernels' edges: the 64 x 64 x 8 GEMM tile of the linear
backward, the 256 threads of the element-wise and reduction kernels, groups,
dilation, asymmetric padding, strides that skip inputs, batch 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import reference as ref
from lepton_kernels import _cuda_emu as emu

DTYPES = [np.float32, np.float64]
BM, BN, BK = emu.GEMM_TILE


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# --------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------


def _taps(out_size, stride, offset, size):
    pos = np.arange(out_size) * stride + offset
    return np.clip(pos, 0, size - 1), (pos >= 0) & (pos < size)


def conv2d_backward_ref(go, x, w, stride, pads, dilation, groups):
    """(grad_input, grad_weight, grad_bias) in float64, tap by tap: the adjoint of reference.conv2d."""
    go, x, w = (np.asarray(a, np.float64) for a in (go, x, w))
    sh, sw = stride
    dh, dw = dilation
    top, _, left, _ = pads
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    P, Q = go.shape[2:]
    G, Kg = groups, K // groups
    gog = go.reshape(N, G, Kg, P, Q)
    gi = np.zeros((N, G, Cg, H, W))
    gw = np.zeros((G, Kg, Cg, R, S))
    xg = x.reshape(N, G, Cg, H, W)
    wg = w.reshape(G, Kg, Cg, R, S)
    for r in range(R):
        rows, row_ok = _taps(P, sh, r * dh - top, H)
        for s in range(S):
            cols, col_ok = _taps(Q, sw, s * dw - left, W)
            inside = (row_ok[:, None] & col_ok[None, :]).astype(np.float64)
            window = xg[:, :, :, rows][:, :, :, :, cols] * inside
            gw[:, :, :, r, s] = np.einsum("ngkpq,ngcpq->gkc", gog, window)
            contrib = np.einsum("ngkpq,gkc->ngcpq", gog, wg[:, :, :, r, s]) * inside
            for p in range(P):
                if not row_ok[p]:
                    continue
                for q in range(Q):
                    if col_ok[q]:
                        gi[:, :, :, rows[p], cols[q]] += contrib[:, :, :, p, q]
    return gi.reshape(N, C, H, W), gw.reshape(K, Cg, R, S), go.sum(axis=(0, 2, 3))


def cross_entropy_ref(x, t, reduction, ignore_index):
    """Line losses of logits (N, C, d...) or (C,), in float64, and the result after reduction."""
    x = np.asarray(x, np.float64)
    xl = x[None] if x.ndim == 1 else x
    tl = np.asarray(t)[None] if x.ndim == 1 else np.asarray(t)
    mx = xl.max(axis=1, keepdims=True)
    lse = (mx + np.log(np.exp(xl - mx).sum(axis=1, keepdims=True)))[:, 0]
    keep = tl != ignore_index
    safe = np.where(keep, tl, 0)
    picked = np.take_along_axis(xl, safe[:, None], axis=1)[:, 0]
    lines = np.where(keep, lse - picked, 0.0)
    if reduction == "none":
        return lines if x.ndim > 1 else lines[0]
    total = lines.sum()
    with np.errstate(invalid="ignore"):  # mean over no line: 0 / 0 = NaN, as torch
        return total / keep.sum() if reduction == "mean" else total


def cross_entropy_backward_ref(g, x, t, reduction, ignore_index):
    x = np.asarray(x, np.float64)
    xl = x[None] if x.ndim == 1 else x
    tl = np.asarray(t)[None] if x.ndim == 1 else np.asarray(t)
    p = np.exp(xl - xl.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    keep = tl != ignore_index
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, np.where(keep, tl, 0)[:, None], 1.0, axis=1)
    g = np.asarray(g, np.float64)
    if reduction == "none":
        scale = (g if x.ndim > 1 else g[None])[:, None]
    else:
        scale = np.full((xl.shape[0], 1) + xl.shape[2:], float(g) / (max(keep.sum(), 1) if reduction == "mean" else 1))
    grad = scale * (p - onehot) * keep[:, None]
    return grad if x.ndim > 1 else grad[0]


# --------------------------------------------------------------------------
# conv2d backward
# --------------------------------------------------------------------------

# (x shape, weight shape, stride, (top, bottom, left, right), dilation, groups)
CONV_CASES = {
    "plain-3x3": ((2, 3, 7, 6), (5, 3, 3, 3), 1, (1, 1, 1, 1), 1, 1),
    "stride-skips-inputs": ((1, 2, 9, 8), (3, 2, 2, 2), (3, 2), (0, 0, 0, 0), 1, 1),
    "stride-pad-dilation": ((2, 4, 11, 9), (6, 4, 3, 2), (2, 1), (2, 0, 1, 3), (2, 3), 1),
    "grouped": ((2, 6, 8, 7), (9, 2, 3, 3), 1, (1, 1, 0, 2), 1, 3),
    "depthwise": ((1, 5, 6, 6), (10, 1, 3, 3), 2, (1, 1, 1, 1), 1, 5),
    "1x1": ((3, 7, 4, 5), (2, 7, 1, 1), 1, (0, 0, 0, 0), 1, 1),
    "pixels-over-256": ((2, 2, 17, 19), (3, 2, 3, 3), 1, (1, 1, 1, 1), 1, 1),
    "batch-0": ((0, 3, 5, 5), (4, 3, 3, 3), 1, (1, 1, 1, 1), 1, 1),
    # 1800 weights: the batch of 7 splits 3 + 3 + 1 for grad_weight, 7 ways for grad_bias.
    "batch-split-unevenly": ((7, 8, 6, 5), (25, 8, 3, 3), 1, (1, 1, 1, 1), 1, 1),
}


def _conv_out(xs, ws, stride, pads, dilation):
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    P = (xs[2] + pads[0] + pads[1] - dh * (ws[2] - 1) - 1) // sh + 1
    Q = (xs[3] + pads[2] + pads[3] - dw * (ws[3] - 1) - 1) // sw + 1
    return (xs[0], ws[0], P, Q)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=list(CONV_CASES))
def test_conv2d_backward(case, dtype, rng):
    xs, ws, stride, pads, dilation, groups = CONV_CASES[case]
    stride, dilation = _pair(stride), _pair(dilation)
    x, w = ref.randn(rng, xs, dtype), ref.randn(rng, ws, dtype)
    go = ref.randn(rng, _conv_out(xs, ws, stride, pads, dilation), dtype)
    x0, w0, go0 = x.copy(), w.copy(), go.copy()
    gi, gw, gb = emu.conv2d_backward(go, x, w, stride, pads, dilation, groups)
    want = conv2d_backward_ref(go, x, w, stride, pads, dilation, groups)
    mags = conv2d_backward_ref(np.abs(go), np.abs(x), np.abs(w), stride, pads, dilation, groups)
    N, K, P, Q = go.shape
    lengths = (K // groups * ws[2] * ws[3], N * P * Q, N * P * Q)
    for got, expected, mag, length, name in zip((gi, gw, gb), want, mags, lengths, ("input", "weight", "bias")):
        ref.assert_sum_close(got, expected, mag, length, dtype, f"grad_{name}, {case}")
    for a, b in ((x, x0), (w, w0), (go, go0)):
        ref.assert_identical(a, b, "an input was modified")


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)])
def test_conv2d_backward_output_mask(mask, rng):
    xs, ws, stride, pads, dilation, groups = CONV_CASES["grouped"]
    x, w = ref.randn(rng, xs, np.float32), ref.randn(rng, ws, np.float32)
    go = ref.randn(rng, _conv_out(xs, ws, stride, pads, dilation), np.float32)
    got = emu.conv2d_backward(go, x, w, _pair(stride), pads, _pair(dilation), groups, output_mask=mask)
    full = emu.conv2d_backward(go, x, w, _pair(stride), pads, _pair(dilation), groups)
    for wanted, g, f in zip(mask, got, full):
        if wanted:
            ref.assert_identical(g, f)
        else:
            assert g is None


def test_conv2d_backward_rejects_a_fused_activation():
    x = np.ones((1, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="grad_output"):
        emu.conv2d_backward(np.ones((1, 2, 2, 2), np.float32), x, np.ones((1, 1, 2, 2), np.float32), (1, 1),
                            (0, 0, 0, 0), (1, 1), 1)


# --------------------------------------------------------------------------
# max_pool2d backward
# --------------------------------------------------------------------------

POOL_CASES = {
    "2x2-stride2": ((2, 3, 8, 6), 2, 2, 0, 1, False),
    "overlapping-3x3-stride1": ((2, 2, 9, 7), 3, 1, 1, 1, False),
    # One plane over several blocks of 256 outputs: the overlapping adds of
    # a plane come from blocks on different OS threads.
    "overlapping-large-plane": ((1, 2, 40, 41), 3, 1, 1, 1, False),
    "dilated-ceil": ((1, 3, 10, 9), (3, 2), (2, 3), (1, 1), (2, 1), True),
}


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES, ids=list(POOL_CASES))
def test_max_pool2d_backward(case, dtype, threads, rng):
    shape, k, s, p, d, ceil = POOL_CASES[case]
    # Many ties, so that overlapping windows pick the same element often.
    x = rng.integers(-3, 4, size=shape).astype(dtype)
    _, idx = ref.max_pool2d(x, k, s, p, d, ceil)
    go = ref.randn(rng, idx.shape, dtype)
    idx0, go0 = idx.copy(), go.copy()
    previous = emu.threads()
    emu.set_threads(threads)
    try:
        gi = emu.max_pool2d_backward(go, idx, shape)
    finally:
        emu.set_threads(previous)
    N, C, H, W = shape
    want = np.zeros((N * C, H * W))
    mag = np.zeros((N * C, H * W))
    planes = np.repeat(np.arange(N * C), idx[0, 0].size)
    np.add.at(want, (planes, idx.reshape(-1)), go.reshape(-1).astype(np.float64))
    np.add.at(mag, (planes, idx.reshape(-1)), np.abs(go.reshape(-1)).astype(np.float64))
    kh, kw = _pair(k)
    ref.assert_sum_close(gi, want.reshape(shape), mag.reshape(shape), kh * kw, dtype, case)
    assert np.count_nonzero(want) > 0
    ref.assert_identical(idx, idx0)
    ref.assert_identical(go, go0)


def test_max_pool2d_backward_skips_out_of_range_indices(rng):
    go = ref.randn(rng, (1, 1, 2, 2), np.float32)
    idx = np.array([[[[0, -1], [16, 15]]]], np.int64)  # -1 and 16 lie outside the 4 x 4 plane
    gi = emu.max_pool2d_backward(go, idx, (1, 1, 4, 4))
    want = np.zeros(16, np.float32)
    want[0], want[15] = go[0, 0, 0, 0], go[0, 0, 1, 1]
    ref.assert_identical(gi.reshape(-1), want)


def test_emulated_atomic_add_is_atomic_across_os_threads():
    previous = emu.threads()
    emu.set_threads(4)
    try:
        out = emu.selftest("atomic_add", blocks=64)
    finally:
        emu.set_threads(previous)
    # out starts at -1; 64 blocks x 64 threads x 16 adds land on each of out[0..3].
    assert list(out[:4]) == [64 * 64 * 16 - 1.0] * 4
    assert (out[4:] == -1.0).all()


# --------------------------------------------------------------------------
# linear backward
# --------------------------------------------------------------------------

# (M rows, K in_features, N out_features): one below, on and above the tile
# edges, primes, 1 and empty.
LINEAR_SHAPES = [(1, 1, 1), (BM - 1, BK + 1, BN + 1), (BM, BK, BN), (BM + 1, 2 * BK - 1, BN - 1), (3, 100, 7),
                 (130, 9, 70), (0, 5, 4), (5, 0, 4), (4, 6, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in LINEAR_SHAPES])
def test_linear_backward(shape, dtype, rng):
    M, K, N = shape
    x, w, go = ref.randn(rng, (M, K), dtype), ref.randn(rng, (N, K), dtype), ref.randn(rng, (M, N), dtype)
    gi, gw, gb = emu.linear_backward(go, x, w)
    g64, x64, w64 = (a.astype(np.float64) for a in (go, x, w))
    ref.assert_sum_close(gi, g64 @ w64, np.abs(g64) @ np.abs(w64), N, dtype, "grad_input")
    ref.assert_sum_close(gw, g64.T @ x64, np.abs(g64).T @ np.abs(x64), M, dtype, "grad_weight")
    ref.assert_sum_close(gb, g64.sum(0), np.abs(g64).sum(0), M, dtype, "grad_bias")


def test_linear_backward_output_mask(rng):
    x, w, go = ref.randn(rng, (9, 5), np.float32), ref.randn(rng, (3, 5), np.float32), ref.randn(rng, (9, 3),
                                                                                               np.float32)
    gi, gw, gb = emu.linear_backward(go, x, w, output_mask=(False, True, False))
    assert gi is None and gb is None and gw.shape == (3, 5)


# --------------------------------------------------------------------------
# relu backward
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000])
def test_relu_backward(n, dtype, rng):
    y = np.maximum(ref.randn(rng, n, dtype), 0)
    y[: n // 3] = 0.0
    if n > 3:
        y[1], y[2] = np.nan, -0.0
    go = ref.randn(rng, n, dtype)
    got = emu.relu_backward(go, y)
    # torch's threshold_backward: zero where output <= 0; a NaN output passes the gradient.
    want = np.where(y <= 0, 0, go).astype(dtype)
    ref.assert_identical(got, want)


# --------------------------------------------------------------------------
# softmax + cross-entropy
# --------------------------------------------------------------------------

# (logits shape, with ignored targets)
CE_SHAPES = [(7,), (1, 1), (5, 10), (300, 3), (4, 1000), (3, 5, 4), (2, 4, 3, 5), (0, 6)]


def _ce_inputs(rng, shape, dtype, ignore):
    x = (3 * ref.randn(rng, shape, dtype)).astype(dtype)
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    C = shape[0] if len(shape) == 1 else shape[1]
    t = rng.integers(0, C, size=tshape).astype(np.int64)
    if ignore and t.size > 1:
        t.reshape(-1)[::3] = -100
    return x, t, C


def _ce_tolerance(x, t, C, dtype):
    """Per line: lse and x_t round at a few eps of their size, the sum of C exponentials at sqrt(C) eps."""
    x64 = np.asarray(x, np.float64)
    xl = x64[None] if x64.ndim == 1 else x64
    return 8 * np.finfo(dtype).eps * (np.abs(xl).max(axis=1) + 1 + math.sqrt(C))


@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=[str(s) for s in CE_SHAPES])
def test_cross_entropy(shape, dtype, reduction, ignore, rng):
    x, t, C = _ce_inputs(rng, shape, dtype, ignore)
    got = emu.cross_entropy(x, t, reduction, -100)
    want = cross_entropy_ref(x, t, reduction, -100)
    line_tol = _ce_tolerance(x, t, C, dtype)
    if reduction == "none":
        tol = line_tol if x.ndim > 1 else line_tol[0]
    else:
        lines = np.abs(cross_entropy_ref(x, t, "none", -100))
        kept = max(int(np.sum(t != -100)), 1) if reduction == "mean" else 1
        # Each line's error, plus the float sum of the lines.
        tol = (line_tol.sum() + lines.size * np.finfo(dtype).eps * lines.sum()) / kept
    assert got.shape == np.shape(want) and got.dtype == dtype
    ref._assert_within(got, want, tol, f"{shape} {reduction}")


def test_cross_entropy_all_ignored_mean_is_nan_and_bad_target_is_nan():
    x = np.ones((3, 4), np.float32)
    assert np.isnan(emu.cross_entropy(x, np.full(3, -100, np.int64), "mean", -100))
    assert emu.cross_entropy(x, np.full(3, -100, np.int64), "sum", -100) == 0
    lines = emu.cross_entropy(x, np.array([0, 4, -5], np.int64), "none", -100)
    assert lines[0] == pytest.approx(math.log(4), rel=1e-6) and np.isnan(lines[1:]).all()


@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=[str(s) for s in CE_SHAPES])
def test_cross_entropy_backward(shape, dtype, reduction, ignore, rng):
    x, t, C = _ce_inputs(rng, shape, dtype, ignore)
    g = ref.randn(rng, t.shape if reduction == "none" else (), dtype)
    g = np.asarray(g, dtype)
    got = emu.cross_entropy_backward(g, x, t, reduction, -100)
    want = cross_entropy_backward_ref(g, x, t, reduction, -100)
    # softmax's error (a few eps times 1 + |x - max| + sqrt(C), relative), times |g| / kept.
    x64 = np.asarray(x, np.float64)
    axis = 0 if x.ndim == 1 else 1
    spread = 1 + np.abs(x64 - x64.max(axis=axis, keepdims=True, initial=-np.inf)) + math.sqrt(C)
    kept = max(int(np.sum(t != -100)), 1) if reduction == "mean" else 1
    gscale = np.abs(np.asarray(g, np.float64))
    if reduction == "none" and x.ndim > 1:
        gscale = np.expand_dims(gscale, 1)
    tol = 8 * np.finfo(dtype).eps * spread * (np.abs(want) + gscale / kept) + np.finfo(dtype).tiny
    assert got.shape == x.shape and got.dtype == dtype
    ref._assert_within(got, want, tol, f"{shape} {reduction}")
