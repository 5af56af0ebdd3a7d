"""conv2d_max_pool2d: the fused chain equals the unfused one bit for bit, at every ISA level.

Fusion only changes where the convolution's output lives (a band in cache
instead of a full array), not how any element is computed: the same plan
picks the same algorithm and blocking, so the pooled result must be exactly
what max_pool2d gives on conv2d's output. The functional ops are compared
with each other and layers with layers: a layer plans for weights packed in
advance, which may change the algorithm the cost model picks. Against the
float64 reference the error bound of a pooled value is the largest bound in
its window.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lepton_kernels as lk
import reference as ref

DTYPES = [np.float32, np.float64]
ALGORITHMS = ("implicit_gemm", "im2col_gemm", "implicit_gemm_t", "indirect_gemm", "direct")


def conv_output_size(x_shape, w_shape, kwargs):
    """(P, Q) of a conv2d with these shapes and arguments."""
    _, _, R, S = w_shape
    sh, sw = ref._pair(kwargs.get("stride", 1))
    dh, dw = ref._pair(kwargs.get("dilation", 1))
    top, bottom, left, right = ref.conv_paddings(kwargs.get("padding", 0), (R, S), (dh, dw))
    H, W = x_shape[-2:]
    return ((H + top + bottom - dh * (R - 1) - 1) // sh + 1, (W + left + right - dw * (S - 1) - 1) // sw + 1)


@st.composite
def pool_args_for(draw, size):
    """(kernel, stride, padding, dilation) of one dimension that fits a conv output of `size`."""
    kernel = draw(st.sampled_from([2, 2, 3, 3, 1]))
    # Dilation 1 with the largest padding always fits: every option list is non-empty.
    dilation = draw(st.sampled_from([d for d in (1, 2) if d * (kernel - 1) + 1 <= size + 2 * (kernel // 2)]))
    padding = draw(st.sampled_from([p for p in range(kernel // 2 + 1) if dilation * (kernel - 1) + 1 <= size + 2 * p]))
    stride = draw(st.integers(1, 3))
    return kernel, stride, padding, dilation


@st.composite
def fused_cases(draw):
    """(input shape, weight shape, has bias, conv kwargs, pool kwargs) of a valid conv2d_max_pool2d."""
    x_shape, w_shape, has_bias, conv = draw(ref.conv_cases())
    P, Q = conv_output_size(x_shape, w_shape, conv)
    (kh, sh, ph, dh), (kw, sw, pw, dw) = draw(pool_args_for(P)), draw(pool_args_for(Q))
    if draw(st.booleans()) and dh * (kh - 1) + 1 <= Q + 2 * ph:
        kw, sw, pw, dw = kh, sh, ph, dh
    pool = dict(kernel_size=kh if (kh, sh, ph, dh) == (kw, sw, pw, dw) else (kh, kw),
                pool_stride=draw(st.sampled_from([None, (sh, sw)])),
                pool_padding=(ph, pw), pool_dilation=(dh, dw), ceil_mode=draw(st.booleans()))
    return x_shape, w_shape, has_bias, conv, pool


def unfused(conv_out, pool):
    return lk.max_pool2d(conv_out, pool["kernel_size"], pool["pool_stride"], pool["pool_padding"],
                         pool["pool_dilation"], pool["ceil_mode"])


def reference(x, w, b, conv, pool):
    """The float64 result and, per output, the largest error bound magnitude in its window."""
    args = dict(kernel_size=pool["kernel_size"], stride=pool["pool_stride"], padding=pool["pool_padding"],
                dilation=pool["pool_dilation"], ceil_mode=pool["ceil_mode"])
    expected = ref.max_pool2d(ref.conv2d(x, w, b, **conv), **args)[0]
    plain = {k: v for k, v in conv.items() if k != "activation"}
    magnitude = ref.max_pool2d(ref.conv2d(np.abs(x), np.abs(w), None if b is None else np.abs(b), **plain), **args)[0]
    return expected, magnitude


def check_fused(rng, x_shape, w_shape, has_bias, conv, pool, dtype, context=""):
    x = ref.randn(rng, x_shape, dtype)
    w = ref.randn(rng, w_shape, dtype)
    b = ref.randn(rng, w_shape[0], dtype) if has_bias else None
    context = f"x {x_shape}, w {w_shape}, bias {has_bias}, {conv}, {pool}; {context}"
    conv_args = {k: v for k, v in conv.items() if k != "activation"}
    activation = conv["activation"]
    expected, magnitude = reference(x, w, b, conv, pool)
    length = w_shape[1] * w_shape[2] * w_shape[3] + has_bias

    got = lk.conv2d_max_pool2d(x, w, b, **conv_args, activation=activation, **pool)
    ref.assert_identical(got, unfused(lk.conv2d(x, w, b, **conv), pool), f"fused != unfused; {context}")
    ref.assert_sum_close(got, expected, magnitude, length, dtype, context)
    out = ref.poisoned(got.shape, dtype)
    assert lk.conv2d_max_pool2d(x, w, b, **conv_args, activation=activation, **pool, out=out) is out
    ref.assert_identical(out, got, f"out=; {context}")

    for algorithm, ukernel in ref.CONV_KERNELS:
        pinned = dict(algorithm=algorithm, ukernel=ukernel)
        layer = lk.Conv2dMaxPool2d(w, b, **conv_args, activation=activation, **pool, **pinned)
        out = ref.poisoned(got.shape, dtype)
        assert layer(x, out=out) is out
        alone = unfused(lk.Conv2d(w, b, **conv_args, activation=activation, **pinned)(x), pool)
        ref.assert_identical(out, alone, f"fused != unfused, {algorithm}/{ukernel}; {context}")
        ref.assert_sum_close(out, expected, magnitude, length, dtype, f"{algorithm}/{ukernel}; {context}")
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=fused_cases(), seed=ref.SEEDS)
def test_matches_unfused_and_reference(isa, dtype, case, seed):
    check_fused(np.random.default_rng(seed), *case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "x_shape, w_shape, conv, pool",
    [
        pytest.param((2, 3, 16, 16), (8, 3, 3, 3), dict(padding=1), dict(), id="3x3-pool2"),
        pytest.param((2, 3, 15, 13), (8, 3, 3, 3), dict(padding=1), dict(), id="odd-size-pool2"),
        pytest.param((2, 3, 15, 13), (8, 3, 3, 3), dict(padding=1), dict(ceil_mode=True), id="odd-size-ceil"),
        pytest.param((2, 3, 17, 17), (16, 3, 5, 5), dict(stride=2, padding=2),
                     dict(kernel_size=3, pool_stride=2, pool_padding=1), id="stem"),
        pytest.param((2, 4, 12, 12), (8, 4, 3, 3), dict(), dict(kernel_size=3, pool_stride=1), id="overlapping"),
        pytest.param((2, 4, 12, 12), (8, 4, 3, 3), dict(padding="same"),
                     dict(kernel_size=2, pool_stride=1, pool_dilation=2, pool_padding=1), id="pool-dilated"),
        pytest.param((2, 4, 11, 10), (8, 4, 3, 3), dict(padding=1),
                     dict(kernel_size=(3, 2), pool_stride=(2, 1), ceil_mode=True), id="rect-pool"),
        pytest.param((2, 6, 10, 10), (12, 2, 3, 3), dict(groups=3, padding=1), dict(), id="grouped"),
        pytest.param((2, 16, 13, 19), (32, 4, 3, 3), dict(groups=4, padding=1), dict(), id="grouped-planes"),
        pytest.param((2, 8, 10, 10), (8, 1, 3, 3), dict(groups=8, padding=1), dict(), id="depthwise"),
        pytest.param((2, 8, 10, 10), (16, 1, 3, 3), dict(groups=8, padding=1), dict(kernel_size=3, ceil_mode=True),
                     id="depthwise-mult-2"),
        pytest.param((2, 16, 9, 9), (24, 16, 1, 1), dict(), dict(), id="pointwise"),
        pytest.param((1, 2, 2, 2), (3, 2, 2, 2), dict(), dict(kernel_size=2, pool_padding=1, pool_stride=1),
                     id="1x1-conv-output"),
        pytest.param((2, 8, 8), (4, 2, 3, 3), dict(padding=1), dict(), id="unbatched"),
        pytest.param((0, 3, 8, 8), (4, 3, 3, 3), dict(padding=1), dict(), id="batch-0"),
        # Many bands of pooled rows, split across the worker threads.
        pytest.param((2, 32, 56, 56), (64, 32, 3, 3), dict(padding=1), dict(), id="threaded"),
        pytest.param((2, 32, 40, 40), (32, 1, 3, 3), dict(groups=32, padding=1), dict(kernel_size=3, pool_stride=2),
                     id="threaded-depthwise"),
        # A reduction over C*R*S = 900 is split in blocks accumulated in place.
        pytest.param((1, 100, 9, 8), (9, 100, 3, 3), dict(padding=1), dict(), id="reduction-blocks"),
    ],
)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_argument_classes(isa, dtype, x_shape, w_shape, conv, pool, has_bias, activation, rng):
    pool = dict(dict(kernel_size=2, pool_stride=None, pool_padding=0, pool_dilation=1, ceil_mode=False), **pool)
    got = check_fused(rng, x_shape, w_shape, has_bias, dict(conv, activation=activation), pool, dtype)
    assert got.ndim == len(x_shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ("auto",) + ALGORITHMS)
@pytest.mark.parametrize("flavour", ["nan", "inf"])
def test_nan_and_inf_propagate_as_unfused(isa, dtype, algorithm, flavour, rng):
    # NaN and infinities in the input reach the convolution's output (inf -
    # inf makes NaN); max-pool propagates NaN and relu keeps it. Fusing must
    # not change which outputs are NaN or infinite.
    x = ref.fill_pool_input(rng, (2, 4, 13, 12), dtype, flavour)
    w = ref.randn(rng, (9, 4, 3, 3), dtype)
    b = ref.randn(rng, 9, dtype)
    for activation in (None, "relu"):
        for pool in (dict(kernel_size=2), dict(kernel_size=3, pool_stride=2, pool_padding=1, ceil_mode=True)):
            pool = dict(dict(pool_stride=None, pool_padding=0, pool_dilation=1, ceil_mode=False), **pool)
            fused = lk.Conv2dMaxPool2d(w, b, padding=1, activation=activation, **pool, algorithm=algorithm)(x)
            alone = unfused(lk.Conv2d(w, b, padding=1, activation=activation, algorithm=algorithm)(x), pool)
            context = f"{flavour}, {activation}, {pool}, algorithm={algorithm}"
            assert np.isnan(alone).any() or flavour == "inf", context
            ref.assert_identical(fused, alone, context)
            if algorithm == "auto":
                functional = lk.conv2d_max_pool2d(x, w, b, padding=1, activation=activation, **pool)
                alone = unfused(lk.conv2d(x, w, b, padding=1, activation=activation), pool)
                ref.assert_identical(functional, alone, f"functional; {context}")


def test_defaults_are_relu_and_2x2(rng):
    x = ref.randn(rng, (2, 3, 10, 10), np.float32)
    w = ref.randn(rng, (5, 3, 3, 3), np.float32)
    got = lk.conv2d_max_pool2d(x, w)
    assert got.shape == (2, 5, 4, 4)
    ref.assert_identical(got, lk.max_pool2d(lk.conv2d(x, w, activation="relu"), 2))
    assert (got >= 0).all()
    ref.assert_identical(lk.Conv2dMaxPool2d(w)(x), lk.max_pool2d(lk.Conv2d(w, activation="relu")(x), 2))


def test_inputs_are_not_modified(rng):
    x = ref.randn(rng, (2, 3, 10, 10), np.float32)
    w = ref.randn(rng, (5, 3, 3, 3), np.float32)
    b = ref.randn(rng, 5, np.float32)
    copies = [a.copy() for a in (x, w, b)]
    lk.conv2d_max_pool2d(x, w, b, padding=1, kernel_size=3, pool_stride=2, pool_padding=1)
    for a, before in zip((x, w, b), copies):
        ref.assert_identical(a, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_fortran_inputs(dtype, rng):
    base = ref.randn(rng, (2, 6, 20, 22), dtype)
    w = ref.randn(rng, (7, 3, 3, 3), dtype)
    for x in (base[:, ::2, ::2, 1::2], np.asfortranarray(base[:, :3]), base[::-1, 3:, ::-1]):
        expected = lk.max_pool2d(lk.conv2d(np.ascontiguousarray(x), w, padding=1, activation="relu"), 2)
        ref.assert_identical(lk.conv2d_max_pool2d(x, w, padding=1), expected, f"strides {x.strides}")


X = np.ones((2, 3, 8, 8), np.float32)
W = np.ones((4, 3, 3, 3), np.float32)

# (keyword arguments, exception type, the argument the message must start with)
ERROR_CASES = {
    "kernel-zero": (dict(kernel_size=0), ValueError, "kernel_size"),
    "kernel-negative": (dict(kernel_size=(2, -1)), ValueError, "kernel_size"),
    "kernel-float": (dict(kernel_size=2.0), TypeError, "kernel_size"),
    "kernel-three": (dict(kernel_size=(2, 2, 2)), ValueError, "kernel_size"),
    "kernel-larger-than-conv-output": (dict(kernel_size=7), ValueError, "input|kernel_size"),
    "dilated-pool-larger-than-conv-output": (dict(kernel_size=3, pool_dilation=3), ValueError, "input|kernel_size"),
    # The convolution has a stride, a padding and a dilation of its own: a
    # message naming those would point at the wrong argument.
    "pool-stride-zero": (dict(pool_stride=0), ValueError, "pool_stride"),
    "pool-stride-float": (dict(pool_stride=1.5), TypeError, "pool_stride"),
    "pool-padding-negative": (dict(pool_padding=-1), ValueError, "pool_padding"),
    "pool-padding-over-half-kernel": (dict(kernel_size=3, pool_padding=2), ValueError, "pool_padding"),
    "pool-dilation-zero": (dict(pool_dilation=0), ValueError, "pool_dilation"),
    "activation-unknown": (dict(activation="sigmoid"), ValueError, "activation"),
    "conv-stride-zero": (dict(stride=0), ValueError, "stride"),
    "conv-padding-same-strided": (dict(padding="same", stride=2), ValueError, "padding"),
    "groups-mismatch": (dict(groups=2), ValueError, "input|weight|groups"),
}


@pytest.mark.parametrize("kwargs, exception, names", [pytest.param(*c, id=n) for n, c in ERROR_CASES.items()])
def test_bad_arguments(kwargs, exception, names):
    with pytest.raises(exception, match=rf"^({names}):"):
        lk.conv2d_max_pool2d(X, W, **kwargs)
    # The layer checks at construction or at the call, with the same message.
    with pytest.raises(exception, match=rf"^({names}):"):
        lk.Conv2dMaxPool2d(W, **kwargs)(X)


@pytest.mark.parametrize(
    "call, exception, names",
    [
        pytest.param(lambda: lk.conv2d_max_pool2d(X.astype(np.float64), W), TypeError, "weight", id="dtype-mismatch"),
        pytest.param(lambda: lk.conv2d_max_pool2d(X, W, np.ones(4)), TypeError, "bias", id="bias-dtype"),
        pytest.param(lambda: lk.conv2d_max_pool2d(X, W, np.ones(5, np.float32)), ValueError, "bias", id="bias-size"),
        pytest.param(lambda: lk.conv2d_max_pool2d(X.astype(np.int32), W), TypeError, "input", id="input-int"),
        pytest.param(lambda: lk.conv2d_max_pool2d(X[0, 0], W), ValueError, "input", id="input-2d"),
        pytest.param(lambda: lk.conv2d_max_pool2d(X, W, out=np.empty((2, 4, 6, 6), np.float32)), ValueError, "out",
                     id="out-unpooled-shape"),
        pytest.param(lambda: lk.conv2d_max_pool2d(X, W, out=np.empty((2, 4, 3, 3))), TypeError, "out",
                     id="out-dtype"),
        pytest.param(lambda: lk.conv2d_max_pool2d(X, W, out=np.empty((2, 4, 3, 3), np.float32).tolist()), TypeError,
                     "out", id="out-list"),
        pytest.param(lambda: lk.conv2d_max_pool2d(X[0], W, out=np.empty((2, 4, 3, 3), np.float32)), ValueError,
                     "out", id="out-batched-for-unbatched"),
    ],
)
def test_bad_arrays(call, exception, names):
    with pytest.raises(exception, match=rf"^({names}):"):
        call()


def test_out_overlapping_the_input():
    buf = np.ones(2 * 3 * 8 * 8, np.float32)
    x = buf.reshape(2, 3, 8, 8)
    with pytest.raises(ValueError, match="^out:"):
        lk.conv2d_max_pool2d(x, W, out=buf[:2 * 4 * 3 * 3].reshape(2, 4, 3, 3))
