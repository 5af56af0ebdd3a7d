"""relu, softmax and log_softmax against the reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lepton_kernels as lk
import reference as ref

DTYPES = [np.float32, np.float64]
# 0-d arrays have their own tests below, so a failure there does not mask others.
SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=9)


def with_specials(rng, x, fraction=0.05):
    """Sprinkles NaN, +inf and -inf over `x`."""
    x = x.copy()
    for value in (np.nan, np.inf, -np.inf):
        x[rng.random(x.shape) < fraction] = value
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=SHAPES, seed=ref.SEEDS, specials=st.booleans())
def test_relu_matches_reference(isa, dtype, shape, seed, specials):
    rng = np.random.default_rng(seed)
    x = ref.randn(rng, shape, dtype)
    if specials:
        x = with_specials(rng, x)
    ref.assert_identical(lk.relu(x), ref.relu(x), f"shape {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@given(shape=SHAPES, data=st.data(), seed=ref.SEEDS,
       scale=st.sampled_from([1.0, 30.0, 1000.0]))
def test_softmax_matches_reference(isa, dtype, log, shape, data, seed, scale):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim")
    # Large scales overflow exp() unless the maximum is subtracted first.
    x = ref.randn(np.random.default_rng(seed), shape, dtype) * dtype(scale)
    op = lk.log_softmax if log else lk.softmax
    ref.assert_softmax_close(op(x, dim), x, dim, log, f"shape {shape}, dim {dim}, scale {scale}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_softmax_special_values(dtype, log, dim, rng):
    x = with_specials(rng, ref.randn(rng, (7, 6, 5), dtype), fraction=0.02)
    lanes = np.moveaxis(x, dim, -1)  # a view: writes go to x
    lanes[0, 0] = -np.inf  # all -inf: NaN, as in torch
    lanes[1, 1] = -np.inf
    lanes[1, 1, 2] = 3.0  # a single finite value: 1 (log: 0) there, 0 (log: -inf) elsewhere
    op = lk.log_softmax if log else lk.softmax
    ref.assert_softmax_close(op(x, dim), x, dim, log, f"dim {dim}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_rows_sum_to_one(dtype, rng):
    x = ref.randn(rng, (33, 130), dtype) * dtype(10)
    y = lk.softmax(x, 1)
    assert (y >= 0).all() and (y <= 1).all()
    np.testing.assert_allclose(y.astype(np.float64).sum(axis=1), 1.0, rtol=0, atol=200 * np.finfo(dtype).eps)
    np.testing.assert_allclose(np.exp(lk.log_softmax(x.astype(np.float64), 1)), lk.softmax(x.astype(np.float64), 1),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [-1.5, 2.5, np.nan])
def test_relu_of_a_scalar(dtype, value):
    x = np.array(value, dtype)
    ref.assert_identical(lk.relu(x), ref.relu(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, -1])
def test_softmax_of_a_scalar(dtype, dim, rng):
    # As in torch, a 0-d array is its own single row.
    x = ref.randn(rng, (), dtype)
    ref.assert_identical(lk.softmax(x, dim), np.array(1.0, dtype))
    ref.assert_identical(lk.log_softmax(x, dim), np.array(0.0, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, dim", [((512, 700), 1), ((700, 512), 0), ((4, 300, 200), 1)])
def test_threaded_sizes(isa, dtype, shape, dim, rng):
    # Over 128 K elements: the work is split across the worker threads.
    x = ref.randn(rng, shape, dtype)
    ref.assert_identical(lk.relu(x), ref.relu(x))
    ref.assert_softmax_close(lk.softmax(x, dim), x, dim, False)
    ref.assert_softmax_close(lk.log_softmax(x, dim), x, dim, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["relu", "softmax", "log_softmax"])
def test_out_is_written_and_returned(dtype, op, rng):
    x = ref.randn(rng, (5, 6, 7), dtype)
    call = (lambda **kw: lk.relu(x, **kw)) if op == "relu" else (lambda **kw: getattr(lk, op)(x, 1, **kw))
    out = ref.poisoned(x.shape, dtype)
    assert call(out=out) is out
    ref.assert_identical(out, call())


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_in_place(dtype, rng):
    # relu documents out=input as the way to work in place.
    x = with_specials(rng, ref.randn(rng, (6, 40), dtype))
    expected = ref.relu(x)
    assert lk.relu(x, out=x) is x
    ref.assert_identical(x, expected)


@pytest.mark.parametrize("op", [lk.softmax, lk.log_softmax])
def test_softmax_out_aliasing_its_input(op, rng):
    # Either refused, like any out= overlapping an input, or done right in place.
    x = ref.randn(rng, (6, 40), np.float32)
    expected = op(x.copy(), 1)
    try:
        result = op(x, 1, out=x)
    except ValueError as e:
        assert str(e).startswith("out:"), e
        return
    assert result is x
    ref.assert_identical(x, expected)
