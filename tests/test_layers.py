"""Layers: Conv2d, Conv2dMaxPool2d, Linear and MaxPool2d against the functional ops.

A layer packs its own copy of the weights once and takes a plan per input
shape from the plan cache. Whatever the caller does with its arrays after
construction, and whatever sequence of shapes it feeds, each call must give
what the functional op gives on the layer's current weights.

A convolution layer's plans are made for weights packed in advance, so the
cost model may pick another algorithm than the functional op (which packs on
every call) and round differently: convolution layers are compared with the
float64 reference, and bit for bit only with a fresh layer made the same way
(which gets the same plan). Linear and MaxPool2d share the functional plans,
but for up to 8 rows: a Linear layer then runs the few-row kernel over packed
panels (unless their padding would add more than a quarter), which the
functional op (that would pack on every call) never uses; those are compared
with the float64 reference.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import lepton_kernels as lk
import reference as ref

DTYPES = [np.float32, np.float64]
ALGORITHMS = ("implicit_gemm", "im2col_gemm", "implicit_gemm_t", "indirect_gemm", "direct")
POOL = dict(kernel_size=3, pool_stride=2, pool_padding=1, pool_dilation=1, ceil_mode=True)


def check_conv_layer(got, x, w, b, conv, pool=None, context=""):
    """A Conv2d (or, with `pool`, Conv2dMaxPool2d) layer's result against the float64 reference."""
    plain = {k: v for k, v in conv.items() if k != "activation"}
    expected = ref.conv2d(x, w, b, **conv)
    magnitude = ref.conv2d(np.abs(x), np.abs(w), None if b is None else np.abs(b), **plain)
    if pool is not None:
        args = dict(kernel_size=pool["kernel_size"], stride=pool["pool_stride"], padding=pool["pool_padding"],
                    dilation=pool["pool_dilation"], ceil_mode=pool["ceil_mode"])
        # A pooled value is off by at most the largest error in its window.
        expected, magnitude = ref.max_pool2d(expected, **args)[0], ref.max_pool2d(magnitude, **args)[0]
    length = w.shape[1] * w.shape[2] * w.shape[3] + (b is not None)
    ref.assert_sum_close(got, expected, magnitude, length, w.dtype, context)


# --------------------------------------------------------------------------
# Results equal the functional ops
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@given(case=ref.conv_cases(), seed=ref.SEEDS)
def test_conv2d_matches_reference(isa, dtype, case, seed):
    x_shape, w_shape, has_bias, kwargs = case
    rng = np.random.default_rng(seed)
    x = ref.randn(rng, x_shape, dtype)
    w = ref.randn(rng, w_shape, dtype)
    b = ref.randn(rng, w_shape[0], dtype) if has_bias else None
    layer = lk.Conv2d(w, b, **kwargs)
    got = layer(x)
    check_conv_layer(got, x, w, b, kwargs, context=f"{case}")
    assert got.shape == lk.conv2d(x, w, b, **kwargs).shape
    out = ref.poisoned(got.shape, dtype)
    assert layer(x, out=out) is out
    ref.assert_identical(out, got, f"out=; {case}")
    ref.assert_identical(lk.Conv2d(w, b, **kwargs)(x), got, f"a second layer; {case}")


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=ref.linear_cases(), seed=ref.SEEDS)
def test_linear_matches_functional(isa, dtype, case, seed):
    x_shape, w_shape, has_bias, activation = case
    assume(len(w_shape) == 2)  # a layer's weight is (out_features, in_features)
    rng = np.random.default_rng(seed)
    x = ref.randn(rng, x_shape, dtype)
    w = ref.randn(rng, w_shape, dtype)
    b = ref.randn(rng, w_shape[0], dtype) if has_bias else None
    layer = lk.Linear(w, b, activation=activation)
    expected = lk.linear(x, w, b, activation=activation)
    got = layer(x)
    if "algo=gemv" in layer.describe(int(np.prod(x_shape[:-1]))):  # the one-row kernel: other rounding
        magnitude = ref.linear(np.abs(x), np.abs(w), None if b is None else np.abs(b))
        ref.assert_sum_close(got, ref.linear(x, w, b, activation), magnitude, w_shape[1] + 1, dtype, f"{case}")
        expected = got
    else:
        ref.assert_identical(got, expected, f"{case}")
    if expected.size:
        out = ref.poisoned(expected.shape, dtype)
        assert layer(x, out=out) is out
        ref.assert_identical(out, expected, f"out=; {case}")


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=ref.pool_cases(), flavour=st.sampled_from(["plain", "ties", "nan"]), seed=ref.SEEDS)
def test_max_pool2d_matches_functional(dtype, case, flavour, seed):
    shape, kwargs = case
    x = ref.fill_pool_input(np.random.default_rng(seed), shape, dtype, flavour)
    values, indices = lk.max_pool2d(x, **kwargs, return_indices=True)
    got_values, got_indices = lk.MaxPool2d(**kwargs, return_indices=True)(x)
    ref.assert_identical(got_values, values, f"{case}")
    ref.assert_identical(got_indices, indices, f"{case}")
    layer = lk.MaxPool2d(**kwargs)
    ref.assert_identical(layer(x), values, f"{case}")
    # NaN is a legitimate result here, so the buffer is filled with a value no input holds.
    out = np.full(values.shape, 7.25, dtype)
    assert layer(x, out=out) is out
    ref.assert_identical(out, values, f"out=; {case}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ("auto",) + ALGORITHMS)
@pytest.mark.parametrize(
    "x_shape, w_shape, kwargs",
    [
        pytest.param((2, 3, 13, 12), (8, 3, 3, 3), dict(padding=1), id="dense"),
        pytest.param((2, 6, 9, 9), (12, 3, 3, 3), dict(groups=2, stride=2), id="grouped"),
        pytest.param((2, 8, 10, 11), (8, 1, 3, 3), dict(groups=8, padding="same", dilation=2), id="depthwise"),
        pytest.param((2, 16, 7, 7), (24, 16, 1, 1), dict(), id="pointwise"),
        pytest.param((5, 13, 12), (8, 5, 3, 3), dict(padding=(1, 0)), id="unbatched"),
        pytest.param((0, 3, 13, 12), (8, 3, 3, 3), dict(padding=1), id="batch-0"),
    ],
)
def test_conv_layers_by_algorithm(isa, dtype, algorithm, x_shape, w_shape, kwargs, rng):
    x = ref.randn(rng, x_shape, dtype)
    w = ref.randn(rng, w_shape, dtype)
    b = ref.randn(rng, w_shape[0], dtype)
    conv = lk.Conv2d(w, b, **kwargs, activation="relu", algorithm=algorithm)(x)
    check_conv_layer(conv, x, w, b, dict(kwargs, activation="relu"))
    pooled = lk.Conv2dMaxPool2d(w, b, **kwargs, **POOL, algorithm=algorithm)(x)
    ref.assert_identical(pooled, lk.max_pool2d(conv, 3, 2, 1, 1, True))
    check_conv_layer(pooled, x, w, b, dict(kwargs, activation="relu"), POOL)


# --------------------------------------------------------------------------
# Weights: copied, read-only, replaced by assignment
# --------------------------------------------------------------------------

# (class, keyword arguments, pooling checked against the reference)
CONV_LAYERS = [
    (lk.Conv2d, dict(padding=1), None),
    (lk.Conv2d, dict(padding=1, algorithm="direct"), None),
    (lk.Conv2dMaxPool2d, dict(padding=1, **POOL), POOL),
]


def conv_layers(w, b):
    """(layer, what a fresh layer made the same way gives, its check against the reference) for weights w, b."""
    layers = []
    for cls, kwargs, pool in CONV_LAYERS:
        conv = dict(padding=1, activation="relu" if pool else None)
        layers.append((cls(w, b, **kwargs), lambda x, w, b, cls=cls, kwargs=kwargs: cls(w, b, **kwargs)(x),
                       lambda got, x, w, b, conv=conv, pool=pool: check_conv_layer(got, x, w, b, conv, pool)))
    return layers


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_are_copied_at_construction(dtype, rng):
    x = ref.randn(rng, (2, 4, 9, 9), dtype)
    w = ref.randn(rng, (6, 4, 3, 3), dtype)
    b = ref.randn(rng, 6, dtype)
    layers = conv_layers(w, b)
    linear = lk.Linear(w.reshape(6, -1), b)
    # Mutate before the first call too: nothing may be read lazily from the caller's arrays.
    w_before, b_before = w.copy(), b.copy()
    w *= -3.0
    b += 1.0
    first = [layer(x) for layer, _, _ in layers]
    first_linear = linear(x.reshape(18, 36))
    for (layer, fresh, check), got in zip(layers, first):
        ref.assert_identical(got, fresh(x, w_before, b_before))
        check(got, x, w_before, b_before)
    ref.assert_identical(first_linear, lk.linear(x.reshape(18, 36), w_before.reshape(6, -1), b_before))
    w[...] = 0.0
    b[...] = 0.0
    for (layer, _, _), expected in zip(layers, first):
        ref.assert_identical(layer(x), expected)
        assert not np.shares_memory(layer.weight, w) and not np.shares_memory(layer.bias, b)
        ref.assert_identical(layer.weight, w_before)
        ref.assert_identical(layer.bias, b_before)
    ref.assert_identical(linear(x.reshape(18, 36)), first_linear)


def test_weight_is_read_only(rng):
    w = ref.randn(rng, (6, 4, 3, 3), np.float32)
    b = ref.randn(rng, 6, np.float32)
    x = ref.randn(rng, (2, 4, 9, 9), np.float32)
    layers = [layer for layer, _, _ in conv_layers(w, b)] + [lk.Linear(w.reshape(6, -1), b)]
    for layer in layers:
        inputs = x if layer.weight.ndim == 4 else x.reshape(18, 36)
        before = layer(inputs)
        with pytest.raises(ValueError):
            layer.weight[...] = 0.0
        with pytest.raises(ValueError):
            layer.weight[0] += 1.0
        with pytest.raises(ValueError):
            layer.bias[0] = 1.0
        ref.assert_identical(layer(inputs), before)
    ref.assert_identical(layers[0].weight, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_assigning_weight_and_bias_gives_new_results(dtype, rng):
    x = ref.randn(rng, (2, 4, 9, 9), dtype)
    w1, w2 = ref.randn(rng, (6, 4, 3, 3), dtype), ref.randn(rng, (6, 4, 3, 3), dtype)
    b1, b2 = ref.randn(rng, 6, dtype), ref.randn(rng, 6, dtype)
    for layer, fresh, check in conv_layers(w1, b1):
        ref.assert_identical(layer(x), fresh(x, w1, b1))
        layer.weight = w2
        got = layer(x)
        ref.assert_identical(got, fresh(x, w2, b1), "after weight =")
        check(got, x, w2, b1)
        layer.bias = b2
        got = layer(x)
        ref.assert_identical(got, fresh(x, w2, b2), "after bias =")
        check(got, x, w2, b2)
        layer.bias = None
        assert layer.bias is None
        ref.assert_identical(layer(x), fresh(x, w2, None), "after bias = None")
        # A weight with more output channels: no plan or packing of the old shape may be reused.
        w3 = ref.randn(rng, (11, 4, 3, 3), dtype)
        layer.weight = w3
        got = layer(x)
        ref.assert_identical(got, fresh(x, w3, None), "after a wider weight")
        check(got, x, w3, None)
        # The assigned array is copied too.
        w3[...] = 0.0
        assert np.abs(layer.weight).min() > 0
        ref.assert_identical(layer(x), got)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_assigning_weight_and_bias(dtype, rng):
    x = ref.randn(rng, (7, 10), dtype)
    w1, w2 = ref.randn(rng, (5, 10), dtype), ref.randn(rng, (9, 10), dtype)
    b1, b2 = ref.randn(rng, 5, dtype), ref.randn(rng, 9, dtype)
    layer = lk.Linear(w1, b1, activation="relu")
    ref.assert_identical(layer(x), lk.linear(x, w1, b1, activation="relu"))
    layer.bias = None
    layer.weight = w2
    ref.assert_identical(layer(x), lk.linear(x, w2, activation="relu"))
    layer.bias = b2
    ref.assert_identical(layer(x), lk.linear(x, w2, b2, activation="relu"))
    w2[...] = 0.0
    b2[...] = 0.0
    assert (layer(x) > 0).any()


def test_assigning_a_bad_weight_raises(rng):
    w = ref.randn(rng, (6, 4, 3, 3), np.float32)
    b = ref.randn(rng, 6, np.float32)
    layer = lk.Conv2d(w, b, padding=1)
    with pytest.raises(ValueError, match="^bias:"):
        layer.weight = ref.randn(rng, (5, 4, 3, 3), np.float32)  # no longer matches the bias
    with pytest.raises(ValueError, match="^weight:"):
        layer.weight = ref.randn(rng, (6, 4, 3), np.float32)
    with pytest.raises(TypeError, match="^bias:"):
        layer.bias = b.astype(np.float64)
    with pytest.raises(TypeError, match="^weight:"):
        layer.weight = w.tolist()
    # A failed assignment leaves the layer as it was.
    x = ref.randn(rng, (1, 4, 7, 7), np.float32)
    ref.assert_identical(layer(x), lk.conv2d(x, w, b, padding=1))
    linear = lk.Linear(w.reshape(6, -1), b)
    with pytest.raises(ValueError, match="^weight:"):
        linear.weight = w
    with pytest.raises(ValueError, match="^bias:"):
        linear.bias = b[:5]


# --------------------------------------------------------------------------
# Inputs: dtypes, channels, shapes, out=
# --------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    pytest.param(lambda w: lk.Conv2d(w), id="Conv2d"),
    pytest.param(lambda w: lk.Conv2d(w, algorithm="im2col_gemm"), id="Conv2d-im2col"),
    pytest.param(lambda w: lk.Conv2dMaxPool2d(w), id="Conv2dMaxPool2d"),
])
@pytest.mark.parametrize(
    "x, exception, names",
    [
        # 4-D inputs go to the core directly; 3-D ones through the Python checks: both must agree.
        pytest.param(np.ones((2, 4, 8, 8)), TypeError, "input", id="float64"),
        pytest.param(np.ones((4, 8, 8)), TypeError, "input", id="float64-unbatched"),
        pytest.param(np.ones((2, 4, 8, 8), np.int32), TypeError, "input", id="int32"),
        pytest.param(np.ones((4, 8, 8), np.int32), TypeError, "input", id="int32-unbatched"),
        pytest.param(np.ones((2, 4, 8, 8), np.float16), TypeError, "input", id="float16"),
        pytest.param(np.ones((2, 5, 8, 8), np.float32), ValueError, "input", id="channels"),
        pytest.param(np.ones((3, 8, 8), np.float32), ValueError, "input", id="channels-unbatched"),
        pytest.param(np.ones((8, 8), np.float32), ValueError, "input", id="2d"),
        pytest.param(np.ones((1, 2, 4, 8, 8), np.float32), ValueError, "input", id="5d"),
        pytest.param(np.ones((2, 4, 0, 8), np.float32), ValueError, "input", id="zero-height"),
        pytest.param(np.ones((2, 4, 1, 8), np.float32), ValueError, "input|weight", id="smaller-than-kernel"),
    ],
)
def test_conv_layer_bad_input(make, x, exception, names):
    layer = make(np.ones((6, 4, 3, 3), np.float32))
    with pytest.raises(exception, match=rf"^({names}):"):
        layer(x)


def test_conv_layer_bad_input_list():
    with pytest.raises(TypeError, match="^input:"):
        lk.Conv2d(np.ones((6, 4, 3, 3), np.float32))(np.ones((2, 4, 8, 8), np.float32).tolist())


@pytest.mark.parametrize(
    "x, exception",
    [
        pytest.param(np.ones((3, 10)), TypeError, id="float64"),
        pytest.param(np.ones((10,)), TypeError, id="float64-1d"),
        pytest.param(np.ones((3, 10), np.int64), TypeError, id="int64"),
        pytest.param(np.ones((2, 3, 10), np.int64), TypeError, id="int64-3d"),
        pytest.param(np.ones((3, 11), np.float32), ValueError, id="features"),
        pytest.param(np.ones((11,), np.float32), ValueError, id="features-1d"),
        pytest.param(np.ones((2, 3, 9), np.float32), ValueError, id="features-3d"),
        pytest.param(np.ones((), np.float32), ValueError, id="0d"),
    ],
)
def test_linear_layer_bad_input(x, exception):
    with pytest.raises(exception, match="^input:"):
        lk.Linear(np.ones((5, 10), np.float32))(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_layer_many_input_shapes(isa, dtype, rng):
    # Each shape gets its own plan; coming back to a shape must not reuse
    # the plan (or blocking) of the shape seen just before.
    w = ref.randn(rng, (8, 3, 3, 3), dtype)
    b = ref.randn(rng, 8, dtype)
    layers = conv_layers(w, b)
    shapes = [(2, 3, 16, 16), (1, 3, 16, 16), (5, 3, 16, 16), (2, 3, 7, 30), (3, 9, 9), (0, 3, 16, 16),
              (2, 3, 40, 40), (2, 3, 16, 16), (3, 9, 9), (1, 3, 16, 16)]
    for shape in shapes:
        x = ref.randn(rng, shape, dtype)
        for layer, fresh, check in layers:
            expected = fresh(x, w, b)
            got = layer(x)
            ref.assert_identical(got, expected, f"{shape}")
            check(got, x, w, b)
            out = ref.poisoned(expected.shape, dtype)
            assert layer(x, out=out) is out
            ref.assert_identical(out, expected, f"out=, {shape}")


@pytest.mark.parametrize("planes,filters,h,w,padding,relu", [(1, 32, 28, 28, 0, True), (3, 16, 17, 20, 1, False),
                                                             (4, 48, 9, 9, 1, True), (32, 32, 10, 12, 1, True)])
def test_conv_max_pool_layer_on_the_direct_kernel(isa, rng, planes, filters, h, w, padding, relu):
    # float32, filters a multiple of 16, a 2x2 pool: the layer runs as a one-layer network, whose direct
    # kernel pools in registers (Winograd on rows for a first layer with AVX-512).
    wt = ref.randn(rng, (filters, planes, 3, 3), np.float32)
    b = ref.randn(rng, filters, np.float32)
    act = "relu" if relu else None
    layer = lk.Conv2dMaxPool2d(wt, b, padding=padding, activation=act)
    pool = dict(kernel_size=2, pool_stride=2, pool_padding=0, pool_dilation=1, ceil_mode=False)
    conv = dict(padding=padding, activation=act)
    assert "network plan" in layer.describe((2, planes, h, w))
    base = ref.randn(rng, (6, planes + 1, h, w + 3), np.float32)
    for x in (base[:1, :planes, :, :w], base[:5, 1:, :, 3:], base[::-2, :planes, :, ::-1][..., :w]):
        before = x.copy()
        got = layer(x)
        check_conv_layer(got, x, wt, b, conv, pool, f"input {x.shape} strides {x.strides}")
        ref.assert_identical(x, before)
        out = ref.poisoned(got.shape, np.float32)
        assert layer(x, out=out) is out
        ref.assert_identical(out, got)
    pooled = ((h + 2 * padding - 2) // 2, (w + 2 * padding - 2) // 2)
    assert layer(base[:0, :planes, :, :w]).shape == (0, filters) + pooled
    # A NaN reaches exactly the windows that read it, as in the functional op.
    x = ref.randn(rng, (2, planes, h, w), np.float32)
    x[1, -1, h // 2, w // 3] = np.nan
    ref.assert_identical(np.isnan(layer(x)), np.isnan(lk.conv2d_max_pool2d(x, wt, b, padding=padding,
                                                                           activation=act)))
    # Filters off the multiples of 16 take the fused GEMM plan.
    other = lk.Conv2dMaxPool2d(ref.randn(rng, (24, planes, 3, 3), np.float32), padding=padding)
    assert "network plan" not in other.describe((2, planes, h, w))


@pytest.mark.parametrize("planes,filters,h,w,conv", [
    (1, 32, 28, 28, {}), (3, 32, 32, 32, dict(padding=1)), (2, 16, 9, 37, dict(padding=1, stride=(2, 1))),
    (7, 16, 11, 13, dict(padding=2, dilation=2)), (1, 48, 5, 3, {}), (4, 32, 6, 40, dict(padding=(0, 1))),
    (24, 32, 17, 20, dict(padding=1))])
def test_conv_layer_on_the_direct_kernel(isa, rng, planes, filters, h, w, conv):
    # float32, filters a multiple of 16, stride 1 along rows, up to 64 taps (or 576 over rows of at least
    # 16 outputs): the layer runs as a one-layer network on the direct kernel with a row's pixels in
    # vector lanes, the last vector of a row partial (widths 26, 32, 37, 13, 1, 40, 20).
    wt = ref.randn(rng, (filters, planes, 3, 3), np.float32)
    for b, act in ((ref.randn(rng, filters, np.float32), "relu"), (None, None)):
        layer = lk.Conv2d(wt, b, activation=act, **conv)
        assert "pixels in lanes" in layer.describe((2, planes, h, w)), layer.describe((2, planes, h, w))
        base = ref.randn(rng, (6, planes + 1, h, w + 3), np.float32)
        for x in (base[:1, :planes, :, :w], base[:5, 1:, :, 3:], base[::-2, :planes, :, ::-1][..., :w]):
            before = x.copy()
            got = layer(x)
            check_conv_layer(got, x, wt, b, dict(conv, activation=act), None, f"input {x.shape} {x.strides}")
            ref.assert_identical(x, before)
    # Stride 2 along rows keeps the GEMM plans, and so does autotuning (which measures those).
    assert "network plan" not in lk.Conv2d(wt, stride=2).describe((2, planes, h, w))
    before = lk.get_scheduler()["autotune"]
    lk.set_scheduler(autotune=True)
    try:
        assert "network plan" not in lk.Conv2d(wt, **conv).describe((2, planes, h, w))
    finally:
        lk.set_scheduler(autotune=before)


@pytest.mark.parametrize("planes,filters,h,w,padding", [(3, 32, 32, 32, 1), (2, 16, 9, 37, 1), (4, 48, 6, 40, 0),
                                                        (3, 64, 7, 7, 1), (2, 32, 33, 70, 1), (1, 32, 28, 28, 0),
                                                        (1, 16, 9, 41, 1)])
def test_first_layer_on_winograd_rows(isa, rng, planes, filters, h, w, padding):
    # 3x3 stride 1 on 1 to 4 planes, channel planes out: F(2, 3) along the rows with pixels in lanes (AVX-512),
    # two outputs per tile, the last tile of an odd row half used, rows in pairs and a last single row, filters
    # in threes and a tail of one or two; a band holding a NaN or an infinity takes the taps.
    wt = ref.randn(rng, (filters, planes, 3, 3), np.float32)
    b = ref.randn(rng, filters, np.float32)
    layer = lk.Conv2d(wt, b, padding=padding, activation="relu")
    assert ("F(2,3) on rows pixels in lanes" in layer.describe((2, planes, h, w))) == (isa == "avx512")
    base = ref.randn(rng, (3, planes + 1, h, w + 3), np.float32)
    for x in (base[:1, :planes, :, :w], base[:, 1:, :, 3:], base[::-2, :planes, :, ::-1][..., :w]):
        check_conv_layer(layer(x), x, wt, b, dict(padding=padding, activation="relu"), None, f"input {x.shape}")
    x = ref.randn(rng, (2, planes, h, w), np.float32)
    check_conv_layer(lk.Conv2d(wt, padding=padding)(x), x, wt, None, dict(padding=padding), None, "no bias, no relu")
    x[1, planes - 1, h // 2, w // 3], x[0, 0, 0, 0] = np.inf, np.nan
    got, expected = layer(x), lk.conv2d(x, wt, b, padding=padding, activation="relu")
    ref.assert_identical(np.isnan(got), np.isnan(expected))
    ref.assert_identical(np.isinf(got), np.isinf(expected))


@pytest.mark.parametrize("planes,filters,kernel,h,w,conv", [
    (3, 64, 7, 40, 45, dict(stride=2, padding=3)), (1, 16, 9, 50, 71, dict(stride=3)),
    (4, 32, 5, 21, 66, dict(stride=(1, 4), padding=(2, 1))), (2, 16, 6, 30, 47, dict(stride=2, dilation=(1, 2), padding=2))])
def test_strided_first_layer_on_column_phases(isa, rng, planes, filters, kernel, h, w, conv):
    # A first layer's few planes at column stride 2 to 4 over more than 64 taps: the band copy splits each
    # plane's columns by their remainder modulo the stride, and the planes kernel runs at stride 1 over them
    # (taps at every phase and offset, dilated ones, rows of whole and partial vectors).
    wt = ref.randn(rng, (filters, planes, kernel, kernel), np.float32)
    b = ref.randn(rng, filters, np.float32)
    layer = lk.Conv2d(wt, b, activation="relu", **conv)
    assert "pixels in lanes" in layer.describe((2, planes, h, w)), layer.describe((2, planes, h, w))
    base = ref.randn(rng, (4, planes + 1, h, w + 3), np.float32)
    for x in (base[:1, :planes, :, :w], base[:, 1:, :, 3:], base[::-2, :planes, :, ::-1][..., :w]):
        check_conv_layer(layer(x), x, wt, b, dict(conv, activation="relu"), None, f"input {x.shape} {x.strides}")
    # Many planes at a column stride keep the GEMM plans (there the GEMM wins).
    assert "network plan" not in lk.Conv2d(ref.randn(rng, (32, 16, 3, 3), np.float32), stride=2).describe((1, 16, h, w))


@pytest.mark.parametrize("planes,filters,rows,h,w,conv", [
    (3, 64, 7, 224, 224, dict(stride=2, padding=3)), (2, 16, 7, 23, 118, dict(stride=(1, 2), padding=(0, 3))),
    (4, 32, 3, 30, 97, dict(stride=(3, 2), padding=1)),
    (3, 48, 5, 40, 170, dict(stride=2, padding=2, dilation=(2, 1)))])
def test_stem_on_winograd_column_phases(isa, rng, planes, filters, rows, h, w, conv):
    # Filters 7 columns wide at column stride 2 on 2 to 4 planes (the ResNet stem): F(4, 4) along the rows of
    # the two column phases (AVX-512), chunks of 64 outputs with a last one partly past the row (112 = 64 + 48
    # outputs, 59, 47, 84 = 64 + 20), any row stride, filter rows and their dilation; a band holding a NaN, an
    # infinity or a value past the transforms' bound takes the taps.
    wt = ref.randn(rng, (filters, planes, rows, 7), np.float32)
    b = ref.randn(rng, filters, np.float32)
    layer = lk.Conv2d(wt, b, activation="relu", **conv)
    assert ("F(4,4) on column phases" in layer.describe((2, planes, h, w))) == (isa == "avx512")
    base = ref.randn(rng, (3, planes + 1, h, w + 3), np.float32)
    for x in (base[:1, :planes, :, :w], base[:, 1:, :, 3:], base[::-2, :planes, :, ::-1][..., :w]):
        check_conv_layer(layer(x), x, wt, b, dict(conv, activation="relu"), None, f"input {x.shape} {x.strides}")
    x = ref.randn(rng, (2, planes, h, w), np.float32)
    x[1, planes - 1, h // 2, w // 3], x[0, 0, 0, 0] = np.inf, np.nan
    got, expected = layer(x), lk.conv2d(x, wt, b, activation="relu", **conv)
    ref.assert_identical(np.isnan(got), np.isnan(expected))
    ref.assert_identical(np.isinf(got), np.isinf(expected))
    x = ref.randn(rng, (1, planes, h, w), np.float32)
    x[0, 0, h - 1, w - 1] = 1e33  # under the taps' bound, past the transforms'
    check_conv_layer(layer(x), x, wt, b, dict(conv, activation="relu"), None, "a value past the bound")
    # With ResNet's pool after it: the stem on F(4, 4), then the pool in a pass of its own.
    pooled = lk.Conv2dMaxPool2d(wt, b, activation="relu", kernel_size=3, pool_stride=2, pool_padding=1, **conv)
    assert ("F(4,4) on column phases" in pooled.describe((2, planes, h, w))) == (isa == "avx512")
    x = base[:, 1:, :, 3:]
    pool = dict(kernel_size=3, pool_stride=2, pool_padding=1, pool_dilation=1, ceil_mode=False)
    check_conv_layer(pooled(x), x, wt, b, dict(conv, activation="relu"), pool, f"pooled, input {x.shape}")


@pytest.mark.parametrize("planes,filters,h,w,padding", [(16, 32, 17, 20, 1), (32, 16, 5, 3, 0), (64, 64, 56, 56, 1),
                                                        (48, 80, 9, 13, 1)])
def test_conv_layer_on_winograd(isa, rng, planes, filters, h, w, padding):
    # float32, 3x3 stride 1, channels and filters multiples of 16: Winograd F(2x2, 3x3), 4 outputs per
    # tile, partial tiles at odd sizes and blocks of 8 tiles; inputs that are not finite take the taps.
    wt = ref.randn(rng, (filters, planes, 3, 3), np.float32)
    for b, act in ((ref.randn(rng, filters, np.float32), "relu"), (None, None)):
        layer = lk.Conv2d(wt, b, padding=padding, activation=act)
        assert "winograd F(2x2,3x3)" in layer.describe((2, planes, h, w)), layer.describe((2, planes, h, w))
        base = ref.randn(rng, (3, planes + 1, h, w + 3), np.float32)
        for x in (base[:1, :planes, :, :w], base[:, 1:, :, 3:], base[::-2, :planes, :, ::-1][..., :w]):
            got = layer(x)
            check_conv_layer(got, x, wt, b, dict(padding=padding, activation=act), None, f"input {x.shape}")
        x = ref.randn(rng, (2, planes, h, w), np.float32)
        x[1, 3, h // 2, w // 3], x[0, 0, 0, 0] = np.inf, np.nan
        ref.assert_identical(np.isnan(layer(x)), np.isnan(lk.conv2d(x, wt, b, padding=padding, activation=act)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_many_input_shapes(isa, dtype, rng):
    w = ref.randn(rng, (13, 10), dtype)
    b = ref.randn(rng, 13, dtype)
    layer = lk.Linear(w, b)
    for shape in [(4, 10), (10,), (1, 10), (2, 3, 10), (0, 10), (97, 10), (2, 0, 10), (1, 1, 1, 10), (4, 10)]:
        x = ref.randn(rng, shape, dtype)
        got = layer(x)
        assert got.shape == shape[:-1] + (13,)
        if "algo=gemv" not in layer.describe(int(np.prod(shape[:-1]))):  # the one-row kernel rounds otherwise
            ref.assert_identical(got, lk.linear(x, w, b), f"{shape}")
        ref.assert_sum_close(got, ref.linear(x, w, b), ref.linear(np.abs(x), np.abs(w), np.abs(b)), 11, dtype)
        out = ref.poisoned(got.shape, dtype)
        assert layer(x, out=out) is out
        ref.assert_identical(out, got, f"out=, {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched_inputs(dtype, rng):
    x = ref.randn(rng, (3, 11, 10), dtype)
    w = ref.randn(rng, (7, 3, 3, 3), dtype)
    for layer, shape in ((lk.Conv2d(w, padding=1), (7, 11, 10)), (lk.Conv2dMaxPool2d(w, padding=1), (7, 5, 5)),
                         (lk.MaxPool2d(2), (3, 5, 5))):
        got = layer(x)
        assert got.shape == shape
        ref.assert_identical(got, layer(x[None])[0])
        out = ref.poisoned(shape, dtype)
        assert layer(x, out=out) is out
        ref.assert_identical(out, got)
    values, indices = lk.MaxPool2d(3, 2, 1, return_indices=True)(x)
    ref.assert_identical(values, lk.max_pool2d(x, 3, 2, 1))
    ref.assert_identical(indices, lk.max_pool2d(x[None], 3, 2, 1, return_indices=True)[1][0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(dtype, rng):
    base = ref.randn(rng, (4, 6, 20, 22), dtype)
    w = ref.randn(rng, (5, 3, 3, 3), dtype)
    conv, pooled = lk.Conv2d(w, padding=1), lk.Conv2dMaxPool2d(w, padding=1)
    lw = ref.randn(rng, (4, 22), dtype)
    linear = lk.Linear(lw)
    for x in (base[::2, ::2, 1::2, :], np.asfortranarray(base[:, :3]), base[::-1, 3:, ::-1]):
        before = x.copy()
        ref.assert_identical(conv(x), conv(np.ascontiguousarray(x)))
        ref.assert_identical(pooled(x), pooled(np.ascontiguousarray(x)))
        ref.assert_identical(x, before)
    for x in (base[0, 0, ::3], base[:, 0, 1], base[0, :, :, ::-1]):
        ref.assert_identical(linear(x), lk.linear(np.ascontiguousarray(x), lw))


def test_weights_of_any_layout(rng):
    x = ref.randn(rng, (2, 4, 9, 9), np.float32)
    w = np.asfortranarray(ref.randn(rng, (6, 4, 3, 3), np.float32))
    b = ref.randn(rng, 12, np.float32)[::2]
    ref.assert_identical(lk.Conv2d(w, b)(x), lk.Conv2d(np.ascontiguousarray(w), np.ascontiguousarray(b))(x))
    lw = ref.randn(rng, (9, 5), np.float32).T
    ref.assert_identical(lk.Linear(lw)(x[0, 0]), lk.linear(x[0, 0], np.ascontiguousarray(lw)))


def test_out_errors(rng):
    w = ref.randn(rng, (6, 4, 3, 3), np.float32)
    x = ref.randn(rng, (2, 4, 8, 8), np.float32)
    layer = lk.Conv2d(w)
    with pytest.raises(ValueError, match="^out:"):
        layer(x, out=np.empty((2, 6, 6, 7), np.float32))
    with pytest.raises(TypeError, match="^out:"):
        layer(x, out=np.empty((2, 6, 6, 6)))
    with pytest.raises(ValueError, match="^out:"):
        layer(x[0], out=np.empty((1, 6, 6, 6), np.float32))
    with pytest.raises(ValueError, match="^out:"):
        lk.Linear(w.reshape(6, -1))(x.reshape(2, 4, -1)[..., :36], out=np.empty((2, 5, 6), np.float32))


# --------------------------------------------------------------------------
# describe() and construction errors
# --------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ("auto",) + ALGORITHMS)
@pytest.mark.parametrize("cls", [lk.Conv2d, lk.Conv2dMaxPool2d])
def test_describe_names_the_algorithm(cls, algorithm, rng):
    w = ref.randn(rng, (8, 3, 3, 3), np.float32)
    layer = cls(w, padding=1, algorithm=algorithm)
    x = ref.randn(rng, (2, 3, 16, 16), np.float32)
    for arg in (x, x.shape, list(x.shape), x[0], x[0].shape):
        text = layer.describe(arg)
        assert isinstance(text, str)
        names = ALGORITHMS if algorithm == "auto" else (algorithm,)
        assert any(f"algo={name} " in text for name in names), text


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(1000, 512), (131, 2003), (97, 3001)])  # 1 MiB or more in float32: past L2
def test_linear_one_row_large_weight(isa, dtype, n, k, rng):
    w, b = ref.randn(rng, (n, k), dtype), ref.randn(rng, n, dtype)
    for bias, activation in ((b, "relu"), (None, None)):
        layer = lk.Linear(w, bias, activation=activation)
        assert "algo=gemv" in layer.describe(1), layer.describe(1)
        wide = ref.randn(rng, (1, 2 * k), dtype)
        for x in (ref.randn(rng, (1, k), dtype), ref.randn(rng, k, dtype), wide[:, ::2], ref.randn(rng, (2, k), dtype)):
            x_before = x.copy()
            got = layer(x)
            ref.assert_identical(x, x_before)
            magnitude = ref.linear(np.abs(x), np.abs(w), None if bias is None else np.abs(bias))
            ref.assert_sum_close(got, ref.linear(x, w, bias, activation), magnitude, k + 1, dtype, f"{x.shape}")
            ref.assert_identical(layer(x), got, "the next call, reading the panels in the other order")
    layer.weight = w2 = ref.randn(rng, (n, k), dtype)  # repacked: never the old panels
    x = ref.randn(rng, (1, k), dtype)
    ref.assert_sum_close(layer(x), ref.linear(x, w2), ref.linear(np.abs(x), np.abs(w2)), k, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(45, 300), (200, 1103)])
def test_linear_few_rows_on_panels(isa, dtype, n, k, rng):
    # Up to 8 rows against a layer's weight packed in panels: blocks of 4
    # rows and a rest of 1-3, groups of 4, 2 and 1 panels, k in one chunk or
    # in four and a tail; alternate calls read backwards. Rows read in place,
    # strided, and all one row (stride 0).
    w, b = ref.randn(rng, (n, k), dtype), ref.randn(rng, n, dtype)
    layer = lk.Linear(w, b, activation="relu")
    magnitude = lambda x: ref.linear(np.abs(x), np.abs(w), np.abs(b))  # noqa: E731
    for rows in range(1, 10):
        assert ("algo=gemv" in layer.describe(rows)) == (rows <= 8), layer.describe(rows)
        wide = ref.randn(rng, (rows, 2 * k), dtype)
        one = np.broadcast_to(ref.randn(rng, (1, k), dtype), (rows, k))
        for x in (ref.randn(rng, (rows, k), dtype), wide[:, ::2], one):
            got = layer(x)
            ref.assert_sum_close(got, ref.linear(x, w, b, "relu"), magnitude(x), k + 1, dtype, f"{rows} rows")
            ref.assert_identical(layer(x), got, "the next call, reading the panels in the other order")
        ref.assert_identical(got, np.broadcast_to(got[:1], got.shape), "rows of one input row")


def test_linear_describe(rng):
    layer = lk.Linear(ref.randn(rng, (9, 16), np.float32))
    for rows in (1, 7, 300):
        text = layer.describe(rows)
        assert isinstance(text, str) and "algo=" in text, text
        # An array or a shape describes the plan of its rows, as Conv2d.describe takes an input.
        assert layer.describe(np.zeros((rows, 16), np.float32)) == text
        assert layer.describe((1, rows, 16)) == text
    assert layer.describe((16,)) == layer.describe(1)
    for bad, exception in ((np.zeros((3, 15), np.float32), ValueError), ((), ValueError), (-1, ValueError),
                           (2.5, TypeError), (True, TypeError), ("rows", TypeError)):
        with pytest.raises(exception, match="^input:"):
            layer.describe(bad)


@pytest.mark.parametrize("algorithm", ["bogus", "Direct", ""])
@pytest.mark.parametrize("cls", [lk.Conv2d, lk.Conv2dMaxPool2d])
def test_unknown_algorithm(cls, algorithm):
    with pytest.raises(ValueError, match="^algorithm:"):
        cls(np.ones((4, 3, 3, 3), np.float32), algorithm=algorithm)


@pytest.mark.parametrize(
    "make, exception, names",
    [
        pytest.param(lambda: lk.Conv2d(np.ones((4, 3, 3), np.float32)), ValueError, "weight", id="conv-weight-3d"),
        pytest.param(lambda: lk.Conv2d(np.ones((4, 3, 3, 3), np.int32)), TypeError, "weight", id="conv-weight-int"),
        pytest.param(lambda: lk.Conv2d(np.ones((4, 3, 3, 3), np.float32), np.ones(4)), TypeError, "bias",
                     id="conv-bias-dtype"),
        pytest.param(lambda: lk.Conv2d(np.ones((4, 3, 3, 3), np.float32), np.ones(3, np.float32)), ValueError,
                     "bias", id="conv-bias-size"),
        pytest.param(lambda: lk.Conv2d(np.ones((4, 3, 3, 3), np.float32), groups=3), ValueError, "groups",
                     id="conv-groups"),
        pytest.param(lambda: lk.Conv2d(np.ones((4, 3, 3, 3), np.float32), stride=0), ValueError, "stride",
                     id="conv-stride"),
        pytest.param(lambda: lk.Conv2d(np.ones((4, 3, 3, 3), np.float32), padding="same", stride=2), ValueError,
                     "padding", id="conv-same-strided"),
        pytest.param(lambda: lk.Conv2d(np.ones((4, 3, 3, 3), np.float32), activation="tanh"), ValueError,
                     "activation", id="conv-activation"),
        pytest.param(lambda: lk.Conv2dMaxPool2d(np.ones((4, 3, 3, 3), np.float32), kernel_size=0), ValueError,
                     "kernel_size", id="fused-kernel"),
        pytest.param(lambda: lk.Linear(np.ones((4,), np.float32)), ValueError, "weight", id="linear-weight-1d"),
        pytest.param(lambda: lk.Linear(np.ones((4, 3), np.int32)), TypeError, "weight", id="linear-weight-int"),
        pytest.param(lambda: lk.Linear(np.ones((4, 3), np.float32), np.ones(3, np.float32)), ValueError, "bias",
                     id="linear-bias-size"),
        pytest.param(lambda: lk.Linear(np.ones((4, 3), np.float32), activation="gelu"), ValueError, "activation",
                     id="linear-activation"),
        pytest.param(lambda: lk.MaxPool2d(0), ValueError, "kernel_size", id="pool-kernel"),
        pytest.param(lambda: lk.MaxPool2d(3, padding=2), ValueError, "padding", id="pool-padding"),
        pytest.param(lambda: lk.MaxPool2d(2, stride=1.5), TypeError, "stride", id="pool-stride"),
    ],
)
def test_bad_construction(make, exception, names):
    with pytest.raises(exception, match=rf"^({names}):"):
        make()


def test_max_pool2d_layer_bad_input():
    layer = lk.MaxPool2d(3)
    for x, exception in ((np.ones((2, 3, 8, 8), np.int32), TypeError), (np.ones((8, 8), np.float32), ValueError),
                         (np.ones((2, 3, 2, 8), np.float32), ValueError)):
        with pytest.raises(exception, match="^input:"):
            layer(x)
