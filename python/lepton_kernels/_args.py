"""Argument normalisation shared by the functional ops.

Everything here follows torch.nn.functional: which values are accepted, how
they expand, and which mistakes raise. Each error names the argument.
"""

from __future__ import annotations

import operator

import numpy as np

try:
    from numpy.exceptions import AxisError
except ImportError:  # numpy < 1.25
    from numpy import AxisError

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Bound on strides, paddings, dilations and kernel sizes: far beyond any real
# network, and small enough that no index arithmetic in int64 can overflow.
_MAX_PARAM = 1 << 40
# Bound on an output's size in bytes, before anything is allocated.
_MAX_BYTES = 1 << 62


class ArrayMeta:
    """Base of arrays the CPU does not hold (device arrays, see _device.DeviceArray).

    They have shape, ndim and dtype, which is all the checks here read, so the
    device path shares the argument rules of the CPU path.
    """

    __slots__ = ()


def check_array(x, name):
    """Return `x` if it is a float32/float64 NumPy array (or device array metadata), else raise TypeError."""
    if not isinstance(x, (np.ndarray, ArrayMeta)):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {x.dtype}")
    return x


def check_same_dtype(ref, x, name):
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {x.dtype} does not match input dtype {ref.dtype}")


def int_param(value, name, *, minimum):
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None
    if v < minimum:
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name}: must be {what}, got {v}")
    if v > _MAX_PARAM:
        raise OverflowError(f"{name}: {v} is too large")
    return v


def pair(value, name, *, minimum):
    """An int, or a sequence of one or two ints, as a pair."""
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            value = (value[0], value[0])
        if len(value) != 2:
            raise ValueError(f"{name}: expected an int or a sequence of 2 ints, got {len(value)} values")
        return (int_param(value[0], name, minimum=minimum), int_param(value[1], name, minimum=minimum))
    v = int_param(value, name, minimum=minimum)
    return (v, v)


def spatial_input(x, name="input"):
    """Batched NCHW view of a 3-D (unbatched) or 4-D input, and whether it was batched."""
    shape = x.shape
    if x.ndim == 4:
        batched = True
    elif x.ndim == 3:
        x, batched = x[None], False
    else:
        raise ValueError(f"{name}: expected a 3-D (unbatched) or 4-D (batched) array, got shape {shape}")
    if 0 in x.shape[1:]:
        raise ValueError(f"{name}: expected non-zero size for non-batch dimensions, got shape {shape}")
    return x, batched


def check_out_size(shape, dtype, name="input"):
    total = int(np.dtype(dtype).itemsize)
    for s in shape:
        total *= int(s)
    if total > _MAX_BYTES:
        raise OverflowError(f"{name}: the output of shape {tuple(shape)} is too large to address")


def check_out(out, inputs):
    """`out` must be a NumPy array that overlaps none of the inputs."""
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a numpy.ndarray, got {type(out).__name__}")
    for x in inputs:
        if x is not None and np.may_share_memory(out, x):
            raise ValueError("out: must not overlap an input array")


def normalize_dim(dim, ndim, name="dim"):
    try:
        d = operator.index(dim)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(dim).__name__}") from None
    lo, hi = -max(ndim, 1), max(ndim, 1) - 1
    if not lo <= d <= hi:
        raise AxisError(f"{name}: {d} is out of range for an array of {ndim} dimensions "
                        f"(expected to be in [{lo}, {hi}])")
    return d % max(ndim, 1)
