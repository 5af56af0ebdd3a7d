"""Device arrays (CuPy, or anything exposing ``__cuda_array_interface__`` or
CUDA DLPack) through the functional API and the layers.

A call on device arrays goes through a *runtime*: the array module that
allocates outputs, copies and names the current stream (CuPy), and the
kernels on raw device pointers (``_core.cuda``, present when the build has
CUDA). Without usable kernels the runtime has a reason instead, and calls
fall back to the CPU: inputs are copied to the host, the CPU library
computes, the results are copied back into new arrays of the array module,
and a :class:`LeptonFallbackWarning` says why, once per process.

A call on the GPU:

* reads each array's interface (zero-copy): data pointer, shape, strides,
  dtype, and the stream its producer wrote it on (CUDA array interface v3)
  or makes the producer order its work before our stream (DLPack's
  ``__dlpack__(stream=...)``);
* runs on the input's device (made current for the call) and on the array
  module's current stream there (``cupy.cuda.get_current_stream()``);
  every other array must be on the same device;
* when a CUDA array interface names another stream than ours, makes our
  stream wait for it with an event: nothing ever synchronises the host;
* copies a non-contiguous (or misaligned) input into a contiguous array
  first, on the same stream (the kernels read contiguous NCHW);
* allocates outputs with the array module (so CuPy's memory pool owns
  them) and returns them as the input's kind: a CuPy array for CuPy input;
  for another producer, its ``from_dlpack`` of the result (zero-copy), or
  the CuPy array if it has none.

Everything device-specific goes through the runtime, so the tests drive
this module with a stand-in: the emulated kernels (``_cuda_emu.device``,
the same binding code over host memory) and a small CuPy-like module whose
"device" arrays live in host memory (tests/test_gpu.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import math
import operator
import sys
import threading
import warnings
from typing import NamedTuple

import numpy as np

from . import _core
from ._args import FLOAT_DTYPES, ArrayMeta

__all__ = ["LeptonFallbackWarning", "is_device_array"]

_INT64 = np.dtype(np.int64)
# DLPack device types whose memory the kernels can read.
_KDL_CUDA, _KDL_CUDA_MANAGED = 2, 13
_DEVICE_TYPES = (_KDL_CUDA, _KDL_CUDA_MANAGED)


class LeptonFallbackWarning(UserWarning):
    """A device array was computed on the CPU (copied to the host and back); the message says why."""


# --------------------------------------------------------------------------
# The runtime
# --------------------------------------------------------------------------


class Runtime(NamedTuple):
    """What device arrays run with.

    ``xp``: the array module (CuPy's API: ``empty``, ``asarray``,
    ``ascontiguousarray``, ``asnumpy``, ``copyto``, ``ndarray``,
    ``cuda.Device``, ``cuda.get_current_stream``), or None when none is
    installed. ``kernels``: the device-pointer kernels (``_core.cuda``), or
    None to compute on the CPU. ``reason``: why kernels is None.
    """

    xp: object
    kernels: object
    reason: str

    @property
    def path(self) -> str:
        if self.xp is None:
            return "unavailable"
        return "gpu" if self.kernels is not None else "cpu-fallback"


_lock = threading.Lock()
_default = None
# A runtime set by ``use_runtime`` (tests; the torch ops, whose array module
# is torch): a context variable, so one thread's override is not another's.
_override: contextvars.ContextVar = contextvars.ContextVar("lepton_runtime", default=None)


def _kernels():
    """(the device-pointer kernels, or None and why)."""
    kernels = getattr(_core, "cuda", None)
    if kernels is None:
        return None, "lepton_kernels was built without CUDA"
    try:
        n = kernels.device_count()
    except Exception as e:
        return None, f"the CUDA runtime failed ({e})"
    if n == 0:
        return None, "no CUDA device is usable (no GPU or no driver)"
    return kernels, ""


def _resolve() -> Runtime:
    kernels, why = _kernels()
    try:
        import cupy
    except ImportError:
        return Runtime(None, None, "CuPy is not installed" + (f"; {why}" if why else ""))
    except Exception as e:  # a broken CUDA installation can fail at import
        return Runtime(None, None, f"CuPy failed to import ({type(e).__name__}: {e})")
    return Runtime(cupy, kernels, why)


def runtime() -> Runtime:
    """The runtime in force: an override (tests), else the one resolved at first use."""
    rt = _override.get()
    if rt is not None:
        return rt
    global _default
    if _default is None:
        with _lock:
            if _default is None:
                _default = _resolve()
    return _default


@contextlib.contextmanager
def use_runtime(rt: Runtime):
    """Run device arrays with `rt` inside the block (another array module, the emulator, a forced fallback)."""
    token = _override.set(rt)
    try:
        yield rt
    finally:
        _override.reset(token)


_warned = False


def _warn_fallback(reason: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(f"lepton_kernels computes device arrays on the CPU (copied to the host and back): {reason}. "
                  "This warning is shown once.", LeptonFallbackWarning, stacklevel=5)


def _reset_fallback_warning() -> None:
    """Let the next fallback warn again (for tests)."""
    global _warned
    _warned = False


# --------------------------------------------------------------------------
# Reading device arrays
# --------------------------------------------------------------------------


def _has_cai(obj) -> bool:
    """Whether obj offers a CUDA array interface. Some producers' properties raise
    instead (a CPU tensor, a tensor that requires grad): those go by DLPack, if anything."""
    try:
        return getattr(obj, "__cuda_array_interface__", None) is not None
    except Exception:
        return False


def _uses_cai(obj) -> bool:
    """Whether to read obj through its CUDA array interface rather than DLPack.

    Version 3 carries the producer's stream; older versions say nothing of
    streams, so a producer that also speaks DLPack is asked through it, which
    makes the producer order its pending work before our stream (a torch
    tensor, which exports version 2, goes that way).
    """
    try:
        cai = obj.__cuda_array_interface__
    except Exception:
        return False
    if cai is None:
        return False
    if isinstance(cai, dict) and hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        version = cai.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version < 3:
            return False
    return True


def is_device_array(obj) -> bool:
    """True for an object exposing ``__cuda_array_interface__``, or DLPack on a CUDA device."""
    if isinstance(obj, np.ndarray):
        return False
    if _has_cai(obj):
        return True
    dev = getattr(obj, "__dlpack_device__", None)
    if dev is None:
        return False
    try:
        return int(dev()[0]) in _DEVICE_TYPES
    except Exception:
        return False


class DeviceArray(ArrayMeta):
    """An array in device memory, as read from its interface: pointer, shape, byte strides, dtype.

    ``device``: from DLPack, else None (the runtime asks the pointer);
    ``stream``: the stream the producer wrote it on (CUDA array interface
    v3), None when there is nothing to wait for.
    """

    __slots__ = ("obj", "ptr", "shape", "strides", "dtype", "device", "stream", "readonly", "keepalive")

    def __init__(self, obj, ptr, shape, strides, dtype, device, stream, readonly, keepalive=None):
        self.obj, self.ptr, self.shape, self.strides, self.dtype = obj, ptr, shape, strides, dtype
        self.device, self.stream, self.readonly, self.keepalive = device, stream, readonly, keepalive

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __getitem__(self, key):
        # x[None]: the batched view spatial_input makes of a 3-D input.
        if key is not None:
            raise TypeError("device arrays support only x[None] here")
        return DeviceArray(self.obj, self.ptr, (1,) + self.shape, (0,) + self.strides, self.dtype, self.device,
                           self.stream, self.readonly, self.keepalive)

    def is_contiguous(self) -> bool:
        """C-contiguous with an element-aligned pointer (what the kernels read)."""
        if self.size == 0:
            return True
        if self.ptr % self.dtype.itemsize:
            return False
        expected = self.dtype.itemsize
        for n, s in zip(reversed(self.shape), reversed(self.strides)):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True

    def span(self):
        """[first, last) bytes the array can touch."""
        if self.size == 0:
            return (self.ptr, self.ptr)
        lo = hi = self.ptr
        for n, s in zip(self.shape, self.strides):
            if s >= 0:
                hi += (n - 1) * s
            else:
                lo += (n - 1) * s
        return (lo, hi + self.dtype.itemsize)

    def __repr__(self):
        return (f"DeviceArray(ptr={self.ptr:#x}, shape={self.shape}, strides={self.strides}, dtype={self.dtype}, "
                f"device={self.device}, stream={self.stream})")


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _check_dtype(dtype, name, dtypes):
    if dtypes is not None and dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {want}, got {dtype}")


def _int_tuple(value, name, what):
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{name}: __cuda_array_interface__ {what} must be a tuple, got {type(value).__name__}")
    try:
        return tuple(operator.index(v) for v in value)
    except TypeError:
        raise ValueError(f"{name}: __cuda_array_interface__ {what} must hold ints, got {value!r}") from None


def from_cuda_array_interface(obj, name, dtypes=FLOAT_DTYPES) -> DeviceArray:
    """Read ``obj.__cuda_array_interface__`` (versions 0 to 3), checking every field the kernels rely on."""
    cai = obj.__cuda_array_interface__
    if not isinstance(cai, dict):
        raise TypeError(f"{name}: __cuda_array_interface__ must be a dict, got {type(cai).__name__}")
    version = cai.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= 3:
        raise ValueError(f"{name}: unsupported __cuda_array_interface__ version {version!r} (expected 0 to 3)")
    try:
        shape, typestr, data = cai["shape"], cai["typestr"], cai["data"]
    except KeyError as e:
        raise ValueError(f"{name}: __cuda_array_interface__ lacks the required key {e.args[0]!r}") from None
    shape = _int_tuple(shape, name, "shape")
    if any(n < 0 for n in shape):
        raise ValueError(f"{name}: __cuda_array_interface__ shape has a negative size: {shape}")
    if not isinstance(typestr, str):
        raise ValueError(f"{name}: __cuda_array_interface__ typestr must be a str, got {typestr!r}")
    try:
        dtype = np.dtype(typestr)
    except TypeError:
        raise ValueError(f"{name}: __cuda_array_interface__ typestr {typestr!r} is not a dtype") from None
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big"):
        raise TypeError(f"{name}: big-endian data ({typestr!r}) is not supported")
    _check_dtype(dtype.newbyteorder("="), name, dtypes)
    dtype = dtype.newbyteorder("=")
    if not isinstance(data, tuple) or len(data) != 2:
        raise ValueError(f"{name}: __cuda_array_interface__ data must be a (pointer, read_only) tuple, got {data!r}")
    try:
        ptr = operator.index(data[0])
    except TypeError:
        raise ValueError(f"{name}: __cuda_array_interface__ data pointer must be an int, got {data[0]!r}") from None
    size = math.prod(shape) if shape else 1
    if ptr < 0 or ptr >= 1 << 64:
        raise ValueError(f"{name}: __cuda_array_interface__ data pointer {ptr} is out of range")
    if ptr == 0 and size:
        raise ValueError(f"{name}: __cuda_array_interface__ data pointer is null for a non-empty array")
    strides = cai.get("strides")
    if strides is None:
        strides = _c_strides(shape, dtype.itemsize)
    else:
        strides = _int_tuple(strides, name, "strides")
        if len(strides) != len(shape):
            raise ValueError(f"{name}: __cuda_array_interface__ has {len(strides)} strides for {len(shape)} "
                             "dimensions")
    if cai.get("mask") is not None:
        raise ValueError(f"{name}: masked device arrays are not supported")
    stream = cai.get("stream") if version >= 3 else None
    if stream is not None:
        if isinstance(stream, bool) or not isinstance(stream, int):
            raise ValueError(f"{name}: __cuda_array_interface__ stream must be an int or None, got {stream!r}")
        if stream == 0:
            # The interface forbids 0: it could mean either default stream.
            raise ValueError(f"{name}: __cuda_array_interface__ stream 0 is disallowed by the interface "
                             "(use 1 for the legacy default stream, 2 for the per-thread one)")
    return DeviceArray(obj, ptr, shape, strides, dtype, None, stream, bool(data[1]))


# DLPack, read through ctypes (the structures of dlpack.h, ABI version 0.x
# and 1.x; a consumer that does not rename the capsule leaves its deleter to
# the capsule's destructor, which runs when the call drops it).
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", _DLPackVersion), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p),
                ("flags", ctypes.c_uint64), ("dl_tensor", _DLTensor)]


_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype, _capsule_is_valid.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]

_DL_DTYPES = {(2, 32): np.dtype(np.float32), (2, 64): np.dtype(np.float64), (0, 64): _INT64,
              (0, 32): np.dtype(np.int32), (2, 16): np.dtype(np.float16), (1, 8): np.dtype(np.uint8)}
_DL_READ_ONLY = 1  # DLPACK_FLAG_BITMASK_READ_ONLY


def _dlpack_stream(stream: int) -> int:
    # DLPack forbids 0 for CUDA; the null stream is the legacy default (1).
    return 1 if stream == 0 else stream


def from_dlpack(obj, name, stream, dtypes=FLOAT_DTYPES) -> DeviceArray:
    """Read a CUDA DLPack export of `obj`, made ready for work on `stream` (the producer orders it)."""
    dev_type, dev_id = obj.__dlpack_device__()
    if int(dev_type) not in _DEVICE_TYPES:
        raise TypeError(f"{name}: DLPack device type {dev_type} is not CUDA memory")
    capsule = obj.__dlpack__(stream=_dlpack_stream(stream))
    if _capsule_is_valid(capsule, b"dltensor_versioned"):
        managed = _DLManagedTensorVersioned.from_address(_capsule_pointer(capsule, b"dltensor_versioned"))
        readonly = bool(managed.flags & _DL_READ_ONLY)
    elif _capsule_is_valid(capsule, b"dltensor"):
        managed = _DLManagedTensor.from_address(_capsule_pointer(capsule, b"dltensor"))
        readonly = False
    else:
        raise TypeError(f"{name}: __dlpack__ did not return an unconsumed DLPack capsule")
    t = managed.dl_tensor
    if t.device.device_type != int(dev_type) or t.device.device_id != int(dev_id):
        raise ValueError(f"{name}: the DLPack tensor's device ({t.device.device_type}, {t.device.device_id}) "
                         f"differs from __dlpack_device__ ({dev_type}, {dev_id})")
    if t.dtype.lanes != 1 or (t.dtype.code, t.dtype.bits) not in _DL_DTYPES:
        raise TypeError(f"{name}: unsupported DLPack dtype (code {t.dtype.code}, {t.dtype.bits} bits, "
                        f"{t.dtype.lanes} lanes)")
    dtype = _DL_DTYPES[(t.dtype.code, t.dtype.bits)]
    _check_dtype(dtype, name, dtypes)
    if t.ndim < 0:
        raise ValueError(f"{name}: DLPack ndim is negative")
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    if any(n < 0 for n in shape):
        raise ValueError(f"{name}: DLPack shape has a negative size: {shape}")
    if t.strides:
        strides = tuple(int(t.strides[i]) * dtype.itemsize for i in range(t.ndim))  # elements -> bytes
    else:
        strides = _c_strides(shape, dtype.itemsize)
    ptr = (t.data or 0) + t.byte_offset
    if ptr == 0 and any(shape) and 0 not in shape:
        raise ValueError(f"{name}: DLPack data pointer is null for a non-empty array")
    # The producer made the data ready on `stream`: nothing left to wait for.
    return DeviceArray(obj, ptr, shape, strides, dtype, int(dev_id), None, readonly, keepalive=capsule)


def _same_stream(a: int, b: int) -> bool:
    # CuPy names the legacy default stream 0 (its handle), the interface 1.
    return (1 if a == 0 else a) == (1 if b == 0 else b)


# --------------------------------------------------------------------------
# One call on the GPU
# --------------------------------------------------------------------------


# A stream given with ``stream=``: launches go there instead of the array
# module's current stream (a context variable, so threads and tasks each keep
# their own).
_explicit_stream: contextvars.ContextVar = contextvars.ContextVar("lepton_stream", default=None)


def stream_handle(stream) -> int:
    """The cudaStream_t of an int handle, a CuPy stream (``.ptr``) or a torch.cuda.Stream (``.cuda_stream``)."""
    if isinstance(stream, bool):
        raise TypeError("stream: expected a CUDA stream, got a bool")
    if isinstance(stream, int):
        handle = stream
    elif hasattr(stream, "ptr"):
        handle = int(stream.ptr)
    elif hasattr(stream, "cuda_stream"):
        handle = int(stream.cuda_stream)
    else:
        raise TypeError(f"stream: expected a CUDA stream handle (int), a CuPy stream or a torch.cuda.Stream, "
                        f"got {type(stream).__name__}")
    if handle < 0:
        raise ValueError(f"stream: a handle cannot be negative, got {handle}")
    return handle


@contextlib.contextmanager
def on_stream(stream):
    """Launches inside the block go to `stream` (None: the array module's current stream)."""
    if stream is None:
        yield
        return
    token = _explicit_stream.set(stream_handle(stream))
    try:
        yield
    finally:
        _explicit_stream.reset(token)


class _Launch:
    """The device, stream and arrays of one call; enter it to make the device current."""

    def __init__(self, rt: Runtime, input, name="input"):
        self.rt, self.xp, self.kernels = rt, rt.xp, rt.kernels
        self.input = input
        self._keep = []  # contiguous copies and DLPack capsules, alive until the launch is enqueued
        self.device = self._device_of(input, name)
        self._ctx = None

    def _device_of(self, obj, name):
        if not _uses_cai(obj):
            return int(obj.__dlpack_device__()[1])
        meta = from_cuda_array_interface(obj, name, None)  # read() checks the dtype
        if meta.size == 0:
            return int(self.kernels.current_device())
        return int(self.kernels.pointer_device(meta.ptr, name))

    def __enter__(self):
        self._ctx = self.xp.cuda.Device(self.device)
        self._ctx.__enter__()
        explicit = _explicit_stream.get()
        self.stream = explicit if explicit is not None else int(self.xp.cuda.get_current_stream().ptr)
        return self

    def __exit__(self, *exc):
        self._keep.clear()
        return self._ctx.__exit__(*exc)

    def read(self, obj, name, dtypes=FLOAT_DTYPES) -> DeviceArray:
        """`obj` as a DeviceArray on this call's device, ordered before this call's stream."""
        if not is_device_array(obj):
            raise TypeError(f"{name}: expected a device array like the input (CuPy, __cuda_array_interface__ or "
                            f"CUDA DLPack), got {type(obj).__module__}.{type(obj).__name__}")
        if _uses_cai(obj):
            a = from_cuda_array_interface(obj, name, dtypes)
            if a.size:
                a.device = int(self.kernels.pointer_device(a.ptr, name))
        else:
            a = from_dlpack(obj, name, self.stream, dtypes)
            self._keep.append(a.keepalive)
        if a.size and a.device != self.device:
            raise ValueError(f"{name}: is on device {a.device}, but the input is on device {self.device}")
        if a.stream is not None and not _same_stream(a.stream, self.stream):
            # CUDA array interface v3: the producer's pending work on its
            # stream must finish before ours reads the data.
            self.kernels.stream_wait(self.device, self.stream, a.stream)
        return a

    def contiguous(self, a: DeviceArray, name) -> DeviceArray:
        """`a` itself when the kernels can read it; else a contiguous copy, made on this call's stream."""
        if a.is_contiguous():
            return a
        copy = self.xp.ascontiguousarray(_as_xp(self.xp, a.obj))
        self._keep.append(copy)
        c = from_cuda_array_interface(copy, name, (a.dtype,))
        c.device = self.device
        return c

    def input_array(self, obj, name, dtypes=FLOAT_DTYPES) -> DeviceArray:
        return self.contiguous(self.read(obj, name, dtypes), name)

    def output(self, shape, dtype, out=None, inputs=(), allow_same=None) -> DeviceArray:
        """A new output (allocated by the array module), or `out` after checking it.

        `out` may not overlap any of `inputs`, except that it may be exactly
        `allow_same` (same memory and layout: an element-wise op in place).
        """
        shape = tuple(int(s) for s in shape)
        if out is None:
            y = self.xp.empty(shape, dtype=dtype)
            a = from_cuda_array_interface(y, "output", (np.dtype(dtype),))
            a.device = self.device
            return a
        o = self.read(out, "out", (np.dtype(dtype),))
        if o.shape != shape:
            raise ValueError(f"out: expected shape {shape}, got {o.shape}")
        if o.readonly:
            raise ValueError("out: array is read-only")
        if not o.is_contiguous():
            raise ValueError("out: must be C-contiguous")
        lo, hi = o.span()
        for x in inputs:
            if x is None or hi <= lo:
                continue
            if allow_same is not None and x is allow_same and x.ptr == o.ptr and x.shape == o.shape \
                    and x.strides == o.strides:
                continue
            xlo, xhi = x.span()
            if xlo < hi and lo < xhi:
                raise ValueError("out: must not overlap an input array")
        return o

    def result(self, y: DeviceArray, out=None):
        """What the caller gets: `out`, or the new array as the input's kind."""
        if out is not None:
            return out
        return _as_kind_of(self.xp, y.obj, self.input)


def _as_kind_of(xp, array, like):
    if isinstance(like, xp.ndarray):
        return array
    module = sys.modules.get(type(like).__module__.partition(".")[0])
    from_dl = getattr(module, "from_dlpack", None)
    if from_dl is not None:
        try:
            return from_dl(array)
        except Exception:
            pass
    return array


# --------------------------------------------------------------------------
# The CPU fallback
# --------------------------------------------------------------------------


def _need_xp(rt, name="input"):
    if rt.xp is None:
        raise TypeError(f"{name}: a device array needs CuPy to allocate results and copy data "
                        f"({rt.reason}); install cupy-cuda12x or cupy-cuda13x")


def _as_xp(xp, obj):
    if isinstance(obj, xp.ndarray):
        return obj
    if _uses_cai(obj):
        return xp.asarray(obj)
    return xp.from_dlpack(obj)


def _fallback_device(xp, obj):
    if not _uses_cai(obj):
        return int(obj.__dlpack_device__()[1])
    device = _as_xp(xp, obj).device
    return int(device.index if xp.__name__ == "torch" else device.id)


def on_cpu(rt: Runtime, fn, args, kwargs, input):
    """fn(*args, **kwargs) on host copies of the device arrays; results back as device arrays.

    An ``out`` in kwargs receives the (first) result on the device.
    """
    _need_xp(rt)
    xp = rt.xp
    _warn_fallback(rt.reason)
    device = _fallback_device(xp, input)

    def host(v):
        if is_device_array(v):
            return xp.asnumpy(_as_xp(xp, v))
        return v

    kwargs = dict(kwargs)
    out = kwargs.pop("out", None)
    res = fn(*[host(a) for a in args], **{k: host(v) for k, v in kwargs.items()})
    with xp.cuda.Device(device):
        def back(v):
            return _as_kind_of(xp, xp.asarray(v), input) if isinstance(v, np.ndarray) else v

        if isinstance(res, tuple):
            res = tuple(back(v) for v in res)
        else:
            res = back(res)
        if out is not None:
            first = res[0] if isinstance(res, tuple) else res
            target = _as_xp(xp, out)
            if tuple(target.shape) != tuple(first.shape):
                raise ValueError(f"out: expected shape {tuple(first.shape)}, got {tuple(target.shape)}")
            xp.copyto(target, _as_xp(xp, first))
            res = (out,) + res[1:] if isinstance(res, tuple) else out
    return res


def _require_device(values):
    for name, v in values.items():
        if v is not None and not is_device_array(v):
            raise TypeError(f"{name}: expected a device array like the input (CuPy, __cuda_array_interface__ or "
                            f"CUDA DLPack), got {type(v).__module__}.{type(v).__name__}")


# --------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------


def _F():
    from . import functional

    return functional


def _f64(a: DeviceArray) -> bool:
    return a.dtype == np.float64


def _check_same_dtype(ref, x, name):
    if x is not None and x.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {x.dtype} does not match input dtype {ref.dtype}")


def _conv_tuple(x4_shape, w_shape, groups, stride, pads, dilation):
    N, C, H, W = x4_shape
    K, _, R, S = w_shape
    return (N, C, H, W, K, R, S, groups, stride[0], stride[1], pads[0], pads[1], pads[2], pads[3], dilation[0],
            dilation[1])


class ParamCache:
    """A layer's host weights on each device, uploaded once per device (and dropped with the layer)."""

    def __init__(self, *arrays):
        self._host = arrays
        self._by_device = {}

    def get(self, xp, device):
        got = self._by_device.get(device)
        if got is None:
            got = tuple(None if a is None else xp.asarray(a) for a in self._host)
            self._by_device[device] = got
        return got


def conv2d(input, weight, bias, stride, padding, dilation, groups, *, activation, out, pool=None, ceil_mode=False,
           return_indices=False):
    """conv2d (or, with `pool` = (kernel_size, stride, padding, dilation), conv2d_max_pool2d) of device arrays."""
    F = _F()
    rt = runtime()
    _require_device({"weight": weight, "bias": bias})
    if rt.kernels is None:
        if pool is None:
            return on_cpu(rt, F.conv2d, (input, weight, bias, stride, padding, dilation, groups),
                          {"activation": activation, "out": out}, input)
        kernel_size, pool_stride, pool_padding, pool_dilation = pool
        kwargs = {"activation": activation, "kernel_size": kernel_size, "pool_stride": pool_stride,
                  "pool_padding": pool_padding, "pool_dilation": pool_dilation, "ceil_mode": ceil_mode, "out": out}
        if return_indices:
            kwargs["return_indices"] = True
        return on_cpu(rt, F.conv2d_max_pool2d, (input, weight, bias, stride, padding, dilation, groups), kwargs,
                      input)
    return _conv_gpu(rt, input, weight, bias, stride, padding, dilation, groups, activation, out, pool, ceil_mode,
                     return_indices=return_indices)


def conv_layer(layer, input, out):
    """A Conv2d or Conv2dMaxPool2d layer on a device array: its weights uploaded once per device."""
    rt = runtime()
    if rt.kernels is None:
        return on_cpu(rt, layer, (input,), {"out": out}, input)
    return _conv_gpu(rt, input, None, None, layer._stride, layer._pads, layer._dilation, layer._groups,
                     layer._activation, out, layer._pool, layer._ceil_mode, params=layer._device_params)


def _conv_gpu(rt, input, weight, bias, stride, padding, dilation, groups, activation, out, pool, ceil_mode,
              params=None, return_indices=False):
    """The GPU path. With `params` (a layer's ParamCache), weight and bias come from it and
    stride, padding (top, bottom, left, right), dilation, groups and pool are already normalised.

    With `return_indices` (conv2d_max_pool2d only), the fused kernel, which
    keeps no indices, gives way to conv2d into a temporary and max_pool2d
    with indices (flattened over the convolution output's planes)."""
    F = _F()
    from ._args import spatial_input

    with _Launch(rt, input) as L:
        x = L.input_array(input, "input")
        if params is not None:
            weight, bias = params.get(L.xp, L.device)
        w = L.input_array(weight, "weight")
        b = None if bias is None else L.input_array(bias, "bias")
        _check_same_dtype(x, w, "weight")
        _check_same_dtype(x, b, "bias")
        if params is not None:
            x4, batched = spatial_input(x)
            pads = padding
            _, C, H, W = x4.shape
            _, Cg, R, S = w.shape
            if Cg * groups != C:
                raise ValueError(f"input: expected {Cg * groups} channels, got {C}")
            P = (H + pads[0] + pads[1] - dilation[0] * (R - 1) - 1) // stride[0] + 1
            Q = (W + pads[2] + pads[3] - dilation[1] * (S - 1) - 1) // stride[1] + 1
            if P < 1 or Q < 1:
                raise ValueError(f"input: image {H}x{W} is smaller than the kernel with dilation and padding")
        else:
            x4, batched, stride, pads, dilation, groups, (P, Q) = F._conv_args(x, w, b, stride, padding, dilation,
                                                                                groups)
        act = F._activation(activation)
        conv = _conv_tuple(x4.shape, w.shape, groups, stride, pads, dilation)
        N, K = x4.shape[0], w.shape[0]
        if pool is None:
            out_shape = (N, K, P, Q)
        else:
            if params is not None:
                pk, ps, pp, pd = pool
                _, _, _, _, (PP, PQ) = F._pool_args(pk, ps, pp, pd, ceil_mode, K, P, Q, F._FUSED_POOL_NAMES)
            else:
                pk, ps, pp, pd, (PP, PQ) = F._pool_args(*pool, ceil_mode, K, P, Q, F._FUSED_POOL_NAMES)
            out_shape = (N, K, PP, PQ)
        F.check_out_size(out_shape, x.dtype)
        y = L.output(out_shape if batched else out_shape[1:], x.dtype, out, (x, w, b))
        idx = L.output(y.shape, _INT64) if return_indices else None
        if y.size:
            bp = 0 if b is None else b.ptr
            if pool is None:
                L.kernels.conv2d(_f64(x), x.ptr, w.ptr, bp, y.ptr, conv, act == "relu", L.device, L.stream)
            elif return_indices:
                full = L.output((N, K, P, Q), x.dtype)  # freed in stream order after the pooling reads it
                L.kernels.conv2d(_f64(x), x.ptr, w.ptr, bp, full.ptr, conv, act == "relu", L.device, L.stream)
                L.kernels.max_pool2d(_f64(x), full.ptr, y.ptr, idx.ptr, (N, K, P, Q),
                                     (*pk, *ps, *pp, *pd, int(bool(ceil_mode))), L.device, L.stream)
            else:
                pool_args = (*pk, *ps, *pp, *pd, int(bool(ceil_mode)))
                L.kernels.conv2d_max_pool2d(_f64(x), x.ptr, w.ptr, bp, y.ptr, conv, act == "relu", pool_args,
                                            L.device, L.stream)
        if return_indices:
            return L.result(y, out), L.result(idx)
        return L.result(y, out)


def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, *, out):
    F = _F()
    rt = runtime()
    if rt.kernels is None:
        return on_cpu(rt, F.max_pool2d, (input, kernel_size, stride, padding, dilation, ceil_mode, return_indices),
                      {"out": out}, input)
    from ._args import spatial_input

    with _Launch(rt, input) as L:
        x = L.input_array(input, "input")
        x4, batched = spatial_input(x)
        N, C, H, W = x4.shape
        kernel, stride, pad, dilation, (P, Q) = F._pool_args(kernel_size, stride, padding, dilation, ceil_mode, C, H,
                                                             W)
        F.check_out_size((N, C, P, Q), x.dtype)
        shape = (N, C, P, Q) if batched else (C, P, Q)
        y = L.output(shape, x.dtype, out, (x,))
        idx = L.output(shape, _INT64) if return_indices else None
        if y.size:
            L.kernels.max_pool2d(_f64(x), x.ptr, y.ptr, 0 if idx is None else idx.ptr, x4.shape,
                                 (*kernel, *stride, *pad, *dilation, int(bool(ceil_mode))), L.device, L.stream)
        res = L.result(y, out)
        if return_indices:
            return res, _as_kind_of(L.xp, idx.obj, input)
        return res


def linear(input, weight, bias, *, activation, out):
    F = _F()
    rt = runtime()
    _require_device({"weight": weight, "bias": bias})
    if rt.kernels is None:
        return on_cpu(rt, F.linear, (input, weight, bias), {"activation": activation, "out": out}, input)
    return _linear_gpu(rt, input, weight, bias, activation, out)


def linear_layer(layer, input, out):
    """A Linear layer on a device array: its weights uploaded once per device."""
    rt = runtime()
    if rt.kernels is None:
        return on_cpu(rt, layer, (input,), {"out": out}, input)
    return _linear_gpu(rt, input, None, None, layer._activation, out, params=layer._device_params)


def _linear_gpu(rt, input, weight, bias, activation, out, params=None):
    F = _F()
    with _Launch(rt, input) as L:
        x = L.input_array(input, "input")
        if params is not None:
            weight, bias = params.get(L.xp, L.device)
        w = L.input_array(weight, "weight")
        b = None if bias is None else L.input_array(bias, "bias")
        _check_same_dtype(x, w, "weight")
        _check_same_dtype(x, b, "bias")
        act = F._activation(activation)
        if x.ndim < 1:
            raise ValueError("input: expected at least 1 dimension, got a 0-d array")
        if w.ndim not in (1, 2):
            raise ValueError(f"weight: expected a 2-D array (out_features, in_features), got shape {w.shape}")
        vector = w.ndim == 1
        N, K = (1, w.shape[0]) if vector else w.shape
        if x.shape[-1] != K:
            raise ValueError(f"weight: expected {K} input features to match input's last dimension, "
                             f"got weight of shape {w.shape}")
        if b is not None:
            expected = () if vector else (N,)
            if b.shape != expected and not (vector and b.shape == (1,)):
                raise ValueError(f"bias: expected shape {expected}, got {b.shape}")
        lead = x.shape[:-1]
        M = math.prod(lead)
        out_shape = lead + (() if vector else (N,))
        F.check_out_size(out_shape, x.dtype)
        y = L.output(out_shape, x.dtype, out, (x, w, b))
        if y.size:
            L.kernels.linear(_f64(x), x.ptr, w.ptr, 0 if b is None else b.ptr, y.ptr, M, K, N, act == "relu",
                             L.device, L.stream)
        return L.result(y, out)


def relu(input, *, out):
    F = _F()
    rt = runtime()
    if rt.kernels is None:
        return on_cpu(rt, F.relu, (input,), {"out": out}, input)
    with _Launch(rt, input) as L:
        x = L.input_array(input, "input")
        y = L.output(x.shape, x.dtype, out, (x,), allow_same=x)
        if y.size:
            L.kernels.relu(_f64(x), x.ptr, y.ptr, x.size, L.device, L.stream)
        return L.result(y, out)


def softmax(input, dim, *, out, log):
    F = _F()
    rt = runtime()
    if rt.kernels is None:
        return on_cpu(rt, F.log_softmax if log else F.softmax, (input, dim), {"out": out}, input)
    from ._args import normalize_dim

    with _Launch(rt, input) as L:
        x = L.input_array(input, "input")
        d = normalize_dim(dim, x.ndim)
        shape = x.shape if x.ndim else (1,)
        outer = math.prod(shape[:d])
        inner = math.prod(shape[d + 1:])
        y = L.output(x.shape, x.dtype, out, (x,), allow_same=x)
        if y.size:
            L.kernels.softmax(_f64(x), x.ptr, y.ptr, outer, shape[d], inner, bool(log), L.device, L.stream)
        return L.result(y, out)


# --------------------------------------------------------------------------
# Backward ops (the CUDA kernels of csrc/cuda/*backward*)
# --------------------------------------------------------------------------


def _cpu_op(name):
    from . import backward

    return getattr(backward, name)


def _mask(output_mask):
    try:
        m = tuple(bool(v) for v in output_mask)
    except TypeError:
        raise TypeError(f"output_mask: expected a sequence of 3 bools, got {type(output_mask).__name__}") from None
    if len(m) != 3:
        raise ValueError(f"output_mask: expected 3 entries (input, weight, bias), got {len(m)}")
    return m


def _expect_shape(a, shape, name):
    if a.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {a.shape}")


def conv2d_backward(grad_output, input, weight, stride=1, padding=0, dilation=1, groups=1, *,
                    output_mask=(True, True, True)):
    """(grad_input, grad_weight, grad_bias) of conv2d on device arrays; None where output_mask is False."""
    rt = runtime()
    _require_device({"weight": weight, "grad_output": grad_output})
    if rt.kernels is None:
        return on_cpu(rt, _cpu_op("conv2d_backward"), (grad_output, input, weight, stride, padding, dilation, groups),
                      {"output_mask": output_mask}, input)
    mask = _mask(output_mask)
    with _Launch(rt, input) as L:
        go = L.input_array(grad_output, "grad_output")
        x = L.input_array(input, "input")
        w = L.input_array(weight, "weight")
        _check_same_dtype(go, x, "input")
        _check_same_dtype(go, w, "weight")
        return _conv_backward_gpu(L, go, x, w, stride, padding, dilation, groups, mask)


def _conv_backward_gpu(L, go, x, w, stride, padding, dilation, groups, mask):
    F = _F()
    x4, batched, stride, pads, dilation, groups, (P, Q) = F._conv_args(x, w, None, stride, padding, dilation, groups)
    N, K = x4.shape[0], w.shape[0]
    _expect_shape(go, (N, K, P, Q) if batched else (K, P, Q), "grad_output")
    gi = L.output(x.shape, x.dtype) if mask[0] else None
    gw = L.output(w.shape, x.dtype) if mask[1] else None
    gb = L.output((K,), x.dtype) if mask[2] else None
    if any(g is not None and g.size for g in (gi, gw, gb)):
        L.kernels.conv2d_backward(_f64(x), go.ptr, x.ptr, w.ptr, gi.ptr if gi else 0, gw.ptr if gw else 0,
                                  gb.ptr if gb else 0, _conv_tuple(x4.shape, w.shape, groups, stride, pads, dilation),
                                  L.device, L.stream)
    return tuple(None if g is None else L.result(g) for g in (gi, gw, gb))


def conv2d_max_pool2d_backward(grad_output, input, weight, output, indices, stride=1, padding=0, dilation=1,
                               groups=1, *, activation="relu", output_mask=(True, True, True)):
    """Gradients of conv2d_max_pool2d on device arrays: the activation's mask on the pooled
    gradient, the pooling's scatter into a convolution-sized gradient, then conv2d_backward."""
    F = _F()
    rt = runtime()
    _require_device({"grad_output": grad_output, "weight": weight, "output": output, "indices": indices})
    if rt.kernels is None:
        return on_cpu(rt, _cpu_op("conv2d_max_pool2d_backward"),
                      (grad_output, input, weight, output, indices, stride, padding, dilation, groups),
                      {"activation": activation, "output_mask": output_mask}, input)
    mask = _mask(output_mask)
    act = F._activation(activation)
    with _Launch(rt, input) as L:
        go = L.input_array(grad_output, "grad_output")
        x = L.input_array(input, "input")
        w = L.input_array(weight, "weight")
        y = L.input_array(output, "output")
        idx = L.input_array(indices, "indices", (_INT64,))
        for a, name in ((x, "input"), (w, "weight"), (y, "output")):
            _check_same_dtype(go, a, name)
        _expect_shape(y, go.shape, "output")
        _expect_shape(idx, go.shape, "indices")
        if go.ndim not in (3, 4):
            raise ValueError(f"grad_output: expected a 4-D (or 3-D unbatched) array, got shape {go.shape}")
        x4, batched, stride_, pads, dilation_, groups_, (P, Q) = F._conv_args(x, w, None, stride, padding,
                                                                             dilation, groups)
        N, K = x4.shape[0], w.shape[0]
        if go.shape[:-2] != ((N, K) if batched else (K,)):
            raise ValueError(f"grad_output: expected leading dimensions {(N, K) if batched else (K,)}, "
                             f"got shape {go.shape}")
        masked = go
        if act == "relu" and go.size:
            masked = L.output(go.shape, go.dtype)
            L.kernels.relu_backward(_f64(go), go.ptr, y.ptr, masked.ptr, go.size, L.device, L.stream)
        conv_shape = (N, K, P, Q) if batched else (K, P, Q)
        gconv = L.output(conv_shape, go.dtype)
        if gconv.size:
            PQo = go.shape[-1] * go.shape[-2]
            if not PQo:  # a valid pooling has at least one output per plane
                raise ValueError(f"grad_output: empty pooled planes for a {P}x{Q} convolution output")
            L.kernels.max_pool2d_backward(_f64(go), masked.ptr, idx.ptr, gconv.ptr, N * K, P * Q, PQo, L.device,
                                          L.stream)
        return _conv_backward_gpu(L, gconv, x, w, stride, padding, dilation, groups, mask)


def max_pool2d_backward(grad_output, indices, input_shape):
    """grad_input of max_pool2d from its int64 indices (flattened per H*W plane) on device arrays.

    Unlike the CPU, an index outside its plane is skipped, not reported:
    checking would synchronise with the device.
    """
    rt = runtime()
    _require_device({"indices": indices})
    if rt.kernels is None:
        return on_cpu(rt, _cpu_op("max_pool2d_backward"), (grad_output, indices, input_shape), {}, grad_output)
    try:
        shape = tuple(operator.index(s) for s in input_shape)
    except TypeError:
        raise TypeError("input_shape: expected a sequence of ints") from None
    with _Launch(rt, grad_output, "grad_output") as L:
        go = L.input_array(grad_output, "grad_output")
        idx = L.input_array(indices, "indices", (_INT64,))
        if len(shape) != go.ndim or len(shape) not in (3, 4):
            raise ValueError(f"input_shape: expected {go.ndim} dimensions like grad_output "
                             f"(3-D unbatched or 4-D), got {shape}")
        if any(s < 0 for s in shape):
            raise ValueError(f"input_shape: sizes must be non-negative, got {shape}")
        _expect_shape(idx, go.shape, "indices")
        if go.shape[:-2] != shape[:-2]:
            raise ValueError(f"grad_output: leading dimensions {go.shape[:-2]} differ from input_shape's {shape[:-2]}")
        planes = math.prod(shape[:-2])
        gi = L.output(shape, go.dtype)
        if gi.size:
            if go.size:
                L.kernels.max_pool2d_backward(_f64(go), go.ptr, idx.ptr, gi.ptr, planes, shape[-2] * shape[-1],
                                              go.shape[-2] * go.shape[-1], L.device, L.stream)
            else:
                raise ValueError(f"grad_output: empty pooled planes for a non-empty input_shape {shape}")
        return L.result(gi)


def linear_backward(grad_output, input, weight, *, output_mask=(True, True, True)):
    """(grad_input, grad_weight, grad_bias) of linear on device arrays (2-D weight; any leading input dims)."""
    rt = runtime()
    _require_device({"weight": weight, "grad_output": grad_output})
    if rt.kernels is None:
        return on_cpu(rt, _cpu_op("linear_backward"), (grad_output, input, weight), {"output_mask": output_mask},
                      input)
    mask = _mask(output_mask)
    with _Launch(rt, input) as L:
        go = L.input_array(grad_output, "grad_output")
        x = L.input_array(input, "input")
        w = L.input_array(weight, "weight")
        _check_same_dtype(go, x, "input")
        _check_same_dtype(go, w, "weight")
        if w.ndim != 2:
            raise ValueError(f"weight: expected a 2-D array (out_features, in_features), got shape {w.shape}")
        if x.ndim < 1:
            raise ValueError("input: expected at least 1 dimension, got a 0-d array")
        N, K = w.shape
        if x.shape[-1] != K:
            raise ValueError(f"weight: expected {x.shape[-1]} input features to match input's last dimension, "
                             f"got weight of shape {w.shape}")
        _expect_shape(go, x.shape[:-1] + (N,), "grad_output")
        M = math.prod(x.shape[:-1])
        gi = L.output(x.shape, x.dtype) if mask[0] else None
        gw = L.output(w.shape, x.dtype) if mask[1] else None
        gb = L.output((N,), x.dtype) if mask[2] else None
        if any(g is not None and g.size for g in (gi, gw, gb)):
            L.kernels.linear_backward(_f64(x), go.ptr, x.ptr, w.ptr, gi.ptr if gi else 0, gw.ptr if gw else 0,
                                      gb.ptr if gb else 0, M, K, N, L.device, L.stream)
        return tuple(None if g is None else L.result(g) for g in (gi, gw, gb))


def relu_backward(grad_output, output):
    """grad_output where output > 0 (or NaN), else 0, on device arrays."""
    rt = runtime()
    _require_device({"output": output})
    if rt.kernels is None:
        return on_cpu(rt, _cpu_op("relu_backward"), (grad_output, output), {}, grad_output)
    with _Launch(rt, grad_output, "grad_output") as L:
        go = L.input_array(grad_output, "grad_output")
        y = L.input_array(output, "output")
        _check_same_dtype(go, y, "output")
        _expect_shape(y, go.shape, "output")
        gi = L.output(go.shape, go.dtype)
        if gi.size:
            L.kernels.relu_backward(_f64(go), go.ptr, y.ptr, gi.ptr, go.size, L.device, L.stream)
        return L.result(gi)


_REDUCTIONS = ("mean", "sum", "none")


def _ce_args(x, t, reduction, ignore_index):
    """The CPU API's contract: (N, C) logits, (N,) int64 targets. (The kernels also take
    (N, C, d...) and (C,); the CPU library does not, and a program must run on both.)"""
    if x.ndim != 2:
        raise ValueError(f"input: expected a 2-D array (N, C) of logits, got shape {x.shape}")
    _expect_shape(t, x.shape[:1], "target")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}") from None


def cross_entropy(input, target, *, reduction="mean", ignore_index=-100):
    """softmax + cross-entropy of (N, C) logits against int64 class indices, on device arrays.

    Unlike the CPU, a target outside [0, C) that is not ignore_index gives
    NaN instead of an error: checking would synchronise with the device.
    """
    rt = runtime()
    _require_device({"target": target})
    if rt.kernels is None:
        return on_cpu(rt, _cpu_op("cross_entropy"), (input, target),
                      {"reduction": reduction, "ignore_index": ignore_index}, input)
    with _Launch(rt, input) as L:
        x = L.input_array(input, "input")
        t = L.input_array(target, "target", (_INT64,))
        ignore_index = _ce_args(x, t, reduction, ignore_index)
        loss = L.output(t.shape if reduction == "none" else (), x.dtype)
        if loss.size:
            L.kernels.cross_entropy(_f64(x), x.ptr, t.ptr, loss.ptr, x.shape[0], x.shape[1], 1, reduction,
                                    ignore_index, L.device, L.stream)
        return L.result(loss)


def cross_entropy_backward(grad_loss, input, target, *, reduction="mean", ignore_index=-100):
    """grad_input of cross_entropy on device arrays. grad_loss is a device array (read on the
    device: no synchronisation) or a number (copied to the device)."""
    rt = runtime()
    _require_device({"target": target})
    if rt.kernels is None:
        return on_cpu(rt, _cpu_op("cross_entropy_backward"), (grad_loss, input, target),
                      {"reduction": reduction, "ignore_index": ignore_index}, input)
    with _Launch(rt, input) as L:
        x = L.input_array(input, "input")
        t = L.input_array(target, "target", (_INT64,))
        ignore_index = _ce_args(x, t, reduction, ignore_index)
        if not is_device_array(grad_loss):
            if isinstance(grad_loss, np.ndarray) and grad_loss.dtype != x.dtype:
                raise TypeError(f"grad_loss: dtype {grad_loss.dtype} does not match input dtype {x.dtype}")
            try:
                host = np.asarray(grad_loss, dtype=x.dtype)
            except (TypeError, ValueError):
                raise TypeError(f"grad_loss: expected a device array or a number, "
                                f"got {type(grad_loss).__name__}") from None
            grad_loss = L.xp.asarray(host)
            L._keep.append(grad_loss)
        g = L.input_array(grad_loss, "grad_loss")
        _check_same_dtype(x, g, "grad_loss")
        _expect_shape(g, t.shape if reduction == "none" else (), "grad_loss")
        gi = L.output(x.shape, x.dtype)
        if gi.size:
            L.kernels.cross_entropy_backward(_f64(x), g.ptr, x.ptr, t.ptr, gi.ptr, x.shape[0], x.shape[1], 1,
                                             reduction, ignore_index, L.device, L.stream)
        return L.result(gi)


def adam_step(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """One Adam step in place on device arrays (the kernel of csrc/cuda/optim.cu).

    The fallback copies the four arrays to the host, runs the CPU step and
    copies the three updated ones back into the device arrays."""
    rt = runtime()
    _require_device({"grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq})
    named = (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq))
    if rt.kernels is None:
        _need_xp(rt, "param")
        xp = rt.xp
        _warn_fallback(rt.reason)
        hosts = [xp.asnumpy(_as_xp(xp, a)) for _, a in named]
        _core_adam()(*hosts, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        with xp.cuda.Device(_fallback_device(xp, param)):
            for (name, a), h in zip(named, hosts):
                if name != "grad":
                    xp.copyto(_as_xp(xp, a), xp.asarray(h))
        return None
    with _Launch(rt, param, "param") as L:
        arrays = {}
        for name, a in named:
            d = L.read(a, name)
            if name == "grad":
                d = L.contiguous(d, name)
            else:
                if d.readonly:
                    raise ValueError(f"{name}: array is read-only")
                if not d.is_contiguous():
                    raise ValueError(f"{name}: must be C-contiguous (it is updated in place)")
            if name != "param":
                _check_same_dtype(arrays["param"], d, name)
                if d.shape != arrays["param"].shape:
                    raise ValueError(f"{name}: expected shape {arrays['param'].shape} (param's), got {d.shape}")
            arrays[name] = d
        p, g, m, v = arrays["param"], arrays["grad"], arrays["exp_avg"], arrays["exp_avg_sq"]
        updated = [p, m, v]
        for i, a in enumerate(updated):
            lo, hi = a.span()
            for b in updated[i + 1:] + [g]:
                blo, bhi = b.span()
                if hi > lo and bhi > blo and blo < hi and lo < bhi:
                    raise ValueError("param, grad, exp_avg, exp_avg_sq: must not overlap")
        if p.size:
            L.kernels.adam_step(_f64(p), p.ptr, g.ptr, m.ptr, v.ptr, p.size, step, lr, beta1, beta2, eps,
                                weight_decay, L.device, L.stream)
    return None


def _core_adam():
    from .backward import adam_step as cpu

    return cpu


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def describe() -> dict:
    """Which path device arrays take, and why."""
    rt = runtime()
    info = {"path": rt.path}
    if rt.path == "gpu":
        info["why"] = "CUDA kernels on the array's device and current stream"
    else:
        info["why"] = rt.reason
    xp = rt.xp
    info["array_module"] = f"{xp.__name__} {getattr(xp, '__version__', '')}".strip() if xp is not None else "none"
    return info
