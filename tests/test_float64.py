"""The float64 contract, in one place.

Every op's float64 results against the float64 reference live in the op's
own test file (each is parametrised over float32 and float64, at every ISA
level). This file checks what an autograd integration relies on beyond that:

- torch.autograd.gradcheck passes through our forward kernels: each op is
  wrapped in a torch.autograd.Function whose forward is lepton's and whose
  backward is torch's own. gradcheck's finite differences (step 1e-6) of our
  forward must match torch's analytic gradient to rtol 1e-3 / atol 1e-5.
  A forward rounded to float32 anywhere (relative error ~6e-8, divided by
  the 1e-6 step) is off by ~0.1 and fails, and so does a wrong tap or index.
- max_pool2d in float64 picks exactly what float32 picks (NaN, ties, -inf,
  padding, ceil_mode) on data both dtypes represent exactly.
- mixed dtypes raise TypeError naming the argument, on every path (the
  cached fast path of conv2d and linear, unbatched inputs, layers, out=).
- the plan cache keeps float32 and float64 plans of one shape apart.
- no op modifies its float64 inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

import lepton_kernels as lk
import reference as ref

F32, F64 = np.float32, np.float64


# --------------------------------------------------------------------------
# gradcheck through lepton's forward, torch's backward
# --------------------------------------------------------------------------

def _lk_function(torch, lk_forward, torch_forward):
    """A torch.autograd.Function: forward by lepton (on NumPy), backward by torch's op."""

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            ctx.save_for_backward(*args)
            arrays = [a.detach().numpy() for a in args]
            before = [a.copy() for a in arrays]
            y = lk_forward(*arrays)
            for a, b in zip(arrays, before):
                ref.assert_identical(a, b, "an input was modified")
            assert y.dtype == np.float64
            return torch.from_numpy(y)

        @staticmethod
        def backward(ctx, grad):
            args = [a.detach().requires_grad_(True) for a in ctx.saved_tensors]
            with torch.enable_grad():
                y = torch_forward(*args)
            return torch.autograd.grad(y, args, grad)

    return Op.apply


def _separated(rng, shape, gap=1e-2):
    """Distinct values at least `gap` apart, shuffled, none within gap/2 of 0:
    a finite-difference step cannot reorder them or cross a ReLU's kink."""
    n = int(np.prod(shape))
    values = (np.arange(n) - n / 2 + 0.5) * gap
    return rng.permutation(values).reshape(shape) + rng.uniform(-0.1, 0.1) * gap


CONV_CASES = [
    pytest.param((2, 3, 6, 5), (4, 3, 3, 3), True, dict(padding=1), id="pad"),
    pytest.param((1, 3, 7, 6), (4, 3, 3, 2), True, dict(padding="same", dilation=(2, 1)), id="same-dilated",
                 # torch's note that it pads a copy for the even kernel width, not a problem
                 marks=pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")),
    pytest.param((2, 2, 7, 7), (3, 2, 3, 3), False, dict(padding="valid", stride=2), id="valid-stride"),
    pytest.param((1, 4, 5, 6), (6, 2, 2, 3), True, dict(groups=2, padding=(1, 0)), id="grouped"),
    pytest.param((1, 3, 5, 5), (3, 1, 3, 3), True, dict(groups=3, padding=1, activation="relu"), id="depthwise-relu"),
]


@pytest.mark.parametrize("x_shape, w_shape, has_bias, kwargs", CONV_CASES)
def test_gradcheck_conv2d(x_shape, w_shape, has_bias, kwargs, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    conv_kwargs = {k: v for k, v in kwargs.items() if k != "activation"}
    act = (lambda t: F.relu(t)) if kwargs.get("activation") == "relu" else (lambda t: t)
    args = [ref.randn(rng, x_shape, F64), ref.randn(rng, w_shape, F64)]
    if has_bias:
        args.append(ref.randn(rng, w_shape[0], F64))
    op = _lk_function(torch, lambda x, w, b=None: lk.conv2d(x, w, b, **kwargs),
                      lambda x, w, b=None: act(F.conv2d(x, w, b, **conv_kwargs)))
    tensors = tuple(torch.from_numpy(a).requires_grad_(True) for a in args)
    assert torch.autograd.gradcheck(op, tensors)
    # A layer with float64 weights runs the same kernels with packed weights.
    layer = lk.Conv2d(*args[1:], **kwargs)
    op = _lk_function(torch, lambda x: layer(x),
                      lambda x: act(F.conv2d(x, *(torch.from_numpy(a) for a in args[1:]), **conv_kwargs)))
    assert torch.autograd.gradcheck(op, (tensors[0],))


@pytest.mark.parametrize("kwargs", [
    pytest.param(dict(kernel_size=2), id="2x2"),
    pytest.param(dict(kernel_size=3, stride=2, padding=1), id="3x3-s2-p1"),
    pytest.param(dict(kernel_size=(2, 3), stride=1, dilation=(2, 1)), id="dilated-s1"),
    pytest.param(dict(kernel_size=2, stride=2, padding=1, ceil_mode=True), id="ceil"),
])
def test_gradcheck_max_pool2d(kwargs, rng):
    torch = pytest.importorskip("torch")
    x = _separated(rng, (2, 3, 7, 9))

    def forward(a):
        values, indices = lk.max_pool2d(a, **kwargs, return_indices=True)
        ref.assert_identical(lk.MaxPool2d(**kwargs)(a), values)
        # The indices are the ones torch's backward scatters to.
        _, t_indices = torch.nn.functional.max_pool2d(torch.from_numpy(a), **kwargs, return_indices=True)
        ref.assert_identical(indices, t_indices.numpy())
        return values

    op = _lk_function(torch, forward, lambda t: torch.nn.functional.max_pool2d(t, **kwargs))
    assert torch.autograd.gradcheck(op, (torch.from_numpy(x).requires_grad_(True),))


@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradcheck_conv2d_max_pool2d(activation, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    # A weight of one tap, 1, per channel pair keeps the convolution outputs
    # as well separated as the input, so no step reorders a pooling window.
    x = _separated(rng, (2, 3, 6, 7))
    w = ref.randn(rng, (4, 3, 3, 3), F64) * 1e-3
    w[np.arange(4), np.arange(4) % 3, 1, 1] = 1.0
    b = ref.randn(rng, 4, F64) * 1e-3
    pool = dict(kernel_size=3, pool_stride=2, pool_padding=1)
    t_pool = dict(kernel_size=3, stride=2, padding=1)
    act = F.relu if activation == "relu" else (lambda t: t)
    op = _lk_function(torch, lambda x, w, b: lk.conv2d_max_pool2d(x, w, b, padding=1, activation=activation, **pool),
                      lambda x, w, b: F.max_pool2d(act(F.conv2d(x, w, b, padding=1)), **t_pool))
    tensors = tuple(torch.from_numpy(a).requires_grad_(True) for a in (x, w, b))
    assert torch.autograd.gradcheck(op, tensors)
    layer = lk.Conv2dMaxPool2d(w, b, padding=1, activation=activation, **pool)
    op = _lk_function(torch, lambda x: layer(x),
                      lambda x: F.max_pool2d(act(F.conv2d(x, tensors[1].detach(), tensors[2].detach(), padding=1)),
                                             **t_pool))
    assert torch.autograd.gradcheck(op, (tensors[0],))


@pytest.mark.parametrize("x_shape, w_shape, has_bias, activation", [
    pytest.param((5, 7), (6, 7), True, None, id="2d"),
    pytest.param((2, 3, 7), (4, 7), False, "relu", id="3d-relu"),
    pytest.param((1, 33), (9, 33), True, None, id="one-row"),
    pytest.param((7,), (7,), True, None, id="vector-weight"),
])
def test_gradcheck_linear(x_shape, w_shape, has_bias, activation, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    act = F.relu if activation == "relu" else (lambda t: t)
    args = [ref.randn(rng, x_shape, F64), ref.randn(rng, w_shape, F64)]
    if has_bias:  # a 1-D weight takes a 0-d bias, as in torch
        args.append(np.asarray(ref.randn(rng, w_shape[:-1], F64)))
    op = _lk_function(torch, lambda x, w, b=None: np.asarray(lk.linear(x, w, b, activation=activation)),
                      lambda x, w, b=None: act(F.linear(x, w, b)))
    tensors = tuple(torch.from_numpy(a).requires_grad_(True) for a in args)
    assert torch.autograd.gradcheck(op, tensors)
    if len(w_shape) == 2:
        layer = lk.Linear(*args[1:], activation=activation)
        op = _lk_function(torch, lambda x: layer(x),
                          lambda x: act(F.linear(x, *(torch.from_numpy(a) for a in args[1:]))))
        assert torch.autograd.gradcheck(op, (tensors[0],))


@pytest.mark.parametrize("name", ["relu", "softmax", "log_softmax"])
@pytest.mark.parametrize("shape, dim", [((4, 9), 1), ((3, 5, 4), 0), ((2, 3, 4, 5), -2)])
def test_gradcheck_activations(name, shape, dim, rng):
    torch = pytest.importorskip("torch")
    x = _separated(rng, shape, gap=0.05)
    if name == "relu":
        lk_op, t_op = (lambda a: np.asarray(lk.relu(a))), torch.relu
    else:
        lk_op = lambda a: np.asarray(getattr(lk, name)(a, dim))  # noqa: E731
        t_op = lambda t: getattr(torch, name)(t, dim)  # noqa: E731
    op = _lk_function(torch, lk_op, t_op)
    assert torch.autograd.gradcheck(op, (torch.from_numpy(x).requires_grad_(True),))


# --------------------------------------------------------------------------
# max_pool2d: float64 picks exactly what float32 picks
# --------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["plain", "ties", "nan", "inf", "all_neg_inf"])
@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=2),  # the 2x2 stride-2 kernel
    dict(kernel_size=3, stride=1, padding=1),  # stride-1 windows
    dict(kernel_size=(3, 2), stride=2, dilation=(1, 2)),  # stride-2 windows
    dict(kernel_size=3, stride=3, padding=1, dilation=2),  # the gather path
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=(1, 4), stride=(2, 1)),
])
def test_max_pool2d_same_choice_as_float32(isa, kwargs, flavour, rng):
    x32 = ref.fill_pool_input(rng, (2, 3, 19, 41), F32, flavour)
    v32, i32 = lk.max_pool2d(x32, **kwargs, return_indices=True)
    v64, i64 = lk.max_pool2d(x32.astype(F64), **kwargs, return_indices=True)
    assert v64.dtype == F64 and i64.dtype == np.int64
    ref.assert_identical(v64, v32.astype(F64), f"{flavour} {kwargs}")
    ref.assert_identical(i64, i32, f"{flavour} {kwargs}")
    # Fused behind a depthwise identity convolution (1 * x, nothing added):
    # the same windows, the same choices.
    fused = lk.conv2d_max_pool2d(x32.astype(F64), np.ones((3, 1, 1, 1)), groups=3, activation=None,
                                 **_fused(kwargs))
    ref.assert_identical(fused, v64, f"fused {flavour} {kwargs}")


def _fused(kwargs):
    names = dict(stride="pool_stride", padding="pool_padding", dilation="pool_dilation")
    return {names.get(k, k): v for k, v in kwargs.items()}


# --------------------------------------------------------------------------
# Mixed dtypes: a TypeError naming the argument, on every path
# --------------------------------------------------------------------------

def _a(*shape, dtype=F64):
    return np.ones(shape, dtype)


X4, W4, B4 = _a(2, 3, 8, 8), _a(4, 3, 3, 3), _a(4)


MIXED = {
    "conv2d-f32-input": (lambda: lk.conv2d(X4.astype(F32), W4, B4), "weight"),
    "conv2d-f32-weight": (lambda: lk.conv2d(X4, W4.astype(F32), B4), "weight"),
    "conv2d-f32-bias": (lambda: lk.conv2d(X4, W4, B4.astype(F32)), "bias"),
    "conv2d-f32-bias-unbatched": (lambda: lk.conv2d(X4[0], W4, B4.astype(F32)), "bias"),
    "conv2d-f32-out": (lambda: lk.conv2d(X4, W4, out=_a(2, 4, 6, 6, dtype=F32)), "out"),
    "conv2d-f16-input": (lambda: lk.conv2d(X4.astype(np.float16), W4), "input"),
    "fused-f32-weight": (lambda: lk.conv2d_max_pool2d(X4, W4.astype(F32)), "weight"),
    "fused-f32-bias": (lambda: lk.conv2d_max_pool2d(X4, W4, B4.astype(F32)), "bias"),
    "fused-f32-out": (lambda: lk.conv2d_max_pool2d(X4, W4, out=_a(2, 4, 3, 3, dtype=F32)), "out"),
    "pool-f32-out": (lambda: lk.max_pool2d(X4, 2, out=_a(2, 3, 4, 4, dtype=F32)), "out"),
    "pool-int-input": (lambda: lk.max_pool2d(X4.astype(np.int64), 2), "input"),
    "linear-f32-weight": (lambda: lk.linear(_a(2, 5), _a(3, 5, dtype=F32)), "weight"),
    "linear-f32-input": (lambda: lk.linear(_a(2, 5, dtype=F32), _a(3, 5)), "weight"),
    "linear-f32-bias": (lambda: lk.linear(_a(2, 5), _a(3, 5), _a(3, dtype=F32)), "bias"),
    "linear-3d-f32-bias": (lambda: lk.linear(_a(2, 2, 5), _a(3, 5), _a(3, dtype=F32)), "bias"),
    "linear-f32-out": (lambda: lk.linear(_a(2, 5), _a(3, 5), out=_a(2, 3, dtype=F32)), "out"),
    "relu-f32-out": (lambda: lk.relu(_a(3, 4), out=_a(3, 4, dtype=F32)), "out"),
    "softmax-f32-out": (lambda: lk.softmax(_a(3, 4), 1, out=_a(3, 4, dtype=F32)), "out"),
    "log_softmax-f32-out": (lambda: lk.log_softmax(_a(3, 4), 0, out=_a(3, 4, dtype=F32)), "out"),
    "Conv2d-f32-input": (lambda: lk.Conv2d(W4, B4)(X4.astype(F32)), "input"),
    "Conv2d-f32-input-unbatched": (lambda: lk.Conv2d(W4, B4)(X4[0].astype(F32)), "input"),
    "Conv2d-f32-bias": (lambda: lk.Conv2d(W4, B4.astype(F32)), "bias"),
    "Conv2d-f32-out": (lambda: lk.Conv2d(W4)(X4, out=_a(2, 4, 6, 6, dtype=F32)), "out"),
    "Conv2dMaxPool2d-f32-input": (lambda: lk.Conv2dMaxPool2d(W4)(X4.astype(F32)), "input"),
    "Conv2dMaxPool2d-f32-bias": (lambda: lk.Conv2dMaxPool2d(W4, B4.astype(F32)), "bias"),
    "MaxPool2d-f32-out": (lambda: lk.MaxPool2d(2)(X4, out=_a(2, 3, 4, 4, dtype=F32)), "out"),
    "Linear-f32-input": (lambda: lk.Linear(_a(3, 5))(_a(2, 5, dtype=F32)), "input"),
    "Linear-f32-input-3d": (lambda: lk.Linear(_a(3, 5))(_a(4, 2, 5, dtype=F32)), "input"),
    "Linear-f32-bias": (lambda: lk.Linear(_a(3, 5), _a(3, dtype=F32)), "bias"),
    "Linear-f32-out": (lambda: lk.Linear(_a(3, 5))(_a(2, 5), out=_a(2, 3, dtype=F32)), "out"),
    "f32-Conv2d-f64-input": (lambda: lk.Conv2d(W4.astype(F32))(X4), "input"),
    "f32-Linear-f64-input": (lambda: lk.Linear(_a(3, 5, dtype=F32))(_a(2, 5)), "input"),
}


@pytest.mark.parametrize("call, name", list(MIXED.values()), ids=list(MIXED))
def test_mixed_dtypes_raise_naming_the_argument(call, name):
    # Warm the cached fast paths with valid calls of both dtypes first: a
    # cached call must check dtypes as strictly as the first one.
    for dtype in (F32, F64):
        lk.conv2d(X4.astype(dtype), W4.astype(dtype), B4.astype(dtype))
        lk.linear(_a(2, 5, dtype=dtype), _a(3, 5, dtype=dtype), _a(3, dtype=dtype))
    with pytest.raises(TypeError, match=rf"^{name}:"):
        call()
    with pytest.raises(TypeError, match=rf"^{name}:"):
        call()  # and again, now that any argument cache is warm


def test_cached_conv_args_check_the_weight_dtype(rng):
    # The fast path keys its cache by both dtypes: a float64 call with the
    # shapes of an earlier float32 call must not reuse the float32 entry.
    x, w, b = ref.randn(rng, (2, 3, 7, 7), F64), ref.randn(rng, (5, 3, 3, 3), F64), ref.randn(rng, 5, F64)
    for _ in range(2):
        y32 = lk.conv2d(x.astype(F32), w.astype(F32), b.astype(F32), padding=1)
        y64 = lk.conv2d(x, w, b, padding=1)
        assert y32.dtype == F32 and y64.dtype == F64
        magnitude = ref.conv2d(np.abs(x), np.abs(w), np.abs(b), padding=1)
        ref.assert_sum_close(y64, ref.conv2d(x, w, b, padding=1), magnitude, 28, F64)
        with pytest.raises(TypeError, match="^weight:"):
            lk.conv2d(x, w.astype(F32), b.astype(F32), padding=1)
        with pytest.raises(TypeError, match="^bias:"):
            lk.conv2d(x, w, b.astype(F32), padding=1)


# --------------------------------------------------------------------------
# Plan cache: one plan per dtype
# --------------------------------------------------------------------------

def test_plan_cache_keeps_dtypes_apart(rng):
    x, w, b = ref.randn(rng, (2, 4, 9, 9), F64), ref.randn(rng, (6, 4, 3, 3), F64), ref.randn(rng, 6, F64)
    xl, wl = ref.randn(rng, (5, 11), F64), ref.randn(rng, (7, 11), F64)
    calls = {
        "conv2d": lambda d: lk.conv2d(x.astype(d), w.astype(d), b.astype(d), padding=1),
        "fused": lambda d: lk.conv2d_max_pool2d(x.astype(d), w.astype(d), b.astype(d), padding=1),
        "linear": lambda d: lk.linear(xl.astype(d), wl.astype(d)),
    }
    lk.cache_clear()
    try:
        for name, call in calls.items():
            misses = lk.cache_info().misses
            first = {d: call(d) for d in (F32, F64)}
            assert lk.cache_info().misses - misses == 2, f"{name}: float32 and float64 must plan apart"
            hits = lk.cache_info().hits
            again = {d: call(d) for d in (F64, F32)}
            info = lk.cache_info()
            assert info.misses - misses == 2 and info.hits - hits == 2, name
            for d in (F32, F64):
                assert first[d].dtype == d and again[d].dtype == d
                ref.assert_identical(again[d], first[d], f"{name} {np.dtype(d).name}")
    finally:
        lk.cache_clear()


# --------------------------------------------------------------------------
# Inputs are not modified
# --------------------------------------------------------------------------

def test_float64_inputs_are_not_modified(rng):
    x = ref.randn(rng, (2, 4, 10, 10), F64)
    w = ref.randn(rng, (6, 2, 3, 3), F64)
    b = ref.randn(rng, 6, F64)
    xl, wl, bl = ref.randn(rng, (3, 2, 9), F64), ref.randn(rng, (5, 9), F64), ref.randn(rng, 5, F64)
    arrays = (x, w, b, xl, wl, bl)
    copies = [a.copy() for a in arrays]
    results = [
        lk.conv2d(x, w, b, padding="same", groups=2, activation="relu"),
        lk.conv2d(x[:, :, ::-1], w, b, stride=2, dilation=2, groups=2),
        lk.conv2d_max_pool2d(x, w, b, padding=1, groups=2, kernel_size=3, pool_stride=2, pool_padding=1),
        *lk.max_pool2d(x, 3, stride=2, padding=1, dilation=2, ceil_mode=True, return_indices=True),
        lk.linear(xl, wl, bl, activation="relu"),
        lk.relu(x), lk.softmax(x, 1), lk.log_softmax(xl, -1),
        lk.Conv2d(w, b, padding=1, groups=2)(x),
        lk.Conv2dMaxPool2d(w, b, padding=1, groups=2)(x),
        lk.MaxPool2d(2, return_indices=True)(x)[0],
        lk.Linear(wl, bl)(xl),
    ]
    for a, before in zip(arrays, copies):
        ref.assert_identical(a, before)
    for y in results:
        assert y.dtype in (F64, np.int64)
        assert not any(np.shares_memory(y, a) for a in arrays)
