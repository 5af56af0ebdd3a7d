"""The reference workloads (WORKLOADS.md) as data, and how each one runs.

A workload is a chain of layers applied to one input: a name, a group, the
input shape and the layers. ``Workload.build`` makes the random input and
parameters once; every implementation then turns that shared ``Instance``
into a zero-argument callable (``LEPTON.prepare``, the peers in ``peers.py``)
and ``reference`` computes the float64 result the others are checked against.

Most rows are a single layer. A row with several layers is run by lepton as
one call per layer, which is the unfused baseline of a fusion workload; a
fused row is a new ``Workload`` whose chain lepton maps to a fused entry point
in ``LeptonImpl.prepare`` (the peers keep running their best sequence).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ContextManager, Dict, Optional, Tuple

import numpy as np

import lepton_kernels as lk

__all__ = [
    "Conv2d",
    "MaxPool2d",
    "Linear",
    "Softmax",
    "Workload",
    "Instance",
    "Prepared",
    "chain",
    "LeptonImpl",
    "LEPTON",
    "WORKLOADS",
    "select",
    "reference",
    "tolerance",
    "compare",
]

Shape = Tuple[int, ...]


def _uniform(rng, shape, bound):
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


# --- layers -----------------------------------------------------------------
# Each layer knows its output shape, its work and the length of the sums it
# computes (which scales the tolerance). Parameters are drawn like torch's
# default initialisation, so outputs stay O(1) whatever the fan-in.


@dataclass(frozen=True)
class Conv2d:
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    bias: bool = True
    relu: bool = False

    def out_shape(self, shape: Shape) -> Shape:
        n, _, h, w = shape
        p = (h + 2 * self.padding - self.kernel) // self.stride + 1
        q = (w + 2 * self.padding - self.kernel) // self.stride + 1
        return (n, self.out_channels, p, q)

    def reduction(self, shape: Shape) -> int:
        return shape[1] // self.groups * self.kernel * self.kernel

    def flops(self, shape: Shape) -> int:
        n, k, p, q = self.out_shape(shape)
        return 2 * n * k * self.reduction(shape) * p * q

    def make_params(self, shape: Shape, rng) -> Dict[str, Optional[np.ndarray]]:
        fan_in = self.reduction(shape)
        bound = 1.0 / math.sqrt(fan_in)
        weight = _uniform(rng, (self.out_channels, shape[1] // self.groups, self.kernel, self.kernel), bound)
        bias = _uniform(rng, (self.out_channels,), bound) if self.bias else None
        return {"weight": weight, "bias": bias}

    def describe(self, shape: Shape) -> str:
        s = f"conv {shape[1]}->{self.out_channels} {self.kernel}x{self.kernel}"
        if self.stride != 1:
            s += f" s{self.stride}"
        if self.padding:
            s += f" p{self.padding}"
        if self.groups != 1:
            s += f" g{self.groups}"
        return s + ("+b" if self.bias else "") + ("+relu" if self.relu else "")


@dataclass(frozen=True)
class MaxPool2d:
    kernel: int
    stride: Optional[int] = None
    padding: int = 0

    @property
    def step(self) -> int:
        return self.kernel if self.stride is None else self.stride

    def out_shape(self, shape: Shape) -> Shape:
        n, c, h, w = shape
        p = (h + 2 * self.padding - self.kernel) // self.step + 1
        q = (w + 2 * self.padding - self.kernel) // self.step + 1
        return (n, c, p, q)

    def reduction(self, shape: Shape) -> int:
        return 0  # a maximum is exact: no rounding error to allow for

    def flops(self, shape: Shape) -> int:
        # Comparisons, not floating-point arithmetic: rows made only of pools
        # report Gop/s (see Workload.unit).
        n, c, p, q = self.out_shape(shape)
        return n * c * p * q * self.kernel * self.kernel

    def make_params(self, shape: Shape, rng) -> Dict[str, Optional[np.ndarray]]:
        return {}

    def describe(self, shape: Shape) -> str:
        s = f"maxpool {self.kernel}x{self.kernel}"
        if self.step != self.kernel:
            s += f" s{self.step}"
        if self.padding:
            s += f" p{self.padding}"
        return s


@dataclass(frozen=True)
class Linear:
    """A dense layer; an input with more than two dimensions is flattened first."""

    out_features: int
    bias: bool = True
    relu: bool = False

    @staticmethod
    def in_features(shape: Shape) -> int:
        return math.prod(shape[1:])

    def out_shape(self, shape: Shape) -> Shape:
        return (shape[0], self.out_features)

    def reduction(self, shape: Shape) -> int:
        return self.in_features(shape)

    def flops(self, shape: Shape) -> int:
        return 2 * shape[0] * self.in_features(shape) * self.out_features

    def make_params(self, shape: Shape, rng) -> Dict[str, Optional[np.ndarray]]:
        fan_in = self.in_features(shape)
        bound = 1.0 / math.sqrt(fan_in)
        weight = _uniform(rng, (self.out_features, fan_in), bound)
        bias = _uniform(rng, (self.out_features,), bound) if self.bias else None
        return {"weight": weight, "bias": bias}

    def describe(self, shape: Shape) -> str:
        s = f"dense {self.in_features(shape)}->{self.out_features}"
        return s + ("+b" if self.bias else "") + ("+relu" if self.relu else "")


@dataclass(frozen=True)
class Softmax:
    """Softmax over dimension 1 of a (batch, features) input."""

    def out_shape(self, shape: Shape) -> Shape:
        return shape

    def reduction(self, shape: Shape) -> int:
        return 0  # exp, sum and divide: a few roundings per element, well inside the chain's tolerance

    def flops(self, shape: Shape) -> int:
        return 4 * math.prod(shape)

    def make_params(self, shape: Shape, rng) -> Dict[str, Optional[np.ndarray]]:
        return {}

    def describe(self, shape: Shape) -> str:
        return "softmax"


Layer = Any  # Conv2d | MaxPool2d | Linear | Softmax


# --- workloads --------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    group: str
    input_shape: Shape
    layers: Tuple[Layer, ...]
    # Large rows: the test suite runs them once, or for few rounds when timing.
    heavy: bool = False
    # lepton runs the chain as one fused call (conv -> ReLU -> max-pool);
    # peers run their own best sequence of the same ops.
    fused: bool = False
    # lepton runs the whole chain as one lk.Sequential (one native call per batch).
    network: bool = False

    def shapes(self):
        """(input shape, layer) for each layer of the chain, then the output shape."""
        shape = self.input_shape
        pairs = []
        for layer in self.layers:
            pairs.append((shape, layer))
            shape = layer.out_shape(shape)
        return pairs, shape

    @property
    def output_shape(self) -> Shape:
        return self.shapes()[1]

    @property
    def flops(self) -> int:
        return sum(layer.flops(shape) for shape, layer in self.shapes()[0])

    @property
    def reduction(self) -> int:
        """Summed length of the chain's reductions; scales the tolerance."""
        return sum(layer.reduction(shape) for shape, layer in self.shapes()[0])

    @property
    def unit(self) -> str:
        if all(isinstance(layer, MaxPool2d) for layer in self.layers):
            return "Gop/s"
        return "GFLOP/s"

    def describe(self) -> str:
        steps = " > ".join(layer.describe(shape) for shape, layer in self.shapes()[0])
        return f"{'x'.join(map(str, self.input_shape))}: {steps}"

    def build(self, seed: Optional[int] = None) -> "Instance":
        """The input and parameters, random and float32, made once for every implementation."""
        if seed is None:
            seed = zlib.crc32(self.name.encode())  # stable per row, independent of the table's order
        rng = np.random.default_rng(seed)
        x = _uniform(rng, self.input_shape, 1.0)
        params = tuple(layer.make_params(shape, rng) for shape, layer in self.shapes()[0])
        return Instance(self, x, params)


@dataclass
class Instance:
    workload: Workload
    x: np.ndarray
    params: Tuple[Dict[str, Optional[np.ndarray]], ...]

    def steps(self):
        """(layer, its input shape, its parameters) along the chain."""
        pairs, _ = self.workload.shapes()
        return [(layer, shape, params) for (shape, layer), params in zip(pairs, self.params)]


@dataclass
class Prepared:
    """One implementation bound to one instance.

    ``run`` is what gets timed; ``to_numpy`` turns its result into an array
    for checking, outside the timed region; ``context`` is entered around each
    timed loop (not each call) for settings such as torch's inference mode.
    """

    run: Callable[[], Any]
    to_numpy: Callable[[Any], np.ndarray] = np.asarray
    context: Callable[[], ContextManager] = contextlib.nullcontext


def chain(first, rest):
    """A zero-argument callable running ``first()`` then each of ``rest`` on the result."""
    if not rest:
        return first

    def run():
        y = first()
        for step in rest:
            y = step(y)
        return y

    return run


class LeptonImpl:
    """lepton-kernels itself: one layer object per op (weights packed once, as
    ONNX Runtime packs them when its session is made), fresh outputs."""

    name = "lepton"

    @property
    def version(self) -> str:
        return lk.__version__

    def set_threads(self, n: int) -> None:
        lk.set_num_threads(n)

    @staticmethod
    def _step(layer, shape, p):
        if isinstance(layer, Conv2d):
            return lk.Conv2d(p["weight"], p["bias"], stride=layer.stride, padding=layer.padding, groups=layer.groups,
                             activation="relu" if layer.relu else None)
        if isinstance(layer, MaxPool2d):
            return lk.MaxPool2d(layer.kernel, stride=layer.step, padding=layer.padding)
        if isinstance(layer, Linear):
            linear = lk.Linear(p["weight"], p["bias"], activation="relu" if layer.relu else None)
            if len(shape) == 2:
                return linear
            return lambda x: linear(x.reshape(x.shape[0], -1))
        if isinstance(layer, Softmax):
            return partial(lk.softmax, dim=1)
        raise TypeError(f"lepton: no implementation for {type(layer).__name__}")

    @staticmethod
    def _network(inst: Instance):
        """The chain as one lk.Sequential: planned on its first call, then one native call per batch."""
        modules = []
        for layer, shape, p in inst.steps():
            if isinstance(layer, Conv2d):
                modules.append(lk.Conv2d(p["weight"], p["bias"], stride=layer.stride, padding=layer.padding,
                                         groups=layer.groups, activation="relu" if layer.relu else None))
            elif isinstance(layer, MaxPool2d):
                modules.append(lk.MaxPool2d(layer.kernel, stride=layer.step, padding=layer.padding))
            elif isinstance(layer, Linear):
                if len(shape) != 2:
                    modules.append(lk.Flatten())
                modules.append(lk.Linear(p["weight"], p["bias"], activation="relu" if layer.relu else None))
            elif isinstance(layer, Softmax):
                modules.append(lk.Softmax(dim=1))
            else:
                raise TypeError(f"lepton: no network layer for {type(layer).__name__}")
        return lk.Sequential(modules)

    def prepare(self, inst: Instance) -> Prepared:
        if inst.workload.network:
            return Prepared(partial(self._network(inst), inst.x))
        if inst.workload.fused:
            (conv, _, p), (pool, _, _) = inst.steps()
            fused = lk.Conv2dMaxPool2d(p["weight"], p["bias"], stride=conv.stride, padding=conv.padding,
                                       groups=conv.groups, activation="relu" if conv.relu else None,
                                       kernel_size=pool.kernel, pool_stride=pool.step, pool_padding=pool.padding)
            return Prepared(partial(fused, inst.x))
        return self._unfused(inst)

    def _unfused(self, inst: Instance) -> Prepared:
        """One call per op of the chain."""
        steps = [self._step(layer, shape, p) for layer, shape, p in inst.steps()]
        return Prepared(chain(partial(steps[0], inst.x), steps[1:]))


LEPTON = LeptonImpl()


class LeptonUnfusedImpl(LeptonImpl):
    """Our own unfused sequence of a fused row (one call per op), timed in the fused row's loops: the
    baseline of the fusion target, measured side by side with the fused call it is compared with."""

    name = "unfused"

    def applies(self, workload) -> bool:
        return workload.fused

    def prepare(self, inst: Instance) -> Prepared:
        return self._unfused(inst)


LEPTON_UNFUSED = LeptonUnfusedImpl()
OURS = (LEPTON.name, LEPTON_UNFUSED.name)  # result names that are not peers


# --- float64 reference -------------------------------------------------------


def _ref_conv(x, layer: Conv2d, weight, bias):
    n, c, h, w = x.shape
    k, cg, r_, s_ = weight.shape
    _, _, p, q = layer.out_shape(x.shape)
    st, pad, g = layer.stride, layer.padding, layer.groups
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((n, k, p, q))
    kg = k // g
    # One matrix product per filter tap keeps the temporaries at the size of
    # the input instead of an im2col matrix R*S times larger.
    for gi in range(g):
        xs = xp[:, gi * cg:(gi + 1) * cg]
        ws = weight[gi * kg:(gi + 1) * kg]
        acc = np.zeros((n, p, q, kg))
        for r in range(r_):
            for s in range(s_):
                patch = xs[:, :, r:r + st * (p - 1) + 1:st, s:s + st * (q - 1) + 1:st]
                acc += np.tensordot(patch, ws[:, :, r, s], axes=([1], [1]))
        out[:, gi * kg:(gi + 1) * kg] = acc.transpose(0, 3, 1, 2)
    if bias is not None:
        out += bias[:, None, None]
    return out


def _ref_max_pool(x, layer: MaxPool2d):
    n, c, p, q = layer.out_shape(x.shape)
    pad, st = layer.padding, layer.step
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    out = np.full((n, c, p, q), -np.inf)
    for r in range(layer.kernel):
        for s in range(layer.kernel):
            np.maximum(out, xp[:, :, r:r + st * (p - 1) + 1:st, s:s + st * (q - 1) + 1:st], out=out)
    return out


def reference(inst: Instance) -> np.ndarray:
    """The workload's output computed in float64 with plain NumPy."""
    y = inst.x.astype(np.float64)
    for layer, _, p in inst.steps():
        p = {k: (None if v is None else v.astype(np.float64)) for k, v in p.items()}
        if isinstance(layer, Conv2d):
            y = _ref_conv(y, layer, p["weight"], p["bias"])
        elif isinstance(layer, MaxPool2d):
            y = _ref_max_pool(y, layer)
        elif isinstance(layer, Linear):
            y = y.reshape(y.shape[0], -1) @ p["weight"].T
            if p["bias"] is not None:
                y += p["bias"]
        elif isinstance(layer, Softmax):
            e = np.exp(y - y.max(axis=1, keepdims=True))
            y = e / e.sum(axis=1, keepdims=True)
        else:
            raise TypeError(f"reference: no implementation for {type(layer).__name__}")
        if getattr(layer, "relu", False):
            np.maximum(y, 0.0, out=y)
    return y


def tolerance(workload: Workload) -> float:
    """Relative error allowed for a float32 result against the exact one.

    Rounding errors of a float32 sum of L terms grow like sqrt(L) (the
    kernels' max errors measure 1-2 eps*sqrt(L) here); the factor 8 leaves
    margin while a single missing or repeated term still fails. Pool-only
    rows are exact.
    """
    return 8 * float(np.finfo(np.float32).eps) * math.sqrt(workload.reduction)


def compare(actual: np.ndarray, expected: np.ndarray, tol: float) -> Tuple[bool, float]:
    """Whether ``actual`` matches ``expected`` within ``tol``, and the error relative to the output's RMS.

    Errors scale with the magnitude of the summed terms rather than with each
    output, so the absolute part of the tolerance is ``tol`` times the RMS of
    ``expected``.
    """
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        return False, math.inf
    scale = float(np.sqrt(np.mean(np.square(expected, dtype=np.float64)))) or 1.0
    diff = np.abs(actual.astype(np.float64) - expected)
    err = float(diff.max(initial=0.0)) / scale
    ok = bool(np.allclose(actual, expected, rtol=tol, atol=tol * scale, equal_nan=False))
    return ok, err


# --- the table ----------------------------------------------------------------


def _mnist(batch):
    x = (batch, 1, 28, 28)
    conv = Conv2d(32, 3, bias=True, relu=True)
    heavy = batch >= 256
    return [
        Workload(f"mnist-conv-b{batch}", "mnist", x, (conv,), heavy),
        Workload(f"mnist-pool-b{batch}", "mnist", (batch, 32, 26, 26), (MaxPool2d(2),), heavy),
        Workload(f"mnist-dense-b{batch}", "mnist", (batch, 32 * 13 * 13), (Linear(10),), heavy),
    ]


def _cifar(batch):
    return [
        Workload(f"cifar-conv1-b{batch}", "cifar", (batch, 3, 32, 32), (Conv2d(32, 3, padding=1, relu=True),)),
        Workload(f"cifar-pool1-b{batch}", "cifar", (batch, 32, 32, 32), (MaxPool2d(2),)),
        Workload(f"cifar-conv2-b{batch}", "cifar", (batch, 32, 16, 16), (Conv2d(64, 3, padding=1, relu=True),)),
        Workload(f"cifar-pool2-b{batch}", "cifar", (batch, 64, 16, 16), (MaxPool2d(2),)),
        Workload(f"cifar-fc1-b{batch}", "cifar", (batch, 4096), (Linear(128, relu=True),)),
        Workload(f"cifar-fc2-b{batch}", "cifar", (batch, 128), (Linear(10),)),
    ]


def _r18():
    # ResNet convolutions carry no bias (batch norm follows them); the fc does.
    def conv(c, k, size, kernel=3, stride=1, padding=1, batch=1):
        return (batch, c, size, size), (Conv2d(k, kernel, stride, padding, bias=False),)

    rows = [
        ("r18-stem", *conv(3, 64, 224, kernel=7, stride=2, padding=3)),
        ("r18-pool", (1, 64, 112, 112), (MaxPool2d(3, 2, 1),)),
        ("r18-c2", *conv(64, 64, 56)),
        ("r18-c2-b32", *conv(64, 64, 56, batch=32)),
        ("r18-c3", *conv(128, 128, 28)),
        ("r18-c4", *conv(256, 256, 14)),
        ("r18-c5", *conv(512, 512, 7)),
        ("r18-down", *conv(64, 128, 56, kernel=1, stride=2, padding=0)),
        ("r18-fc", (1, 512), (Linear(1000),)),
    ]
    return [Workload(name, "r18", shape, layers, heavy=True) for name, shape, layers in rows]


def _fusion():
    # Each fusion chain twice: fused (one lepton call) and unfused (one call
    # per op), the baseline the fused pass is measured against.
    mnist = (Conv2d(32, 3, relu=True), MaxPool2d(2))
    c2 = (Conv2d(64, 3, padding=1, relu=True), MaxPool2d(2))
    rows = [("fuse-mnist-b256", (256, 1, 28, 28), mnist), ("fuse-c2-b1", (1, 64, 56, 56), c2),
            ("fuse-c2-b32", (32, 64, 56, 56), c2)]
    return [Workload(name + suffix, "fuse", shape, layers, heavy=True, fused=fused)
            for name, shape, layers in rows for suffix, fused in (("", True), ("/unfused", False))]


def _networks():
    # Whole networks (WORKLOADS.md's seed and small networks): lepton runs each
    # as one lk.Sequential call per batch, the peers as their own graph or ops.
    mnist = (Conv2d(32, 3, relu=True), MaxPool2d(2), Linear(10), Softmax())
    cifar = (Conv2d(32, 3, padding=1, relu=True), MaxPool2d(2), Conv2d(64, 3, padding=1, relu=True), MaxPool2d(2),
             Linear(128, relu=True), Linear(10))
    rows = [(f"lepton-mnist-b{b}", (b, 1, 28, 28), mnist, b >= 256) for b in (1, 16, 256)]
    rows += [(f"lepton-cifar-b{b}", (b, 3, 32, 32), cifar, b >= 64) for b in (1, 64)]
    return [Workload(name, "net", shape, layers, heavy=heavy, network=True) for name, shape, layers, heavy in rows]


WORKLOADS: Tuple[Workload, ...] = tuple(
    [w for b in (1, 16, 256) for w in _mnist(b)]
    + [w for b in (1, 64) for w in _cifar(b)]
    + _r18()
    + _fusion()
    + _networks()
)

assert len({w.name for w in WORKLOADS}) == len(WORKLOADS), "workload names must be unique"


def select(substr: Optional[str] = None) -> Tuple[Workload, ...]:
    """The workloads whose name contains ``substr`` (all of them for None or "")."""
    return tuple(w for w in WORKLOADS if not substr or substr in w.name)
