"""Operators of the model graph: ONNX semantics (latest opset) on NumPy arrays.

Each operator is a *builder*: ``build(attrs, consts) -> run``, where
``consts`` holds, per input, the constant array when that input is a
constant of the model (weights) or None when it arrives at run time, and
``run(*inputs)`` returns a tuple of outputs. Builders do their expensive work
once: convolution and linear layers pack their weights into lepton layers
when the weights are constants.

Convolution, max-pooling, Gemm/MatMul/linear, ReLU and (log-)softmax on
float32/float64 run through lepton's kernels; everything else (the shape
arithmetic of exported graphs, average pooling, element-wise ops) is NumPy.
The same builders evaluate constant subgraphs when a model is loaded.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _core
from ..functional import linear as _lk_linear
from ..functional import log_softmax as _lk_log_softmax
from ..functional import relu as _lk_relu
from ..functional import softmax as _lk_softmax

FAST = (np.dtype(np.float32), np.dtype(np.float64))

OPS = {}


class OpError(ValueError):
    """An operator's attributes or inputs are outside what it supports."""


def op(*names):
    def register(fn):
        for n in names:
            OPS[n] = fn
        return fn
    return register


def _compute_dtype(dtype):
    """The dtype lepton's kernels run an op of `dtype` in (float16/bfloat16 widen to float32), or None."""
    dtype = np.dtype(dtype)
    if dtype in FAST:
        return dtype
    if dtype.kind == "f":
        return np.dtype(np.float32)
    return None


def _ints(v, n=None, default=None):
    if v is None:
        return None if default is None else [default] * n
    return [int(a) for a in v]


# --------------------------------------------------------------------------- pooling and convolution geometry

def same_pads(size, kernel, stride, dilation, mode):
    """auto_pad SAME_UPPER / SAME_LOWER: (begin, end) padding so that the output is ceil(size / stride)."""
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size)
    small = total // 2
    return (small, total - small) if mode == "SAME_UPPER" else (total - small, small)


def spatial_pads(attrs, sizes, kernel, strides, dilations):
    """Per spatial dim (begin, end) pads from ``pads`` / ``auto_pad`` for an input of spatial `sizes`."""
    nd = len(sizes)
    auto = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return [same_pads(sizes[i], kernel[i], strides[i], dilations[i], auto) for i in range(nd)]
    if auto == "VALID":
        return [(0, 0)] * nd
    if auto not in ("NOTSET", ""):
        raise OpError(f"auto_pad: unknown value {auto!r}")
    pads = _ints(attrs.get("pads"), 2 * nd, 0)
    if len(pads) != 2 * nd:
        raise OpError(f"pads: expected {2 * nd} values, got {len(pads)}")
    if min(pads) < 0:
        raise OpError(f"pads: negative padding {pads} is not supported")
    return [(pads[i], pads[i + nd]) for i in range(nd)]


def pool_out_size(size, kernel, stride, dilation, begin, end, ceil_mode):
    """Output length of a pooling window sweep; with ceil_mode the last window must start inside the
    input or the leading padding (the rule of torch and of ONNX Runtime)."""
    num = size + begin + end - dilation * (kernel - 1) - 1
    if num < 0:
        raise OpError(f"the input of spatial size {size} (padded {size + begin + end}) is smaller than the "
                      f"window {dilation * (kernel - 1) + 1}")
    o = (-(-num // stride) if ceil_mode else num // stride) + 1
    if ceil_mode and (o - 1) * stride >= size + begin:
        o -= 1
    return o


def _is_auto(attrs):
    auto = attrs.get("auto_pad", "NOTSET")
    return auto in ("SAME_UPPER", "SAME_LOWER", b"SAME_UPPER", b"SAME_LOWER")


def np_pool(x, kind, kernel, strides, dilations, pads, ceil_mode, count_include_pad=False, outs=None):
    """N-d max / average pooling in NumPy over x (N, C, *spatial); `pads` is a list of (begin, end)."""
    nd = len(kernel)
    sizes = x.shape[2:]
    if outs is None:
        outs = [pool_out_size(sizes[i], kernel[i], strides[i], dilations[i], *pads[i], ceil_mode)
                for i in range(nd)]
    ext = [(outs[i] - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 for i in range(nd)]
    if kind == "max":
        fill = -np.inf if x.dtype.kind == "f" else (np.iinfo(x.dtype).min if x.dtype.kind in "iu" else False)
        xp = np.full(x.shape[:2] + tuple(ext), fill, x.dtype)
    else:
        acc = np.float64 if x.dtype == np.float64 else np.float32
        xp = np.zeros(x.shape[:2] + tuple(ext), acc)
        mask = np.zeros(tuple(ext), acc)
    src, dst, msk = [slice(None)] * 2, [slice(None)] * 2, []
    for i in range(nd):
        b = pads[i][0]
        n = max(0, min(sizes[i], ext[i] - b))
        src.append(slice(0, n))
        dst.append(slice(b, b + n))
    xp[tuple(dst)] = x[tuple(src)]
    if kind != "max":
        if count_include_pad:
            # The explicit padding counts; the extra tail that ceil_mode adds does not.
            msk = tuple(slice(0, min(ext[i], sizes[i] + pads[i][0] + pads[i][1])) for i in range(nd))
        else:
            msk = tuple(dst[2:])
        mask[msk] = 1
    win = tuple(dilations[i] * (kernel[i] - 1) + 1 for i in range(nd))
    axes = tuple(range(2, 2 + nd))

    def windows(a, lead):
        v = np.lib.stride_tricks.sliding_window_view(a, win, axis=tuple(range(lead, lead + nd)))
        sel = (slice(None),) * lead + tuple(slice(None, None, strides[i]) for i in range(nd))
        sel += tuple(slice(None, None, dilations[i]) for i in range(nd))
        return v[sel]

    w = windows(xp, 2)
    red = tuple(range(2 + nd, 2 + 2 * nd))
    if kind == "max":
        return w.max(axis=red)
    s = w.sum(axis=red)
    cnt = windows(mask, 0).sum(axis=tuple(range(nd, 2 * nd)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (s / cnt).astype(x.dtype, copy=False)


# --------------------------------------------------------------------------- Conv

class _ConvKernel:
    """A 1-D or 2-D convolution (optionally + ReLU + fused max-pool) through lepton's conv layers.

    Layers are made per (dtype, padding) on first use: padding changes with the input size only under
    auto_pad=SAME_*. 1-D convolutions run as 2-D ones over a height of 1.
    """

    def __init__(self, attrs, w, b):
        self.attrs = attrs
        self.nd = w.ndim - 2
        if self.nd not in (1, 2):
            raise OpError(f"Conv: {self.nd}-D convolution is not supported (1-D and 2-D are)")
        self.w, self.b = w, b
        nd = self.nd
        self.kernel = list(w.shape[2:])
        ks = attrs.get("kernel_shape")
        if ks is not None and list(ks) != self.kernel:
            raise OpError(f"Conv: kernel_shape {list(ks)} does not match the weight's {self.kernel}")
        self.strides = _ints(attrs.get("strides"), nd, 1)
        self.dilations = _ints(attrs.get("dilations"), nd, 1)
        self.group = int(attrs.get("group", 1))
        self.activation = attrs.get("activation") or "none"
        self.pool = attrs.get("pool")
        self.layers = {}
        # Padding fixed by the attributes (not auto_pad=SAME_*): the float32 layer is made once, here.
        self.fast = None
        if self.nd == 2 and not _is_auto(attrs):
            self.fast = self.layer(np.dtype(np.float32), self._pads([0, 0]))

    def _pads(self, sizes):
        return spatial_pads(self.attrs, sizes, self.kernel, self.strides, self.dilations)

    def layer(self, dtype, pads):
        key = (dtype, tuple(pads))
        layer = self.layers.get(key)
        if layer is None:
            w = np.ascontiguousarray(self.w, dtype)
            b = None if self.b is None else np.ascontiguousarray(self.b.reshape(-1), dtype)
            if self.nd == 1:
                w = w[:, :, None, :]
            two = (lambda v: (1, v[0])) if self.nd == 1 else tuple
            p = [(0, 0)] + list(pads) if self.nd == 1 else list(pads)
            pool = None
            if self.pool is not None:
                pl = self.pool
                pool = (two(pl["kernel_shape"]), two(pl["strides"]), two(pl["pads"]), two(pl["dilations"]))
            if len(self.layers) > 16:
                self.layers.clear()
            layer = self.layers[key] = _core.Conv2dLayer(
                w, b, w.shape[1] * self.group, two(self.strides), (p[0][0], p[0][1], p[1][0], p[1][1]),
                two(self.dilations), self.group, self.activation, pool,
                bool(self.pool and self.pool.get("ceil_mode")), "auto", -1)
        return layer

    def __call__(self, x, *_):
        if self.fast is not None and x.dtype == np.float32 and x.ndim == 4:
            return (self.fast(x),)
        if x.ndim != self.nd + 2:
            raise OpError(f"Conv: expected a {self.nd + 2}-D input for a {self.nd}-D convolution, got shape "
                          f"{x.shape}")
        cd = _compute_dtype(x.dtype)
        if cd is None:
            raise OpError(f"Conv: unsupported input dtype {x.dtype}")
        xc = x.astype(cd, copy=False)
        if self.nd == 1:
            xc = xc[:, :, None, :]
        y = self.layer(cd, self._pads(x.shape[2:]))(xc)
        if self.nd == 1:
            y = y[:, :, 0, :]
        return (y.astype(x.dtype, copy=False),)


@op("Conv")
def build_conv(attrs, consts):
    w = consts[1]
    has_b = len(consts) > 2
    b = consts[2] if has_b else None
    if w is not None and (not has_b or b is not None):
        return _ConvKernel(attrs, w, b)

    def run(x, w, b=None):
        return _ConvKernel(attrs, w, b)(x)
    return run


# --------------------------------------------------------------------------- pooling

def _pool_geometry(attrs, x):
    nd = x.ndim - 2
    kernel = _ints(attrs["kernel_shape"])
    if len(kernel) != nd:
        raise OpError(f"kernel_shape: {len(kernel)} values for an input with {nd} spatial dimensions")
    strides = _ints(attrs.get("strides"), nd, 1)
    dilations = _ints(attrs.get("dilations"), nd, 1)
    pads = spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
    return nd, kernel, strides, dilations, pads


def _onnx_indices(idx, shape, storage_order):
    """lepton's per-plane argmax indices (row-major H*W) as ONNX's flat indices over the whole tensor."""
    N, C, H, W = shape
    base = (np.arange(N * C, dtype=np.int64) * (H * W)).reshape(N, C, 1, 1)
    if storage_order:
        h, w = idx // W, idx % W
        idx = w * H + h
    return idx + base


@op("MaxPool")
def build_max_pool(attrs, consts):
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    storage_order = int(attrs.get("storage_order", 0))

    def run(x):
        nd, kernel, strides, dilations, pads = _pool_geometry(attrs, x)
        outs = [pool_out_size(x.shape[2 + i], kernel[i], strides[i], dilations[i], *pads[i], ceil_mode)
                for i in range(nd)]
        cd = _compute_dtype(x.dtype)
        if nd in (1, 2) and cd is not None:
            xc = x.astype(cd, copy=False)
            if nd == 1:
                xc = xc[:, :, None, :]
                kernel2, strides2, dil2, pads2, outs2 = [1] + kernel, [1] + strides, [1] + dilations, \
                    [(0, 0)] + pads, [1] + outs
            else:
                kernel2, strides2, dil2, pads2, outs2 = kernel, strides, dilations, pads, outs
            sym = all(b == e and 2 * b <= k for (b, e), k in zip(pads2, kernel2))
            direct = sym and all(
                pool_out_size(xc.shape[2 + i], kernel2[i], strides2[i], dil2[i], pads2[i][0], pads2[i][0],
                              ceil_mode) == outs2[i] for i in range(2))
            if direct:
                xin, p, cm = xc, (pads2[0][0], pads2[1][0]), ceil_mode
                offs = (0, 0)
            else:
                # Asymmetric or large padding: pad with -inf once, then pool without padding.
                ext = [(outs2[i] - 1) * strides2[i] + dil2[i] * (kernel2[i] - 1) + 1 for i in range(2)]
                xin = np.full(xc.shape[:2] + tuple(ext), -np.inf, cd)
                hs = [max(0, min(xc.shape[2 + i], ext[i] - pads2[i][0])) for i in range(2)]
                xin[:, :, pads2[0][0]:pads2[0][0] + hs[0], pads2[1][0]:pads2[1][0] + hs[1]] = \
                    xc[:, :, :hs[0], :hs[1]]
                p, cm, offs = (0, 0), False, (pads2[0][0], pads2[1][0])
            y, idx = _core.max_pool2d(xin, tuple(kernel2), tuple(strides2), p, tuple(dil2), cm, True, None)
            if offs != (0, 0):
                Wp = xin.shape[3]
                h, w = idx // Wp - offs[0], idx % Wp - offs[1]
                idx = h * xc.shape[3] + w
            if nd == 1:
                y = y[:, :, 0, :]
                idx = idx[:, :, 0, :]
                return y.astype(x.dtype, copy=False), idx + (
                    np.arange(x.shape[0] * x.shape[1], dtype=np.int64) * x.shape[2]).reshape(x.shape[:2] + (1,))
            return y.astype(x.dtype, copy=False), _onnx_indices(idx, x.shape, storage_order)
        y = np_pool(x, "max", kernel, strides, dilations, pads, ceil_mode, outs=outs)
        return y, None

    return run


@op("AveragePool")
def build_average_pool(attrs, consts):
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    include = bool(attrs.get("count_include_pad", 0))

    def run(x):
        nd, kernel, strides, dilations, pads = _pool_geometry(attrs, x)
        return (np_pool(x, "avg", kernel, strides, dilations, pads, ceil_mode, include),)
    return run


@op("GlobalAveragePool")
def build_global_average_pool(attrs, consts):
    def run(x):
        return (x.mean(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=np.float64).astype(x.dtype),)
    return run


@op("GlobalMaxPool")
def build_global_max_pool(attrs, consts):
    return lambda x: (x.max(axis=tuple(range(2, x.ndim)), keepdims=True),)


@op("LRN")
def build_lrn(attrs, consts):
    alpha, beta, bias, size = (float(attrs.get("alpha", 1e-4)), float(attrs.get("beta", 0.75)),
                               float(attrs.get("bias", 1.0)), int(attrs["size"]))

    def run(x):
        sq = np.square(x.astype(np.float64))
        C = x.shape[1]
        acc = np.zeros_like(sq)
        lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
        for c in range(C):
            acc[:, c] = sq[:, max(0, c - lo):min(C, c + hi + 1)].sum(axis=1)
        return ((x / (bias + alpha / size * acc) ** beta).astype(x.dtype),)
    return run


# --------------------------------------------------------------------------- dense layers

class _LinearKernel:
    """y = x @ weight.T + bias (+ ReLU) with weight (out, in), packed once per dtype."""

    def __init__(self, weight, bias, activation):
        self.weight, self.bias, self.activation = weight, bias, activation or "none"
        self.layers = {}
        self.fast = None
        if weight.dtype == np.float32:
            self.fast = self.layers[weight.dtype] = _core.LinearLayer(
                np.ascontiguousarray(weight), None if bias is None else np.ascontiguousarray(bias, np.float32),
                self.activation)

    def __call__(self, x, *_):
        if self.fast is not None and x.dtype == np.float32 and x.ndim == 2 and x.shape[0]:
            return (self.fast(x),)
        cd = _compute_dtype(x.dtype)
        if cd is None:
            raise OpError(f"Linear: unsupported input dtype {x.dtype}")
        layer = self.layers.get(cd)
        if layer is None:
            b = None if self.bias is None else np.ascontiguousarray(self.bias, cd)
            layer = self.layers[cd] = _core.LinearLayer(np.ascontiguousarray(self.weight, cd), b,
                                                        self.activation)
        xc = x.astype(cd, copy=False)
        if x.shape[-1] != self.weight.shape[1]:
            raise OpError(f"Linear: expected {self.weight.shape[1]} input features, got shape {x.shape}")
        lead = x.shape[:-1]
        x2 = xc.reshape(-1, x.shape[-1]) if x.ndim != 2 else xc
        if x2.size == 0:
            y = np.zeros((x2.shape[0], self.weight.shape[0]), cd)
        else:
            y = layer(x2)
        return (y.reshape(lead + (self.weight.shape[0],)).astype(x.dtype, copy=False),)


@op("Linear")
def build_linear(attrs, consts):
    """lepton's own op: inputs (x, weight (out, in) constant, optional bias), attribute activation."""
    w = consts[1]
    if w is None:
        raise OpError("Linear: the weight must be a constant")
    b = consts[2] if len(consts) > 2 else None
    return _LinearKernel(w, b, attrs.get("activation"))


def _matmul(a, b):
    """a @ b through lepton's linear kernel when the shapes and dtypes allow, else NumPy."""
    if (a.dtype == b.dtype and a.dtype in FAST and b.ndim == 2 and a.ndim >= 2 and a.size and b.size):
        return _lk_linear(a, b.T)
    return np.matmul(a, b)


@op("MatMul")
def build_matmul(attrs, consts):
    b = consts[1]
    if b is not None and b.ndim == 2 and b.dtype in FAST:
        k = _LinearKernel(np.ascontiguousarray(b.T), None, None)

        def run_const(a, _b):
            if a.ndim >= 2 and a.dtype == b.dtype:
                return k(a)
            return (np.matmul(a, b),)
        return run_const
    return lambda a, b: (_matmul(a, b),)


@op("Gemm")
def build_gemm(attrs, consts):
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    ta, tb = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))

    def run(a, b, c=None):
        if ta:
            a = a.T
        if tb:
            b = b.T
        if a.dtype == b.dtype and a.dtype in FAST and a.size and b.size:
            bias = None
            if c is not None and c.dtype == a.dtype and beta == 1.0 and alpha == 1.0 and c.shape == (b.shape[1],):
                bias, c = c, None
            y = _lk_linear(np.ascontiguousarray(a), b.T, bias)
        else:
            y = np.matmul(a, b)
        if alpha != 1.0:
            y = y * np.asarray(alpha, y.dtype)
        if c is not None:
            y = y + (c * np.asarray(beta, c.dtype) if beta != 1.0 else c)
        return (y.astype(a.dtype, copy=False),)
    return run


# --------------------------------------------------------------------------- activations and normalisation

@op("Relu")
def build_relu(attrs, consts):
    def run(x):
        if x.dtype in FAST:
            return (_lk_relu(x),)
        return (np.maximum(x, np.zeros((), x.dtype)),)
    return run


def _softmax_builder(log):
    def build(attrs, consts):
        axis = int(attrs.get("axis", -1))
        legacy = bool(attrs.get("coerce_2d", 0))  # opset < 13: softmax over all dims from `axis` on

        def run(x):
            if x.ndim == 2 and axis in (1, -1) and x.dtype in FAST and x.flags.c_contiguous and x.size:
                return (_core.softmax(x, x.shape[0], x.shape[1], 1, log, None),)  # checked here: straight in
            a = axis % max(x.ndim, 1)
            shape = x.shape
            if legacy and a != x.ndim - 1:
                x = x.reshape(int(np.prod(shape[:a], dtype=np.int64)), -1) if x.size else x
                a = 1 if x.size else a
            if x.dtype in FAST:
                y = (_lk_log_softmax if log else _lk_softmax)(x, a)
            else:
                x64 = x.astype(np.float64)
                m = x64 - x64.max(axis=a, keepdims=True)
                e = np.exp(m)
                s = e.sum(axis=a, keepdims=True)
                y = (m - np.log(s) if log else e / s).astype(x.dtype)
            return (y.reshape(shape),)
        return run
    return build


OPS["Softmax"] = _softmax_builder(False)
OPS["LogSoftmax"] = _softmax_builder(True)


@op("BatchNormalization")
def build_batch_norm(attrs, consts):
    eps = float(attrs.get("epsilon", 1e-5))
    if int(attrs.get("training_mode", 0)):
        raise OpError("BatchNormalization: training_mode=1 is not supported (inference only)")

    def affine(scale, bias, mean, var):
        a = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
        return a, bias.astype(np.float64) - mean.astype(np.float64) * a

    if all(c is not None for c in consts[1:5]):
        a, b = affine(*consts[1:5])
        cache = {}

        def run_const(x, *_):
            key = (x.dtype, x.ndim)
            if key not in cache:
                shape = (-1,) + (1,) * (x.ndim - 2)
                cache[key] = (a.astype(x.dtype).reshape(shape), b.astype(x.dtype).reshape(shape))
            sa, sb = cache[key]
            return (x * sa + sb,)
        return run_const

    def run(x, scale, bias, mean, var):
        a, b = affine(scale, bias, mean, var)
        shape = (-1,) + (1,) * (x.ndim - 2)
        return ((x * a.reshape(shape) + b.reshape(shape)).astype(x.dtype),)
    return run


@op("InstanceNormalization")
def build_instance_norm(attrs, consts):
    eps = float(attrs.get("epsilon", 1e-5))

    def run(x, scale, bias):
        x64 = x.astype(np.float64)
        axes = tuple(range(2, x.ndim))
        mean = x64.mean(axis=axes, keepdims=True)
        var = x64.var(axis=axes, keepdims=True)
        shape = (-1,) + (1,) * (x.ndim - 2)
        y = (x64 - mean) / np.sqrt(var + eps) * scale.reshape(shape) + bias.reshape(shape)
        return (y.astype(x.dtype),)
    return run


@op("LayerNormalization")
def build_layer_norm(attrs, consts):
    eps = float(attrs.get("epsilon", 1e-5))
    axis = int(attrs.get("axis", -1))

    def run(x, scale, bias=None):
        a = axis % x.ndim
        x64 = x.astype(np.float64)
        axes = tuple(range(a, x.ndim))
        mean = x64.mean(axis=axes, keepdims=True)
        inv = 1.0 / np.sqrt(x64.var(axis=axes, keepdims=True) + eps)
        y = (x64 - mean) * inv * scale
        if bias is not None:
            y = y + bias
        outs = (y.astype(x.dtype), mean.astype(np.float32), inv.astype(np.float32))
        return outs[:attrs.get("__outputs__", 1)]
    return run


def _gelu(x, a):
    x64 = x.astype(np.float64)
    if a.get("approximate", "none") == "tanh":
        return 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3)))
    return 0.5 * x64 * (1 + _erf(x64 / np.sqrt(2)))


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x) if x.size else x.astype(np.float64)


def _unary(fn, keep_dtype=True):
    def build(attrs, consts):
        def run(x):
            y = fn(x, attrs)
            return (y.astype(x.dtype, copy=False) if keep_dtype else y,)
        return run
    return build


def _sigmoid(x, a):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


_UNARY = {
    "Sigmoid": _sigmoid,
    "Tanh": lambda x, a: np.tanh(x),
    "Exp": lambda x, a: np.exp(x),
    "Log": lambda x, a: np.log(x),
    "Sqrt": lambda x, a: np.sqrt(x),
    "Neg": lambda x, a: np.negative(x),
    "Abs": lambda x, a: np.abs(x),
    "Reciprocal": lambda x, a: np.reciprocal(x),
    "Floor": lambda x, a: np.floor(x),
    "Ceil": lambda x, a: np.ceil(x),
    "Erf": lambda x, a: _erf(x),
    "Gelu": _gelu,
    "Softplus": lambda x, a: np.logaddexp(0, x),
    "Softsign": lambda x, a: x / (1 + np.abs(x)),
    "LeakyRelu": lambda x, a: np.where(x >= 0, x, x * np.asarray(a.get("alpha", 0.01), x.dtype)),
    "Elu": lambda x, a: np.where(x > 0, x, (np.exp(np.minimum(x, 0)) - 1) * np.asarray(a.get("alpha", 1.0), x.dtype)),
    "Selu": lambda x, a: np.asarray(a.get("gamma", 1.0507009873554804934193349852946), x.dtype) * np.where(
        x > 0, x, (np.exp(np.minimum(x, 0)) - 1) * np.asarray(a.get("alpha", 1.6732632423543772848170429916717),
                                                             x.dtype)),
    "HardSigmoid": lambda x, a: np.clip(x * np.asarray(a.get("alpha", 0.2), x.dtype)
                                        + np.asarray(a.get("beta", 0.5), x.dtype), 0, 1),
    "HardSwish": lambda x, a: x * np.clip(x / 6 + 0.5, 0, 1),
    "Not": lambda x, a: np.logical_not(x),
}
for _name, _fn in _UNARY.items():
    OPS[_name] = _unary(_fn, _name != "Not")


@op("Clip")
def build_clip(attrs, consts):
    def run(x, lo=None, hi=None):
        y = x
        if lo is not None:
            y = np.maximum(y, lo.astype(x.dtype))
        if hi is not None:
            y = np.minimum(y, hi.astype(x.dtype))
        return (y,)
    return run


@op("PRelu")
def build_prelu(attrs, consts):
    def run(x, slope):
        if slope.ndim == 1 and x.ndim > 2 and slope.shape[0] == x.shape[1] and slope.shape[0] != x.shape[-1]:
            slope = slope.reshape((-1,) + (1,) * (x.ndim - 2))  # opset < 7: the slope is per channel
        return (np.where(x >= 0, x, x * slope).astype(x.dtype),)
    return run


# --------------------------------------------------------------------------- element-wise binary and variadic

def _binary(fn):
    def build(attrs, consts):
        return lambda a, b: (fn(a, b),)
    return build


def _div(a, b):
    if a.dtype.kind in "iu":
        return np.trunc(np.true_divide(a, b)).astype(a.dtype)
    return np.true_divide(a, b).astype(np.result_type(a, b), copy=False)


def _pow(a, b):
    return np.power(a, b.astype(a.dtype) if b.dtype != a.dtype else b).astype(a.dtype, copy=False)


for _name, _fn in {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _div, "Pow": _pow,
                   "Equal": np.equal, "Less": np.less, "Greater": np.greater, "LessOrEqual": np.less_equal,
                   "GreaterOrEqual": np.greater_equal, "And": np.logical_and, "Or": np.logical_or,
                   "Mod": np.fmod}.items():
    OPS[_name] = _binary(_fn)


def _legacy_binary(fn):
    def build(attrs, consts):
        axis = int(attrs["legacy_axis"])

        def run(a, b):
            ax = axis % a.ndim
            return (fn(a, b.reshape(b.shape + (1,) * (a.ndim - ax - b.ndim))),)
        return run
    return build


for _name in ("Add", "Sub", "Mul", "Div", "Pow"):
    OPS["Legacy" + _name] = _legacy_binary(lambda a, b, _op=OPS[_name]: _op({}, [])(a, b)[0])


def _variadic(fn):
    def build(attrs, consts):
        def run(*xs):
            y = xs[0]
            for x in xs[1:]:
                y = fn(y, x)
            return (y,)
        return run
    return build


OPS["Sum"] = _variadic(np.add)
OPS["Max"] = _variadic(np.maximum)
OPS["Min"] = _variadic(np.minimum)


@op("Mean")
def build_mean(attrs, consts):
    def run(*xs):
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        return ((y / len(xs)).astype(xs[0].dtype),)
    return run


@op("Where")
def build_where(attrs, consts):
    return lambda c, a, b: (np.where(c, a, b),)


# --------------------------------------------------------------------------- shapes and data movement

@op("Identity", "Dropout")
def build_identity(attrs, consts):
    if attrs.get("__outputs__", 1) > 1:  # Dropout's mask: all kept at inference
        return lambda x, *_: (x, np.ones(x.shape, bool))
    return lambda x, *_: (x,)


@op("Flatten")
def build_flatten(attrs, consts):
    axis = int(attrs.get("axis", 1))

    def run(x):
        if axis == 1 and x.ndim >= 2 and x.shape[0]:
            return (x.reshape(x.shape[0], -1),)
        a = axis + x.ndim if axis < 0 else axis
        if not 0 <= a <= x.ndim:
            raise OpError(f"Flatten: axis {axis} is out of range for {x.ndim} dimensions")
        lead = int(np.prod(x.shape[:a], dtype=np.int64))
        return (x.reshape(lead, int(np.prod(x.shape[a:], dtype=np.int64))),)
    return run


def reshape_target(in_shape, shape, allowzero=False):
    shape = [int(s) for s in shape]
    out = []
    for i, s in enumerate(shape):
        if s == 0 and not allowzero:
            if i >= len(in_shape):
                raise OpError(f"Reshape: 0 at position {i} copies a dimension the input {tuple(in_shape)} lacks")
            s = in_shape[i]
        out.append(s)
    if out.count(-1) > 1:
        raise OpError(f"Reshape: more than one -1 in shape {shape}")
    if -1 in out:
        known = int(np.prod([s for s in out if s != -1], dtype=np.int64))
        total = int(np.prod(in_shape, dtype=np.int64))
        if known == 0 or total % known:
            raise OpError(f"Reshape: cannot reshape {tuple(in_shape)} to {shape}")
        out[out.index(-1)] = total // known
    return tuple(out)


@op("Reshape")
def build_reshape(attrs, consts):
    allowzero = bool(attrs.get("allowzero", 0))
    return lambda x, shape: (x.reshape(reshape_target(x.shape, shape, allowzero)),)


@op("Transpose")
def build_transpose(attrs, consts):
    perm = attrs.get("perm")
    return lambda x: (np.transpose(x, None if perm is None else [int(p) for p in perm]),)


def _axes(axes, ndim):
    return tuple(sorted(int(a) % ndim for a in axes))


@op("Squeeze")
def build_squeeze(attrs, consts):
    def run(x, axes=None):
        if axes is None:
            return (np.squeeze(x),)
        return (np.squeeze(x, axis=_axes(axes, x.ndim)),)
    return run


@op("Unsqueeze")
def build_unsqueeze(attrs, consts):
    def run(x, axes):
        n = x.ndim + len(axes)
        shape = list(x.shape)
        for a in _axes(axes, n):
            shape.insert(a, 1)
        return (x.reshape(shape),)
    return run


@op("Concat")
def build_concat(attrs, consts):
    axis = int(attrs["axis"])
    return lambda *xs: (np.concatenate(xs, axis=axis),)


@op("Split")
def build_split(attrs, consts):
    axis = int(attrs.get("axis", 0))
    num = attrs.get("num_outputs")

    def run(x, split=None):
        n = x.shape[axis]
        if split is None:
            k = int(num) if num is not None else attrs["__outputs__"]
            step = -(-n // k)
            split = [min(step, n - i * step) for i in range(k)]
        idx = np.cumsum([int(s) for s in split])[:-1]
        return tuple(np.split(x, idx, axis=axis))
    return run


@op("Shape")
def build_shape(attrs, consts):
    start, end = attrs.get("start", 0), attrs.get("end")
    return lambda x: (np.array(x.shape[start:end], dtype=np.int64),)


@op("Size")
def build_size(attrs, consts):
    return lambda x: (np.array(x.size, dtype=np.int64),)


@op("Gather")
def build_gather(attrs, consts):
    axis = int(attrs.get("axis", 0))
    return lambda x, idx: (np.take(x, np.where(idx < 0, idx + x.shape[axis], idx), axis=axis),)


@op("Slice")
def build_slice(attrs, consts):
    def run(x, starts, ends, axes=None, steps=None):
        axes = range(len(starts)) if axes is None else [int(a) % x.ndim for a in axes]
        steps = [1] * len(starts) if steps is None else steps
        sl = [slice(None)] * x.ndim
        for a, s, e, st in zip(axes, starts, ends, steps):
            n = x.shape[a]
            s, e, st = int(s), int(e), int(st)
            s = max(-n - 1, min(n, s)) if st < 0 else max(-n, min(n, s))
            e = max(-n - 1, min(n, e))
            if st < 0 and e == -n - 1:
                e = None
            sl[a] = slice(s, e, st)
        return (x[tuple(sl)],)
    return run


@op("Cast")
def build_cast(attrs, consts):
    to = attrs["to"]
    return lambda x: (x.astype(to),)


@op("CastLike")
def build_cast_like(attrs, consts):
    return lambda x, like: (x.astype(like.dtype),)


@op("ConstantOfShape")
def build_constant_of_shape(attrs, consts):
    value = attrs.get("value")
    value = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    return lambda shape: (np.full(tuple(int(s) for s in shape), value[0], value.dtype),)


@op("Constant")
def build_constant(attrs, consts):
    v = attrs["value"]
    return lambda: (v,)


@op("Expand")
def build_expand(attrs, consts):
    def run(x, shape):
        target = np.broadcast_shapes(x.shape, tuple(int(s) for s in shape))
        return (np.broadcast_to(x, target).copy(),)
    return run


@op("Tile")
def build_tile(attrs, consts):
    return lambda x, reps: (np.tile(x, [int(r) for r in reps]),)


@op("Range")
def build_range(attrs, consts):
    return lambda s, e, d: (np.arange(s, e, d).astype(s.dtype),)


@op("Pad")
def build_pad(attrs, consts):
    mode = attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode

    def run(x, pads, value=None, axes=None):
        pads = [int(p) for p in pads]
        axes = list(range(x.ndim)) if axes is None else [int(a) % x.ndim for a in axes]
        n = len(axes)
        width = [(0, 0)] * x.ndim
        for i, a in enumerate(axes):
            width[a] = (pads[i], pads[i + n])
        if min(pads) < 0:
            raise OpError("Pad: negative pads are not supported")
        if mode == "constant":
            v = 0 if value is None or value.size == 0 else value.reshape(-1)[0]
            return (np.pad(x, width, mode="constant", constant_values=v),)
        return (np.pad(x, width, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode]),)
    return run


def _reduce(fn):
    def build(attrs, consts):
        keep = bool(attrs.get("keepdims", 1))
        noop = bool(attrs.get("noop_with_empty_axes", 0))

        def run(x, axes=None):
            if axes is None or len(axes) == 0:
                if noop:
                    return (x,)
                ax = None
            else:
                ax = _axes(axes, x.ndim)
            return (np.asarray(fn(x, axis=ax, keepdims=keep)).astype(x.dtype, copy=False),)
        return run
    return build


for _name, _fn in {"ReduceMean": np.mean, "ReduceSum": np.sum, "ReduceMax": np.max, "ReduceMin": np.min,
                   "ReduceProd": np.prod,
                   "ReduceL2": lambda x, axis, keepdims: np.sqrt(np.sum(np.square(x), axis=axis,
                                                                        keepdims=keepdims)),
                   "ReduceLogSumExp": lambda x, axis, keepdims: np.log(np.sum(np.exp(x), axis=axis,
                                                                              keepdims=keepdims)),
                   }.items():
    OPS[_name] = _reduce(_fn)


@op("ArgMax", "ArgMin")
def build_argmax(attrs, consts):
    axis, keep = int(attrs.get("axis", 0)), bool(attrs.get("keepdims", 1))
    last = bool(attrs.get("select_last_index", 0))
    fn = np.argmin if attrs.get("__op__") == "ArgMin" else np.argmax

    def run(x):
        if last:
            r = x.shape[axis] - 1 - fn(np.flip(x, axis), axis=axis)
        else:
            r = fn(x, axis=axis)
        r = np.asarray(r, np.int64)
        return (np.expand_dims(r, axis) if keep else r,)
    return run


# Operators whose result depends on nothing but their inputs: safe to evaluate once at load time.
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli"}
