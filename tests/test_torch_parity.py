"""Differential tests against torch.nn.functional, whose semantics the API follows."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lepton_kernels as lk
import reference as ref

torch = pytest.importorskip("torch", reason="the differential tests compare against PyTorch")
F = torch.nn.functional

DTYPES = [np.float32, np.float64]
POOL_FLAVOURS = ["plain", "ties", "nan", "inf", "all_neg_inf"]
# What the library raises for a bad argument (numpy's AxisError is a ValueError).
LK_ERRORS = (ValueError, TypeError, OverflowError)


def tensor(a):
    # A writable C-ordered copy (np.ascontiguousarray would turn 0-d into 1-d).
    return None if a is None else torch.from_numpy(np.asarray(a).copy(order="C"))


def torch_call(fn, *args, **kwargs):
    with warnings.catch_warnings():
        # torch pads a copy of the input for 'same' with even kernels, and says so.
        warnings.filterwarnings("ignore", "Using padding='same' with even kernel", UserWarning)
        return fn(*args, **kwargs)


def torch_conv2d(x, w, b, activation=None, **kwargs):
    y = torch_call(F.conv2d, tensor(x), tensor(w), tensor(b), **kwargs)
    return (F.relu(y) if activation == "relu" else y).numpy()


def torch_linear(x, w, b, activation=None):
    y = F.linear(tensor(x), tensor(w), tensor(b))
    return (F.relu(y) if activation == "relu" else y).numpy()


def torch_max_pool2d(x, **kwargs):
    values, indices = F.max_pool2d(tensor(x), return_indices=True, **kwargs)
    return values.numpy(), indices.numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=ref.conv_cases(), seed=ref.SEEDS)
def test_conv2d(dtype, case, seed):
    x_shape, w_shape, has_bias, kwargs = case
    rng = np.random.default_rng(seed)
    x, w = ref.randn(rng, x_shape, dtype), ref.randn(rng, w_shape, dtype)
    b = ref.randn(rng, w_shape[0], dtype) if has_bias else None
    conv_args = {k: v for k, v in kwargs.items() if k != "activation"}
    magnitude = ref.conv2d(np.abs(x), np.abs(w), None if b is None else np.abs(b), **conv_args)
    # Both results are within the bound of the exact value, so within twice it of each other.
    ref.assert_sum_close(lk.conv2d(x, w, b, **kwargs), torch_conv2d(x, w, b, **kwargs), 2 * magnitude,
                         w[0].size + has_bias, dtype, f"x {x_shape}, w {w_shape}, {kwargs}")


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=ref.pool_cases(), flavour=st.sampled_from(POOL_FLAVOURS), seed=ref.SEEDS)
def test_max_pool2d(dtype, case, flavour, seed):
    shape, kwargs = case
    x = ref.fill_pool_input(np.random.default_rng(seed), shape, dtype, flavour)
    values, indices = lk.max_pool2d(x, **kwargs, return_indices=True)
    expected_values, expected_indices = torch_max_pool2d(x, **kwargs)
    context = f"x {shape}, {kwargs}, {flavour}"
    ref.assert_identical(values, expected_values, context)
    ref.assert_identical(indices, expected_indices, context)
    # The reference agrees with torch too, so the other tests' oracle is sound.
    ref.assert_identical(ref.max_pool2d(x, **kwargs)[1], expected_indices, f"reference: {context}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d_nan_and_window_edges(dtype, rng):
    x = ref.fill_pool_input(rng, (2, 3, 7, 6), dtype, "nan")
    x[0, 0] = np.nan  # a plane of NaN: the last tap of each window wins
    x[0, 1] = -np.inf
    x[1, 0, :, :3] = 5.0  # ties
    for kwargs in (dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                   dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), dilation=(2, 3)),
                   dict(kernel_size=2, stride=1, padding=1, dilation=5)):
        values, indices = lk.max_pool2d(x, **kwargs, return_indices=True)
        expected_values, expected_indices = torch_max_pool2d(x, **kwargs)
        ref.assert_identical(values, expected_values, str(kwargs))
        ref.assert_identical(indices, expected_indices, str(kwargs))


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=ref.linear_cases(), seed=ref.SEEDS)
def test_linear(dtype, case, seed):
    x_shape, w_shape, has_bias, activation = case
    if has_bias and len(w_shape) == 1:
        has_bias = False  # torch has no bias for a 1-D weight
    rng = np.random.default_rng(seed)
    x, w = ref.randn(rng, x_shape, dtype), ref.randn(rng, w_shape, dtype)
    b = ref.randn(rng, w_shape[:-1], dtype) if has_bias else None
    magnitude = ref.linear(np.abs(x), np.abs(w), None if b is None else np.abs(b))
    ref.assert_sum_close(lk.linear(x, w, b, activation=activation), torch_linear(x, w, b, activation),
                         2 * magnitude, x_shape[-1] + has_bias, dtype, f"x {x_shape}, w {w_shape}")


@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=st.lists(st.integers(0, 7), min_size=1, max_size=4).map(tuple), data=st.data(), seed=ref.SEEDS,
       scale=st.sampled_from([1.0, 1000.0]))
def test_activations(dtype, shape, data, seed, scale):
    rng = np.random.default_rng(seed)
    x = ref.randn(rng, shape, dtype) * dtype(scale)
    x[rng.random(shape) < 0.05] = -np.inf
    x[rng.random(shape) < 0.02] = np.nan
    ref.assert_identical(lk.relu(x), torch.relu(tensor(x)).numpy(), "relu")
    dim = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim")
    for op, torch_op in ((lk.softmax, torch.softmax), (lk.log_softmax, torch.log_softmax)):
        expected = torch_op(tensor(x), dim).numpy()
        got = op(x, dim)
        assert got.shape == expected.shape, op.__name__
        # Compared with the float64 reference (torch's float32 softmax has its
        # own rounding); NaN, zeros and infinities must sit where torch's do.
        ref.assert_softmax_close(got, x, dim, op is lk.log_softmax, op.__name__)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), op.__name__)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected), op.__name__)


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_of_a_scalar(dtype):
    x = np.array(-0.75, dtype)
    ref.assert_identical(lk.relu(x), torch.relu(tensor(x)).numpy(), "relu")
    ref.assert_identical(lk.softmax(x, 0), torch.softmax(tensor(x), 0).numpy(), "softmax")
    ref.assert_identical(lk.log_softmax(x, -1), torch.log_softmax(tensor(x), -1).numpy(), "log_softmax")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, kwargs",
    [
        pytest.param((1, 1, 1, 1), dict(kernel_size=2, ceil_mode=True), id="2x2-on-1x1"),
        pytest.param((2, 3, 3, 5), dict(kernel_size=4, ceil_mode=True), id="4x4-on-3x5"),
        pytest.param((2, 3, 5, 2), dict(kernel_size=3, stride=2, padding=(1, 0), ceil_mode=True), id="3x3-on-5x2"),
    ],
)
def test_max_pool2d_ceil_mode_window_over_the_edge(dtype, shape, kwargs, rng):
    # With ceil_mode torch accepts a window that reaches past the input (and
    # its padding) as long as it starts inside: it pools what is there.
    x = ref.randn(rng, shape, dtype)
    values, indices = lk.max_pool2d(x, **kwargs, return_indices=True)
    expected_values, expected_indices = torch_max_pool2d(x, **kwargs)
    ref.assert_identical(values, expected_values, str(kwargs))
    ref.assert_identical(indices, expected_indices, str(kwargs))


# ---------------------------------------------------------------------------
# Errors: where torch raises, the library raises too; where torch computes,
# the library computes the same.
# ---------------------------------------------------------------------------

def check_same_outcome(lk_fn, torch_fn, compare, context, lk_may_refuse=False):
    """Torch raises -> the library raises; torch computes -> the same result.

    `lk_may_refuse`: torch skips some argument checks on empty inputs; there
    the library may still refuse bad arguments.
    """
    try:
        expected = torch_fn()
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        with pytest.raises(LK_ERRORS):
            lk_fn()
            pytest.fail(f"torch raises {type(e).__name__}: {e}; the library does not; {context}")
        return
    if lk_may_refuse:
        try:
            got = lk_fn()
        except LK_ERRORS:
            return
    else:
        got = lk_fn()
    compare(got, expected)


@given(
    x_shape=st.tuples(st.integers(0, 2), st.integers(1, 6), st.integers(1, 7), st.integers(1, 7)),
    w_shape=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.integers(1, 4)),
    bias=st.sampled_from([None, 0, 1, -1]),
    stride=st.one_of(st.integers(-1, 3), st.tuples(st.integers(0, 3), st.integers(1, 3))),
    padding=st.one_of(st.integers(-1, 3), st.tuples(st.integers(0, 3), st.integers(-1, 2)),
                      st.sampled_from(["same", "valid"])),
    dilation=st.one_of(st.integers(0, 3), st.tuples(st.integers(1, 3), st.integers(0, 2))),
    groups=st.integers(0, 3),
    seed=ref.SEEDS,
)
def test_conv2d_errors_where_torch_errors(x_shape, w_shape, bias, stride, padding, dilation, groups, seed):
    rng = np.random.default_rng(seed)
    x, w = ref.randn(rng, x_shape, np.float64), ref.randn(rng, w_shape, np.float64)
    b = None if bias is None else ref.randn(rng, w_shape[0] + bias, np.float64)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    context = f"x {x_shape}, w {w_shape}, bias {None if b is None else b.shape}, {kwargs}"

    def compare(got, expected):
        magnitude = ref.conv2d(np.abs(x), np.abs(w), None if b is None else np.abs(b), **kwargs)
        ref.assert_sum_close(got, expected, 2 * magnitude, w[0].size + 1, np.float64, context)

    check_same_outcome(lambda: lk.conv2d(x, w, b, **kwargs), lambda: torch_conv2d(x, w, b, **kwargs), compare,
                       context, lk_may_refuse=x.size == 0)


@given(
    x_shape=st.tuples(st.integers(0, 2), st.integers(1, 3), st.integers(1, 8), st.integers(1, 8)),
    kernel_size=st.one_of(st.integers(0, 4), st.tuples(st.integers(1, 4), st.integers(-1, 4))),
    stride=st.one_of(st.none(), st.integers(0, 4), st.tuples(st.integers(1, 3), st.integers(0, 3))),
    padding=st.one_of(st.integers(-1, 3), st.tuples(st.integers(0, 3), st.integers(0, 2))),
    dilation=st.one_of(st.integers(0, 3), st.tuples(st.integers(1, 3), st.integers(1, 4))),
    ceil_mode=st.booleans(),
    seed=ref.SEEDS,
)
def test_max_pool2d_errors_where_torch_errors(x_shape, kernel_size, stride, padding, dilation, ceil_mode, seed):
    x = ref.randn(np.random.default_rng(seed), x_shape, np.float32)
    kwargs = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    context = f"x {x_shape}, {kwargs}"

    def compare(got, expected):
        ref.assert_identical(got[0], expected[0], context)
        ref.assert_identical(got[1], expected[1], context)

    check_same_outcome(lambda: lk.max_pool2d(x, **kwargs, return_indices=True),
                       lambda: torch_max_pool2d(x, **kwargs), compare, context, lk_may_refuse=x.size == 0)


@given(
    x_shape=st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
    w_shape=st.one_of(st.tuples(st.integers(0, 5), st.integers(0, 4)), st.tuples(st.integers(0, 4)),
                      st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))),
    # Bias sizes off by 2 never broadcast, which torch would allow.
    bias=st.sampled_from([None, 0, 2]),
    seed=ref.SEEDS,
)
def test_linear_errors_where_torch_errors(x_shape, w_shape, bias, seed):
    rng = np.random.default_rng(seed)
    x, w = ref.randn(rng, x_shape, np.float64), ref.randn(rng, w_shape, np.float64)
    b = None if bias is None or len(w_shape) == 1 else ref.randn(rng, w_shape[0] + bias, np.float64)
    context = f"x {x_shape}, w {w_shape}, bias {None if b is None else b.shape}"

    def compare(got, expected):
        magnitude = ref.linear(np.abs(x), np.abs(w), None if b is None else np.abs(b))
        ref.assert_sum_close(got, expected, 2 * magnitude, x_shape[-1] + 1, np.float64, context)

    check_same_outcome(lambda: lk.linear(x, w, b), lambda: torch_linear(x, w, b), compare, context)


@pytest.mark.parametrize("shape", [(), (3,), (2, 3), (2, 1, 3)])
@pytest.mark.parametrize("dim", [-4, -3, -2, -1, 0, 1, 2, 3])
def test_softmax_errors_where_torch_errors(shape, dim, rng):
    x = ref.randn(rng, shape, np.float32)
    for op, torch_op in ((lk.softmax, torch.softmax), (lk.log_softmax, torch.log_softmax)):
        check_same_outcome(lambda: op(x, dim), lambda: torch_op(tensor(x), dim).numpy(),
                           lambda got, expected: ref.assert_softmax_close(got, x, dim, op is lk.log_softmax),
                           f"{op.__name__} shape {shape} dim {dim}")
