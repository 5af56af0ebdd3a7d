"""Between lk.Graph and lk.Sequential.

A loaded model that is a plain chain of layers lk.Sequential runs (float32
convolutions with symmetric padding, max-pooling, linear layers, ReLU,
Flatten, softmax; conv + ReLU + max-pool already fused) becomes one: the
whole network then runs as one native call per batch. A chain that starts
by turning NHWC images into NCHW (Keras models) qualifies too: the
transpose is a view handed to the network. Anything else stays an lk.Graph.

``graph_of`` goes the other way, for ``lk.save_model``.
"""

from __future__ import annotations

import numpy as np

from .graph import Graph, Node, TensorInfo, _check_input

_LOADED = None


def _sequential_class():
    try:
        from ..network import Sequential
    except ImportError:  # a build without networks: graphs run everything
        return None
    return Sequential


def _loaded_class():
    """lk.Sequential with what a loaded model carries: input shape, layout, metadata, the source graph."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    Sequential = _sequential_class()
    if Sequential is None:
        return None

    class LoadedSequential(Sequential):
        """An lk.Sequential made by ``lk.load_model``: the chain of layers of a loaded model.

        ``model(x)`` takes the input the original model takes (NHWC for Keras models; the layout is in
        ``model.layout``), converted to float32; ``input_shape``, ``metadata`` and ``describe()`` as for
        lk.Graph. ``graph`` is the lk.Graph it was made from.
        """

        def __init__(self, layers, graph):
            super().__init__(layers)
            self.graph = graph
            self._nhwc = graph.nodes[0].op == "Transpose"

        @property
        def input_shape(self):
            return self.graph.input_shape

        @property
        def inputs(self):
            return self.graph.inputs

        @property
        def outputs(self):
            return self.graph.outputs

        @property
        def metadata(self):
            return self.graph.metadata

        @property
        def layout(self):
            return self.graph.layout

        def __call__(self, input, *, out=None):
            x = _check_input(input, self.graph.inputs[0])
            if self._nhwc:
                x = x.transpose(0, 3, 1, 2)
            return super().__call__(x, out=out)

        def run(self, *args, **kwargs):
            """The outputs by name, as lk.Graph.run."""
            if kwargs:
                args = args + tuple(kwargs.values())
            if len(args) != 1:
                raise TypeError(f"the model takes 1 input, got {len(args)}")
            return {self.graph.outputs[0]: self(args[0])}

        def describe(self, input=None) -> str:
            """The network's plan for `input` (an array or batched shape; default: the last call's, else a
            batch of one of the model's input shape)."""
            if input is None and self._last_shape is None:
                shape = self.input_shape
                if shape is None or any(d is None for d in shape[1:]):
                    raise ValueError("input: the model's input size is not fixed; give an input or its shape")
                input = (1 if shape[0] is None else shape[0],) + tuple(shape[1:])
                if self._nhwc:
                    input = (input[0], input[3], input[1], input[2])
            elif input is not None and self._nhwc:
                shape = input.shape if isinstance(input, np.ndarray) else tuple(input)
                input = (shape[0], shape[3], shape[1], shape[2])
            return (f"lk.Sequential from {self.metadata.get('source', 'a model')} "
                    f"({self.layout.upper()} input {self.input_shape}):\n" + super().describe(input))

        def __reduce__(self):
            return _rebuild, (self.graph,)

    LoadedSequential.__module__ = __name__
    _LOADED = LoadedSequential
    return LoadedSequential


def _rebuild(graph):
    return to_sequential(graph)


def _symmetric(pads):
    """(ph, pw) of ONNX pads (top, left, bottom, right), or None when they are not symmetric."""
    pads = [int(p) for p in pads] if pads is not None else [0, 0, 0, 0]
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
        return None
    return pads[0], pads[1]


def _chain_modules(graph):
    """The lk modules of `graph` when it is a chain lk.Sequential runs, else None."""
    from ..layers import Conv2d, Conv2dMaxPool2d, Linear, MaxPool2d
    from ..network import Flatten, LogSoftmax, ReLU, Softmax

    if len(graph.inputs) != 1 or len(graph.outputs) != 1 or graph.inputs[0].dtype != np.float32 or not graph.nodes:
        return None
    if any(v.dtype != np.float32 for v in graph.params.values()):
        return None
    nodes = list(graph.nodes)
    prev = graph.inputs[0].name
    shape = graph.inputs[0].shape
    rank = None if shape is None else len(shape)
    if nodes[0].op == "Transpose" and nodes[0].attrs.get("perm") == [0, 3, 1, 2] and rank == 4:
        prev = nodes[0].outputs[0]
        nodes = nodes[1:]
    modules = []
    p = graph.params
    for n in nodes:
        if not n.inputs or n.inputs[0] != prev or len([o for o in n.outputs if o]) != 1:
            return None
        if any(i not in p for i in n.inputs[1:] if i):
            return None
        a = n.attrs
        if n.op == "Conv":
            w = p[n.inputs[1]]
            b = p[n.inputs[2]] if len(n.inputs) > 2 else None
            if w.ndim != 4 or a.get("auto_pad", "NOTSET") not in ("NOTSET", "", "VALID"):
                return None
            pads = _symmetric(None if a.get("auto_pad") == "VALID" else a.get("pads"))
            if pads is None:
                return None
            kw = dict(stride=tuple(a.get("strides", (1, 1))), padding=pads, dilation=tuple(a.get("dilations", (1, 1))),
                      groups=int(a.get("group", 1)), activation=a.get("activation"))
            pool = a.get("pool")
            if pool:
                modules.append(Conv2dMaxPool2d(w, b, **kw, kernel_size=tuple(pool["kernel_shape"]),
                                               pool_stride=tuple(pool["strides"]), pool_padding=tuple(pool["pads"]),
                                               pool_dilation=tuple(pool["dilations"]),
                                               ceil_mode=bool(pool["ceil_mode"])))
            else:
                modules.append(Conv2d(w, b, **kw))
            rank = 4
        elif n.op == "MaxPool":
            k = a.get("kernel_shape")
            if k is None or len(k) != 2 or a.get("auto_pad", "NOTSET") not in ("NOTSET", "", "VALID"):
                return None
            pads = _symmetric(None if a.get("auto_pad") == "VALID" else a.get("pads"))
            if pads is None or 2 * pads[0] > k[0] or 2 * pads[1] > k[1]:
                return None
            modules.append(MaxPool2d(tuple(k), tuple(a.get("strides", (1, 1))), pads,
                                     tuple(a.get("dilations", (1, 1))), bool(a.get("ceil_mode", 0))))
            rank = 4
        elif n.op == "Linear":
            b = p[n.inputs[2]] if len(n.inputs) > 2 else None
            modules.append(Linear(p[n.inputs[1]], b, activation=a.get("activation")))
        elif n.op == "Relu":
            modules.append(ReLU())
        elif n.op == "Flatten" and int(a.get("axis", 1)) == 1:
            modules.append(Flatten(1))
            rank = 2
        elif n.op in ("Softmax", "LogSoftmax"):
            axis = int(a.get("axis", -1))
            if rank is None:
                if axis < 0:
                    return None
            else:
                if a.get("coerce_2d") and axis % rank != rank - 1:
                    return None
                axis %= rank
            modules.append((LogSoftmax if n.op == "LogSoftmax" else Softmax)(axis))
        else:
            return None
        prev = n.outputs[0]
    if prev != graph.outputs[0] or not modules:
        return None
    # The network takes batches of images (4-D) when it starts with a convolution or pooling, of
    # feature rows (2-D) when it starts with a linear layer.
    first = next((m for m in modules if not isinstance(m, ReLU)), None)
    want = 4 if isinstance(first, (Conv2d, Conv2dMaxPool2d, MaxPool2d)) else 2 if isinstance(first, Linear) else None
    if want is None or shape is None or len(shape) != want:
        return None
    return modules


def to_sequential(graph: Graph):
    """`graph` as an lk.Sequential when it is a chain of layers one runs, else `graph` itself."""
    cls = _loaded_class()
    if cls is None:
        return graph
    modules = _chain_modules(graph)
    if modules is None:
        return graph
    try:
        return cls(modules, graph)
    except (TypeError, ValueError):  # a combination the network does not take: the graph runs it
        return graph


def graph_of(model):
    """The lk.Graph that describes `model` (an lk.Graph or lk.Sequential), or None for anything else."""
    if isinstance(model, Graph):
        return model
    g = getattr(model, "graph", None)
    if isinstance(g, Graph):
        return g
    Sequential = _sequential_class()
    if Sequential is None or not isinstance(model, Sequential):
        return None
    return _graph_from_modules(model.layers)


def _graph_from_modules(modules):
    from ..layers import Conv2d, Conv2dMaxPool2d, Linear, MaxPool2d
    from ..network import Dropout, Flatten, LogSoftmax, ReLU, Softmax

    nodes, params = [], {}
    prev = "input"
    rank = None
    first_rank = None
    for i, m in enumerate(modules):
        out = f"{i}:{type(m).__name__}"
        if isinstance(m, (Conv2d, Conv2dMaxPool2d)):
            t, bt, lf, rt = m._pads
            attrs = {"strides": list(m._stride), "pads": [t, lf, bt, rt], "dilations": list(m._dilation),
                     "group": m._groups}
            if m._activation:
                attrs["activation"] = m._activation
            if isinstance(m, Conv2dMaxPool2d):
                k, s, pp, d = m._pool
                attrs["pool"] = {"kernel_shape": list(k), "strides": list(s), "pads": list(pp),
                                 "dilations": list(d), "ceil_mode": int(m._ceil_mode)}
            params[f"{i}.weight"] = m.weight
            ins = [prev, f"{i}.weight"]
            if m.bias is not None:
                params[f"{i}.bias"] = m.bias
                ins.append(f"{i}.bias")
            nodes.append(Node("Conv", ins, [out], attrs))
            rank = 4
        elif isinstance(m, MaxPool2d):
            k, s, pp, d, ceil_mode, _ = m._args
            nodes.append(Node("MaxPool", [prev], [out], {"kernel_shape": list(k), "strides": list(s),
                                                        "pads": [pp[0], pp[1], pp[0], pp[1]],
                                                        "dilations": list(d), "ceil_mode": int(ceil_mode)}))
            rank = 4
        elif isinstance(m, Linear):
            params[f"{i}.weight"] = m.weight
            ins = [prev, f"{i}.weight"]
            if m.bias is not None:
                params[f"{i}.bias"] = m.bias
                ins.append(f"{i}.bias")
            nodes.append(Node("Linear", ins, [out], {"activation": m._activation} if m._activation else {}))
            rank = rank or 2
        elif isinstance(m, ReLU):
            nodes.append(Node("Relu", [prev], [out]))
        elif isinstance(m, Flatten):
            if m.start_dim == 1:
                nodes.append(Node("Flatten", [prev], [out], {"axis": 1}))
                rank = 2
            else:
                shape_name = f"{i}.shape"
                params[shape_name] = np.array([0] * m.start_dim + [-1], np.int64)
                nodes.append(Node("Reshape", [prev, shape_name], [out]))
                rank = m.start_dim + 1
        elif isinstance(m, Softmax):  # LogSoftmax too
            nodes.append(Node("LogSoftmax" if isinstance(m, LogSoftmax) else "Softmax", [prev], [out],
                              {"axis": m.dim}))
        elif isinstance(m, Dropout):
            continue
        else:
            return None
        if first_rank is None:
            first_rank = rank
        prev = out
    if not nodes:
        return None
    nodes.append(Node("Identity", [prev], ["output"]))
    shape = (None,) * first_rank if first_rank else None
    return Graph(nodes, [TensorInfo("input", shape, np.dtype(np.float32))], ["output"], params,
                 metadata={"source": "lk.Sequential"})
