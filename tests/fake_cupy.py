"""A stand-in for CuPy whose "device" arrays live in host memory, and a
recording proxy of the emulated device kernels, so the device-array
dispatch of lepton_kernels (_device.py) runs here without a GPU.

The fake arrays expose a real ``__cuda_array_interface__`` (or a real CUDA
DLPack capsule) pointing at host memory. That is only safe because these
tests hand them to the *emulated* kernels (``_cuda_emu.device``: the CUDA
sources compiled as C++, over host memory); a real CUDA runtime would refuse
them (``pointer_device`` raises for host memory), and they must never reach
one. Tests install them with ``_device.use_runtime``.

The module implements the part of CuPy's API the dispatch uses: ``ndarray``,
``empty`` (poisoned: NaN, or -7 for integers, so an unwritten output
fails), ``asarray``, ``ascontiguousarray``, ``asnumpy``, ``copyto``,
``from_dlpack``, ``cuda.Device`` and ``cuda.get_current_stream``.
"""

from __future__ import annotations

import ctypes
import types

import numpy as np

from lepton_kernels import _cuda_emu, _device


class FakeArray:
    """A device array of FakeCupy: host data, a device id, and the stream its interface reports."""

    def __init__(self, module, host, device, stream=None, version=3, readonly=False):
        self._module, self.host, self._device = module, host, device
        self.cai_stream, self.cai_version, self.readonly = stream, version, readonly
        module._register(host, device)

    @property
    def shape(self):
        return self.host.shape

    @property
    def dtype(self):
        return self.host.dtype

    @property
    def ndim(self):
        return self.host.ndim

    @property
    def size(self):
        return self.host.size

    @property
    def device(self):
        return types.SimpleNamespace(id=self._device)

    @property
    def __cuda_array_interface__(self):
        h = self.host
        return {
            "version": self.cai_version,
            "shape": h.shape,
            "typestr": h.dtype.str,
            "data": (h.__array_interface__["data"][0], self.readonly),
            "strides": None if h.flags.c_contiguous else h.strides,
            "stream": self.cai_stream,
        }

    def __getitem__(self, key):
        return FakeArray(self._module, self.host[key], self._device, self.cai_stream)

    @property
    def T(self):
        return FakeArray(self._module, self.host.T, self._device, self.cai_stream)

    def transpose(self, *axes):
        return FakeArray(self._module, self.host.transpose(*axes), self._device, self.cai_stream)

    def reshape(self, *shape):
        # CuPy reshapes a contiguous array as a view; so does NumPy here.
        return FakeArray(self._module, self.host.reshape(*shape), self._device, self.cai_stream)

    def get(self):
        return self.host.copy()

    def __repr__(self):
        return f"FakeArray(device={self._device}, {self.host!r})"


class _Device:
    def __init__(self, module, device):
        self._module, self.id = module, device
        self._previous = []

    def __enter__(self):
        if not 0 <= self.id < self._module.device_count:
            raise ValueError(f"no fake device {self.id}")
        self._previous.append(self._module.current_device)
        self._module.current_device = self.id
        return self

    def __exit__(self, *exc):
        self._module.current_device = self._previous.pop()
        return False


class FakeCupy(types.ModuleType):
    """The fake array module. `streams[d]` is device d's current stream handle."""

    def __init__(self, device_count=1):
        super().__init__("fakecupy")
        self.__version__ = "0-fake"
        self.ndarray = FakeArray
        self.device_count = device_count
        self.current_device = 0
        self.streams = {d: 0 for d in range(device_count)}
        self.buffers = []  # (first byte, end, device, owner)
        self.log = []  # ("empty" | "asarray" | "ascontiguousarray" | "asnumpy" | "copyto", ...)
        module = self

        class _Stream:
            def __init__(self, ptr):
                self.ptr = ptr

        self.cuda = types.SimpleNamespace(
            Device=lambda device=None: _Device(module, module.current_device if device is None else device),
            get_current_stream=lambda: _Stream(module.streams[module.current_device]),
        )

    def _register(self, host, device):
        # The bytes this array can reach (what np.lib.array_utils.byte_bounds gives on NumPy 2).
        lo = hi = host.__array_interface__["data"][0]
        for n, s in zip(host.shape, host.strides):
            if n > 0:
                lo, hi = lo + min(0, (n - 1) * s), hi + max(0, (n - 1) * s)
        self.buffers.append((lo, hi + host.itemsize, device, host))

    def device_of(self, ptr):
        for lo, hi, device, _ in reversed(self.buffers):
            if lo <= ptr < hi:
                return device
        return None

    def array(self, host, device=0, **kw):
        """A device array on `device` holding a copy of `host` (the tests' constructor)."""
        return FakeArray(self, np.array(host, copy=True), device, **kw)

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        self.log.append(("empty", tuple(shape), dtype))
        fill = np.nan if dtype.kind == "f" else -7
        return FakeArray(self, np.full(shape, fill, dtype), self.current_device)

    def asarray(self, obj):
        if isinstance(obj, FakeArray):
            return obj
        if getattr(obj, "__cuda_array_interface__", None) is not None:
            raise TypeError("fakecupy.asarray: only its own device arrays")
        self.log.append(("asarray", np.shape(obj)))
        return FakeArray(self, np.array(obj, copy=True), self.current_device)

    def ascontiguousarray(self, a):
        self.log.append(("ascontiguousarray", a.shape))
        return FakeArray(self, np.ascontiguousarray(a.host).copy(), a._device)

    def asnumpy(self, a, stream=None):
        self.log.append(("asnumpy", a.shape))
        return a.host.copy()

    def copyto(self, dst, src):
        self.log.append(("copyto", dst.shape))
        dst.host[...] = src.host

    def from_dlpack(self, obj):
        return obj.to_fake()


class RecordingKernels:
    """_cuda_emu.device with devices looked up in a FakeCupy, every launch and stream wait recorded."""

    OPS = ("conv2d", "conv2d_max_pool2d", "max_pool2d", "linear", "relu", "softmax", "conv2d_backward",
           "max_pool2d_backward", "linear_backward", "relu_backward", "cross_entropy", "cross_entropy_backward",
           "adam_step")

    def __init__(self, xp, sm_counts=None):
        self.xp = xp
        self.dev = _cuda_emu.device
        self.dev.set_emulated_devices(sm_counts or [132] * xp.device_count)
        self.launches = []  # (op, device, stream)
        self.waits = []  # (device, consumer, producer)

    def device_count(self):
        return self.xp.device_count

    def current_device(self):
        return self.xp.current_device

    def pointer_device(self, ptr, what):
        d = self.xp.device_of(ptr)
        if d is None:
            # What the CUDA runtime says of memory it does not know.
            raise ValueError(f"{what}: the data pointer is host memory, not device memory")
        return d

    def stream_wait(self, device, consumer, producer):
        self.waits.append((device, consumer, producer))

    def __getattr__(self, name):
        if name not in self.OPS:
            return getattr(self.dev, name)
        fn = getattr(self.dev, name)

        def launch(*args):
            device, stream = args[-2], args[-1]
            assert device == self.xp.current_device, "launched on a device that is not current"
            self.launches.append((name, device, stream))
            return fn(*args)

        return launch


# --------------------------------------------------------------------------
# DLPack over host memory
# --------------------------------------------------------------------------


_DLDevice, _DLDataType, _DLTensor = _device._DLDevice, _device._DLDataType, _device._DLTensor
_DLManagedTensor, _DLPackVersion = _device._DLManagedTensor, _device._DLPackVersion
_DLManagedTensorVersioned = _device._DLManagedTensorVersioned

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_DL_CODES = {np.dtype(np.float32): (2, 32), np.dtype(np.float64): (2, 64), np.dtype(np.int64): (0, 64)}


class DLPackOnly:
    """A CUDA DLPack producer (no __cuda_array_interface__) over a FakeArray's host memory.

    The capsule carries a real DLManagedTensor (device type kDLCUDA) with
    element strides and a byte offset of 0 or `offset_elements`; the object
    keeps the structures alive. Records the stream each export was made for.
    `versioned`: a DLPack 1.x DLManagedTensorVersioned ("dltensor_versioned"
    capsule), read-only when `readonly`.
    """

    def __init__(self, fake: FakeArray, offset_elements=0, versioned=False, readonly=False):
        self.fake = fake
        self.offset = offset_elements
        self.versioned, self.readonly = versioned, readonly
        self.streams = []
        self._keep = []

    def __dlpack_device__(self):
        return (2, self.fake._device)

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        h = self.fake.host
        item = h.dtype.itemsize
        shape = (ctypes.c_int64 * max(h.ndim, 1))(*h.shape)
        strides = (ctypes.c_int64 * max(h.ndim, 1))(*(s // item for s in h.strides))
        m = _DLManagedTensorVersioned() if self.versioned else _DLManagedTensor()
        if self.versioned:
            m.version = _DLPackVersion(1, 0)
            m.flags = 1 if self.readonly else 0  # DLPACK_FLAG_BITMASK_READ_ONLY
        t = m.dl_tensor
        t.data = h.__array_interface__["data"][0] - self.offset * item
        t.byte_offset = self.offset * item
        t.device = _DLDevice(2, self.fake._device)
        t.ndim = h.ndim
        code, bits = _DL_CODES[h.dtype]
        t.dtype = _DLDataType(code, bits, 1)
        t.shape = ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64))
        t.strides = ctypes.cast(strides, ctypes.POINTER(ctypes.c_int64))
        self._keep += [m, shape, strides]
        name = b"dltensor_versioned" if self.versioned else b"dltensor"
        return _capsule_new(ctypes.addressof(m), name, None)

    def to_fake(self):
        return self.fake
