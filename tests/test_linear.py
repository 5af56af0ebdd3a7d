"""linear against the float64 reference, at every ISA level."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

import lepton_kernels as lk
import reference as ref

DTYPES = [np.float32, np.float64]


def check_linear(rng, x_shape, w_shape, has_bias, activation, dtype, context=""):
    x = ref.randn(rng, x_shape, dtype)
    w = ref.randn(rng, w_shape, dtype)
    b = ref.randn(rng, w_shape[:-1], dtype) if has_bias else None
    got = lk.linear(x, w, b, activation=activation)
    expected = ref.linear(x, w, b, activation)
    magnitude = ref.linear(np.abs(x), np.abs(w), None if b is None else np.abs(b))
    context = f"x {x_shape}, w {w_shape}, bias {has_bias}, {activation}; {context}"
    ref.assert_sum_close(got, expected, magnitude, x_shape[-1] + has_bias, dtype, context)
    # The same call into a NaN-filled out= must write every element. (An
    # empty out= has a test of its own, so that a failure there masks nothing.)
    if got.size:
        out = ref.poisoned(got.shape, dtype)
        assert lk.linear(x, w, b, activation=activation, out=out) is out
        ref.assert_identical(out, got, f"out=; {context}")
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=ref.linear_cases(), seed=ref.SEEDS)
def test_matches_reference(isa, dtype, case, seed):
    check_linear(np.random.default_rng(seed), *case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_edges(isa, dtype, rng):
    # Rows (batch) and columns (output features) around every tile edge of
    # the GEMM microkernels and of the dot kernel used for few rows or few
    # outputs, then reduction lengths around its vector widths.
    for m in (1, 3, 4, 5, 7, 8, 9, 15, 16, 17):
        for n in (1, 3, 4, 5, 6, 7, 11, 12, 13, 23, 24, 25, 47, 48, 49, 95, 96, 97):
            check_linear(rng, (m, 19), (n, 19), (m + n) % 2 == 1, None, dtype, f"m={m} n={n}")
    for k in (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65):
        for m, n in ((1, 5), (2, 9), (4, 4), (9, 13), (9, 50)):
            check_linear(rng, (m, k), (n, k), True, "relu", dtype, f"m={m} n={n} k={k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "x_shape, w_shape",
    [
        pytest.param((5, 1), (3, 1), id="one-feature"),
        pytest.param((7,), (9, 7), id="1d-input"),
        pytest.param((2, 3, 4, 10), (6, 10), id="4d-input"),
        pytest.param((6, 10), (10,), id="1d-weight"),
        pytest.param((10,), (10,), id="1d-input-and-weight"),
        # A reduction of more than 1024 is split in blocks accumulated in place.
        pytest.param((9, 1100), (17, 1100), id="reduction-blocks"),
        pytest.param((5, 2053), (3, 2053), id="reduction-blocks-prime"),
        # More rows than one row block (16 microkernel tiles).
        pytest.param((131, 20), (50, 20), id="row-blocks"),
        # Large enough (over 8 MFLOP) to be split across the worker threads.
        pytest.param((64, 256), (300, 256), id="threaded"),
    ],
)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_argument_classes(isa, dtype, x_shape, w_shape, has_bias, activation, rng):
    got = check_linear(rng, x_shape, w_shape, has_bias, activation, dtype)
    assert got.shape == x_shape[:-1] + w_shape[:-1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_no_input_features_gives_bias(dtype, activation, rng):
    # An empty sum is 0, so the output is the bias (through the activation).
    x = np.empty((4, 0), dtype)
    w = np.empty((5, 0), dtype)
    b = ref.randn(rng, 5, dtype)
    got = lk.linear(x, w, b, activation=activation)
    expected = np.broadcast_to(np.maximum(b, 0) if activation else b, (4, 5))
    ref.assert_identical(got, expected)
    ref.assert_identical(lk.linear(x, w), np.zeros((4, 5), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(0,), (2, 3, 0), (1, 1, 1, 0)])
def test_no_input_features_any_rank(dtype, x_shape, rng):
    w = np.empty((5, 0), dtype)
    b = ref.randn(rng, 5, dtype)
    ref.assert_identical(lk.linear(np.empty(x_shape, dtype), w, b), np.broadcast_to(b, x_shape[:-1] + (5,)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_clamps_negative_outputs(dtype, rng):
    x = ref.randn(rng, (9, 12), dtype)
    w = ref.randn(rng, (13, 12), dtype)
    b = np.full(13, -2.0, dtype)
    plain = lk.linear(x, w, b)
    assert (plain < 0).mean() > 0.5
    ref.assert_identical(lk.linear(x, w, b, activation="relu"), np.maximum(plain, 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(9, 12), (2, 3, 12), (12,)])
def test_out_is_written_and_returned(isa, dtype, x_shape, rng):
    x = ref.randn(rng, x_shape, dtype)
    w = ref.randn(rng, (13, 12), dtype)
    b = ref.randn(rng, 13, dtype)
    out = ref.poisoned(x_shape[:-1] + (13,), dtype)
    assert lk.linear(x, w, b, activation="relu", out=out) is out
    ref.assert_identical(out, lk.linear(x, w, b, activation="relu"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_gemm_with_an_edge_on_another_tile_shape(isa, dtype, rng):
    # A layer's GEMM may take the wide tiles' whole panels and its last columns on a panel of another shape
    # (64 x 300 -> 80 at AVX-512: 48 columns on 8x48 tiles, 32 on 8x32): every column, bias and ReLU, input
    # rows read in place or packed (a column stride), rows past whole tiles.
    for m, k, n in ((64, 300, 80), (64, 300, 128), (30, 100, 113), (17, 64, 49), (9, 33, 97), (64, 20, 56)):
        x_full = ref.randn(rng, (m, 2 * k), dtype)
        w, b = ref.randn(rng, (n, k), dtype), ref.randn(rng, (n,), dtype)
        layer = lk.Linear(w, b, activation="relu")
        for x in (x_full[:, :k], x_full[:, ::2]):
            expected = ref.linear(x, w, b, "relu")
            magnitude = ref.linear(np.abs(x), np.abs(w), np.abs(b))
            ref.assert_sum_close(layer(x), expected, magnitude, k + 1, dtype, f"{m} x {k} -> {n}, {x.strides}")
    if isa == "avx512" and dtype == np.float32:
        assert "columns_from=48" in lk.Linear(ref.randn(rng, (80, 300), dtype)).describe(64)
