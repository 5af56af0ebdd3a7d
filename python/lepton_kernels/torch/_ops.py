"""The ``lepton::`` operators: lepton's kernels as PyTorch custom ops.

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation,
so that ``torch.compile`` and other tracers see an opaque kernel of known
output shape, and each differentiable op has its backward registered as
another custom op (``lepton::*_backward``), so a compiled graph's backward
pass calls our backward kernels too.

CPU tensors cross into NumPy without copies through DLPack; outputs are
allocated by torch (``torch.empty``) and written through the kernels' ``out=``,
or, where a kernel has no ``out=``, its fresh NumPy result becomes the
tensor (``torch.from_numpy``, no copy either). CUDA tensors go to lepton's
device path with torch as its array module (``_cuda.py``): outputs from
torch's allocator, kernels on torch's current stream.

The ops take normalised arguments (pairs of ints, flags); the friendlier
wrappers in ``lepton_kernels.torch.functional`` accept what
``torch.nn.functional`` accepts and choose among the ops.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

import lepton_kernels as lk
from lepton_kernels import _device

from . import _cuda

__all__ = [
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_with_indices",
    "max_pool2d_backward",
    "conv2d_relu_max_pool2d",
    "conv2d_relu_max_pool2d_with_indices",
    "conv2d_relu_max_pool2d_backward",
    "linear",
    "linear_backward",
    "relu",
    "relu_backward",
    "cross_entropy",
    "cross_entropy_backward",
]

_FLOATS = (torch.float32, torch.float64)


# --- tensors <-> arrays ---------------------------------------------------------


def _check(op: str, **tensors) -> bool:
    """Every given tensor is a dense float32/float64 tensor, all of one dtype and on one device (the CPU or a
    CUDA device); errors name the op and the argument. True when they are CUDA tensors."""
    dtype = device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"lepton::{op}: {name} is on {t.device}; the lepton ops take CPU and CUDA tensors")
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"lepton::{op}: {name} is on {t.device}, but {first} is on {device}")
        if t.layout != torch.strided:
            raise TypeError(f"lepton::{op}: {name}: expected a dense (strided) tensor, got layout {t.layout}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"lepton::{op}: {name}: expected dtype torch.float32 or torch.float64, got {t.dtype}")
        if dtype is None:
            dtype = t.dtype
        elif t.dtype != dtype:
            raise TypeError(f"lepton::{op}: {name}: dtype {t.dtype} does not match input dtype {dtype}")
    return device is not None and device.type == "cuda"


_GEOMETRY_MINIMUM = {"stride": 1, "padding": 0, "dilation": 1, "kernel_size": 1, "pool_stride": 1,
                     "pool_padding": 0, "pool_dilation": 1}


def _check_geometry(op: str, **lists) -> None:
    """Each (height, width) argument is two ints in range: checked before any output size is computed."""
    for name, v in lists.items():
        least = _GEOMETRY_MINIMUM[name]
        if len(v) != 2 or any(e < least for e in v):
            raise ValueError(f"lepton::{op}: {name}: expected two ints >= {least}, got {list(v)}")


def _check_indices(op: str, name: str, t: Tensor, like: Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"lepton::{op}: {name} is on {t.device}, but the data is on {like.device}")
    if t.dtype != torch.int64:
        raise TypeError(f"lepton::{op}: {name}: expected dtype torch.int64, got {t.dtype}")


def _runs_on(cuda: bool):
    """The block's CUDA tensors go to lepton's device path with torch as its array module: outputs from
    torch's allocator on the input's device, kernels on torch's current stream (see _cuda.py)."""
    return _device.use_runtime(_cuda.runtime()) if cuda else contextlib.nullcontext()


def _np(t: Optional[Tensor], shape=None):
    """What lepton's functional API takes for `t` (reshaped to `shape` if given): a NumPy view of a CPU
    tensor (DLPack, no copy; any strides), a CUDA tensor itself (detached: DLPack exports no tensor that
    requires grad)."""
    if t is None:
        return None
    cuda = t.device.type == "cuda"
    t = t.detach()
    if shape is not None:
        t = t.reshape(shape)
    return _cuda.device_view(t) if cuda else np.from_dlpack(t)


def _batch(t: Tensor):
    """A view of a (C, H, W) tensor as (1, C, H, W); of an (N, C, H, W) one as it is."""
    return _np(t, (1, *t.shape) if t.dim() == 3 else None)


def _unbatch(a, like: Tensor):
    return a[0] if a is not None and like.dim() == 3 else a


def _out(shape, like: Tensor) -> Tuple[Tensor, np.ndarray]:
    """A fresh CPU tensor for a kernel to write through ``out=``, and its NumPy view."""
    if any(d < 0 for d in shape):
        raise ValueError(f"input: of shape {tuple(like.shape)} is smaller than the (dilated, padded) kernel: "
                         f"the output would have shape {tuple(shape)}")
    t = torch.empty(shape, dtype=like.dtype)
    return t, np.from_dlpack(t)


def _tensor(a, like: Tensor) -> Tensor:
    """A kernel's fresh result as a tensor (no copy): a NumPy array through torch.from_numpy, a device
    result (already a tensor) as it is; an empty tensor for a result not asked for."""
    if a is None:
        return like.new_empty(0)
    if isinstance(a, Tensor):
        return a
    return torch.from_numpy(np.asarray(a))


# --- output sizes (also on symbolic sizes, for the fake implementations) -----------


def _conv_size(n, kernel, stride, padding, dilation):
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _pool_size(n, kernel, stride, padding, dilation, ceil_mode):
    num = n + 2 * padding - dilation * (kernel - 1) - 1
    o = (-(-num // stride) if ceil_mode else num // stride) + 1
    if ceil_mode and (o - 1) * stride >= n + padding:
        o = o - 1  # the last window must start inside the input or the left padding
    return o


def _conv_shape(input, weight, stride, padding, dilation):
    *lead, H, W = input.shape
    R, S = weight.shape[2], weight.shape[3]
    return (*lead[:-1], weight.shape[0], _conv_size(H, R, stride[0], padding[0], dilation[0]),
            _conv_size(W, S, stride[1], padding[1], dilation[1]))


def _pool_shape(shape, kernel_size, stride, padding, dilation, ceil_mode):
    *lead, H, W = shape
    return (*lead, _pool_size(H, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode),
            _pool_size(W, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode))


def _activation(relu: bool):
    return "relu" if relu else None


def _grads(grads, mask):
    """None for each output of a backward op whose gradient was not asked for (an empty placeholder)."""
    return tuple(g if need else None for g, need in zip(grads, mask))


# --- conv2d ---------------------------------------------------------------------


@torch.library.custom_op("lepton::conv2d", mutates_args=())
def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
           dilation: List[int], groups: int, relu: bool) -> Tensor:
    """``conv2d`` (+ ReLU when ``relu``) of an (N, C, H, W) or (C, H, W) input."""
    cuda = _check("conv2d", input=input, weight=weight, bias=bias)
    _check_geometry("conv2d", stride=stride, padding=padding, dilation=dilation)
    if not cuda and input.dim() == 4 and weight.dim() == 4:
        y, out = _out(_conv_shape(input, weight, stride, padding, dilation), input)
        lk.conv2d(_np(input), _np(weight), _np(bias), stride, padding, dilation, groups,
                  activation=_activation(relu), out=out)
        return y
    # lk.conv2d raises the clear error for a bad shape, or handles the unbatched input.
    with _runs_on(cuda):
        return _tensor(lk.conv2d(_np(input), _np(weight), _np(bias), stride, padding, dilation, groups,
                                 activation=_activation(relu)), input)


@conv2d.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, relu):
    return input.new_empty(_conv_shape(input, weight, stride, padding, dilation))


@torch.library.custom_op("lepton::conv2d_backward", mutates_args=())
def conv2d_backward(grad_output: Tensor, input: Tensor, weight: Tensor, output: Optional[Tensor],
                    stride: List[int], padding: List[int], dilation: List[int], groups: int,
                    output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (input, weight, bias) of ``conv2d``; with ``output`` given, of ``relu(conv2d)`` whose result it is.

    A gradient not asked for in ``output_mask`` comes back as an empty tensor.
    """
    cuda = _check("conv2d_backward", grad_output=grad_output, input=input, weight=weight, output=output)
    x = _batch(input)  # unbatched: the backward kernels see a batch of one
    g = _batch(grad_output)
    with _runs_on(cuda):
        if output is not None:
            g = lk.relu_backward(g, _batch(output))
        gi, gw, gb = lk.conv2d_backward(g, x, _np(weight), stride, padding, dilation, groups,
                                        output_mask=tuple(output_mask))
    return _tensor(_unbatch(gi, input), input), _tensor(gw, input), _tensor(gb, input)


@conv2d_backward.register_fake
def _(grad_output, input, weight, output, stride, padding, dilation, groups, output_mask):
    return _fake_grads(output_mask, input, weight, (weight.shape[0],))


def _fake_grads(mask, input, weight, bias_shape):
    shapes = (input.shape, weight.shape, bias_shape)
    return tuple(input.new_empty(s if need else (0,)) for s, need in zip(shapes, mask))


def _conv2d_setup(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, relu = inputs
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input, weight, output if relu else None)


def _conv2d_backward(ctx, grad):
    input, weight, output = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if grad is None or not any(mask):
        return (None,) * 8
    grads = conv2d_backward(grad, input, weight, output, *ctx.conv, mask)
    return (*_grads(grads, mask), None, None, None, None, None)


conv2d.register_autograd(_conv2d_backward, setup_context=_conv2d_setup)


# --- max_pool2d -------------------------------------------------------------------


@torch.library.custom_op("lepton::max_pool2d", mutates_args=())
def max_pool2d(input: Tensor, kernel_size: List[int], stride: List[int], padding: List[int], dilation: List[int],
               ceil_mode: bool) -> Tensor:
    """Max-pooling without indices: for inference (no gradient; ``max_pool2d_with_indices`` has one)."""
    cuda = _check("max_pool2d", input=input)
    _check_geometry("max_pool2d", kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
    if not cuda and input.dim() == 4:
        y, out = _out(_pool_shape(input.shape, kernel_size, stride, padding, dilation, ceil_mode), input)
        lk.max_pool2d(_np(input), kernel_size, stride, padding, dilation, ceil_mode, out=out)
        return y
    with _runs_on(cuda):
        return _tensor(lk.max_pool2d(_np(input), kernel_size, stride, padding, dilation, ceil_mode), input)


@max_pool2d.register_fake
def _(input, kernel_size, stride, padding, dilation, ceil_mode):
    return input.new_empty(_pool_shape(input.shape, kernel_size, stride, padding, dilation, ceil_mode))


def _no_gradient(name, use):
    def backward(ctx, *grads):
        raise RuntimeError(f"lepton::{name} has no gradient (it keeps no indices); use lepton::{use}, which "
                           f"lepton_kernels.torch.functional chooses when a gradient is needed")

    return backward


max_pool2d.register_autograd(_no_gradient("max_pool2d", "max_pool2d_with_indices"))


@torch.library.custom_op("lepton::max_pool2d_with_indices", mutates_args=())
def max_pool2d_with_indices(input: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                            dilation: List[int], ceil_mode: bool) -> Tuple[Tensor, Tensor]:
    """Max-pooling and the int64 index of each maximum, flattened per H*W plane (as in torch)."""
    cuda = _check("max_pool2d_with_indices", input=input)
    _check_geometry("max_pool2d_with_indices", kernel_size=kernel_size, stride=stride, padding=padding,
                    dilation=dilation)
    if not cuda and input.dim() == 4:
        y, out = _out(_pool_shape(input.shape, kernel_size, stride, padding, dilation, ceil_mode), input)
        _, idx = lk.max_pool2d(_np(input), kernel_size, stride, padding, dilation, ceil_mode, return_indices=True,
                               out=out)
        return y, torch.from_numpy(idx)
    with _runs_on(cuda):
        y, idx = lk.max_pool2d(_np(input), kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
    return _tensor(y, input), _tensor(idx, input)


@max_pool2d_with_indices.register_fake
def _(input, kernel_size, stride, padding, dilation, ceil_mode):
    shape = _pool_shape(input.shape, kernel_size, stride, padding, dilation, ceil_mode)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("lepton::max_pool2d_backward", mutates_args=())
def max_pool2d_backward(grad_output: Tensor, indices: Tensor, input_size: List[int]) -> Tensor:
    """Gradient of max-pooling: each output's gradient added to the input element its index names."""
    cuda = _check("max_pool2d_backward", grad_output=grad_output)
    _check_indices("max_pool2d_backward", "indices", indices, grad_output)
    with _runs_on(cuda):
        return _tensor(lk.max_pool2d_backward(_np(grad_output), _np(indices), tuple(input_size)), grad_output)


@max_pool2d_backward.register_fake
def _(grad_output, indices, input_size):
    return grad_output.new_empty(input_size)


def _pool_setup(ctx, inputs, output):
    ctx.input_size = list(inputs[0].shape)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _pool_backward(ctx, grad, _grad_indices):
    if grad is None:
        return (None,) * 6
    (indices,) = ctx.saved_tensors
    return max_pool2d_backward(grad, indices, ctx.input_size), None, None, None, None, None


max_pool2d_with_indices.register_autograd(_pool_backward, setup_context=_pool_setup)


# --- conv2d -> ReLU -> max_pool2d, fused ------------------------------------------------


def _fused_shape(input, weight, stride, padding, dilation, kernel_size, pool_stride, pool_padding, pool_dilation,
                 ceil_mode):
    conv = _conv_shape(input, weight, stride, padding, dilation)
    return _pool_shape(conv, kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode)


def _fused_args(stride, padding, dilation, groups, kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode):
    return dict(stride=stride, padding=padding, dilation=dilation, groups=groups, activation="relu",
                kernel_size=kernel_size, pool_stride=pool_stride, pool_padding=pool_padding,
                pool_dilation=pool_dilation, ceil_mode=ceil_mode)


@torch.library.custom_op("lepton::conv2d_relu_max_pool2d", mutates_args=())
def conv2d_relu_max_pool2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                           padding: List[int], dilation: List[int], groups: int, kernel_size: List[int],
                           pool_stride: List[int], pool_padding: List[int], pool_dilation: List[int],
                           ceil_mode: bool) -> Tensor:
    """``max_pool2d(relu(conv2d(...)))`` in one pass, without indices: for inference (no gradient)."""
    cuda = _check("conv2d_relu_max_pool2d", input=input, weight=weight, bias=bias)
    _check_geometry("conv2d_relu_max_pool2d", stride=stride, padding=padding, dilation=dilation,
                    kernel_size=kernel_size, pool_stride=pool_stride, pool_padding=pool_padding,
                    pool_dilation=pool_dilation)
    args = _fused_args(stride, padding, dilation, groups, kernel_size, pool_stride, pool_padding, pool_dilation,
                       ceil_mode)
    if not cuda and input.dim() == 4 and weight.dim() == 4:
        y, out = _out(_fused_shape(input, weight, stride, padding, dilation, kernel_size, pool_stride, pool_padding,
                                   pool_dilation, ceil_mode), input)
        lk.conv2d_max_pool2d(_np(input), _np(weight), _np(bias), out=out, **args)
        return y
    with _runs_on(cuda):
        return _tensor(lk.conv2d_max_pool2d(_np(input), _np(weight), _np(bias), **args), input)


@conv2d_relu_max_pool2d.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, kernel_size, pool_stride, pool_padding, pool_dilation,
      ceil_mode):
    return input.new_empty(_fused_shape(input, weight, stride, padding, dilation, kernel_size, pool_stride,
                                        pool_padding, pool_dilation, ceil_mode))


conv2d_relu_max_pool2d.register_autograd(_no_gradient("conv2d_relu_max_pool2d",
                                                      "conv2d_relu_max_pool2d_with_indices"))


@torch.library.custom_op("lepton::conv2d_relu_max_pool2d_with_indices", mutates_args=())
def conv2d_relu_max_pool2d_with_indices(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                                        padding: List[int], dilation: List[int], groups: int,
                                        kernel_size: List[int], pool_stride: List[int], pool_padding: List[int],
                                        pool_dilation: List[int], ceil_mode: bool) -> Tuple[Tensor, Tensor]:
    """The fused pass and the index of each maximum in its convolution output plane (int64, per P*Q plane)."""
    cuda = _check("conv2d_relu_max_pool2d_with_indices", input=input, weight=weight, bias=bias)
    _check_geometry("conv2d_relu_max_pool2d_with_indices", stride=stride, padding=padding, dilation=dilation,
                    kernel_size=kernel_size, pool_stride=pool_stride, pool_padding=pool_padding,
                    pool_dilation=pool_dilation)
    args = _fused_args(stride, padding, dilation, groups, kernel_size, pool_stride, pool_padding, pool_dilation,
                       ceil_mode)
    if not cuda and input.dim() == 4 and weight.dim() == 4:
        y, out = _out(_fused_shape(input, weight, stride, padding, dilation, kernel_size, pool_stride, pool_padding,
                                   pool_dilation, ceil_mode), input)
        _, idx = lk.conv2d_max_pool2d(_np(input), _np(weight), _np(bias), out=out, return_indices=True, **args)
        return y, torch.from_numpy(idx)
    with _runs_on(cuda):
        y, idx = lk.conv2d_max_pool2d(_np(input), _np(weight), _np(bias), return_indices=True, **args)
    return _tensor(y, input), _tensor(idx, input)


@conv2d_relu_max_pool2d_with_indices.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, kernel_size, pool_stride, pool_padding, pool_dilation,
      ceil_mode):
    shape = _fused_shape(input, weight, stride, padding, dilation, kernel_size, pool_stride, pool_padding,
                         pool_dilation, ceil_mode)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("lepton::conv2d_relu_max_pool2d_backward", mutates_args=())
def conv2d_relu_max_pool2d_backward(grad_output: Tensor, input: Tensor, weight: Tensor, output: Tensor,
                                    indices: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                                    groups: int, output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (input, weight, bias) of the fused pass; empty tensors for those not in ``output_mask``."""
    cuda = _check("conv2d_relu_max_pool2d_backward", grad_output=grad_output, input=input, weight=weight,
                  output=output)
    _check_indices("conv2d_relu_max_pool2d_backward", "indices", indices, input)
    # An unbatched input: the backward kernels see a batch of one.
    with _runs_on(cuda):
        gi, gw, gb = lk.conv2d_max_pool2d_backward(_batch(grad_output), _batch(input), _np(weight),
                                                   _batch(output), _batch(indices), stride, padding, dilation, groups,
                                                   activation="relu", output_mask=tuple(output_mask))
    return _tensor(_unbatch(gi, input), input), _tensor(gw, input), _tensor(gb, input)


@conv2d_relu_max_pool2d_backward.register_fake
def _(grad_output, input, weight, output, indices, stride, padding, dilation, groups, output_mask):
    return _fake_grads(output_mask, input, weight, (weight.shape[0],))


def _fused_setup(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups = inputs[:7]
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None
    out, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(input, weight, out, indices)


def _fused_backward(ctx, grad, _grad_indices):
    input, weight, out, indices = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if grad is None or not any(mask):
        return (None,) * 12
    grads = conv2d_relu_max_pool2d_backward(grad, input, weight, out, indices, *ctx.conv, mask)
    return (*_grads(grads, mask),) + (None,) * 9


conv2d_relu_max_pool2d_with_indices.register_autograd(_fused_backward, setup_context=_fused_setup)


# --- linear -----------------------------------------------------------------------------


@torch.library.custom_op("lepton::linear", mutates_args=())
def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], relu: bool) -> Tensor:
    """``input @ weight.T + bias`` (+ ReLU when ``relu``) for input (..., in_features), weight (out, in)."""
    cuda = _check("linear", input=input, weight=weight, bias=bias)
    if not cuda and input.dim() >= 1 and weight.dim() == 2:
        y, out = _out((*input.shape[:-1], weight.shape[0]), input)
        lk.linear(_np(input), _np(weight), _np(bias), activation=_activation(relu), out=out)
        return y
    with _runs_on(cuda):
        return _tensor(lk.linear(_np(input), _np(weight), _np(bias), activation=_activation(relu)), input)


@linear.register_fake
def _(input, weight, bias, relu):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _rows(t: Tensor):
    """_np of (..., K) as (rows, K); a view when the layout allows."""
    return _np(t, (-1, t.shape[-1]) if t.dim() != 2 else None)


@torch.library.custom_op("lepton::linear_backward", mutates_args=())
def linear_backward(grad_output: Tensor, input: Tensor, weight: Tensor, output: Optional[Tensor],
                    output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (input, weight, bias) of ``linear``; with ``output`` given, of ``relu(linear)`` whose result it is."""
    cuda = _check("linear_backward", grad_output=grad_output, input=input, weight=weight, output=output)
    if input.numel() == 0:  # reshape(-1, K) of an empty array is ambiguous: no rows, zero gradients
        shapes = (input.shape, weight.shape, weight.shape[:1])
        return tuple(input.new_zeros(shape if need else (0,)) for shape, need in zip(shapes, output_mask))
    g = _rows(grad_output)
    with _runs_on(cuda):
        if output is not None:
            g = lk.relu_backward(g, _rows(output))
        gi, gw, gb = lk.linear_backward(g, _rows(input), _np(weight), output_mask=tuple(output_mask))
    if gi is not None:
        gi = gi.reshape(input.shape)
    return _tensor(gi, input), _tensor(gw, input), _tensor(gb, input)


@linear_backward.register_fake
def _(grad_output, input, weight, output, output_mask):
    return _fake_grads(output_mask, input, weight, (weight.shape[0],))


def _linear_setup(ctx, inputs, output):
    input, weight, bias, relu = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input, weight, output if relu else None)


def _linear_backward(ctx, grad):
    input, weight, output = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if grad is None or not any(mask):
        return (None,) * 4
    grads = linear_backward(grad, input, weight, output, mask)
    return (*_grads(grads, mask), None)


linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# --- relu -------------------------------------------------------------------------------


@torch.library.custom_op("lepton::relu", mutates_args=())
def relu(input: Tensor) -> Tensor:
    """max(input, 0) element-wise; NaN stays NaN."""
    if _check("relu", input=input):
        with _runs_on(True):
            return lk.relu(_np(input))
    y, out = _out(input.shape, input)
    lk.relu(_np(input), out=out)
    return y


@relu.register_fake
def _(input):
    return input.new_empty(input.shape)


@torch.library.custom_op("lepton::relu_backward", mutates_args=())
def relu_backward(grad_output: Tensor, output: Tensor) -> Tensor:
    """Gradient of ``relu`` from its result: ``grad_output`` where ``output > 0``, else 0."""
    cuda = _check("relu_backward", grad_output=grad_output, output=output)
    with _runs_on(cuda):
        return _tensor(lk.relu_backward(_np(grad_output), _np(output)), grad_output)


@relu_backward.register_fake
def _(grad_output, output):
    return grad_output.new_empty(grad_output.shape)


def _relu_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _relu_backward(ctx, grad):
    (output,) = ctx.saved_tensors
    return None if grad is None else relu_backward(grad, output)


relu.register_autograd(_relu_backward, setup_context=_relu_setup)


# --- cross_entropy ----------------------------------------------------------------------


@torch.library.custom_op("lepton::cross_entropy", mutates_args=())
def cross_entropy(input: Tensor, target: Tensor, reduction: str, ignore_index: int) -> Tensor:
    """Cross-entropy of logits (N, C) against class indices (N,) (int64)."""
    cuda = _check("cross_entropy", input=input)
    _check_indices("cross_entropy", "target", target, input)
    with _runs_on(cuda):
        return _tensor(lk.cross_entropy(_np(input), _np(target), reduction=reduction, ignore_index=ignore_index),
                       input)


@cross_entropy.register_fake
def _(input, target, reduction, ignore_index):
    return input.new_empty(input.shape[:1] if reduction == "none" else ())


@torch.library.custom_op("lepton::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(grad_loss: Tensor, input: Tensor, target: Tensor, reduction: str,
                           ignore_index: int) -> Tensor:
    """Gradient of ``cross_entropy`` with respect to the logits."""
    cuda = _check("cross_entropy_backward", grad_loss=grad_loss, input=input)
    _check_indices("cross_entropy_backward", "target", target, input)
    with _runs_on(cuda):
        return _tensor(lk.cross_entropy_backward(_np(grad_loss), _np(input), _np(target), reduction=reduction,
                                                 ignore_index=ignore_index), input)


@cross_entropy_backward.register_fake
def _(grad_loss, input, target, reduction, ignore_index):
    return input.new_empty(input.shape)


def _ce_setup(ctx, inputs, output):
    input, target, reduction, ignore_index = inputs
    ctx.args = (reduction, ignore_index)
    ctx.save_for_backward(input, target)


def _ce_backward(ctx, grad):
    input, target = ctx.saved_tensors
    if grad is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    return cross_entropy_backward(grad, input, target, *ctx.args), None, None, None


cross_entropy.register_autograd(_ce_backward, setup_context=_ce_setup)
