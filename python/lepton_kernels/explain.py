"""What the scheduler would do for a call, without running it."""

from __future__ import annotations

import math

import numpy as np

from . import _core, functional, layers
from ._args import check_array

__all__ = ["explain"]


def _rows(x):
    return math.prod(x.shape[:-1]) if x.ndim > 1 else 1


def explain(op, *args, **kwargs) -> str:
    """The plan ``op(*args, **kwargs)`` runs with: algorithm, blocking, threads,
    predicted time and workspace (and, for convolutions, the cost model's best
    candidates), and the machine ceilings the prediction is based on.

    ``op`` is ``lk.conv2d``, ``lk.conv2d_max_pool2d`` or ``lk.linear`` with the
    call's arguments, or a layer (``lk.Conv2d(...)`` etc.) and its input.
    """
    if isinstance(op, (layers.Conv2d, layers.Conv2dMaxPool2d)):
        (x,) = args
        text = op.describe(x)
    elif isinstance(op, layers.Linear):
        (x,) = args
        text = op.describe(_rows(x))
    elif op is functional.conv2d or op is functional.conv2d_max_pool2d:
        text = _explain_conv(op, *args, **kwargs)
    elif op is functional.linear:
        x, w, *rest = args
        bias = rest[0] if rest else kwargs.get("bias")
        check_array(x, "input")
        check_array(w, "weight")
        w2 = w[None] if w.ndim == 1 else w
        text = _core.describe_linear(_rows(x), w2, bias is not None,
                                     functional._activation(kwargs.get("activation")))
    else:
        raise TypeError(f"op: expected lk.conv2d, lk.conv2d_max_pool2d, lk.linear or a layer, got {op!r}")
    return f"{text}\nmachine: {_core.machine_model()}"


_DEFAULT = object()


def _explain_conv(op, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=_DEFAULT,
                  out=None, **pool):
    if activation is _DEFAULT:  # each op's own default
        activation = "relu" if op is functional.conv2d_max_pool2d else None
    x, _, stride, pads, dilation, groups, (P, Q) = functional._conv_args(input, weight, bias, stride, padding,
                                                                         dilation, groups)
    act = functional._activation(activation)
    if op is functional.conv2d:
        return _core.describe_conv2d(x, weight, bias, stride, pads, dilation, groups, act)
    pk, ps, pp, pd, _ = functional._pool_args(pool.get("kernel_size", 2), pool.get("pool_stride"),
                                              pool.get("pool_padding", 0), pool.get("pool_dilation", 1),
                                              pool.get("ceil_mode", False), weight.shape[0], P, Q,
                                              functional._FUSED_POOL_NAMES)
    return _core.describe_conv2d_max_pool2d(x, weight, bias, stride, pads, dilation, groups, act, pk, ps, pp, pd,
                                            bool(pool.get("ceil_mode", False)))
