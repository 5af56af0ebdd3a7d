"""conv2d against the float64 reference, at every ISA level."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

import lepton_kernels as lk
import reference as ref

DTYPES = [np.float32, np.float64]


def check_conv(rng, x_shape, w_shape, has_bias, kwargs, dtype, context=""):
    """Runs lk.conv2d, and each algorithm, on fresh data against the reference."""
    x = ref.randn(rng, x_shape, dtype)
    w = ref.randn(rng, w_shape, dtype)
    b = ref.randn(rng, w_shape[0], dtype) if has_bias else None
    expected = ref.conv2d(x, w, b, **kwargs)
    args = {k: v for k, v in kwargs.items() if k != "activation"}
    magnitude = ref.conv2d(np.abs(x), np.abs(w), None if b is None else np.abs(b), **args)
    length = w_shape[1] * w_shape[2] * w_shape[3] + has_bias
    context = f"x {x_shape}, w {w_shape}, bias {has_bias}, {kwargs}; {context}"
    got = lk.conv2d(x, w, b, **kwargs)
    ref.assert_sum_close(got, expected, magnitude, length, dtype, context)
    # The same call into a NaN-filled out= must write every element.
    out = ref.poisoned(got.shape, dtype)
    assert lk.conv2d(x, w, b, **kwargs, out=out) is out
    ref.assert_identical(out, got, f"out=; {context}")
    for algorithm, ukernel in ref.CONV_KERNELS:
        out = ref.poisoned(got.shape, dtype)
        assert lk.Conv2d(w, b, **kwargs, algorithm=algorithm, ukernel=ukernel)(x, out=out) is out
        ref.assert_sum_close(out, expected, magnitude, length, dtype, f"{algorithm}/{ukernel}; {context}")
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=ref.conv_cases(), seed=ref.SEEDS)
def test_matches_reference(isa, dtype, case, seed):
    check_conv(np.random.default_rng(seed), *case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_edges(isa, dtype, rng):
    # Output channels x output pixels one below, on and one above every
    # microkernel tile edge, both ways round (the transposed GEMM puts pixels
    # on the rows). A 1-row output makes any pixel count reachable.
    sizes = (1, 3, 4, 5, 7, 8, 9, 11, 12, 13, 16, 17, 23, 24, 25, 47, 48, 49, 95, 96, 97)
    for k in sizes:
        for pixels in sizes:
            got = check_conv(rng, (2, 3, 3, pixels), (k, 3, 3, 3), (k + pixels) % 2 == 1, dict(padding=(0, 1)),
                             dtype, f"k={k} pixels={pixels}")
            assert got.shape[2] * got.shape[3] == pixels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "x_shape, w_shape, kwargs",
    [
        pytest.param((2, 3, 9, 8), (8, 3, 3, 3), dict(padding=1), id="pad-int"),
        pytest.param((2, 3, 9, 8), (8, 3, 3, 3), dict(padding=(2, 0)), id="pad-pair"),
        pytest.param((2, 3, 9, 8), (8, 3, 3, 3), dict(padding=[0, 2]), id="pad-list"),
        pytest.param((2, 3, 9, 8), (8, 3, 3, 3), dict(padding="valid"), id="pad-valid"),
        pytest.param((2, 3, 9, 8), (8, 3, 3, 3), dict(padding="same"), id="same-odd"),
        pytest.param((2, 3, 9, 8), (8, 3, 4, 2), dict(padding="same"), id="same-even"),
        pytest.param((2, 3, 9, 8), (8, 3, 2, 3), dict(padding="same", dilation=(3, 2)), id="same-even-dilated"),
        pytest.param((2, 3, 9, 8), (8, 3, 3, 3), dict(padding="same", dilation=2), id="same-odd-dilated"),
        pytest.param((2, 3, 11, 10), (9, 3, 3, 3), dict(stride=2, padding=1), id="stride-2"),
        pytest.param((2, 3, 11, 10), (9, 3, 3, 3), dict(stride=(3, 1), padding=(1, 0)), id="stride-pair"),
        pytest.param((2, 3, 13, 12), (9, 3, 3, 3), dict(dilation=(2, 3), padding=2), id="dilation"),
        pytest.param((2, 3, 10, 9), (7, 3, 1, 5), dict(padding=(0, 2)), id="rect-1x5"),
        pytest.param((2, 3, 10, 9), (7, 3, 5, 2), dict(), id="rect-5x2"),
        pytest.param((2, 5, 7, 9), (16, 5, 1, 1), dict(), id="pointwise"),
        pytest.param((2, 5, 7, 9), (16, 5, 1, 1), dict(stride=2), id="pointwise-strided"),
        pytest.param((2, 5, 6, 6), (17, 5, 6, 6), dict(), id="kernel-equals-input"),
        pytest.param((2, 5, 3, 3), (17, 5, 4, 4), dict(padding=1), id="kernel-needs-padding"),
        pytest.param((2, 6, 8, 8), (12, 2, 3, 3), dict(groups=3, padding=1), id="grouped"),
        pytest.param((2, 8, 8, 8), (16, 4, 3, 3), dict(groups=2, stride=2), id="grouped-gemm"),
        # Groups of several channels and filters: float's direct algorithm runs the planes kernel per group.
        pytest.param((2, 12, 9, 21), (24, 4, 3, 3), dict(groups=3, padding=(2, 1), dilation=(2, 1)), id="grouped-planes"),
        pytest.param((3, 16, 11, 18), (32, 8, 3, 5), dict(groups=2, stride=(2, 1), padding=(0, 2)), id="grouped-planes-rows"),
        pytest.param((2, 12, 9, 23), (24, 4, 3, 5), dict(groups=3, stride=(1, 3), padding=2, dilation=(1, 2)),
                     id="grouped-planes-phases"),
        pytest.param((2, 32, 10, 19), (32, 4, 3, 3), dict(groups=8, padding=1), id="grouped-planes-4-filters"),
        pytest.param((2, 6, 8, 8), (6, 1, 3, 3), dict(groups=6, padding=1), id="depthwise"),
        pytest.param((2, 6, 8, 8), (12, 1, 3, 3), dict(groups=6, padding=1), id="depthwise-mult-2"),
        pytest.param((2, 5, 9, 9), (5, 1, 5, 5), dict(groups=5, padding="same", dilation=2), id="depthwise-same"),
        pytest.param((2, 4, 9, 9), (4, 1, 3, 3), dict(groups=4, stride=2, padding=(1, 0)), id="depthwise-strided"),
        # Rows split in phases whose last pairs fill part of a vector: half of one, or one and a bit.
        pytest.param((2, 4, 11, 21), (4, 1, 3, 3), dict(groups=4, stride=2, padding=1), id="depthwise-strided-tail"),
        pytest.param((2, 3, 12, 27), (3, 1, 5, 5), dict(groups=3, stride=2, padding=2), id="depthwise-strided-5x5"),
        # Planes narrower than a vector: channels in the lanes, in blocks (a last partial one), any window.
        pytest.param((2, 20, 6, 7), (20, 1, 3, 3), dict(groups=20, padding=1), id="depthwise-small-planes"),
        pytest.param((1, 13, 9, 9), (13, 1, 5, 5), dict(groups=13, stride=2, padding=2),
                     id="depthwise-small-planes-5x5"),
        pytest.param((2, 12, 7, 5), (12, 1, 2, 3), dict(groups=12, dilation=2, padding=(2, 1)),
                     id="depthwise-small-planes-dilated"),
        pytest.param((1, 1, 1, 1), (1, 1, 1, 1), dict(), id="all-ones"),
        pytest.param((1, 1, 1, 1), (9, 1, 3, 3), dict(padding=1), id="1x1-image-padded"),
        # A reduction over C*R*S = 900 > 768 is split in blocks accumulated in place.
        pytest.param((1, 100, 6, 7), (9, 100, 3, 3), dict(padding=1), id="reduction-blocks"),
        # Big enough (over 8 MFLOP) to be split across the worker threads.
        pytest.param((2, 16, 24, 24), (32, 16, 3, 3), dict(padding=1), id="threaded"),
        pytest.param((2, 32, 40, 40), (32, 1, 3, 3), dict(groups=32, padding=1), id="threaded-depthwise"),
    ],
)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_argument_classes(isa, dtype, x_shape, w_shape, kwargs, has_bias, activation, rng):
    got = check_conv(rng, x_shape, w_shape, has_bias, dict(kwargs, activation=activation), dtype)
    if kwargs.get("padding") == "same":
        assert got.shape[2:] == x_shape[2:]


def test_grouped_direct_runs_the_planes_kernel_per_group(isa, rng):
    # float32 groups of several channels and a multiple of 4 filters: the direct algorithm takes the planes
    # kernel group by group, in bands of rows (a few per thread here), the weights packed tap-major.
    x = ref.randn(rng, (2, 32, 23, 37), np.float32)
    w, b = ref.randn(rng, (64, 8, 3, 3), np.float32), ref.randn(rng, 64, np.float32)
    layer = lk.Conv2d(w, b, padding=1, groups=4, activation="relu", algorithm="direct")
    assert "planes per group" in layer.describe(x)
    assert "planes per group" not in lk.Conv2d(w.astype(np.float64), algorithm="direct", groups=4).describe(x)
    expected = ref.conv2d(x, w, b, padding=1, groups=4, activation="relu")
    magnitude = ref.conv2d(np.abs(x), np.abs(w), np.abs(b), padding=1, groups=4)
    ref.assert_sum_close(layer(x), expected, magnitude, 8 * 9 + 1, np.float32, "module")
    ref.assert_sum_close(lk.conv2d(x, w, b, padding=1, groups=4, activation="relu"), expected, magnitude, 8 * 9 + 1,
                         np.float32, "function")


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched_input_gives_unbatched_output(dtype, rng):
    x = ref.randn(rng, (3, 7, 6), dtype)
    w = ref.randn(rng, (8, 3, 3, 3), dtype)
    b = ref.randn(rng, 8, dtype)
    got = lk.conv2d(x, w, b, padding=1, activation="relu")
    assert got.shape == (8, 7, 6)
    ref.assert_identical(got, lk.conv2d(x[None], w, b, padding=1, activation="relu")[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_clamps_negative_outputs(dtype, rng):
    # With a negative bias most outputs are negative: relu must zero them
    # exactly (not leave them negative, and not clamp before the bias).
    x = ref.randn(rng, (1, 4, 6, 6), dtype)
    w = ref.randn(rng, (8, 4, 3, 3), dtype)
    b = np.full(8, -3.0, dtype)
    plain = lk.conv2d(x, w, b)
    fused = lk.conv2d(x, w, b, activation="relu")
    assert (plain < 0).mean() > 0.5
    ref.assert_identical(fused, np.maximum(plain, 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_is_written_and_returned(isa, dtype, rng):
    x = ref.randn(rng, (2, 5, 8, 9), dtype)
    for w_shape, groups in (((9, 5, 3, 3), 1), ((5, 1, 3, 3), 5)):
        w = ref.randn(rng, w_shape, dtype)
        out = ref.poisoned((2, w_shape[0], 8, 9), dtype)
        result = lk.conv2d(x, w, padding="same", groups=groups, out=out)
        assert result is out
        ref.assert_identical(out, lk.conv2d(x, w, padding="same", groups=groups))


def test_out_for_unbatched_input(rng):
    x = ref.randn(rng, (3, 5, 5), np.float32)
    w = ref.randn(rng, (8, 3, 3, 3), np.float32)
    out = ref.poisoned((8, 3, 3), np.float32)
    assert lk.conv2d(x, w, out=out) is out
    ref.assert_identical(out, lk.conv2d(x, w))
