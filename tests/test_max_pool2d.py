"""max_pool2d against the reference: values and indices must match exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lepton_kernels as lk
import reference as ref

DTYPES = [np.float32, np.float64]
FLAVOURS = ["plain", "ties", "nan", "inf", "all_neg_inf"]


def check_pool(x, kwargs, context=""):
    """Compares values and indices with the reference; returns them."""
    context = f"x {x.shape}, {kwargs}; {context}"
    values, indices = lk.max_pool2d(x, **kwargs, return_indices=True)
    ref_values, ref_indices = ref.max_pool2d(x, **kwargs)
    ref.assert_identical(values, ref_values, context)
    ref.assert_identical(indices, ref_indices.astype(np.int64), context)
    # Without indices the values are the same.
    ref.assert_identical(lk.max_pool2d(x, **kwargs), ref_values, context)
    # The same call into a NaN-filled out= must write every element; where
    # NaN is a legitimate result, fill with a value no input holds instead.
    out = np.full(values.shape, 7.25, x.dtype) if np.isnan(ref_values).any() else ref.poisoned(values.shape, x.dtype)
    assert lk.max_pool2d(x, **kwargs, out=out) is out
    ref.assert_identical(out, ref_values, f"out=; {context}")
    return values, indices


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=ref.pool_cases(), flavour=st.sampled_from(FLAVOURS), seed=ref.SEEDS)
def test_matches_reference(isa, dtype, case, flavour, seed):
    shape, kwargs = case
    x = ref.fill_pool_input(np.random.default_rng(seed), shape, dtype, flavour)
    check_pool(x, kwargs, flavour)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, kwargs",
    [
        pytest.param((2, 3, 8, 8), dict(kernel_size=2), id="2x2"),
        pytest.param((2, 3, 9, 7), dict(kernel_size=3, stride=2, padding=1), id="3x3-s2-p1"),
        pytest.param((2, 3, 9, 7), dict(kernel_size=(3, 2), stride=(1, 2)), id="rect"),
        pytest.param((2, 3, 9, 7), dict(kernel_size=3, stride=1, padding=1, dilation=2), id="dilated"),
        pytest.param((2, 3, 10, 11), dict(kernel_size=(4, 3), padding=(2, 1), dilation=(1, 3)), id="pad-dilation"),
        pytest.param((2, 3, 8, 8), dict(kernel_size=3, stride=2, ceil_mode=True), id="ceil"),
        pytest.param((2, 3, 9, 9), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True), id="ceil-pad"),
        # ceil_mode would add a window that starts in the right padding: dropped.
        pytest.param((1, 2, 5, 5), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True), id="ceil-dropped"),
        pytest.param((1, 2, 6, 6), dict(kernel_size=3, stride=3, padding=1, ceil_mode=True), id="ceil-dropped-2"),
        pytest.param((2, 3, 1, 1), dict(kernel_size=1), id="1x1"),
        pytest.param((2, 3, 5, 4), dict(kernel_size=(5, 4)), id="global"),
        pytest.param((2, 3, 7, 7), dict(kernel_size=3, stride=4), id="stride-over-kernel"),
        # Windows wholly inside the padding: -inf, index of their first tap.
        pytest.param((1, 2, 1, 1), dict(kernel_size=2, stride=1, padding=1, dilation=2), id="window-in-padding"),
        pytest.param((1, 2, 1, 3), dict(kernel_size=(2, 3), stride=1, padding=1, dilation=(2, 1)),
                     id="windows-in-padding"),
        # Over 4 M window taps (2e6 per thread): split across the worker threads.
        pytest.param((2, 64, 64, 64), dict(kernel_size=3, stride=1, padding=1), id="threaded"),
    ],
)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_argument_classes(isa, dtype, shape, kwargs, flavour, rng):
    check_pool(ref.fill_pool_input(rng, shape, dtype, flavour), kwargs, flavour)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, kwargs",
    [
        pytest.param((1, 1, 1, 1), dict(kernel_size=2, ceil_mode=True), id="2x2-on-1x1"),
        pytest.param((2, 3, 3, 5), dict(kernel_size=4, ceil_mode=True), id="4x4-on-3x5"),
        pytest.param((2, 3, 5, 2), dict(kernel_size=3, stride=2, padding=(1, 0), ceil_mode=True), id="3x3-on-5x2"),
    ],
)
def test_ceil_mode_window_past_the_input(dtype, shape, kwargs, rng):
    # With ceil_mode a window may reach past the input and its padding, as
    # long as it starts inside: torch pools the taps that exist.
    check_pool(ref.randn(rng, shape, dtype), kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(kernel_size=2), id="2x2-s2"),
        pytest.param(dict(kernel_size=3, stride=1, padding=1), id="3x3-s1-p1"),
        pytest.param(dict(kernel_size=3, stride=2, padding=1), id="3x3-s2-p1"),
        pytest.param(dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 2)), id="dilated-s2"),
    ],
)
def test_row_widths(isa, dtype, kwargs, rng):
    # Rows of outputs are taken a vector (4 to 16 columns) at a time, the
    # last one overlapping, narrower vectors and scalar code for short rows:
    # every width from 1 to past twice the widest vector.
    for width in range(1, 72):
        for flavour in ("plain", "ties", "nan"):
            check_pool(ref.fill_pool_input(rng, (1, 2, 5, width + 4), dtype, flavour), kwargs,
                       f"width {width}, {flavour}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_shape_and_default_stride(dtype, rng):
    x = ref.randn(rng, (2, 3, 9, 7), dtype)
    assert lk.max_pool2d(x, 2).shape == (2, 3, 4, 3)
    assert lk.max_pool2d(x, 2, ceil_mode=True).shape == (2, 3, 5, 4)
    assert lk.max_pool2d(x, (3, 2), stride=1).shape == (2, 3, 7, 6)
    ref.assert_identical(lk.max_pool2d(x, 3), lk.max_pool2d(x, 3, stride=3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates_and_last_nan_wins(dtype, rng):
    x = ref.randn(rng, (1, 1, 4, 4), dtype)
    x[0, 0, 0, 1] = np.nan  # window (0, 0): one NaN
    x[0, 0, 0, 2] = np.nan  # window (0, 1): two NaN, the later one wins
    x[0, 0, 1, 3] = np.nan
    x[0, 0, 3, 3] = 1e30  # window (1, 1): no NaN, a large value
    values, indices = lk.max_pool2d(x, 2, return_indices=True)
    assert np.isnan(values[0, 0, 0, 0]) and indices[0, 0, 0, 0] == 1
    assert np.isnan(values[0, 0, 0, 1]) and indices[0, 0, 0, 1] == 7
    assert values[0, 0, 1, 1] == dtype(1e30) and indices[0, 0, 1, 1] == 15
    check_pool(x, dict(kernel_size=2))
    # A NaN ahead of a larger finite value still wins.
    x[0, 0, 2, 0], x[0, 0, 2, 1] = np.nan, np.inf
    values, indices = lk.max_pool2d(x, 2, return_indices=True)
    assert np.isnan(values[0, 0, 1, 0]) and indices[0, 0, 1, 0] == 8


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_take_the_first_index(dtype):
    x = np.ones((1, 1, 4, 6), dtype)
    values, indices = lk.max_pool2d(x, 2, stride=1, return_indices=True)
    assert (values == 1).all()
    rows, cols = np.meshgrid(np.arange(3), np.arange(5), indexing="ij")
    ref.assert_identical(indices[0, 0], (rows * 6 + cols).astype(np.int64))
    check_pool(x, dict(kernel_size=(3, 2), stride=(1, 2), padding=1, dilation=(1, 2)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_neg_inf_windows(dtype):
    x = np.full((2, 2, 5, 5), -np.inf, dtype)
    values, indices = lk.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    assert (values == -np.inf).all()
    # No tap beats -inf: each window reports its first tap inside the input.
    first = np.array([0, 1, 3])
    ref.assert_identical(indices[0, 0], (first[:, None] * 5 + first[None, :]).astype(np.int64))
    check_pool(x, dict(kernel_size=3, stride=2, padding=1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched_input(dtype, rng):
    x = ref.randn(rng, (3, 7, 6), dtype)
    values, indices = lk.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    assert values.shape == indices.shape == (3, 4, 3)
    batched = lk.max_pool2d(x[None], 3, stride=2, padding=1, return_indices=True)
    ref.assert_identical(values, batched[0][0])
    ref.assert_identical(indices, batched[1][0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batched", [True, False])
def test_out_is_written_and_returned(dtype, batched, rng):
    x = ref.randn(rng, (2, 3, 9, 8) if batched else (3, 9, 8), dtype)
    out = ref.poisoned(((2,) if batched else ()) + (3, 5, 4), dtype)
    assert lk.max_pool2d(x, 3, stride=2, padding=1, out=out) is out
    ref.assert_identical(out, lk.max_pool2d(x, 3, stride=2, padding=1))
    out[...] = np.nan
    values, indices = lk.max_pool2d(x, 3, stride=2, padding=1, return_indices=True, out=out)
    assert values is out
    expected = ref.max_pool2d(x, 3, stride=2, padding=1)
    ref.assert_identical(out, expected[0])
    ref.assert_identical(indices, expected[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, kwargs",
    [
        # Planes that 2x2 windows tile exactly pool as one tall plane; rows of half a vector go two to a vector.
        pytest.param((3, 5, 16, 16), dict(kernel_size=2), id="2x2-16"),
        pytest.param((2, 3, 14, 8), dict(kernel_size=2), id="2x2-8"),
        pytest.param((1, 7, 6, 4), dict(kernel_size=2), id="2x2-4"),
        pytest.param((2, 3, 12, 10), dict(kernel_size=3, stride=3), id="3x3-s3"),
        # 3x3 at stride 2: each input row's maxima serve two output rows; rows past 512 outputs go in chunks.
        pytest.param((2, 3, 23, 71), dict(kernel_size=3, stride=2, padding=1), id="3x3-s2-p1"),
        pytest.param((1, 2, 40, 36), dict(kernel_size=3, stride=2), id="3x3-s2"),
        pytest.param((1, 1, 9, 1100), dict(kernel_size=3, stride=2, padding=1), id="3x3-s2-wide"),
    ],
)
def test_stacked_planes_and_shared_rows(isa, dtype, shape, kwargs, rng):
    # Exact values, signed zeros included: the first maximum in row-major order wins a tie of -0 and +0.
    for flavour in ("plain", "ties", "nan", "inf", "zeros"):
        if flavour == "zeros":
            x = np.where(rng.random(shape) < 0.5, -0.0, 0.0).astype(dtype)
            x[rng.random(shape) < 0.3] = -1
        else:
            x = ref.fill_pool_input(rng, shape, dtype, flavour)
        values, _ = check_pool(x, kwargs, flavour)
        expected = ref.max_pool2d(x, **kwargs)[0]
        fine = ~np.isnan(expected)
        assert np.array_equal(np.signbit(values[fine]), np.signbit(expected[fine])), f"{flavour}: signs of zeros"
        assert np.array_equal(np.signbit(lk.max_pool2d(x, **kwargs)[fine]), np.signbit(expected[fine]))
