"""Backward (training) ops: the gradients of the functional ops, and Adam.

The semantics are those of ``torch.autograd`` through ``torch.nn.functional``.
Arrays are float32 (the fast path) or float64 (for gradient checking), all
of one dtype; any layout is accepted (a non-contiguous array is read through
one contiguous copy); inputs are never modified and results are new
C-contiguous arrays. ``output_mask`` says which gradients to compute, as in
torch's ``convolution_backward``: a ``False`` entry gives ``None``.

Device arrays (CuPy, ``__cuda_array_interface__``, CUDA DLPack) run on the
CUDA backward kernels and return device arrays (see ``_device.py``).
"""

from __future__ import annotations

import math
import operator

import numpy as np

from . import _core, _device
from ._args import check_array, check_out_size, spatial_input
from .functional import _activation, _conv_args

__all__ = [
    "conv2d_backward",
    "conv2d_max_pool2d_backward",
    "max_pool2d_backward",
    "linear_backward",
    "relu_backward",
    "cross_entropy",
    "cross_entropy_backward",
    "adam_step",
]

_REDUCTIONS = ("mean", "sum", "none")


def _mask(output_mask):
    try:
        mask = tuple(bool(m) for m in output_mask)
    except TypeError:
        raise TypeError(f"output_mask: expected a sequence of 3 bools, got {type(output_mask).__name__}") from None
    if len(mask) != 3:
        raise ValueError(f"output_mask: expected 3 entries (input, weight, bias), got {len(mask)}")
    return mask


def _same_dtype(ref, x, name, ref_name="grad_output"):
    check_array(x, name)
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {x.dtype} does not match {ref_name} dtype {ref.dtype}")


def _conv_common(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    check_array(grad_output, "grad_output")
    _same_dtype(grad_output, input, "input")
    _same_dtype(grad_output, weight, "weight")
    mask = _mask(output_mask)
    x, batched, stride, pads, dilation, groups, (P, Q) = _conv_args(input, weight, None, stride, padding,
                                                                    dilation, groups)
    gy = grad_output if batched else grad_output[None]
    return mask, x, batched, gy, stride, pads, dilation, groups, (P, Q)


def _unbatch(grads, batched):
    gx, gw, gb = grads
    if gx is not None and not batched:
        gx = gx[0]
    return gx, gw, gb


def conv2d_backward(grad_output, input, weight, stride=1, padding=0, dilation=1, groups=1, *,
                    output_mask=(True, True, True), stream=None):
    """Gradients of ``conv2d(input, weight, bias, stride, padding, dilation, groups)``.

    Returns ``(grad_input, grad_weight, grad_bias)``, ``None`` where
    ``output_mask`` is False. ``padding`` takes the forms ``conv2d`` takes
    (int, pair, ``'same'``, ``'valid'``).
    """
    if _device.is_device_array(input):
        with _device.on_stream(stream):
            return _device.conv2d_backward(grad_output, input, weight, stride, padding, dilation, groups,
                                           output_mask=output_mask)
    mask, x, batched, gy, stride, pads, dilation, groups, (P, Q) = _conv_common(
        grad_output, input, weight, stride, padding, dilation, groups, output_mask)
    expected = (x.shape[0], weight.shape[0], P, Q)
    if gy.shape != expected:
        raise ValueError(f"grad_output: expected shape {expected if batched else expected[1:]}, "
                         f"got {grad_output.shape}")
    grads = _core.conv2d_backward(gy, x, weight, stride, pads, dilation, groups, mask)
    return _unbatch(grads, batched)


def conv2d_max_pool2d_backward(grad_output, input, weight, output, indices, stride=1, padding=0, dilation=1,
                               groups=1, *, activation="relu", output_mask=(True, True, True), stream=None):
    """Gradients of ``conv2d_max_pool2d`` (conv -> activation -> max-pool).

    ``output`` and ``indices`` are what ``conv2d_max_pool2d(...,
    return_indices=True)`` returned. The pooled gradient goes to each
    window's maximum, masked by the activation's derivative (ReLU: zero where
    ``output <= 0``), one image at a time inside the convolution's backward:
    no array of the convolution output's size is made.
    """
    if _device.is_device_array(input):
        with _device.on_stream(stream):
            return _device.conv2d_max_pool2d_backward(grad_output, input, weight, output, indices, stride, padding,
                                                      dilation, groups, activation=activation, output_mask=output_mask)
    mask, x, batched, gy, stride, pads, dilation, groups, _ = _conv_common(
        grad_output, input, weight, stride, padding, dilation, groups, output_mask)
    _same_dtype(grad_output, output, "output")
    if not isinstance(indices, np.ndarray):
        raise TypeError(f"indices: expected a numpy.ndarray, got {type(indices).__name__}")
    if output.shape != grad_output.shape:
        raise ValueError(f"output: expected shape {grad_output.shape} (grad_output's), got {output.shape}")
    if indices.shape != grad_output.shape:
        raise ValueError(f"indices: expected shape {grad_output.shape} (grad_output's), got {indices.shape}")
    if gy.ndim != 4:
        raise ValueError(f"grad_output: expected a 4-D (or 3-D unbatched) array, got shape {grad_output.shape}")
    out = output if batched else output[None]
    idx = indices if batched else indices[None]
    grads = _core.conv2d_max_pool2d_backward(gy, x, weight, out, idx, stride, pads, dilation, groups,
                                             _activation(activation), mask)
    return _unbatch(grads, batched)


def max_pool2d_backward(grad_output, indices, input_shape, *, stream=None):
    """Gradient of ``max_pool2d``: ``grad_output`` added at each window's maximum.

    ``indices`` are those ``max_pool2d(..., return_indices=True)`` returned
    (int64, flattened per H*W plane); overlapping windows add up. Indices
    outside the plane raise ValueError.
    """
    if _device.is_device_array(grad_output):
        with _device.on_stream(stream):
            return _device.max_pool2d_backward(grad_output, indices, input_shape)
    check_array(grad_output, "grad_output")
    if not isinstance(indices, np.ndarray):
        raise TypeError(f"indices: expected a numpy.ndarray, got {type(indices).__name__}")
    try:
        shape = tuple(operator.index(s) for s in input_shape)
    except TypeError:
        raise TypeError("input_shape: expected a sequence of ints") from None
    if len(shape) != grad_output.ndim or len(shape) not in (3, 4):
        raise ValueError(f"input_shape: expected {grad_output.ndim} dimensions like grad_output "
                         f"(3-D unbatched or 4-D), got {shape}")
    if indices.shape != grad_output.shape:
        raise ValueError(f"indices: expected shape {grad_output.shape} (grad_output's), got {indices.shape}")
    batched = len(shape) == 4
    gy, _ = spatial_input(grad_output, "grad_output")
    idx = indices if batched else indices[None]
    full = shape if batched else (1,) + shape
    if any(s < 0 for s in full):
        raise ValueError(f"input_shape: sizes must be non-negative, got {shape}")
    check_out_size(full, grad_output.dtype, "input_shape")
    gx = _core.max_pool2d_backward(gy, idx, full)
    return gx if batched else gx[0]


def linear_backward(grad_output, input, weight, *, output_mask=(True, True, True), stream=None):
    """Gradients of ``linear(input, weight, bias)`` for input (..., in) and weight (out, in).

    Returns ``(grad_input, grad_weight, grad_bias)`` (grad_input shaped like
    ``input``), ``None`` where ``output_mask`` is False.
    """
    if _device.is_device_array(input):
        with _device.on_stream(stream):
            return _device.linear_backward(grad_output, input, weight, output_mask=output_mask)
    check_array(grad_output, "grad_output")
    _same_dtype(grad_output, input, "input")
    _same_dtype(grad_output, weight, "weight")
    mask = _mask(output_mask)
    if weight.ndim != 2:
        raise ValueError(f"weight: expected a 2-D array (out_features, in_features), got shape {weight.shape}")
    if input.ndim < 1:
        raise ValueError("input: expected at least 1 dimension, got a 0-d array")
    out_f, in_f = weight.shape
    if input.shape[-1] != in_f:
        raise ValueError(f"weight: expected {input.shape[-1]} input features to match input's last dimension, "
                         f"got weight of shape {weight.shape}")
    expected = input.shape[:-1] + (out_f,)
    if grad_output.shape != expected:
        raise ValueError(f"grad_output: expected shape {expected}, got {grad_output.shape}")
    rows = math.prod(input.shape[:-1])
    x2 = input.reshape(rows, in_f) if input.size else np.zeros((rows, in_f), input.dtype)
    g2 = grad_output.reshape(rows, out_f) if grad_output.size else np.zeros((rows, out_f), grad_output.dtype)
    gx, gw, gb = _core.linear_backward(g2, x2, weight, mask)
    if gx is not None:
        gx = gx.reshape(input.shape)
    return gx, gw, gb


def relu_backward(grad_output, output, *, stream=None):
    """Gradient of ``relu``: ``grad_output`` where ``output > 0``, else 0.

    As torch's ``threshold_backward``: zero exactly where ``output <= 0``,
    so a NaN output passes its gradient on.
    """
    if _device.is_device_array(grad_output):
        with _device.on_stream(stream):
            return _device.relu_backward(grad_output, output)
    check_array(grad_output, "grad_output")
    _same_dtype(grad_output, output, "output")
    if output.shape != grad_output.shape:
        raise ValueError(f"output: expected shape {grad_output.shape} (grad_output's), got {output.shape}")
    return _core.relu_backward(grad_output, output)


def _ce_args(input, target, reduction, ignore_index):
    check_array(input, "input")
    if not isinstance(target, np.ndarray):
        raise TypeError(f"target: expected a numpy.ndarray, got {type(target).__name__}")
    if target.dtype != np.int64:
        raise TypeError(f"target: expected dtype int64 (class indices), got {target.dtype}")
    if input.ndim != 2:
        raise ValueError(f"input: expected a 2-D array (N, C) of logits, got shape {input.shape}")
    if target.shape != input.shape[:1]:
        raise ValueError(f"target: expected shape {input.shape[:1]}, got {target.shape}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    try:
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}") from None
    return ignore_index


def cross_entropy(input, target, *, reduction="mean", ignore_index=-100, stream=None):
    """Softmax cross-entropy of (N, C) logits against int64 class indices (N,).

    log-softmax and the negative log-likelihood in one stable pass (the
    maximum subtracted, sums in float64). ``reduction`` is ``'mean'`` (over
    the rows not ignored), ``'sum'`` (both 0-d arrays) or ``'none'`` ((N,)).
    """
    if _device.is_device_array(input):
        with _device.on_stream(stream):
            return _device.cross_entropy(input, target, reduction=reduction, ignore_index=ignore_index)
    ignore_index = _ce_args(input, target, reduction, ignore_index)
    return _core.cross_entropy(input, target, reduction, ignore_index)


def cross_entropy_backward(grad_loss, input, target, *, reduction="mean", ignore_index=-100, stream=None):
    """Gradient of ``cross_entropy`` w.r.t. its logits: ``(softmax(input) - onehot(target))``
    scaled by ``grad_loss`` (divided by the rows counted for ``'mean'``); 0 on ignored rows."""
    if _device.is_device_array(input):
        with _device.on_stream(stream):
            return _device.cross_entropy_backward(grad_loss, input, target, reduction=reduction,
                                                  ignore_index=ignore_index)
    ignore_index = _ce_args(input, target, reduction, ignore_index)
    if not isinstance(grad_loss, np.ndarray):
        grad_loss = np.asarray(grad_loss, dtype=input.dtype)
    check_array(grad_loss, "grad_loss")
    if grad_loss.dtype != input.dtype:
        raise TypeError(f"grad_loss: dtype {grad_loss.dtype} does not match input dtype {input.dtype}")
    expected = input.shape[:1] if reduction == "none" else ()
    if grad_loss.shape != expected:
        raise ValueError(f"grad_loss: expected shape {expected} for reduction={reduction!r}, got {grad_loss.shape}")
    return _core.cross_entropy_backward(grad_loss, input, target, reduction, ignore_index)


def _float(value, name):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}") from None


def adam_step(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.0, stream=None):
    """One ``torch.optim.Adam`` step, in place on ``param``, ``exp_avg`` and ``exp_avg_sq``.

    ``step`` counts from 1 (bias correction); ``weight_decay`` adds
    ``weight_decay * param`` to the gradient (L2, not AdamW). The three
    updated arrays must be C-contiguous, writeable and of ``param``'s shape
    and dtype; ``grad`` may have any layout. Returns None.
    """
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"step: expected an int, got {type(step).__name__}") from None
    if _device.is_device_array(param):
        if step < 1:
            raise ValueError(f"step: must be at least 1, got {step}")
        with _device.on_stream(stream):
            return _device.adam_step(param, grad, exp_avg, exp_avg_sq, step, _float(lr, "lr"),
                                     _float(beta1, "beta1"), _float(beta2, "beta2"), _float(eps, "eps"),
                                     _float(weight_decay, "weight_decay"))
    for name, a in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_array(a, name)
    _core.adam_step(param, grad, exp_avg, exp_avg_sq, step, _float(lr, "lr"), _float(beta1, "beta1"),
                    _float(beta2, "beta2"), _float(eps, "eps"), _float(weight_decay, "weight_decay"))

