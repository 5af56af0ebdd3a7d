"""The backward ops and Adam against float64 references, torch.autograd, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lepton_kernels as lk
import reference as ref
import reference_backward as rb

DTYPES = [np.float32, np.float64]


def _batched(shape):
    return len(shape) == 4


def _conv_out_shape(x_shape, w_shape, kwargs):
    """The forward output's shape, from the library's own forward op on zeros."""
    x = np.zeros(x_shape, np.float64)
    w = np.zeros(w_shape, np.float64)
    return lk.conv2d(x, w, **{k: v for k, v in kwargs.items() if k != "activation"}).shape


def check_conv_backward(rng, x_shape, w_shape, kwargs, dtype, mask=(True, True, True), context=""):
    kwargs = {k: v for k, v in kwargs.items() if k != "activation"}
    y_shape = _conv_out_shape(x_shape, w_shape, kwargs)
    x = ref.randn(rng, x_shape, dtype)
    w = ref.randn(rng, w_shape, dtype)
    gy = ref.randn(rng, y_shape, dtype)
    copies = [a.copy() for a in (gy, x, w)]
    got = lk.conv2d_backward(gy, x, w, **kwargs, output_mask=mask)
    for a, c in zip((gy, x, w), copies):
        ref.assert_identical(a, c, "an input was modified")
    b4 = lambda a: a if _batched(x_shape) else a[None]  # noqa: E731
    expected = rb.conv2d_backward(b4(gy), b4(x), w, **kwargs)
    magnitude = rb.conv2d_backward(np.abs(b4(gy)), np.abs(b4(x)), np.abs(w), **kwargs)
    if not _batched(x_shape):
        expected = (expected[0][0],) + expected[1:]
        magnitude = (magnitude[0][0],) + magnitude[1:]
    K, Cg, R, S = w_shape
    groups = kwargs.get("groups", 1)
    # grad_input sums Kg*R*S products per pixel (at most); grad_weight and
    # grad_bias sum over every image and output pixel.
    n_out = int(np.prod(y_shape)) // y_shape[-3]
    lengths = ((K // groups) * R * S, n_out, n_out)
    context = f"x {x_shape}, w {w_shape}, {kwargs}, mask {mask}; {context}"
    for name, g, e, m, n, want in zip(("grad_input", "grad_weight", "grad_bias"), got, expected, magnitude, lengths,
                                      mask):
        if not want:
            assert g is None, f"{name} should be None; {context}"
            continue
        ref.assert_sum_close(g, e, m, n, dtype, f"{name}; {context}")
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=ref.conv_cases(), seed=ref.SEEDS, mask=st.sampled_from([(True, True, True), (True, False, False),
                                                                    (False, True, True), (False, False, True)]))
def test_conv2d_backward_matches_reference(dtype, case, seed, mask):
    x_shape, w_shape, _, kwargs = case
    check_conv_backward(np.random.default_rng(seed), x_shape, w_shape, kwargs, dtype, mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_backward_isa_levels_and_tile_edges(isa, dtype, rng):
    # Output channels and channel x tap counts on the microkernel tile edges,
    # both GEMM orientations of grad_weight, and pixel counts past one pixel block.
    for k in (1, 7, 8, 9, 12, 13, 32, 33, 49):
        for cg in (1, 3, 6):
            check_conv_backward(rng, (2, cg, 9, 11), (k, cg, 3, 3), dict(padding=1), dtype, context=f"k={k}")
    check_conv_backward(rng, (1, 64, 30, 30), (16, 64, 3, 3), dict(padding=1), dtype)  # blocks of pixels
    check_conv_backward(rng, (3, 8, 20, 20), (8, 4, 3, 3), dict(stride=2, padding=1, groups=2), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_backward_threads_agree(dtype, rng, restore_threads):
    # Images split among threads (partial sums) and, with fewer images than
    # threads, grad_input by channel blocks: every split gives the reference.
    for threads in (1, 2, 3):
        lk.set_num_threads(threads)
        for n in (1, 2, 5):
            check_conv_backward(rng, (n, 6, 16, 15), (10, 6, 3, 3), dict(padding=(1, 2), dilation=(1, 2)), dtype,
                                context=f"threads={threads}")


def test_conv2d_backward_seed_network(rng):
    # The seed network's layer at a training batch: 1 -> 32 channels, 3x3, 28x28.
    for dtype in DTYPES:
        check_conv_backward(rng, (64, 1, 28, 28), (32, 1, 3, 3), {}, dtype)


def test_conv2d_backward_fills_pooled_memory(rng):
    # Large outputs come from the output pool: hand it a NaN-filled block of
    # each output's size first, so an element the op does not write shows.
    x_shape, w_shape = (4, 16, 40, 40), (16, 16, 3, 3)
    for shape in (x_shape,):
        poison = lk.relu(np.full(shape, np.nan, np.float32))
        del poison
    check_conv_backward(rng, x_shape, w_shape, dict(padding=1), np.float32)


# --------------------------------------------------------------------------
# conv2d_max_pool2d: indices from the fused pass, and its backward
# --------------------------------------------------------------------------

FUSED_POOLS = [
    dict(kernel_size=2),
    dict(kernel_size=3, pool_stride=1),  # overlapping windows: gradients add up
    dict(kernel_size=3, pool_stride=2, pool_padding=1),
    dict(kernel_size=(2, 3), pool_stride=(1, 2), pool_dilation=(2, 1), ceil_mode=True),
]


def _window_check(conv, pooled, idx, pool):
    """Each index lies in its window, holds the window's maximum, and is its first position."""
    N, K, P, Q = conv.shape
    kh, kw = ref._pair(pool.get("kernel_size", 2))
    sh, sw = ref._pair(pool.get("pool_stride") or (kh, kw))
    ph, pw = ref._pair(pool.get("pool_padding", 0))
    dh, dw = ref._pair(pool.get("pool_dilation", 1))
    flat = conv.reshape(N, K, P * Q)
    for n in range(N):
        for k in range(K):
            for i in range(idx.shape[2]):
                for j in range(idx.shape[3]):
                    taps = [(h, w) for h in range(i * sh - ph, i * sh - ph + dh * (kh - 1) + 1, dh)
                            for w in range(j * sw - pw, j * sw - pw + dw * (kw - 1) + 1, dw)
                            if 0 <= h < P and 0 <= w < Q]
                    positions = [h * Q + w for h, w in taps]
                    e = int(idx[n, k, i, j])
                    assert e in positions, f"index {e} outside window ({i}, {j}) of plane ({n}, {k})"
                    vals = flat[n, k, positions]
                    if np.isnan(pooled[n, k, i, j]):
                        assert np.isnan(flat[n, k, e])
                    else:
                        assert flat[n, k, e] == pooled[n, k, i, j]
                        assert positions.index(e) == int(np.argmax(vals == vals.max())), "not the first maximum"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool", FUSED_POOLS)
def test_fused_forward_indices(dtype, pool, rng):
    x = ref.randn(rng, (2, 3, 13, 12), dtype)
    w = ref.randn(rng, (5, 3, 3, 3), dtype)
    b = ref.randn(rng, 5, dtype)
    for activation in ("relu", None):
        plain = lk.conv2d_max_pool2d(x, w, b, padding=1, activation=activation, **pool)
        out, idx = lk.conv2d_max_pool2d(x, w, b, padding=1, activation=activation, return_indices=True, **pool)
        ref.assert_identical(out, plain, "return_indices changed the output")
        assert idx.dtype == np.int64 and idx.shape == out.shape
        # The fused pass's own convolution values: out is exact at each index.
        conv = lk.conv2d(x, w, b, padding=1, activation=activation)
        conv_at = np.take_along_axis(conv.reshape(*conv.shape[:2], -1), idx.reshape(*idx.shape[:2], -1), 2)
        magnitude = ref.conv2d(np.abs(x), np.abs(w), np.abs(b), padding=1)
        mag_at = np.take_along_axis(magnitude.reshape(*conv.shape[:2], -1), idx.reshape(*idx.shape[:2], -1), 2)
        ref.assert_sum_close(conv_at.reshape(out.shape), out, mag_at.reshape(out.shape), 28, dtype,
                             f"{pool} {activation}")
        # Where the forward ops agree bit for bit, indices are max_pool2d's.
        _, idx_unfused = lk.max_pool2d(conv, pool.get("kernel_size", 2), pool.get("pool_stride"),
                                       pool.get("pool_padding", 0), pool.get("pool_dilation", 1),
                                       pool.get("ceil_mode", False), return_indices=True)
        same = np.all(lk.max_pool2d(conv, pool.get("kernel_size", 2), pool.get("pool_stride"),
                                    pool.get("pool_padding", 0), pool.get("pool_dilation", 1),
                                    pool.get("ceil_mode", False)) == out)
        if same:
            ref.assert_identical(idx, idx_unfused)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_forward_indices_ties_and_nan(dtype, rng):
    # Zero weights: every convolution output is its bias, so every window
    # ties and the first position must win; relu(-1) ties at 0 the same way.
    x = ref.randn(rng, (2, 2, 9, 10), dtype)
    w = np.zeros((3, 2, 3, 3), dtype)
    b = np.array([1.5, -1.0, 0.0], dtype)
    for pool in FUSED_POOLS:
        out, idx = lk.conv2d_max_pool2d(x, w, b, return_indices=True, **pool)
        conv = np.maximum(np.broadcast_to(b[None, :, None, None], (2, 3, 7, 8)), 0).astype(dtype)
        _window_check(conv, out, idx, pool)
    # NaN in the input: NaN conv outputs win their windows, as in max_pool2d.
    x[0, 1, 4, 4] = np.nan
    w = ref.randn(rng, (3, 2, 3, 3), dtype)
    out, idx = lk.conv2d_max_pool2d(x, w, None, return_indices=True, activation=None)
    conv = lk.conv2d(x, w)
    _window_check(conv, out, idx, dict(kernel_size=2))
    assert np.isnan(out).any()


def check_fused_backward(rng, x_shape, w_shape, conv_kwargs, pool, activation, dtype, mask=(True, True, True)):
    x = ref.randn(rng, x_shape, dtype)
    w = ref.randn(rng, w_shape, dtype)
    b = ref.randn(rng, w_shape[0], dtype)
    out, idx = lk.conv2d_max_pool2d(x, w, b, **conv_kwargs, activation=activation, return_indices=True, **pool)
    gy = ref.randn(rng, out.shape, dtype)
    copies = [a.copy() for a in (gy, x, w, out, idx)]
    got = lk.conv2d_max_pool2d_backward(gy, x, w, out, idx, **conv_kwargs, activation=activation, output_mask=mask)
    for a, c in zip((gy, x, w, out, idx), copies):
        ref.assert_identical(a, c, "an input was modified")
    conv_shape = _conv_out_shape(x_shape, w_shape, conv_kwargs)
    b4 = lambda a: a if _batched(x_shape) else a[None]  # noqa: E731
    conv_shape4 = conv_shape if _batched(x_shape) else (1,) + conv_shape
    expected = rb.conv2d_max_pool2d_backward(b4(gy), b4(x), w, b4(out), b4(idx), conv_shape4, **conv_kwargs,
                                             activation=activation)
    magnitude = rb.conv2d_max_pool2d_backward(np.abs(b4(gy)), np.abs(b4(x)), np.abs(w), b4(out), b4(idx),
                                              conv_shape4, **conv_kwargs, activation=activation)
    if not _batched(x_shape):
        expected = (expected[0][0],) + expected[1:]
        magnitude = (magnitude[0][0],) + magnitude[1:]
    K, Cg, R, S = w_shape
    groups = conv_kwargs.get("groups", 1)
    # Overlapping windows first add up to kh*kw pooled gradients per conv pixel.
    kh, kw = ref._pair(pool.get("kernel_size", 2))
    n_out = int(np.prod(conv_shape)) // conv_shape[-3]
    lengths = ((K // groups) * R * S * kh * kw, n_out * kh * kw, n_out * kh * kw)
    context = f"x {x_shape} w {w_shape} {conv_kwargs} {pool} {activation} {mask}"
    for name, g, e, m, n, want in zip(("grad_input", "grad_weight", "grad_bias"), got, expected, magnitude, lengths,
                                      mask):
        if not want:
            assert g is None
            continue
        ref.assert_sum_close(g, e, m, n, dtype, f"{name}; {context}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool", FUSED_POOLS)
@pytest.mark.parametrize("activation", ["relu", None])
def test_fused_backward_matches_reference(dtype, pool, activation, rng):
    check_fused_backward(rng, (3, 4, 12, 13), (6, 4, 3, 3), dict(padding=1), pool, activation, dtype)
    check_fused_backward(rng, (1, 6, 11, 9), (4, 3, 2, 3), dict(stride=(1, 2), dilation=(2, 1), groups=2), pool,
                         activation, dtype, mask=(True, False, True))
    check_fused_backward(rng, (2, 11, 10), (5, 2, 3, 3), dict(padding="same"), pool, activation, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_backward_threads_and_isa(isa, dtype, rng, restore_threads):
    # Fewer images than threads (grad_input by channel blocks) and more, at
    # every ISA level: the pooled gradient scattered into GEMM panels and
    # into full images must agree with the reference.
    for threads in (1, 2, 3):
        lk.set_num_threads(threads)
        for n in (1, 4):
            check_fused_backward(rng, (n, 3, 14, 13), (12, 3, 3, 3), dict(padding=1), dict(kernel_size=2), "relu",
                                 dtype)
            check_fused_backward(rng, (n, 1, 12, 12), (32, 1, 3, 3), {}, dict(kernel_size=2), "relu", dtype,
                                 mask=(False, True, True))


def test_fused_backward_seed_network(rng):
    for dtype in DTYPES:
        check_fused_backward(rng, (64, 1, 28, 28), (32, 1, 3, 3), {}, dict(kernel_size=2), "relu", dtype,
                             mask=(False, True, True))


def test_fused_backward_bad_indices(rng):
    x = ref.randn(rng, (2, 3, 8, 8), np.float32)
    w = ref.randn(rng, (4, 3, 3, 3), np.float32)
    out, idx = lk.conv2d_max_pool2d(x, w, None, return_indices=True)
    gy = np.ones_like(out)
    for bad in (-1, 36, 10**12):
        idx2 = idx.copy()
        idx2[1, 2, 0, 1] = bad
        with pytest.raises(ValueError, match="indices"):
            lk.conv2d_max_pool2d_backward(gy, x, w, out, idx2)
    with pytest.raises(TypeError, match="indices"):
        lk.conv2d_max_pool2d_backward(gy, x, w, out, idx.astype(np.int32))
    with pytest.raises(ValueError, match="indices"):
        lk.conv2d_max_pool2d_backward(gy, x, w, out, idx[:, :, :1])
    with pytest.raises(ValueError, match="output"):
        lk.conv2d_max_pool2d_backward(gy, x, w, out[:1], idx)
    with pytest.raises(TypeError, match="output"):
        lk.conv2d_max_pool2d_backward(gy, x, w, out.astype(np.float64), idx)
    with pytest.raises(ValueError, match="activation"):
        lk.conv2d_max_pool2d_backward(gy, x, w, out, idx, activation="tanh")
    with pytest.raises(ValueError, match="grad_output"):  # pooled from another convolution's output
        lk.conv2d_max_pool2d_backward(gy, x, w[:2], out, idx)


# --------------------------------------------------------------------------
# max_pool2d, relu, linear
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@given(case=ref.pool_cases(), seed=ref.SEEDS)
def test_max_pool2d_backward_matches_reference(dtype, case, seed):
    rng = np.random.default_rng(seed)
    shape, kwargs = case
    x = ref.fill_pool_input(rng, shape, dtype, "ties")
    y, idx = lk.max_pool2d(x, **kwargs, return_indices=True)
    gy = ref.randn(rng, y.shape, dtype)
    copies = (gy.copy(), idx.copy())
    if (idx >= shape[-1] * shape[-2]).any():
        # A window wholly in the padding reports a position past the plane
        # (as torch does): its gradient has nowhere to go, and the op refuses
        # rather than write outside the input.
        with pytest.raises(ValueError, match="indices"):
            lk.max_pool2d_backward(gy, idx, shape)
        return
    got = lk.max_pool2d_backward(gy, idx, shape)
    ref.assert_identical(gy, copies[0])
    ref.assert_identical(idx, copies[1])
    b4 = (lambda a: a) if len(shape) == 4 else (lambda a: a[None])
    expected = rb.max_pool2d_backward(b4(gy), b4(idx), b4(np.empty(shape)).shape)
    magnitude = rb.max_pool2d_backward(np.abs(b4(gy)), b4(idx), b4(np.empty(shape)).shape)
    if len(shape) == 3:
        expected, magnitude = expected[0], magnitude[0]
    kh, kw = ref._pair(kwargs["kernel_size"])
    # An input pixel collects at most one gradient per window covering it.
    ref.assert_sum_close(got, expected, magnitude, kh * kw, dtype, f"{shape} {kwargs}")


def test_max_pool2d_backward_errors(rng):
    x = ref.randn(rng, (2, 3, 6, 6), np.float32)
    y, idx = lk.max_pool2d(x, 2, return_indices=True)
    for bad in (-1, 36):
        idx2 = idx.copy()
        idx2[0, 1, 2, 2] = bad
        with pytest.raises(ValueError, match="indices"):
            lk.max_pool2d_backward(y, idx2, x.shape)
    with pytest.raises(ValueError, match="indices"):  # 36 is in range for the shape given, 35 is the last
        idx2 = idx.copy()
        idx2[0, 0, 0, 0] = 35
        lk.max_pool2d_backward(y, idx2, (2, 3, 5, 7))
    with pytest.raises(TypeError, match="indices"):
        lk.max_pool2d_backward(y, idx.astype(np.float32), x.shape)
    with pytest.raises(ValueError, match="indices"):
        lk.max_pool2d_backward(y, idx[:1], x.shape)
    with pytest.raises(ValueError, match="input_shape"):
        lk.max_pool2d_backward(y, idx, (2, 4, 6, 6))
    with pytest.raises(ValueError, match="input_shape"):
        lk.max_pool2d_backward(y, idx, (3, 6, 6))
    with pytest.raises(TypeError, match="grad_output"):
        lk.max_pool2d_backward(y.astype(np.int32), idx, x.shape)


def test_max_pool2d_backward_fills_pooled_memory(rng):
    shape = (8, 16, 32, 32)  # 512 KB: from the output pool
    poison = lk.relu(np.full(shape, np.nan, np.float32))
    del poison
    x = ref.randn(rng, shape, np.float32)
    y, idx = lk.max_pool2d(x, 3, 2, 1, return_indices=True)
    got = lk.max_pool2d_backward(y, idx, shape)
    ref.assert_sum_close(got, rb.max_pool2d_backward(y, idx, shape), rb.max_pool2d_backward(np.abs(y), idx, shape),
                         9, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward(isa, dtype, rng):
    for shape in [(), (1,), (7, 5), (3, 4, 5, 6), (300_001,)]:
        y = ref.randn(rng, shape, dtype)
        y[...] = np.maximum(y, 0)
        if y.size > 4:
            y.flat[:4] = [0.0, -0.0, np.nan, 1e-30]
        gy = ref.randn(rng, shape, dtype)
        copies = (gy.copy(), y.copy())
        got = lk.relu_backward(gy, y)
        ref.assert_identical(got, rb.relu_backward(gy, y).astype(dtype))
        ref.assert_identical(gy, copies[0])
        ref.assert_identical(y, copies[1])
    # Any layout.
    y = np.maximum(ref.randn(rng, (6, 8), dtype), 0)
    gy = ref.randn(rng, (8, 6), dtype).T
    ref.assert_identical(lk.relu_backward(gy, y[:, ::-1]), rb.relu_backward(gy, y[:, ::-1]).astype(dtype))
    with pytest.raises(ValueError, match="output"):
        lk.relu_backward(gy, y[:2])
    with pytest.raises(TypeError, match="output"):
        lk.relu_backward(gy, y.astype(np.float32 if dtype == np.float64 else np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, out_features", [((64, 5408), 10), ((1, 7), 3), ((3, 5, 17), 9), ((13,), 4),
                                                   ((0, 6), 5), ((4, 0), 3), ((97, 49), 48), ((2, 3), 0)])
def test_linear_backward(dtype, x_shape, out_features, rng):
    x = ref.randn(rng, x_shape, dtype)
    w = ref.randn(rng, (out_features, x_shape[-1]), dtype)
    gy = ref.randn(rng, x_shape[:-1] + (out_features,), dtype)
    copies = [a.copy() for a in (gy, x, w)]
    got = lk.linear_backward(gy, x, w)
    for a, c in zip((gy, x, w), copies):
        ref.assert_identical(a, c)
    expected = rb.linear_backward(gy, x, w)
    magnitude = rb.linear_backward(np.abs(gy), np.abs(x), np.abs(w))
    rows = int(np.prod(x_shape[:-1]))
    for name, g, e, m, n in zip(("grad_input", "grad_weight", "grad_bias"), got, expected, magnitude,
                                (out_features, rows, rows)):
        ref.assert_sum_close(g, e, m, n, dtype, f"{name} {x_shape} {out_features}")
    # Masks, and transposed inputs.
    gx, gw, gb = lk.linear_backward(gy, x, w, output_mask=(False, True, False))
    assert gx is None and gb is None
    ref.assert_identical(gw, got[1])
    if len(x_shape) == 2:
        gxt = lk.linear_backward(np.ascontiguousarray(gy.T).T, np.asfortranarray(x), w[::1])
        for a, b in zip(gxt, got):
            ref.assert_sum_close(a, b, np.abs(b) + 1e-30, 1, dtype)


def test_linear_backward_errors(rng):
    x = ref.randn(rng, (4, 6), np.float32)
    w = ref.randn(rng, (3, 6), np.float32)
    gy = ref.randn(rng, (4, 3), np.float32)
    with pytest.raises(ValueError, match="grad_output"):
        lk.linear_backward(gy[:, :2], x, w)
    with pytest.raises(ValueError, match="weight"):
        lk.linear_backward(gy, x, w[:, :5])
    with pytest.raises(TypeError, match="weight"):
        lk.linear_backward(gy, x, w.astype(np.float64))
    with pytest.raises(ValueError, match="output_mask"):
        lk.linear_backward(gy, x, w, output_mask=(True, True))
    with pytest.raises(TypeError, match="input"):
        lk.linear_backward(gy, x.tolist(), w)


# --------------------------------------------------------------------------
# cross-entropy
# --------------------------------------------------------------------------

def _ce_tolerance(x, dtype):
    # Each row: a max, a sum of C exponentials (relative error ~ sqrt(C) eps)
    # and a log: a few eps of (1 + |x - max| + sqrt(C)) per row, as in the
    # log-softmax check; a reduction adds N rows on top (sqrt(N) growth).
    eps = np.finfo(dtype).eps
    x64 = x.astype(np.float64)
    per_row = 8 * eps * (1 + np.max(np.abs(x64 - x64.max(axis=1, keepdims=True)), axis=1) + math.sqrt(x.shape[1]))
    return per_row


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N, C", [(1, 1), (1, 10), (64, 10), (13, 7), (300, 1000), (5, 2)])
def test_cross_entropy(dtype, reduction, N, C, rng):
    x = (ref.randn(rng, (N, C), dtype) * 4).astype(dtype)
    t = rng.integers(0, C, N).astype(np.int64)
    ignore = rng.random(N) < 0.2
    t[ignore] = -100
    copies = (x.copy(), t.copy())
    loss = lk.cross_entropy(x, t, reduction=reduction)
    expected = rb.cross_entropy(x, t, reduction)
    per_row = _ce_tolerance(x, dtype)
    assert loss.dtype == dtype and loss.shape == np.shape(expected)
    if reduction == "none":
        tol = per_row * (1 + np.abs(expected))
    else:
        kept = max(int((~ignore).sum()), 1)
        tol = (per_row.max() * (1 + np.abs(rb.cross_entropy(x, t, "none")).max()) * math.sqrt(N)
               * (1 if reduction == "sum" else 1 / kept) * (kept if reduction == "sum" else 1))
    ref._assert_within(loss, expected, tol, f"loss {reduction} {N}x{C}")
    g = ref.randn(rng, (N,) if reduction == "none" else (), dtype)
    grad = lk.cross_entropy_backward(g, x, t, reduction=reduction)
    ref.assert_identical(x, copies[0])
    ref.assert_identical(t, copies[1])
    expected_grad = rb.cross_entropy_backward(g, x, t, reduction)
    # softmax's relative accuracy times |scale|, plus the one-hot's rounding.
    scale = np.abs(g) if reduction == "none" else np.full(N, abs(float(g)) / (
        max(int((~ignore).sum()), 1) if reduction == "mean" else 1))
    ref._assert_within(grad, expected_grad, (per_row * scale)[:, None] * 2 + np.finfo(dtype).tiny,
                       f"grad {reduction} {N}x{C}")
    assert np.all(grad[ignore] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_stable_and_edges(dtype):
    # Huge logits: a naive exp overflows; the stable form gives the exact answer.
    x = np.array([[1e4, 0.0, -1e4], [50.0, 50.0, 50.0]], dtype)
    t = np.array([1, 2], np.int64)
    loss = lk.cross_entropy(x, t, reduction="none")
    np.testing.assert_allclose(loss, [1e4, math.log(3)], rtol=4 * np.finfo(dtype).eps)
    g = lk.cross_entropy_backward(np.ones((), dtype), x, t, reduction="sum")
    np.testing.assert_allclose(g, [[1, -1, 0], [1 / 3, 1 / 3, -2 / 3]], atol=4 * np.finfo(dtype).eps)
    # Every row ignored: torch's mean is 0/0 = NaN, and the gradient is 0.
    t_ign = np.array([-100, -100], np.int64)
    assert np.isnan(lk.cross_entropy(x, t_ign))
    assert lk.cross_entropy(x, t_ign, reduction="sum") == 0
    assert np.all(lk.cross_entropy_backward(np.ones((), dtype), x, t_ign) == 0)
    # A custom ignore_index, and a NaN logit poisons its row only.
    x2 = np.array([[0.0, np.nan], [1.0, 2.0]], dtype)
    loss = lk.cross_entropy(x2, np.array([0, 3], np.int64), reduction="none", ignore_index=3)
    assert np.isnan(loss[0]) and loss[1] == 0


def test_cross_entropy_errors():
    x = np.zeros((3, 4), np.float32)
    t = np.array([0, 1, 2], np.int64)
    with pytest.raises(ValueError, match="target"):
        lk.cross_entropy(x, np.array([0, 4, 1], np.int64))
    with pytest.raises(ValueError, match="target"):
        lk.cross_entropy_backward(np.float32(1), x, np.array([0, -1, 1], np.int64))
    with pytest.raises(TypeError, match="target"):
        lk.cross_entropy(x, t.astype(np.int32))
    with pytest.raises(ValueError, match="target"):
        lk.cross_entropy(x, t[:2])
    with pytest.raises(ValueError, match="input"):
        lk.cross_entropy(x[0], t)
    with pytest.raises(ValueError, match="reduction"):
        lk.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="grad_loss"):
        lk.cross_entropy_backward(np.ones(3, np.float32), x, t)
    with pytest.raises(TypeError, match="grad_loss"):
        lk.cross_entropy_backward(np.ones((), np.float64), x, t)
    with pytest.raises(ValueError, match="grad_loss"):
        lk.cross_entropy_backward(np.ones((), np.float32), x, t, reduction="none")


# --------------------------------------------------------------------------
# Adam
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 7, 16, 1000, 200_003])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_step(isa, dtype, size, weight_decay, rng):
    p0 = ref.randn(rng, size, dtype)
    grads = [ref.randn(rng, size, dtype) for _ in range(5)]
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for step, g in enumerate(grads, start=1):
        gc = g.copy()
        assert lk.adam_step(p, g, m, v, step=step, lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6,
                            weight_decay=weight_decay) is None
        ref.assert_identical(g, gc, "grad was modified")
    ep, em, ev = rb.adam(p0, grads, 0.01, 0.8, 0.99, 1e-6, weight_decay)
    # The moments are sums of a few decayed terms that may cancel: a few eps
    # per step of the same sums over absolute values. The parameter moves by
    # lr-sized steps, each rounded relative to lr and to |param|.
    _, em_abs, _ = rb.adam(np.abs(p0), [np.abs(g) for g in grads], 0.01, 0.8, 0.99, 1e-6, weight_decay)
    eps = np.finfo(dtype).eps
    steps = len(grads)
    ref._assert_within(m, em, 8 * steps * eps * em_abs, "exp_avg")
    ref._assert_within(v, ev, 8 * steps * eps * np.abs(ev), "exp_avg_sq")
    ref._assert_within(p, ep, 8 * steps * eps * (np.abs(ep) + 0.01), "param")


def test_adam_step_errors(rng):
    p = ref.randn(rng, (4, 5), np.float32)
    m, v, g = np.zeros_like(p), np.zeros_like(p), ref.randn(rng, (4, 5), np.float32)
    with pytest.raises(ValueError, match="param"):
        lk.adam_step(p.T, g.T, m.T, v.T, step=1)
    ro = p.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="param"):
        lk.adam_step(ro, g, m, v, step=1)
    with pytest.raises(ValueError, match="exp_avg"):
        lk.adam_step(p, g, m[:, :4], v, step=1)
    with pytest.raises(TypeError, match="exp_avg_sq"):
        lk.adam_step(p, g, m, v.astype(np.float64), step=1)
    with pytest.raises(TypeError, match="grad"):
        lk.adam_step(p, g.astype(np.float64), m, v, step=1)
    with pytest.raises(ValueError, match="step"):
        lk.adam_step(p, g, m, v, step=0)
    with pytest.raises(TypeError, match="step"):
        lk.adam_step(p, g, m, v, step=1.5)
    with pytest.raises(ValueError, match="exp_avg"):
        lk.adam_step(p, g, p, v, step=1)
    with pytest.raises(ValueError, match="beta1"):
        lk.adam_step(p, g, m, v, step=1, beta1=1.0)
    before = [a.copy() for a in (p, m, v)]
    for a, b in zip((p, m, v), before):
        ref.assert_identical(a, b, "a failed call changed its arrays")
    # A non-contiguous gradient is fine.
    gt = np.asfortranarray(g)
    lk.adam_step(p, gt, m, v, step=1)
    p2, m2, v2 = before[0].copy(), np.zeros_like(p), np.zeros_like(p)
    lk.adam_step(p2, g, m2, v2, step=1)
    ref.assert_identical(p, p2)


# --------------------------------------------------------------------------
# Errors and layouts common to the convolution gradients
# --------------------------------------------------------------------------

def test_conv2d_backward_errors(rng):
    x = ref.randn(rng, (2, 4, 8, 8), np.float32)
    w = ref.randn(rng, (6, 2, 3, 3), np.float32)
    gy = ref.randn(rng, (2, 6, 6, 6), np.float32)
    with pytest.raises(ValueError, match="grad_output"):
        lk.conv2d_backward(gy[:, :, :5], x, w, groups=2)
    with pytest.raises(ValueError, match="groups"):
        lk.conv2d_backward(gy, x, w, groups=3)
    with pytest.raises(TypeError, match="weight"):
        lk.conv2d_backward(gy, x, w.astype(np.float64), groups=2)
    with pytest.raises(TypeError, match="input"):
        lk.conv2d_backward(gy, x.astype(np.float64), w, groups=2)
    with pytest.raises(TypeError, match="grad_output"):
        lk.conv2d_backward(gy.astype(np.int64), x, w, groups=2)
    with pytest.raises(ValueError, match="output_mask"):
        lk.conv2d_backward(gy, x, w, groups=2, output_mask=(True,))
    with pytest.raises(ValueError, match="stride"):
        lk.conv2d_backward(gy, x, w, stride=0, groups=2)
    with pytest.raises(ValueError, match="padding"):
        lk.conv2d_backward(gy, x, w, padding="full", groups=2)
    with pytest.raises(TypeError, match="weight"):
        lk.conv2d_backward(gy, x, list(w), groups=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_backward_any_layout(dtype, rng):
    x = ref.randn(rng, (2, 4, 9, 10), dtype)
    w = ref.randn(rng, (5, 4, 3, 3), dtype)
    gy = ref.randn(rng, (2, 5, 9, 10), dtype)
    base = lk.conv2d_backward(gy, x, w, padding=1)
    xs = np.ascontiguousarray(x[:, :, ::-1])[:, :, ::-1]  # negative strides
    ws = np.asfortranarray(w)
    gys = np.ascontiguousarray(gy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # channels last
    for a, b in zip(lk.conv2d_backward(gys, xs, ws, padding=1), base):
        ref.assert_identical(a, b)


# --------------------------------------------------------------------------
# torch.autograd, when installed
# --------------------------------------------------------------------------

TORCH_CONV_CASES = [
    ((2, 3, 10, 9), (4, 3, 3, 3), dict(stride=1, padding=1)),
    ((3, 4, 11, 12), (6, 2, 3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2)),
    ((1, 6, 7, 7), (6, 1, 3, 3), dict(padding="same", groups=6)),
    ((2, 2, 9, 9), (3, 2, 4, 4), dict(padding="same", dilation=2)),
    ((4, 1, 28, 28), (32, 1, 3, 3), dict()),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, kwargs", TORCH_CONV_CASES)
def test_conv2d_backward_vs_torch(dtype, x_shape, w_shape, kwargs, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w = ref.randn(rng, x_shape, dtype), ref.randn(rng, w_shape, dtype)
    b = ref.randn(rng, w_shape[0], dtype)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = F.conv2d(tx, tw, tb, **kwargs)
    gy = ref.randn(rng, tuple(ty.shape), dtype)
    ty.backward(torch.tensor(gy))
    got = lk.conv2d_backward(gy, x, w, **kwargs)
    magnitude = rb.conv2d_backward(np.abs(gy), np.abs(x), np.abs(w), **kwargs)
    n_out = gy.size // gy.shape[1]
    # Both sides round: twice the single-sided bound.
    for g, t, m, n in zip(got, (tx.grad, tw.grad, tb.grad), magnitude,
                          (w_shape[0] * w_shape[2] * w_shape[3], n_out, n_out)):
        ref.assert_sum_close(g, t.numpy(), 2 * m, n, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_and_training_step_vs_torch(dtype, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = ref.randn(rng, (8, 1, 28, 28), dtype)
    t = rng.integers(0, 10, 8).astype(np.int64)
    w1 = (ref.randn(rng, (32, 1, 3, 3), dtype) * 0.3).astype(dtype)
    b1 = (ref.randn(rng, 32, dtype) * 0.1).astype(dtype)
    w2 = (ref.randn(rng, (10, 5408), dtype) * 0.01).astype(dtype)
    b2 = np.zeros(10, dtype)
    tparams = [torch.tensor(a.copy(), requires_grad=True) for a in (w1, b1, w2, b2)]
    opt = torch.optim.Adam(tparams, lr=1e-2)
    params = [w1, b1, w2, b2]
    state = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    for step in range(1, 4):
        h, idx = lk.conv2d_max_pool2d(x, w1, b1, return_indices=True)
        logits = lk.linear(h.reshape(8, -1), w2, b2)
        loss = lk.cross_entropy(logits, t)
        g = lk.cross_entropy_backward(np.ones((), dtype), logits, t)
        gf, gw2, gb2 = lk.linear_backward(g, h.reshape(8, -1), w2)
        _, gw1, gb1 = lk.conv2d_max_pool2d_backward(gf.reshape(h.shape), x, w1, h, idx,
                                                    output_mask=(False, True, True))
        opt.zero_grad()
        th, tidx = F.max_pool2d(F.relu(F.conv2d(torch.tensor(x), tparams[0], tparams[1])), 2, return_indices=True)
        tloss = F.cross_entropy(F.linear(th.flatten(1), tparams[2], tparams[3]), torch.tensor(t))
        tloss.backward()
        rtol = 1e-4 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(h, th.detach().numpy(), rtol=rtol, atol=rtol)
        np.testing.assert_allclose(loss, tloss.item(), rtol=rtol)
        for got, tp in zip((gw1, gb1, gw2, gb2), tparams):
            np.testing.assert_allclose(got, tp.grad.numpy(), rtol=rtol * 10, atol=rtol * np.abs(tp.grad.numpy()).max())
            # torch's Adam takes our gradients: Adam divides by the gradients' own scale, so a near-zero gradient's
            # rounding (different on each side) would move its weight by up to lr whichever side is right.
            tp.grad = torch.tensor(got)
        opt.step()
        for p, gr, (m, v) in zip(params, (gw1, gb1, gw2, gb2), state):
            lk.adam_step(p, gr, m, v, step=step, lr=1e-2)
        for p, tp in zip(params, tparams):
            np.testing.assert_allclose(p, tp.detach().numpy(), rtol=rtol * 10, atol=rtol)
        if dtype == np.float64:
            ref.assert_identical(idx, tidx.numpy())


def test_gradcheck_float64(rng):
    """torch.autograd.gradcheck-style finite differences on the float64 kernels alone."""
    x = ref.randn(rng, (2, 2, 6, 5), np.float64)
    w = ref.randn(rng, (3, 2, 3, 2), np.float64)
    gy = ref.randn(rng, (2, 3, 3, 5), np.float64)
    kwargs = dict(stride=(2, 1), padding=1, dilation=(1, 2))

    def loss(xx, ww):
        return float(np.sum(lk.conv2d(xx, ww, **kwargs) * gy))

    gx, gw, _ = lk.conv2d_backward(gy, x, w, **kwargs)
    h = 1e-6
    for arr, grad in ((x, gx), (w, gw)):
        for i in rng.choice(arr.size, 12, replace=False):
            plus, minus = arr.copy(), arr.copy()
            plus.flat[i] += h
            minus.flat[i] -= h
            args = [(plus if arr is x else x), (plus if arr is w else w)]
            margs = [(minus if arr is x else x), (minus if arr is w else w)]
            fd = (loss(*args) - loss(*margs)) / (2 * h)
            assert abs(fd - grad.flat[i]) <= 1e-6 * (1 + abs(fd)), (fd, grad.flat[i])
