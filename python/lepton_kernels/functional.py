"""The functional API: the semantics of ``torch.nn.functional`` on NumPy arrays.

Every op takes float32 (the fast path) or float64 arrays of any layout,
never modifies its inputs and returns a new array of the input's dtype, or
writes into ``out=`` when given.

Device arrays (CuPy, ``__cuda_array_interface__``, CUDA DLPack) run on the
GPU and return device arrays; see ``_device.py`` and docs/gpu-design.md.
"""

from __future__ import annotations

import math

import numpy as np

from . import _core, _device
from ._args import (
    FLOAT_DTYPES,
    check_array,
    check_out,
    check_out_size,
    check_same_dtype,
    int_param,
    normalize_dim,
    pair,
    spatial_input,
)

__all__ = ["conv2d", "max_pool2d", "conv2d_max_pool2d", "linear", "relu", "softmax", "log_softmax"]

_ACTIVATIONS = {None: "none", "relu": "relu"}


def _activation(activation):
    try:
        return _ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}") from None


def _batched_out(out, batched):
    if out is None or batched:
        return out
    if isinstance(out, np.ndarray) and out.ndim == 3:
        return out[None]
    raise ValueError("out: expected a 3-D array for an unbatched input")


def _conv_padding(padding, kernel, dilation, stride):
    """(top, bottom, left, right) from an int, a pair, 'valid' or 'same'."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding: 'same' is not supported for strided convolutions")
            pads = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]  # the extra row/column goes last, as in torch
            return tuple(pads)
        raise ValueError(f"padding: expected 'valid', 'same', an int or a pair of ints, got {padding!r}")
    ph, pw = pair(padding, "padding", minimum=0)
    return (ph, ph, pw, pw)


def _conv_params(weight, bias, stride, padding, dilation, groups, dtype=None):
    """Checked weight-side conv arguments: (stride, (top, bottom, left, right), dilation, groups)."""
    check_array(weight, "weight")
    if dtype is not None and weight.dtype != dtype:
        raise TypeError(f"weight: dtype {weight.dtype} does not match input dtype {dtype}")
    if weight.ndim != 4:
        raise ValueError(f"weight: expected a 4-D array (out_channels, in_channels/groups, kH, kW), "
                         f"got shape {weight.shape}")
    if bias is not None:
        check_array(bias, "bias")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias: dtype {bias.dtype} does not match {'input' if dtype else 'weight'} dtype "
                            f"{weight.dtype}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {bias.shape}")
    stride = pair(stride, "stride", minimum=1)
    dilation = pair(dilation, "dilation", minimum=1)
    groups = int_param(groups, "groups", minimum=1)
    K, Cg, R, S = weight.shape
    if K == 0:
        raise ValueError(f"weight: expected at least 1 output channel, got shape {weight.shape}")
    if 0 in (Cg, R, S):
        raise ValueError(f"weight: expected non-zero size for non-output dimensions, got shape {weight.shape}")
    if K % groups:
        raise ValueError(f"groups: out_channels {K} is not divisible by groups={groups}")
    return stride, _conv_padding(padding, (R, S), dilation, stride), dilation, groups


def _conv_args(input, weight, bias, stride, padding, dilation, groups):
    """Checked conv arguments: (batched NCHW input, was it batched, stride, pads, dilation, groups, (P, Q))."""
    check_array(input, "input")
    x, batched = spatial_input(input)
    stride, pads, dilation, groups = _conv_params(weight, bias, stride, padding, dilation, groups, input.dtype)
    _, C, H, W = x.shape
    _, Cg, R, S = weight.shape
    if Cg * groups != C:
        raise ValueError(f"groups: input has {C} channels, which does not match weight's {Cg} channels "
                         f"per group times groups={groups}")
    eff_h, eff_w = dilation[0] * (R - 1) + 1, dilation[1] * (S - 1) + 1
    if H + pads[0] + pads[1] < eff_h or W + pads[2] + pads[3] < eff_w:
        raise ValueError(f"weight: kernel size ({eff_h}, {eff_w}) with dilation can't be greater than the "
                         f"padded input size ({H + pads[0] + pads[1]}, {W + pads[2] + pads[3]})")
    P = (H + pads[0] + pads[1] - eff_h) // stride[0] + 1
    Q = (W + pads[2] + pads[3] - eff_w) // stride[1] + 1
    return x, batched, stride, pads, dilation, groups, (P, Q)


_POOL_NAMES = ("kernel_size", "stride", "padding", "dilation")
_FUSED_POOL_NAMES = ("kernel_size", "pool_stride", "pool_padding", "pool_dilation")


def _pool_params(kernel_size, stride, padding, dilation, names=_POOL_NAMES):
    """Checked pooling arguments: (kernel, stride, padding, dilation); errors use `names`."""
    kn, sn, pn, dn = names
    kernel = pair(kernel_size, kn, minimum=1)
    if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
        stride = kernel
    else:
        stride = pair(stride, sn, minimum=1)
    pad = pair(padding, pn, minimum=0)
    dilation = pair(dilation, dn, minimum=1)
    if pad[0] > kernel[0] // 2 or pad[1] > kernel[1] // 2:
        raise ValueError(f"{pn}: should be at most half of {kn}, got {pn}={pad} and {kn}={kernel}")
    return kernel, stride, pad, dilation


def _pool_args(kernel_size, stride, padding, dilation, ceil_mode, C, H, W, names=_POOL_NAMES):
    """Checked pooling arguments for a C x H x W input: (kernel, stride, padding, dilation, (P, Q))."""
    kernel, stride, pad, dilation = _pool_params(kernel_size, stride, padding, dilation, names)
    sizes = []
    for n, k, s, p, d in zip((H, W), kernel, stride, pad, dilation):
        num = n + 2 * p - d * (k - 1) - 1
        o = (-(-num // s) if ceil_mode else num // s) + 1
        if ceil_mode and (o - 1) * s >= n + p:
            o -= 1  # the last window must start inside the input or the left padding
        sizes.append(o)
    if sizes[0] < 1 or sizes[1] < 1:
        raise ValueError(f"input: given input size ({C}x{H}x{W}), the calculated output size "
                         f"({C}x{sizes[0]}x{sizes[1]}) is too small")
    return kernel, stride, pad, dilation, tuple(sizes)


def _result(y, out, batched):
    if out is not None:
        return out
    return y if batched else y[0]


# Converted arguments of recent conv2d calls, by everything but the input's
# batch and image size: a repeated call goes straight to the core, which
# checks the input against them. Bounded; cleared when full.
_CONV_ARGS = {}


def _key_part(value):
    """``value`` as part of a _CONV_ARGS key, if it is ints or a string: 1.0 and True equal 1 and would
    find an int's entry, though the full path rejects them. Others raise TypeError (the full path then)."""
    if type(value) is str or (type(value) is tuple and all(type(v) is int for v in value)):
        return value
    raise TypeError


# Checked pooling arguments of recent max_pool2d calls, by the arguments as
# given (ints, None, tuples of ints) and the input's C, H, W. Bounded.
_POOL_ARGS = {}
# Likewise the convolution and pooling arguments of conv2d_max_pool2d.
_FUSED_ARGS = {}


def _pool_key(value):
    return value if value is None or type(value) is int else _key_part(value)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None, out=None,
           stream=None):
    """2-D convolution of an (N, C, H, W) or (C, H, W) input with (K, C/groups, R, S) filters.

    ``padding`` is an int, a pair, ``'valid'`` or ``'same'``; ``groups`` splits
    the channels (``groups == C`` is depthwise). ``activation='relu'`` fuses a
    ReLU into the output pass.
    """
    if type(input) is not np.ndarray and _device.is_device_array(input):
        with _device.on_stream(stream):
            return _device.conv2d(input, weight, bias, stride, padding, dilation, groups, activation=activation,
                                  out=out)
    key = None
    if out is None and type(input) is np.ndarray and type(weight) is np.ndarray and input.ndim == 4:
        try:
            key = (weight.shape, weight.dtype, input.dtype, bias is None or (type(bias) is np.ndarray and
                   bias.shape == weight.shape[:1] and bias.dtype),
                   stride if type(stride) is int else _key_part(stride),
                   padding if type(padding) is int else _key_part(padding),
                   dilation if type(dilation) is int else _key_part(dilation),
                   groups if type(groups) is int else _key_part(groups), activation)
            args = _CONV_ARGS.get(key)
        except TypeError:  # lists, floats, ...: the full path below
            key = args = None
        if args is not None:
            return args(input, weight, bias)
    x, batched, stride_, pads, dilation_, groups_, (P, Q) = _conv_args(input, weight, bias, stride, padding,
                                                                       dilation, groups)
    check_out_size((x.shape[0], weight.shape[0], P, Q), x.dtype)
    check_out(out, (input, weight, bias))
    act = _activation(activation)
    if out is None and batched and key is not None:
        if len(_CONV_ARGS) >= 256:
            _CONV_ARGS.clear()
        _CONV_ARGS[key] = _core.Conv2dArgs(stride_, pads, dilation_, groups_, act)
    y = _core.conv2d(x, weight, bias, stride_, pads, dilation_, groups_, act, _batched_out(out, batched))
    return _result(y, out, batched)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False,
               *, out=None, stream=None):
    """2-D max-pooling of an (N, C, H, W) or (C, H, W) input.

    ``stride`` defaults to ``kernel_size``. NaN propagates; on ties the first
    index wins; indices (int64) are flattened per H*W plane, as in torch.
    """
    if type(input) is not np.ndarray and _device.is_device_array(input):
        with _device.on_stream(stream):
            return _device.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                                      out=out)
    check_array(input, "input")
    x, batched = spatial_input(input)
    N, C, H, W = x.shape
    try:
        key = (_pool_key(kernel_size), _pool_key(stride), _pool_key(padding), _pool_key(dilation),
               ceil_mode if type(ceil_mode) is bool else _key_part(ceil_mode), C, H, W)
        args = _POOL_ARGS.get(key)
    except TypeError:  # lists, floats, ...: checked in full each call
        key = args = None
    if args is None:
        args = _pool_args(kernel_size, stride, padding, dilation, ceil_mode, C, H, W)
        if key is not None:
            if len(_POOL_ARGS) >= 256:
                _POOL_ARGS.clear()
            _POOL_ARGS[key] = args
    kernel, stride, pad, dilation, (P, Q) = args
    check_out_size((N, C, P, Q), x.dtype)
    check_out(out, (input,))
    res = _core.max_pool2d(x, kernel, stride, pad, dilation, bool(ceil_mode), bool(return_indices),
                           _batched_out(out, batched))
    if return_indices:
        y, idx = res
        return _result(y, out, batched), (idx if batched else idx[0])
    return _result(res, out, batched)


def conv2d_max_pool2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation="relu",
                      kernel_size=2, pool_stride=None, pool_padding=0, pool_dilation=1, ceil_mode=False,
                      return_indices=False, out=None, stream=None):
    """``max_pool2d(activation(conv2d(input, weight, bias, ...)), kernel_size, pool_stride, ...)`` in one pass.

    The convolution runs band by band and each band is pooled while it is in
    cache: the full-resolution convolution output is never written to memory.
    The result equals the unfused sequence. ``activation`` is ``'relu'`` (the
    default) or ``None``; the pooling arguments are those of ``max_pool2d``
    (``pool_stride`` defaults to ``kernel_size``).

    ``return_indices=True`` also returns each maximum's position (int64),
    flattened over the convolution output's H*W plane as ``max_pool2d``
    reports it, computed inside the same pass (for the backward pass).
    """
    if type(input) is not np.ndarray and _device.is_device_array(input):
        with _device.on_stream(stream):
            return _device.conv2d(input, weight, bias, stride, padding, dilation, groups, activation=activation,
                                  out=out, pool=(kernel_size, pool_stride, pool_padding, pool_dilation),
                                  ceil_mode=ceil_mode, return_indices=return_indices)
    key = args = None
    if out is None and type(input) is np.ndarray and type(weight) is np.ndarray and input.ndim == 4:
        try:
            key = (weight.shape, weight.dtype, input.dtype, input.shape[1:], bias is None or (
                   type(bias) is np.ndarray and bias.shape == weight.shape[:1] and bias.dtype),
                   *(v if type(v) is int else _key_part(v) for v in (stride, padding, dilation, groups)),
                   activation if activation is None else _key_part(activation),
                   *(_pool_key(v) for v in (kernel_size, pool_stride, pool_padding, pool_dilation)),
                   ceil_mode if type(ceil_mode) is bool else _key_part(ceil_mode))
            args = _FUSED_ARGS.get(key)
        except TypeError:  # lists, floats, ...: checked in full each call
            key = None
    if args is None:
        x, batched, stride, pads, dilation, groups, (P, Q) = _conv_args(input, weight, bias, stride, padding,
                                                                        dilation, groups)
        pool = _pool_args(kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode, weight.shape[0], P, Q,
                          _FUSED_POOL_NAMES)
        args = (stride, pads, dilation, groups, _activation(activation), *pool)
        if key is not None:
            if len(_FUSED_ARGS) >= 256:
                _FUSED_ARGS.clear()
            _FUSED_ARGS[key] = args
    else:
        x, batched = input, True
    stride, pads, dilation, groups, act, pk, ps, pp, pd, (PP, PQ) = args
    check_out_size((x.shape[0], weight.shape[0], PP, PQ), x.dtype)
    check_out(out, (input, weight, bias))
    res = _core.conv2d_max_pool2d(x, weight, bias, stride, pads, dilation, groups, act, pk, ps, pp, pd,
                                  bool(ceil_mode), _batched_out(out, batched), bool(return_indices))
    if return_indices:
        y, idx = res
        return _result(y, out, batched), (idx if batched else idx[0])
    return _result(res, out, batched)


def linear(input, weight, bias=None, *, activation=None, out=None, stream=None):
    """``input @ weight.T + bias`` for input (..., in_features), weight (out_features, in_features).

    A 1-D weight (in_features,) gives an output without the feature axis, as in torch.
    ``activation='relu'`` fuses a ReLU into the output pass.
    """
    if type(input) is not np.ndarray and _device.is_device_array(input):
        with _device.on_stream(stream):
            return _device.linear(input, weight, bias, activation=activation, out=out)
    if (out is None and type(input) is np.ndarray and type(weight) is np.ndarray and input.ndim == 2
            and weight.ndim == 2 and input.dtype == weight.dtype and input.dtype in FLOAT_DTYPES
            and input.shape[1] == weight.shape[1] and (bias is None or (type(bias) is np.ndarray and
                                                       bias.dtype == input.dtype and bias.shape == weight.shape[:1]))
            and activation in _ACTIVATIONS):
        return _core.linear(input, weight, bias, _ACTIVATIONS[activation], None)  # already checked: straight in
    check_array(input, "input")
    check_array(weight, "weight")
    check_same_dtype(input, weight, "weight")
    if input.ndim < 1:
        raise ValueError("input: expected at least 1 dimension, got a 0-d array")
    if weight.ndim not in (1, 2):
        raise ValueError(f"weight: expected a 2-D array (out_features, in_features), got shape {weight.shape}")
    vector_weight = weight.ndim == 1
    w2 = weight[None] if vector_weight else weight
    K = input.shape[-1]
    if w2.shape[1] != K:
        raise ValueError(f"weight: expected {K} input features to match input's last dimension, "
                         f"got weight of shape {weight.shape}")
    b = bias
    if bias is not None:
        check_array(bias, "bias")
        check_same_dtype(input, bias, "bias")
        expected = () if vector_weight else (w2.shape[0],)
        if bias.shape != expected and not (vector_weight and bias.shape == (1,)):
            raise ValueError(f"bias: expected shape {expected}, got {bias.shape}")
        b = bias.reshape(1) if vector_weight else bias
    lead = input.shape[:-1]
    out_shape = lead + (() if vector_weight else (w2.shape[0],))
    check_out_size(out_shape, input.dtype)
    check_out(out, (input, weight, bias))
    x2 = _rows(input)
    out2 = None
    if out is not None:
        if out.shape != out_shape:
            raise ValueError(f"out: expected shape {out_shape}, got {out.shape}")
        out2 = _rows_out(out, x2.shape[0], w2.shape[0])
    y = _core.linear(x2, w2, b, _activation(activation), out2)
    return out if out is not None else y.reshape(out_shape)


def _rows(x):
    """(..., K) as a 2-D (rows, K) array; a view when the layout allows."""
    K = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    if x.ndim == 2:
        return x
    if x.size == 0:  # reshape(-1, 0) is ambiguous
        return np.empty((rows, K), x.dtype)
    return x.reshape(rows, K)


def _rows_out(out, rows, n):
    """`out` seen as (rows, n); it must be a view, so results land in `out`."""
    out2 = out.reshape(rows, n)
    if out2.size and not np.shares_memory(out2, out):
        raise ValueError("out: must be C-contiguous")
    return out2


def _contiguous(x, name):
    check_array(x, name)
    # Not np.ascontiguousarray: it turns a 0-d array into a 1-d one.
    return x if x.flags.c_contiguous else x.copy(order="C")


def _elementwise_out(out, x, original):
    if out is None or out is original:
        return out
    check_out(out, (original,))
    return out


def relu(input, *, out=None, stream=None):
    """max(input, 0) element-wise; NaN stays NaN. ``out=input`` works in place."""
    if type(input) is not np.ndarray and _device.is_device_array(input):
        with _device.on_stream(stream):
            return _device.relu(input, out=out)
    x = _contiguous(input, "input")
    res = _core.relu(x, _elementwise_out(out, x, input))
    return res


def _softmax(input, dim, out, log, stream):
    if type(input) is not np.ndarray and _device.is_device_array(input):
        with _device.on_stream(stream):
            return _device.softmax(input, dim, out=out, log=log)
    x = _contiguous(input, "input")
    d = normalize_dim(dim, x.ndim)
    shape = x.shape if x.ndim else (1,)
    outer = math.prod(shape[:d])
    inner = math.prod(shape[d + 1:])
    return _core.softmax(x, outer, shape[d], inner, log, _elementwise_out(out, x, input))


def softmax(input, dim, *, out=None, stream=None):
    """exp(x) / sum(exp(x)) along ``dim``, computed stably (max subtracted, sums in float64)."""
    return _softmax(input, dim, out, False, stream)


def log_softmax(input, dim, *, out=None, stream=None):
    """x - log(sum(exp(x))) along ``dim``, computed stably."""
    return _softmax(input, dim, out, True, stream)
