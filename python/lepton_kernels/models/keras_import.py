"""Keras 3 ``.keras`` files -> lk.Graph, without importing Keras.

A .keras file is a zip of ``config.json`` (the architecture) and
``model.weights.h5`` (weights under ``layers/<layer name>/vars/<i>``), read
here with the standard library and h5py.

Keras models are channels-last: they take NHWC images and their Flatten
flattens in (H, W, C) order. lepton's convolutions run NCHW, so the graph
transposes the input once, runs every convolution and pooling in NCHW, and
permutes the rows of the Dense kernel that follows a Flatten so that it
reads the (C, H, W)-ordered features: the loaded model takes the same NHWC
input as the Keras model and returns the same outputs, and no transpose
back is ever needed.
"""

from __future__ import annotations

import io
import json
import re
import zipfile

import numpy as np

from .graph import Graph, Node, TensorInfo, UnsupportedOperatorError

_SUPPORTED = {"InputLayer", "Conv2D", "DepthwiseConv2D", "SeparableConv2D", "LeakyReLU", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D",
              "GlobalMaxPooling2D", "Flatten", "Dense", "Dropout", "SpatialDropout2D", "GaussianNoise",
              "GaussianDropout", "AlphaDropout", "Activation", "ReLU", "Softmax", "BatchNormalization",
              "Rescaling", "ZeroPadding2D"}
_IDENTITY = {"Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout"}
# Keras activations -> graph ops (None: nothing to do).
_ACTIVATIONS = {"linear": None, None: None, "relu": "Relu", "softmax": "Softmax", "sigmoid": "Sigmoid",
                "tanh": "Tanh", "elu": "Elu", "selu": "Selu", "softplus": "Softplus", "softsign": "Softsign",
                "log_softmax": "LogSoftmax", "hard_sigmoid": "HardSigmoid", "exponential": "Exp"}


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("loading Keras .keras models needs the 'h5py' package: pip install h5py "
                          "(or pip install lepton-kernels[keras])") from None
    return h5py


def _activation_name(a):
    if isinstance(a, dict):  # a serialised function object
        a = a.get("config", a.get("class_name"))
        if isinstance(a, dict):
            a = a.get("name")
    return a


def _pair(v):
    if v is None:
        return None
    if isinstance(v, int):
        return [v, v]
    return [int(x) for x in v]


class _Builder:
    def __init__(self, where):
        self.where = where
        self.nodes, self.params = [], {}
        self.count = 0

    def name(self, hint):
        self.count += 1
        return f"{hint}:{self.count}"

    def param(self, hint, value):
        n = self.name(hint)
        self.params[n] = np.ascontiguousarray(value)
        return n

    def add(self, op, inputs, attrs=None, hint=None, n_outputs=1):
        outs = [self.name(hint or op) for _ in range(n_outputs)]
        self.nodes.append(Node(op, inputs, outs, attrs or {}, name=hint or outs[0]))
        return outs[0]


def load_keras(path) -> Graph:
    """An lk.Graph (NHWC input) from a Keras 3 ``.keras`` file of a Sequential model."""
    h5py = _h5py()
    with zipfile.ZipFile(path) as z:
        config = json.loads(z.read("config.json"))
        try:
            weights_blob = z.read("model.weights.h5")
        except KeyError:
            weights_blob = None
    cls = config.get("class_name")
    if cls != "Sequential":
        raise ValueError(f"{path}: only Keras Sequential models are supported, this one is a {cls}")
    layers = config["config"]["layers"]
    unsupported = {lc["class_name"] for lc in layers if lc["class_name"] not in _SUPPORTED}
    if unsupported:
        raise UnsupportedOperatorError({f"keras.{u}" for u in unsupported}, str(path))
    weights = {}
    if weights_blob is not None:
        with h5py.File(io.BytesIO(weights_blob), "r") as f:
            group = f["layers"] if "layers" in f else {}
            for lc, key in zip(_tracked(layers), _weight_keys(_tracked(layers))):
                lname = lc.get("config", {}).get("name", "")
                grp = group.get(key) if key in group else group.get(lname)
                if grp is not None and "vars" in grp:
                    v = grp["vars"]
                    weights[lname] = [np.asarray(v[str(i)]) for i in range(len(v))]
    return _convert(config, layers, weights, str(path))


def _tracked(layers):
    return [lc for lc in layers if lc["class_name"] != "InputLayer"]


def _snake(name):
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _weight_keys(layers):
    """Where Keras 3 stores each layer's variables: ``layers/<class in snake case>[_<k>]``, numbered by
    class in the order of the layers (not by the layers' own names)."""
    seen = {}
    keys = []
    for lc in layers:
        base = _snake(lc["class_name"])
        k = seen.get(base, 0)
        seen[base] = k + 1
        keys.append(base if k == 0 else f"{base}_{k}")
    return keys


def _input_shape(config, layers):
    for lc in layers:
        c = lc.get("config", {})
        for key in ("batch_shape", "batch_input_shape"):
            if c.get(key):
                return list(c[key]), c.get("dtype")
    for src in (config["config"].get("build_input_shape"), config.get("build_config", {}).get("input_shape")):
        if src:
            return list(src), None
    if layers and layers[0].get("build_config", {}).get("input_shape"):
        return list(layers[0]["build_config"]["input_shape"]), None
    raise ValueError("the model's input shape is not recorded (build the model before saving it)")


def _dtype_of(d):
    if isinstance(d, dict):
        d = d.get("config", {}).get("name", "float32")
    d = d or "float32"
    if d.startswith("mixed_"):
        d = "float32"
    return np.dtype(d)


def _convert(config, layers, weights, where):
    shape, dtype = _input_shape(config, layers)
    b = _Builder(where)
    x = "input"
    # The state of the running value: its shape in Keras' own order (no batch), the layout its 4-D data
    # actually has ('native' = as Keras has it), and a pending feature permutation after a Flatten.
    kshape = [None if d is None else int(d) for d in shape[1:]]
    channels_first = any(lc.get("config", {}).get("data_format") == "channels_first" for lc in layers)
    native = "nchw" if channels_first else "nhwc"
    layout = native
    perm = None  # our flattened index i holds Keras' flattened feature perm[i]

    def as_nchw():
        nonlocal x, layout
        if layout == "nhwc":
            x = b.add("Transpose", [x], {"perm": [0, 3, 1, 2]})
            layout = "nchw"

    def as_native():
        """The value in Keras' own layout and feature order."""
        nonlocal x, layout, perm
        if perm is not None:
            inv = np.argsort(perm)
            x = b.add("Gather", [x, b.param("order", inv.astype(np.int64))], {"axis": 1})
            perm = None
        if len(kshape) == 3 and layout != native:
            x = b.add("Transpose", [x], {"perm": [0, 2, 3, 1] if native == "nhwc" else [0, 3, 1, 2]})
            layout = native

    def spatial():
        """(C, H, W) of the current 4-D value."""
        if native == "nhwc":
            H, W, C = kshape
        else:
            C, H, W = kshape
        return C, H, W

    def set_spatial(C, H, W):
        nonlocal kshape
        kshape = [H, W, C] if native == "nhwc" else [C, H, W]

    def activation(name, layer_name):
        nonlocal x
        act = _activation_name(name)
        if act not in _ACTIVATIONS:
            raise UnsupportedOperatorError({f"keras activation {act!r}"}, where)
        op = _ACTIVATIONS[act]
        if op is None:
            return
        if op in ("Softmax", "LogSoftmax"):
            as_native_last_axis()
            x = b.add(op, [x], {"axis": -1 if layout == native or len(kshape) != 3 else 1}, hint=layer_name)
        else:
            x = b.add(op, [x], {}, hint=layer_name)

    def as_native_last_axis():
        # Softmax over Keras' last axis: feature order does not matter for a 2-D value's softmax.
        if len(kshape) != 3 and perm is not None:
            return
        if len(kshape) != 3:
            return

    for lc in layers:
        cls, c = lc["class_name"], lc.get("config", {})
        lname = c.get("name", cls)
        w = weights.get(lname, [])
        if cls == "InputLayer" or cls in _IDENTITY:
            continue
        if cls in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D",
                   "ZeroPadding2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D"):
            if len(kshape) != 3:
                raise ValueError(f"{where}: layer {lname!r} ({cls}) expects a 4-D input, got shape "
                                 f"(N, {', '.join(map(str, kshape))})")
            if perm is not None:
                raise ValueError(f"{where}: layer {lname!r} ({cls}) after a Flatten is not supported")
            as_nchw()
            C, H, W = spatial()
        if cls in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D"):
            if not w:
                raise ValueError(f"{where}: no weights for layer {lname!r}")
            kernel = w[0]  # Conv2D: (kh, kw, in/groups, filters); the others: (kh, kw, in, depth_multiplier)
            k, s, d = kernel.shape[:2], _pair(c.get("strides", 1)), _pair(c.get("dilation_rate", 1))
            attrs = {"strides": s, "dilations": d, "group": int(c.get("groups", 1))}
            pad = c.get("padding", "valid")
            if pad == "same":
                attrs["auto_pad"] = "SAME_UPPER"
            elif pad != "valid":
                raise ValueError(f"{where}: layer {lname!r}: padding {pad!r} is not supported")
            if cls == "Conv2D":
                filters = kernel.shape[3]
                ins = [x, b.param(lname + "/kernel", np.transpose(kernel, (3, 2, 0, 1)))]
                bias = w[1] if len(w) > 1 else None
            else:
                # Depthwise: input channel c makes outputs c * depth_multiplier + m, each from its own filter.
                cin, mult = kernel.shape[2], kernel.shape[3]
                attrs["group"] = cin
                filters = cin * mult
                depthwise = np.transpose(kernel, (2, 3, 0, 1)).reshape(filters, 1, *kernel.shape[:2])
                ins = [x, b.param(lname + "/depthwise_kernel", depthwise)]
                bias = w[1] if cls == "DepthwiseConv2D" and len(w) > 1 else None
            if c.get("use_bias", True) and bias is not None:
                ins.append(b.param(lname + "/bias", bias))
            x = b.add("Conv", ins, attrs, hint=lname)
            if cls == "SeparableConv2D":  # then a 1x1 convolution across channels, with the bias
                pointwise = w[1]  # (1, 1, in * depth_multiplier, filters)
                filters = pointwise.shape[3]
                ins = [x, b.param(lname + "/pointwise_kernel", np.transpose(pointwise, (3, 2, 0, 1)))]
                if c.get("use_bias", True) and len(w) > 2:
                    ins.append(b.param(lname + "/bias", w[2]))
                x = b.add("Conv", ins, {}, hint=lname + "/pointwise")
            H, W = (_out(H, k[0], s[0], d[0], pad), _out(W, k[1], s[1], d[1], pad))
            set_spatial(filters, H, W)
            activation(c.get("activation"), lname + "/activation")
        elif cls in ("MaxPooling2D", "AveragePooling2D"):
            k = _pair(c.get("pool_size", 2))
            s = _pair(c.get("strides")) or k
            pad = c.get("padding", "valid")
            attrs = {"kernel_shape": k, "strides": s}
            if pad == "same":
                attrs["auto_pad"] = "SAME_UPPER"
            if cls == "AveragePooling2D":
                attrs["count_include_pad"] = 0
            x = b.add("MaxPool" if cls == "MaxPooling2D" else "AveragePool", [x], attrs, hint=lname)
            set_spatial(C, _out(H, k[0], s[0], 1, pad), _out(W, k[1], s[1], 1, pad))
        elif cls in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
            x = b.add("GlobalAveragePool" if cls.startswith("GlobalAverage") else "GlobalMaxPool", [x], {},
                      hint=lname)
            if c.get("keepdims"):
                set_spatial(C, 1, 1)
            else:
                x = b.add("Flatten", [x], {"axis": 1})
                kshape = [C]
        elif cls == "ZeroPadding2D":
            p = c.get("padding", 1)
            if isinstance(p, int):
                (t, bt), (lf, rt) = (p, p), (p, p)
            else:
                p = [[v, v] if isinstance(v, int) else v for v in p]
                (t, bt), (lf, rt) = p
            x = b.add("Pad", [x, b.param("pads", np.array([0, 0, t, lf, 0, 0, bt, rt], np.int64))], {},
                      hint=lname)
            set_spatial(C, None if H is None else H + t + bt, None if W is None else W + lf + rt)
        elif cls == "Flatten":
            if len(kshape) == 3 and layout != native:
                C, H, W = spatial()
                if None in (C, H, W):
                    as_native()
                else:
                    # Our (C, H, W) order; Keras' feature index of each of our positions.
                    order = np.arange(C * H * W).reshape((H, W, C) if native == "nhwc" else (C, H, W))
                    perm = (order.transpose(2, 0, 1) if native == "nhwc" else order).reshape(-1)
            x = b.add("Flatten", [x], {"axis": 1}, hint=lname)
            total = int(np.prod(kshape)) if None not in kshape else None
            kshape = [total]
        elif cls == "Dense":
            if len(kshape) != 1:
                as_native()
            kernel = w[0]  # (in, units)
            if perm is not None:
                kernel = kernel[perm]
                perm = None
            ins = [x, b.param(lname + "/kernel", kernel.T)]
            if c.get("use_bias", True) and len(w) > 1:
                ins.append(b.param(lname + "/bias", w[1]))
            x = b.add("Linear", ins, {}, hint=lname)
            kshape = kshape[:-1] + [kernel.shape[1]]
            activation(c.get("activation"), lname + "/activation")
        elif cls == "Activation":
            if _activation_name(c.get("activation")) in ("softmax", "log_softmax"):
                as_native()
            activation(c.get("activation"), lname)
        elif cls == "ReLU":
            top, slope = c.get("max_value"), float(c.get("negative_slope", 0) or 0)
            if float(c.get("threshold", 0) or 0) != 0 or (top is not None and slope != 0):
                raise ValueError(f"{where}: layer {lname!r}: ReLU with a threshold, or with both max_value and "
                                 f"negative_slope, is not supported")
            if slope != 0:
                x = b.add("LeakyRelu", [x], {"alpha": slope}, hint=lname)
            elif top is not None:  # ReLU6 and the like
                x = b.add("Clip", [x, b.param("min", np.float32(0)), b.param("max", np.float32(top))], {},
                          hint=lname)
            else:
                x = b.add("Relu", [x], {}, hint=lname)
        elif cls == "LeakyReLU":
            slope = c.get("negative_slope", c.get("alpha", 0.3))
            x = b.add("LeakyRelu", [x], {"alpha": float(slope)}, hint=lname)
        elif cls == "Softmax":
            as_native()
            x = b.add("Softmax", [x], {"axis": int(c.get("axis", -1))}, hint=lname)
        elif cls == "BatchNormalization":
            axis = c.get("axis", -1)
            axis = axis[0] if isinstance(axis, list) else axis
            if axis % (len(kshape) + 1) != (len(kshape) if native == "nhwc" or len(kshape) == 1 else 1):
                raise ValueError(f"{where}: layer {lname!r}: BatchNormalization over axis {axis} is not supported")
            if len(kshape) == 3:
                as_nchw()
            elif perm is not None:
                as_native()
            k = 0
            n = kshape[-1] if native == "nhwc" or len(kshape) == 1 else kshape[0]
            gamma = w[k] if c.get("scale", True) else np.ones(n, np.float32)
            k += bool(c.get("scale", True))
            beta = w[k] if c.get("center", True) else np.zeros(n, np.float32)
            k += bool(c.get("center", True))
            mean, var = w[k], w[k + 1]
            x = b.add("BatchNormalization", [x] + [b.param(lname + "/" + t, v) for t, v in
                                                   (("gamma", gamma), ("beta", beta), ("mean", mean),
                                                    ("var", var))],
                      {"epsilon": float(c.get("epsilon", 1e-3))}, hint=lname)
        elif cls == "Rescaling":
            scale, offset = np.float32(c.get("scale", 1.0)), np.float32(c.get("offset", 0.0))
            x = b.add("Mul", [x, b.param("scale", np.asarray(scale, np.float32))], {}, hint=lname)
            x = b.add("Add", [x, b.param("offset", np.asarray(offset, np.float32))], {}, hint=lname + "/offset")
    as_native()
    b.nodes.append(Node("Identity", [x], ["output"], {}, "output"))
    dt = _dtype_of(dtype)
    return Graph(b.nodes, [TensorInfo("input", tuple(None if d is None else int(d) for d in shape), dt)],
                 ["output"], b.params,
                 metadata={"source": "keras", "layout": native, "keras_class": "Sequential",
                           "name": config["config"].get("name", "")})


def _out(n, k, s, d, pad):
    if n is None:
        return None
    if pad == "same":
        return -(-n // s)
    return (n - d * (k - 1) - 1) // s + 1
