"""``torch.nn.functional``-style entry points to the ``lepton::`` ops.

They accept what torch accepts (ints or pairs, ``'valid'``/``'same'``
padding, ``stride=None`` pooling), normalise it for the ops, and choose the
op: an op that keeps max-pooling indices when a gradient will be needed, the
cheaper one without them otherwise.
"""

from __future__ import annotations

import operator

import torch

from . import _ops

__all__ = ["conv2d", "max_pool2d", "conv2d_relu_max_pool2d", "linear", "relu", "cross_entropy"]


def _pair(value, name):
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            value = (value[0], value[0])
        if len(value) != 2:
            raise ValueError(f"{name}: expected an int or a sequence of 2 ints, got {len(value)} values")
        return [_int(value[0], name), _int(value[1], name)]
    v = _int(value, name)
    return [v, v]


def _int(value, name):
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None


def conv_padding(padding, kernel_size, stride, dilation):
    """``padding`` (an int, a pair, 'valid' or 'same') as a symmetric pair, as the ops take it.

    Raises ValueError for 'same' padding that would be asymmetric (an even
    effective kernel): the ops pad both sides alike.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0]
        if padding == "same":
            if list(stride) != [1, 1]:
                raise ValueError("padding: 'same' is not supported for strided convolutions")
            totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
            if any(t % 2 for t in totals):
                raise ValueError("padding: 'same' with an even (dilated) kernel pads one side more than the "
                                 "other, which the lepton ops do not support")
            return [t // 2 for t in totals]
        raise ValueError(f"padding: expected 'valid', 'same', an int or a pair of ints, got {padding!r}")
    return _pair(padding, "padding")


def _activation(activation):
    if activation not in (None, "relu"):
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
    return activation == "relu"


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _pool_args(kernel_size, stride, padding, dilation, names=("kernel_size", "stride", "padding", "dilation")):
    kernel = _pair(kernel_size, names[0])
    stride = kernel if stride is None or (isinstance(stride, (tuple, list)) and not stride) else _pair(stride,
                                                                                                       names[1])
    return kernel, stride, _pair(padding, names[2]), _pair(dilation, names[3])


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None):
    """``F.conv2d`` (then ReLU with ``activation='relu'``) through ``lepton::conv2d``."""
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    padding = conv_padding(padding, weight.shape[2:], stride, dilation)
    return _ops.conv2d(input, weight, bias, stride, padding, dilation, _int(groups, "groups"),
                       _activation(activation))


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``F.max_pool2d`` through ``lepton::max_pool2d_with_indices`` (gradient or indices wanted), else
    ``lepton::max_pool2d``."""
    args = (*_pool_args(kernel_size, stride, padding, dilation), bool(ceil_mode))
    if return_indices:
        return _ops.max_pool2d_with_indices(input, *args)
    if _needs_grad(input):
        return _ops.max_pool2d_with_indices(input, *args)[0]
    return _ops.max_pool2d(input, *args)


def conv2d_relu_max_pool2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, kernel_size=2,
                           pool_stride=None, pool_padding=0, pool_dilation=1, ceil_mode=False):
    """``F.max_pool2d(F.relu(F.conv2d(...)), ...)`` as one fused pass (the conv output is never stored)."""
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    padding = conv_padding(padding, weight.shape[2:], stride, dilation)
    pool = _pool_args(kernel_size, pool_stride, pool_padding, pool_dilation,
                      ("kernel_size", "pool_stride", "pool_padding", "pool_dilation"))
    args = (input, weight, bias, stride, padding, dilation, _int(groups, "groups"), *pool, bool(ceil_mode))
    if _needs_grad(input, weight, bias):
        return _ops.conv2d_relu_max_pool2d_with_indices(*args)[0]
    return _ops.conv2d_relu_max_pool2d(*args)


def linear(input, weight, bias=None, *, activation=None):
    """``F.linear`` (then ReLU with ``activation='relu'``) through ``lepton::linear``."""
    return _ops.linear(input, weight, bias, _activation(activation))


def relu(input):
    """``F.relu`` (not in place) through ``lepton::relu``."""
    return _ops.relu(input)


def cross_entropy(input, target, *, reduction="mean", ignore_index=-100):
    """``F.cross_entropy`` of logits (N, C) and int64 class indices (N,) through ``lepton::cross_entropy``."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    return _ops.cross_entropy(input, target, reduction, _int(ignore_index, "ignore_index"))
