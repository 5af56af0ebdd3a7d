"""Layers: ops that own their weights, for callers that run them many times.

A layer copies its weights when it is made (later writes to the caller's
arrays do not reach it) and packs them once into the layout its kernels read.
Assigning ``layer.weight`` or ``layer.bias`` makes a fresh copy and repacks.
Plans come from the plan cache, one per input shape.

Called on a device array, a layer uploads its weights to that device once
(kept per device) and runs the GPU kernels (see ``_device.py``).
"""

from __future__ import annotations

import math

import numpy as np

from . import _core, _device
from ._args import check_array, check_out, spatial_input
from .functional import (
    _FUSED_POOL_NAMES,
    _activation,
    _batched_out,
    _conv_params,
    _pool_params,
    _result,
    _rows,
    _rows_out,
)

__all__ = ["Conv2d", "Conv2dMaxPool2d", "Linear", "MaxPool2d"]


_ALGORITHMS = ("auto", "implicit_gemm", "im2col_gemm", "implicit_gemm_t", "indirect_gemm", "direct")
# GEMM microkernel shapes of every ISA level: "wide" has more columns per
# tile (e.g. 8x48 on AVX-512), "tall" more rows (12x32), "narrow" the wide
# tile's rows and the tall tile's columns (8x32).
_UKERNELS = {"auto": -1, "wide": 0, "tall": 1, "narrow": 2}


def _frozen_copy(a):
    if a is None:
        return None
    a = np.array(a, copy=True, order="C")
    a.flags.writeable = False
    return a


class _ConvBase:
    _pool = None

    def __init__(self, weight, bias, stride, padding, dilation, groups, activation, algorithm, ukernel):
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {', '.join(map(repr, _ALGORITHMS))}, got {algorithm!r}")
        if ukernel not in _UKERNELS:
            raise ValueError(f"ukernel: expected one of {', '.join(map(repr, _UKERNELS))}, got {ukernel!r}")
        self._ukernel = _UKERNELS[ukernel]
        self._conv = (stride, padding, dilation, groups)
        self._activation = activation
        self._algorithm = algorithm
        self._set(weight, bias)

    def _set(self, weight, bias):
        stride, padding, dilation, groups = self._conv
        self._stride, self._pads, self._dilation, self._groups = _conv_params(weight, bias, stride, padding,
                                                                              dilation, groups)
        self._weight, self._bias = _frozen_copy(weight), _frozen_copy(bias)
        self._device_params = _device.ParamCache(self._weight, self._bias)
        in_channels = weight.shape[1] * self._groups
        self._layer = _core.Conv2dLayer(self._weight, self._bias, in_channels, self._stride, self._pads,
                                        self._dilation, self._groups, _activation(self._activation), self._pool,
                                        self._ceil_mode, self._algorithm, self._ukernel)

    @property
    def weight(self):
        """The layer's weights (read-only; assign a new array to change them)."""
        return self._weight

    @weight.setter
    def weight(self, value):
        self._set(value, self._bias)

    @property
    def bias(self):
        return self._bias

    @bias.setter
    def bias(self, value):
        self._set(self._weight, value)

    def __call__(self, input, *, out=None, stream=None):
        if type(input) is np.ndarray and input.ndim == 4 and out is None:
            return self._layer(input)  # the fast path: the core checks the rest
        if _device.is_device_array(input):
            with _device.on_stream(stream):
                return _device.conv_layer(self, input, out)
        check_array(input, "input")
        x, batched = spatial_input(input)
        check_out(out, (input,))
        return _result(self._layer(x, _batched_out(out, batched)), out, batched)

    def describe(self, input) -> str:
        """The plan for an input like `input` (an array or a shape): algorithm, blocking, threads."""
        if not isinstance(input, np.ndarray):
            input = np.lib.stride_tricks.as_strided(np.zeros(1, self._weight.dtype), tuple(input),
                                                    (0,) * len(tuple(input)))
        x, _ = spatial_input(input)
        return self._layer.describe(x)


class Conv2d(_ConvBase):
    """``lk.conv2d`` with its weights packed once: ``Conv2d(weight, bias)(x)``.

    ``algorithm`` is ``'auto'`` (the scheduler chooses) or one of
    ``'implicit_gemm'``, ``'im2col_gemm'``, ``'implicit_gemm_t'``, ``'indirect_gemm'``, ``'direct'``
    to fix it, and ``ukernel`` ``'auto'``, ``'wide'``, ``'tall'`` or ``'narrow'`` fixes the
    GEMM microkernel's shape (the scheduler still picks blocking and threads).
    ``'im2col_gemm'`` holds the whole image's im2col matrix in a workspace
    (C*R*S times the input): the scheduler never picks it by itself.
    """

    _ceil_mode = False

    def __init__(self, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None,
                 algorithm="auto", ukernel="auto"):
        super().__init__(weight, bias, stride, padding, dilation, groups, activation, algorithm, ukernel)


class Conv2dMaxPool2d(_ConvBase):
    """``lk.conv2d_max_pool2d`` with its weights packed once: conv -> bias -> activation -> max-pool in one pass."""

    def __init__(self, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation="relu",
                 kernel_size=2, pool_stride=None, pool_padding=0, pool_dilation=1, ceil_mode=False, algorithm="auto",
                 ukernel="auto"):
        self._pool = _pool_params(kernel_size, pool_stride, pool_padding, pool_dilation, _FUSED_POOL_NAMES)
        self._ceil_mode = bool(ceil_mode)
        super().__init__(weight, bias, stride, padding, dilation, groups, activation, algorithm, ukernel)


class MaxPool2d:
    """``lk.max_pool2d`` with its arguments checked once."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        self._args = (*_pool_params(kernel_size, stride, padding, dilation), bool(ceil_mode), bool(return_indices))

    def __call__(self, input, *, out=None, stream=None):
        if _device.is_device_array(input):
            with _device.on_stream(stream):
                return _device.max_pool2d(input, *self._args, out=out)
        check_array(input, "input")
        x, batched = spatial_input(input)
        check_out(out, (input,))
        res = _core.max_pool2d(x, *self._args, _batched_out(out, batched))
        if self._args[-1]:
            y, idx = res
            return _result(y, out, batched), (idx if batched else idx[0])
        return _result(res, out, batched)


class Linear:
    """``lk.linear`` with its weights packed once: ``Linear(weight, bias)(x)``."""

    def __init__(self, weight, bias=None, *, activation=None):
        self._activation = activation
        self._set(weight, bias)

    def _set(self, weight, bias):
        check_array(weight, "weight")
        if weight.ndim != 2:
            raise ValueError(f"weight: expected a 2-D array (out_features, in_features), got shape {weight.shape}")
        if bias is not None:
            check_array(bias, "bias")
            if bias.dtype != weight.dtype:
                raise TypeError(f"bias: dtype {bias.dtype} does not match weight dtype {weight.dtype}")
            if bias.shape != (weight.shape[0],):
                raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {bias.shape}")
        self._weight, self._bias = _frozen_copy(weight), _frozen_copy(bias)
        self._device_params = _device.ParamCache(self._weight, self._bias)
        self._layer = _core.LinearLayer(self._weight, self._bias, _activation(self._activation))

    @property
    def weight(self):
        """The layer's weights (read-only; assign a new array to change them)."""
        return self._weight

    @weight.setter
    def weight(self, value):
        self._set(value, self._bias)

    @property
    def bias(self):
        return self._bias

    @bias.setter
    def bias(self, value):
        self._set(self._weight, value)

    def __call__(self, input, *, out=None, stream=None):
        if type(input) is np.ndarray and input.ndim == 2 and out is None:
            return self._layer(input)
        if _device.is_device_array(input):
            with _device.on_stream(stream):
                return _device.linear_layer(self, input, out)
        check_array(input, "input")
        if input.ndim < 1:
            raise ValueError("input: expected at least 1 dimension, got a 0-d array")
        K, N = self._weight.shape[1], self._weight.shape[0]
        if input.shape[-1] != K:
            raise ValueError(f"input: expected {K} features in the last dimension, got shape {input.shape}")
        check_out(out, (input,))
        out_shape = input.shape[:-1] + (N,)
        x2 = _rows(input)
        out2 = None
        if out is not None:
            if out.shape != out_shape:
                raise ValueError(f"out: expected shape {out_shape}, got {out.shape}")
            out2 = _rows_out(out, x2.shape[0], N)
        y = self._layer(x2, out2)
        return out if out is not None else y.reshape(out_shape)

    def describe(self, input) -> str:
        """The plan for an input like `input`: an array, a shape ``(..., in_features)`` or a number of rows."""
        if isinstance(input, (int, np.integer)) and not isinstance(input, (bool, np.bool_)):
            rows = int(input)
        else:
            try:
                shape = tuple(int(d) for d in (input.shape if hasattr(input, "shape") else input))
            except (TypeError, ValueError):
                raise TypeError(f"input: expected an array, a shape or a number of rows, got {input!r}") from None
            K = self._weight.shape[1]
            if not shape or shape[-1] != K:
                raise ValueError(f"input: expected {K} features in the last dimension, got shape {shape}")
            rows = math.prod(shape[:-1])
        if rows < 0:
            raise ValueError(f"input: rows must be non-negative, got {rows}")
        return self._layer.describe(rows)
