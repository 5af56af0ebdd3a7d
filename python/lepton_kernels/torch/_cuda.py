"""torch CUDA tensors through lepton's device path.

The device dispatch (``lepton_kernels._device``) runs the CUDA kernels on
raw pointers and needs an *array module* for the rest: allocating outputs,
contiguous copies, the current device and stream. Its default is CuPy; for
the ``lepton::`` ops it is torch itself, through :class:`TorchArrays`, so
that:

* outputs are torch tensors from torch's caching allocator, on the input's
  device;
* kernels launch on torch's current stream (``torch.cuda.current_stream()``),
  ordered with the rest of the model's work, and nothing syncs the host;
* CuPy is not needed.

Without usable CUDA kernels (a build without CUDA) the same array module
serves the CPU fallback: host copies in and out, with a
``LeptonFallbackWarning``.
"""

from __future__ import annotations

import contextlib
import contextvars
import types

import numpy as np
import torch

from .. import _device

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
                 np.dtype(np.int64): torch.int64}


class _Stream:
    def __init__(self, ptr: int):
        self.ptr = ptr


class TorchArrays:
    """The part of CuPy's API that ``_device`` uses, over tensors of one torch device type."""

    __name__ = "torch"
    ndarray = torch.Tensor

    def __init__(self, device_type: str = "cuda"):
        self.__version__ = torch.__version__
        self.device_type = device_type
        self.cuda = types.SimpleNamespace(Device=self._device, get_current_stream=self._current_stream)

    # What a real CUDA device needs; the emulated tests replace these three.
    def _device(self, index):
        return torch.cuda.device(index)

    def _current_stream(self):
        return _Stream(torch.cuda.current_stream().cuda_stream)

    def _wrap(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def empty(self, shape, dtype):
        return self._wrap(torch.empty(tuple(shape), dtype=_TORCH_DTYPES[np.dtype(dtype)], device=self.device_type))

    def asarray(self, obj):
        if isinstance(obj, torch.Tensor):
            return obj
        if isinstance(obj, np.ndarray):
            host = torch.from_numpy(np.ascontiguousarray(obj))
        else:  # a CUDA array interface or DLPack producer
            return self._wrap(torch.as_tensor(obj, device=self.device_type))
        return self._wrap(host.to(self.device_type))

    def ascontiguousarray(self, a):
        return self._wrap(a.contiguous())

    def asnumpy(self, a):
        return a.detach().cpu().numpy()

    def copyto(self, dst, src):
        with torch.no_grad():
            dst.copy_(src)

    def from_dlpack(self, obj):
        return self._wrap(torch.from_dlpack(obj))


def device_view(t: torch.Tensor):
    """A (detached) CUDA tensor as the device path reads it: the tensor itself, or the emulated tests'
    stand-in for it."""
    return runtime().xp._wrap(t)


def kernels_usable() -> bool:
    """Whether CUDA tensors run on lepton's CUDA kernels (else on its CPU fallback, with a warning)."""
    return runtime().kernels is not None


_ARRAYS = None
# A runtime forced by `using` (tests): context-local like _device's own override.
_forced: contextvars.ContextVar = contextvars.ContextVar("lepton_torch_runtime", default=None)


def runtime() -> _device.Runtime:
    """The runtime of the lepton:: ops on CUDA tensors: torch allocates, lepton's kernels compute."""
    rt = _forced.get()
    if rt is not None:
        return rt
    global _ARRAYS
    if _ARRAYS is None:
        _ARRAYS = TorchArrays()
    kernels, why = _device._kernels()
    return _device.Runtime(_ARRAYS, kernels, why)


@contextlib.contextmanager
def using(rt: _device.Runtime):
    """Device tensors in the block run with `rt` (for tests: torch arrays over the emulated kernels)."""
    token = _forced.set(rt)
    try:
        yield rt
    finally:
        _forced.reset(token)
