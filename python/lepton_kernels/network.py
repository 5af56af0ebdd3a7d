"""Networks: a chain of layers planned once and run as one native call per batch.

    net = lk.Sequential([
        lk.Conv2dMaxPool2d(w1, b1),          # conv + bias + ReLU + 2x2 max-pool
        lk.Flatten(),
        lk.Linear(w2, b2),
        lk.Softmax(dim=1),
    ])
    probs = net(images)                       # one native call
    print(net.describe(images.shape))         # fused stages, threads, arena, predicted time

The first call with a batch size plans the network for it: layers are fused
into stages (convolution + bias + ReLU + max-pool, linear + ReLU, a final
softmax into the last linear), each stage gets a plan from the scheduler,
weights are packed for those plans and one arena is allocated for every
intermediate. Later calls with that batch size run the plan: no Python
between layers, no allocation but the output. Networks run in float32.

An opt-in result cache returns the stored output for an input it has seen
(same bytes, shape and dtype) without computing. Networks pickle (weights and
configuration; plans are rebuilt on first use after loading).
"""

from __future__ import annotations

import hashlib
import math
import operator
import threading
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from . import _core, _device
from ._args import check_array, check_out, normalize_dim
from .functional import _activation, log_softmax, relu, softmax
from .layers import _UKERNELS, Conv2d, Conv2dMaxPool2d, Linear, MaxPool2d

__all__ = ["Sequential", "ReLU", "Flatten", "Softmax", "LogSoftmax", "Dropout", "ResultCacheInfo"]


# --- modules without weights ---------------------------------------------------


class ReLU:
    """``lk.relu`` as a module."""

    def __call__(self, input):
        return relu(input)

    def __repr__(self):
        return "ReLU()"


class Flatten:
    """Flattens dimensions ``start_dim`` to the last into one (``torch.nn.Flatten`` with ``end_dim=-1``)."""

    def __init__(self, start_dim=1):
        self.start_dim = _int(start_dim, "start_dim")

    def __call__(self, input):
        check_array(input, "input")
        d = normalize_dim(self.start_dim, input.ndim, "start_dim")
        return input.reshape(input.shape[:d] + (math.prod(input.shape[d:]),))

    def __repr__(self):
        return f"Flatten(start_dim={self.start_dim})"


class Softmax:
    """``lk.softmax`` along ``dim`` as a module."""

    _log = False

    def __init__(self, dim=1):
        self.dim = _int(dim, "dim")

    def __call__(self, input):
        return (log_softmax if self._log else softmax)(input, self.dim)

    def __repr__(self):
        return f"{type(self).__name__}(dim={self.dim})"


class LogSoftmax(Softmax):
    """``lk.log_softmax`` along ``dim`` as a module."""

    _log = True


class Dropout:
    """Dropout at inference: the identity (the input is returned as it is)."""

    def __init__(self, p=0.5):
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"p: expected a number, got {type(p).__name__}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: dropout probability must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, input):
        return input

    def __repr__(self):
        return f"Dropout(p={self.p})"


def _int(value, name):
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None


# --- layer specs for the core ---------------------------------------------------

_UKERNEL_NAMES = {v: k for k, v in _UKERNELS.items()}


def _float32(a, where, what):
    if a is not None and a.dtype != np.float32:
        raise TypeError(f"{where}: {what} has dtype {a.dtype}; networks run in float32 "
                        f"(build the layer from float32 arrays)")


def _spec(i, m):
    """The core's description of module ``m`` (layer ``i``) and a recipe to rebuild it after unpickling."""
    name = type(m).__name__
    where = f"layer {i} ({name})"
    if isinstance(m, (Conv2d, Conv2dMaxPool2d)):
        _float32(m._weight, where, "weight")
        _float32(m._bias, where, "bias")
        spec = dict(op="conv2d", name=name, weight=m._weight, bias=m._bias,
                    in_channels=m._weight.shape[1] * m._groups, stride=m._stride, padding=m._pads,
                    dilation=m._dilation, groups=m._groups, activation=_activation(m._activation), pool=m._pool,
                    ceil_mode=m._ceil_mode, algorithm=m._algorithm, ukernel=m._ukernel)
        stride, padding, dilation, groups = m._conv
        kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, activation=m._activation,
                      algorithm=m._algorithm, ukernel=_UKERNEL_NAMES[m._ukernel])
        if isinstance(m, Conv2dMaxPool2d):
            k, s, p, d = m._pool
            kwargs.update(kernel_size=k, pool_stride=s, pool_padding=p, pool_dilation=d, ceil_mode=m._ceil_mode)
        return spec, (type(m), (m._weight, m._bias), kwargs)
    if isinstance(m, MaxPool2d):
        k, s, p, d, ceil_mode, return_indices = m._args
        if return_indices:
            raise ValueError(f"{where}: return_indices=True is not supported inside a network")
        return (dict(op="max_pool2d", name=name, pool=(k, s, p, d), ceil_mode=ceil_mode),
                (MaxPool2d, (k, s, p, d, ceil_mode), {}))
    if isinstance(m, Linear):
        _float32(m._weight, where, "weight")
        _float32(m._bias, where, "bias")
        return (dict(op="linear", name=name, weight=m._weight, bias=m._bias, activation=_activation(m._activation)),
                (Linear, (m._weight, m._bias), dict(activation=m._activation)))
    if isinstance(m, ReLU):
        return dict(op="relu", name=name), (ReLU, (), {})
    if isinstance(m, Flatten):
        if m.start_dim < 1:
            raise ValueError(f"{where}: start_dim must be at least 1 inside a network (dimension 0 is the batch), "
                             f"got {m.start_dim}")
        return dict(op="flatten", name=name, start_dim=m.start_dim), (Flatten, (m.start_dim,), {})
    if isinstance(m, Softmax):
        op = "log_softmax" if m._log else "softmax"
        return dict(op=op, name=name, dim=m.dim), (type(m), (m.dim,), {})
    if isinstance(m, Dropout):
        return dict(op="identity", name=name), (Dropout, (m.p,), {})
    raise TypeError(f"{where}: not a layer a network can run (expected Conv2d, Conv2dMaxPool2d, MaxPool2d, Linear, "
                    f"ReLU, Flatten, Softmax, LogSoftmax, Dropout or Sequential)")


# --- the result cache ------------------------------------------------------------


class ResultCacheInfo(NamedTuple):
    hits: int
    misses: int
    bytes: int  # outputs stored, in bytes
    entries: int
    max_bytes: int


class _ResultCache:
    """Outputs by a content hash of the input (BLAKE2b of its bytes, with its shape and dtype), LRU within a byte bound.

    Stored outputs are private read-only copies; a hit returns a fresh copy, so
    callers may change what they get without reaching the cache.
    """

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.hits = self.misses = self.bytes = 0
        self._entries = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(x):
        h = hashlib.blake2b(digest_size=32)
        h.update(x.data if x.flags.c_contiguous else np.ascontiguousarray(x).data)
        return h.digest(), x.shape, x.dtype.str

    def get(self, key):
        with self._lock:
            y = self._entries.get(key)
            if y is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        return y.copy()

    def put(self, key, y):
        if y.nbytes > self.max_bytes:
            return
        y = y.copy()
        y.flags.writeable = False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._entries[key] = y
            self.bytes += y.nbytes
            self._trim()

    def _trim(self):
        while self.bytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes

    def resize(self, max_bytes):
        with self._lock:
            self.max_bytes = max_bytes
            self._trim()

    def clear(self):
        with self._lock:
            self._entries.clear()
            self.bytes = self.hits = self.misses = 0

    def info(self):
        with self._lock:
            return ResultCacheInfo(self.hits, self.misses, self.bytes, len(self._entries), self.max_bytes)


def _max_bytes(value, name):
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int (bytes), got bool")
    v = _int(value, name)
    if v < 0:
        raise ValueError(f"{name}: must be non-negative, got {v}")
    return v


# --- Sequential ----------------------------------------------------------------------


def _expand(layers):
    for m in layers:
        if isinstance(m, Sequential):
            yield from m._modules
        else:
            yield m


class Sequential:
    """A chain of layers run as one native call per batch (see the module's documentation).

    ``layers``: ``lk.Conv2d``, ``lk.Conv2dMaxPool2d``, ``lk.MaxPool2d``, ``lk.Linear``, ``lk.ReLU``,
    ``lk.Flatten``, ``lk.Softmax``, ``lk.LogSoftmax``, ``lk.Dropout`` (or nested ``Sequential``), with
    float32 weights. ``result_cache``: bytes of outputs to memoise by input content (off by default).
    Errors in the chain (a Linear's in_features against the flattened size, a convolution's channels)
    raise ValueError naming the layer's index, when the network is built or on the first call with a
    shape.
    """

    def __init__(self, layers, *, result_cache=None):
        if isinstance(layers, (Conv2d, Conv2dMaxPool2d, MaxPool2d, Linear, ReLU, Flatten, Softmax, Dropout)):
            raise TypeError("layers: expected a list of layers, got a single layer (wrap it in a list)")
        try:
            modules = tuple(_expand(layers))
        except TypeError:
            raise TypeError(f"layers: expected a list of layers, got {type(layers).__name__}") from None
        specs, recipes = [], []
        for i, m in enumerate(modules):
            spec, recipe = _spec(i, m)
            specs.append(spec)
            recipes.append(recipe)
        self._modules = modules
        self._recipes = recipes
        self._net = _core.Network(specs)
        self._strided = self._net.strided_input
        # Input rank of a batch, for accepting unbatched inputs as the ops do.
        first = next((s["op"] for s in specs if s["op"] != "identity"), None)
        self._batched_rank = 4 if first in ("conv2d", "max_pool2d") else 2 if first == "linear" else None
        self._last_shape = None
        self._last_device = None  # the device path of the last call with a device array
        self._cache = None
        if result_cache is not None:
            self.enable_result_cache(result_cache)

    # -- running --

    def __call__(self, input, *, out=None, stream=None):
        net = self._net
        if (out is None and self._cache is None and type(input) is np.ndarray and input.ndim == self._batched_rank
                and (self._strided or input.flags.c_contiguous)):
            self._last_shape = input.shape
            return net(input)  # the fast path: the core checks the rest (dtype included)
        if type(input) is not np.ndarray and _device.is_device_array(input):
            with _device.on_stream(stream):
                return self._on_device(input, out)
        check_array(input, "input")
        if input.dtype != np.float32:
            raise TypeError(f"input: expected dtype float32 (the network's weights), got {input.dtype}")
        batched = not (self._batched_rank is not None and input.ndim == self._batched_rank - 1)
        x = input if batched else input[None]
        if not self._strided and not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        check_out(out, (input,))
        out_b = out
        if out is not None and not batched:
            if not isinstance(out, np.ndarray):
                raise TypeError(f"out: expected a numpy.ndarray, got {type(out).__name__}")
            out_b = out[None]
        self._last_shape = x.shape
        key = None
        if self._cache is not None:
            key = self._cache.key(x)
            y = self._cache.get(key)
            if y is not None:
                if out_b is None:
                    return y if batched else y[0]
                _check_out_shape(out_b, y.shape)
                out_b[...] = y
                return out
        y = net(x, out_b)
        if key is not None:
            self._cache.put(key, y)
        if out is not None:
            return out
        return y if batched else y[0]

    def _on_device(self, input, out):
        """The network on a device array: stage by stage through the device kernels.

        Each layer keeps its weights per device (uploaded on first use there),
        so the network's weights are uploaded once per device. A ReLU right
        after a convolution or linear layer without activation is fused into
        it (the kernels' bias+ReLU epilogue); convolution + max-pool layers run
        the fused conv+bias+ReLU+max-pool kernel; ReLU and softmax after a
        stage run in place on the stage's output. Intermediates come from the
        array module's allocator (CuPy's pool); nothing waits for the device.
        The result cache is bypassed: hashing the input would copy it to the
        host and synchronise.
        """
        rt = _device.runtime()
        if rt.kernels is None:
            y = _device.on_cpu(rt, self, (input,), {"out": out}, input)
            self._last_device = rt.path
            return y
        xp = rt.xp
        _device._require_device({"out": out})
        a = _device._as_xp(xp, input)
        if a.dtype != np.float32:
            raise TypeError(f"input: expected dtype float32 (the network's weights), got {a.dtype}")
        batched = not (self._batched_rank is not None and a.ndim == self._batched_rank - 1)
        x, out_b = (input, out) if batched else (a[None], None if out is None else _device._as_xp(xp, out)[None])
        if batched and a.ndim == self._batched_rank:
            self._last_shape = tuple(a.shape)
        elif not batched:
            self._last_shape = (1,) + tuple(a.shape)
        self._last_device = rt.path
        owned = False  # whether x is an intermediate of this call (then ReLU/softmax may run in place)
        stages = self._device_stages
        for i, (kind, m, act, pool, ceil_mode) in enumerate(stages):
            o = out_b if i == len(stages) - 1 else None
            if kind == "conv":
                x = _device._conv_gpu(rt, x, None, None, m._stride, m._pads, m._dilation, m._groups, act, o,
                                      pool, ceil_mode, params=m._device_params)
            elif kind == "linear":
                x = _device._linear_gpu(rt, x, None, None, act, o, params=m._device_params)
            elif kind == "max_pool2d":
                k, st, p, d, ceil_mode, _ = m._args
                x = _device.max_pool2d(x, k, st, p, d, ceil_mode, False, out=o)
            elif kind == "relu":
                x = _device.relu(x, out=o if o is not None or not owned else x)
            elif kind == "softmax":
                x = _device.softmax(x, m.dim, out=o if o is not None or not owned else x, log=m._log)
            else:  # flatten: a view of the stage output
                x = _device_flatten(rt, x, m.start_dim)
                continue
            owned = True
        if out is not None:
            if not stages or stages[-1][0] == "flatten":
                # No kernel wrote `out` (an empty chain or one ending in Flatten): copy on the device.
                target, src = _device._as_xp(xp, out_b), _device._as_xp(xp, x)
                if tuple(target.shape) != tuple(src.shape):
                    raise ValueError(f"out: expected shape {tuple(src.shape)}, got {tuple(target.shape)}")
                xp.copyto(target, src)
            return out
        if not batched:
            x = _device._as_xp(xp, x)[0]
        if not owned or not batched or stages[-1][0] == "flatten":
            x = _device._as_kind_of(xp, _device._as_xp(xp, x), input)
        return x

    @property
    def _device_stages(self):
        """The device stages: [kind, module, activation, pool, ceil_mode], made on first use.

        A ReLU after a convolution or linear stage becomes its activation
        (for a convolution with pooling too: ReLU commutes with max), and a
        MaxPool2d right after a convolution without pooling joins it as the
        fused kernel's pooling."""
        stages = getattr(self, "_stages", None)
        if stages is None:
            stages = []
            for m in self._modules:
                prev = stages[-1] if stages else None
                if isinstance(m, Dropout):
                    continue
                if isinstance(m, ReLU) and prev is not None and prev[0] in ("conv", "linear"):
                    prev[2] = "relu"
                    continue
                if isinstance(m, MaxPool2d) and prev is not None and prev[0] == "conv" and prev[3] is None \
                        and not m._args[5]:
                    prev[3], prev[4] = m._args[:4], m._args[4]
                    continue
                if isinstance(m, (Conv2d, Conv2dMaxPool2d)):
                    stages.append(["conv", m, m._activation, m._pool, m._ceil_mode])
                elif isinstance(m, Linear):
                    stages.append(["linear", m, m._activation, None, False])
                else:
                    kind = ("max_pool2d" if isinstance(m, MaxPool2d) else "relu" if isinstance(m, ReLU)
                            else "softmax" if isinstance(m, Softmax) else "flatten")
                    stages.append([kind, m, None, None, False])
            self._stages = stages
        return stages

    def output_shape(self, input_shape):
        """The output's shape for a batched input of shape ``input_shape``."""
        return tuple(self._net.output_shape(_shape(input_shape)))

    def describe(self, input=None) -> str:
        """The plan for an input like ``input`` (an array or a batched shape; default: the last call's):
        fused stages and their plans, image tiles and thread split, arena size and predicted time. A device
        array (or a network last run on one) adds the device path: its CUDA kernels or the CPU fallback."""
        device = self._last_device
        if input is not None and not isinstance(input, np.ndarray) and _device.is_device_array(input):
            device = _device.runtime().path
            input = tuple(_device._as_xp(_device.runtime().xp, input).shape)
        if input is None:
            if self._last_shape is None:
                raise ValueError("input: no call yet; give an input or its shape")
            shape = self._last_shape
        else:
            shape = input.shape if isinstance(input, np.ndarray) else _shape(input)
        text = self._net.describe(tuple(shape))
        if device == "gpu":
            text += ("\ndevice path: CUDA kernels, stage by stage (conv+bias+ReLU+max-pool fused, linear+ReLU, "
                     "softmax in place); weights cached per device; result cache bypassed")
        elif device == "cpu-fallback":
            text += "\ndevice path: CPU fallback (device input copied to the host, this plan, output copied back)"
        return text

    def arena_bytes(self, input_shape) -> int:
        """Bytes of the arena the plan for ``input_shape`` holds its intermediates in."""
        return self._net.arena_bytes(_shape(input_shape))

    @property
    def plans_made(self) -> int:
        """Plans this network has made (one per batch size and thread/ISA/scheduler setting)."""
        return self._net.plans_made

    # -- result cache --

    def enable_result_cache(self, max_bytes):
        """Memoise outputs by input content, keeping at most ``max_bytes`` of them (least recently used go first)."""
        max_bytes = _max_bytes(max_bytes, "max_bytes")
        if self._cache is None:
            self._cache = _ResultCache(max_bytes)
        else:
            self._cache.resize(max_bytes)

    def disable_result_cache(self):
        self._cache = None

    def result_cache_info(self) -> ResultCacheInfo:
        """hits, misses, bytes stored, entries and the bound (all zero when the cache is off)."""
        if self._cache is None:
            return ResultCacheInfo(0, 0, 0, 0, 0)
        return self._cache.info()

    def result_cache_clear(self):
        """Drop every stored output and reset the counters."""
        if self._cache is not None:
            self._cache.clear()

    # -- the container --

    @property
    def layers(self):
        return self._modules

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return self._modules[i]

    def __iter__(self):
        return iter(self._modules)

    def __repr__(self):
        inner = "".join(f"\n  ({i}): {m!r}" for i, m in enumerate(self._modules))
        return f"Sequential({inner}\n)"

    # -- pickling: weights and configuration; plans are rebuilt --

    def __reduce__(self):
        cache = None if self._cache is None else self._cache.max_bytes
        return _rebuild, (tuple(self._recipes), cache)


def _device_flatten(rt, x, start_dim):
    xp = rt.xp
    a = _device._as_xp(xp, x)
    d = normalize_dim(start_dim, a.ndim, "start_dim")
    return a.reshape(tuple(a.shape[:d]) + (math.prod(a.shape[d:]),))


def _rebuild(recipes, result_cache):
    return Sequential([cls(*args, **kwargs) for cls, args, kwargs in recipes], result_cache=result_cache)


def _shape(shape):
    try:
        return tuple(_int(s, "input_shape") for s in shape)
    except TypeError:
        raise TypeError(f"input_shape: expected a sequence of ints, got {type(shape).__name__}") from None


def _check_out_shape(out, shape):
    if out.dtype != np.float32:
        raise TypeError(f"out: expected dtype float32, got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"out: expected shape {shape}, got {out.shape}")

