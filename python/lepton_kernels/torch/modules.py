"""Drop-in modules running on the ``lepton::`` ops, and ``swap(model)`` that puts them in place.

Each module subclasses the torch module it replaces (``isinstance`` checks
in user code keep working) and takes over that module's state: the same
Parameter objects, hooks, mode and attributes. An optimizer made before the
swap therefore keeps updating the weights the new module reads. An input the
lepton ops cannot run (not a float32/float64 tensor on the CPU or on a CUDA
device lepton's kernels run on, e.g. after ``model.half()``, or ``model.cuda()``
in a build without CUDA) goes to the torch module's own forward.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import _cuda
from . import functional as LF

__all__ = ["Conv2d", "Conv2dReLUMaxPool2d", "Linear", "MaxPool2d", "ReLU", "swap"]

_FLOATS = (torch.float32, torch.float64)


def _on_lepton_device(device) -> bool:
    """The CPU, or a CUDA device when lepton's CUDA kernels can run there (not its host fallback: torch's
    own forward is the better choice then)."""
    return device.type == "cpu" or (device.type == "cuda" and _cuda.kernels_usable())


def _runs(x, *params):
    """Whether the lepton ops run this input (and these parameters)."""
    if x.dtype not in _FLOATS or x.layout != torch.strided or not _on_lepton_device(x.device):
        return False
    return all(p is None or (p.device == x.device and p.dtype == x.dtype) for p in params)


def _adopt(cls, module):
    """A ``cls`` instance with ``module``'s state: containers copied, their contents (Parameters) shared.

    The hook dicts themselves are shared, so that a handle from a
    ``register_*_hook`` made before the swap still removes its hook.
    """
    new = cls.__new__(cls)
    for key, value in module.__dict__.items():
        if isinstance(value, (dict, set, list)) and "hook" not in key:
            value = copy.copy(value)
        new.__dict__[key] = value
    return new


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (then ReLU when ``relu``) on ``lepton::conv2d``."""

    relu = False

    @classmethod
    def from_torch(cls, conv: nn.Conv2d, relu: bool = False) -> "Conv2d":
        new = _adopt(cls, conv)
        new.relu = relu
        new._lepton_padding = LF.conv_padding(conv.padding, conv.kernel_size, conv.stride, conv.dilation)
        return new

    def forward(self, input):
        if _runs(input, self.weight, self.bias):
            return LF._ops.conv2d(input, self.weight, self.bias, list(self.stride), self._lepton_padding,
                                  list(self.dilation), self.groups, self.relu)
        y = super().forward(input)
        return F.relu(y) if self.relu else y

    def extra_repr(self):
        return super().extra_repr() + (", relu=True" if self.relu else "")


class Conv2dReLUMaxPool2d(Conv2d):
    """``nn.Conv2d`` -> ``nn.ReLU`` -> ``nn.MaxPool2d`` (or pool then ReLU: the same) on one fused op.

    It holds the convolution's Parameters under the convolution's names, so a
    state dict keeps its keys; the ReLU and pool it absorbed become
    ``nn.Identity`` in their container.
    """

    @classmethod
    def from_torch(cls, conv: nn.Conv2d, pool: nn.MaxPool2d) -> "Conv2dReLUMaxPool2d":
        new = super().from_torch(conv, relu=True)
        kernel, stride, padding, dilation = LF._pool_args(pool.kernel_size, pool.stride, pool.padding, pool.dilation)
        new.pool_kernel_size, new.pool_stride, new.pool_padding, new.pool_dilation = kernel, stride, padding, dilation
        new.ceil_mode = bool(pool.ceil_mode)
        return new

    def _pool(self):
        return (self.pool_kernel_size, self.pool_stride, self.pool_padding, self.pool_dilation, self.ceil_mode)

    def forward(self, input):
        if not _runs(input, self.weight, self.bias):
            return F.max_pool2d(F.relu(nn.Conv2d.forward(self, input)), *self._pool())
        args = (input, self.weight, self.bias, list(self.stride), self._lepton_padding, list(self.dilation),
                self.groups, *self._pool())
        if LF._needs_grad(input, self.weight, self.bias):
            return LF._ops.conv2d_relu_max_pool2d_with_indices(*args)[0]
        return LF._ops.conv2d_relu_max_pool2d(*args)

    def extra_repr(self):
        k, s, p, d, c = self._pool()
        return (nn.Conv2d.extra_repr(self) + f", relu=True, pool_kernel_size={tuple(k)}, pool_stride={tuple(s)}"
                + (f", pool_padding={tuple(p)}" if p != [0, 0] else "")
                + (f", pool_dilation={tuple(d)}" if d != [1, 1] else "") + (", ceil_mode=True" if c else ""))


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (without ``return_indices``) on ``lepton::max_pool2d[_with_indices]``."""

    @classmethod
    def from_torch(cls, pool: nn.MaxPool2d) -> "MaxPool2d":
        new = _adopt(cls, pool)
        new._lepton_args = LF._pool_args(pool.kernel_size, pool.stride, pool.padding, pool.dilation)
        return new

    def forward(self, input):
        if not _runs(input):
            return super().forward(input)
        args = (input, *self._lepton_args, bool(self.ceil_mode))
        if LF._needs_grad(input):
            return LF._ops.max_pool2d_with_indices(*args)[0]
        return LF._ops.max_pool2d(*args)


class Linear(nn.Linear):
    """``nn.Linear`` (then ReLU when ``relu``) on ``lepton::linear``."""

    relu = False

    @classmethod
    def from_torch(cls, linear: nn.Linear, relu: bool = False) -> "Linear":
        new = _adopt(cls, linear)
        new.relu = relu
        return new

    def forward(self, input):
        if _runs(input, self.weight, self.bias):
            return LF._ops.linear(input, self.weight, self.bias, self.relu)
        y = super().forward(input)
        return F.relu(y) if self.relu else y

    def extra_repr(self):
        return super().extra_repr() + (", relu=True" if self.relu else "")


class ReLU(nn.ReLU):
    """``nn.ReLU`` on ``lepton::relu``. Always out of place: ``inplace=True`` gives the same values."""

    @classmethod
    def from_torch(cls, relu: nn.ReLU) -> "ReLU":
        return _adopt(cls, relu)

    def forward(self, input):
        if _runs(input):
            return LF._ops.relu(input)
        return super().forward(input)


# --- swap -----------------------------------------------------------------------------


def _has_hooks(m):
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _float_params(m):
    return all(p.dtype in _FLOATS and p.device.type in ("cpu", "cuda") and p.layout == torch.strided
               for p in m.parameters(recurse=False))


def _conv_ok(m):
    if type(m) is not nn.Conv2d or m.padding_mode != "zeros" or not _float_params(m):
        return False
    try:
        LF.conv_padding(m.padding, m.kernel_size, m.stride, m.dilation)
    except ValueError:  # 'same' padding that would be asymmetric
        return False
    return True


def _pool_ok(m):
    return type(m) is nn.MaxPool2d and not m.return_indices


def _relu_ok(m):
    return type(m) is nn.ReLU


def _linear_ok(m):
    return type(m) is nn.Linear and _float_params(m)


def _convert(m):
    """The lepton module replacing ``m`` alone, or None when it stays as it is."""
    if _conv_ok(m):
        return Conv2d.from_torch(m)
    if _pool_ok(m):
        return MaxPool2d.from_torch(m)
    if _linear_ok(m):
        return Linear.from_torch(m)
    if _relu_ok(m):
        return ReLU.from_torch(m)
    return None


def _identity(absorbed):
    """The ``nn.Identity`` standing where ``absorbed`` was, in its train/eval mode."""
    return nn.Identity().train(absorbed.training)


def _fuse_sequential(seq: nn.Sequential) -> None:
    """Fuse runs of consecutive children: conv -> ReLU -> pool, conv -> pool -> ReLU, conv -> ReLU, linear -> ReLU.

    The absorbed modules become ``nn.Identity``, so indices and state-dict keys
    stay. Modules with hooks are never fused (a hook would see other values).
    """
    names = list(seq._modules)
    mods = [seq._modules[n] for n in names]

    def at(j):
        return mods[j] if j < len(mods) else None

    def free(*ms):
        return all(m is not None and not _has_hooks(m) for m in ms)

    i = 0
    while i < len(mods):
        a, b, c = at(i), at(i + 1), at(i + 2)
        if _conv_ok(a) and free(a, b, c) and ((_relu_ok(b) and _pool_ok(c)) or (_pool_ok(b) and _relu_ok(c))):
            seq._modules[names[i]] = Conv2dReLUMaxPool2d.from_torch(a, c if _pool_ok(c) else b)
            seq._modules[names[i + 1]] = _identity(b)
            seq._modules[names[i + 2]] = _identity(c)
            i += 3
        elif (_conv_ok(a) or _linear_ok(a)) and free(a, b) and _relu_ok(b):
            seq._modules[names[i]] = (Conv2d if _conv_ok(a) else Linear).from_torch(a, relu=True)
            seq._modules[names[i + 1]] = _identity(b)
            i += 2
        else:
            i += 1


def _swap_children(module: nn.Module) -> None:
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        _fuse_sequential(module)
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _convert(child)
        if new is not None:
            module._modules[name] = new
        else:
            _swap_children(child)


def swap(model: nn.Module) -> nn.Module:
    """Run ``model``'s Conv2d, MaxPool2d, Linear and ReLU modules on lepton's kernels, in place.

    Recurses into every submodule. Inside an ``nn.Sequential`` (one that runs
    its children in order), Conv2d -> ReLU -> MaxPool2d (or Conv2d ->
    MaxPool2d -> ReLU) becomes one fused ``Conv2dReLUMaxPool2d``, and
    Conv2d -> ReLU or Linear -> ReLU one module with the ReLU fused; absorbed
    modules become ``nn.Identity``. The new modules keep the original
    Parameter objects, so optimizers made before the swap and state dicts
    stay valid. Left as they are: subclasses of those modules, convolutions
    with ``padding_mode`` other than ``'zeros'`` or asymmetric ``'same'``
    padding, pools with ``return_indices``, parameters that are not CPU
    float32/float64 tensors. Functional calls in a ``forward`` (``F.relu``)
    are not changed. Returns ``model`` (or, when ``model`` itself is one of
    those modules, its replacement).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    new = _convert(model)
    if new is not None:
        return new
    _swap_children(model)
    return model
