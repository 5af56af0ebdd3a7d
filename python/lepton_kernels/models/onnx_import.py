"""ONNX models -> lk.Graph.

Attributes are read into plain Python values, and each operator is brought
to its latest-opset form (Softmax before opset 13 flattens to 2-D; Squeeze,
Unsqueeze, Reduce*, Split, Slice, Pad, Clip and Reshape moved attributes to
inputs over the years). Constant nodes become parameters; constant
subgraphs (Shape of a known shape, Gather, Concat, ... feeding Reshape, the
weights of "light" models made by ConstantOfShape) are evaluated when the
graph is made.
"""

from __future__ import annotations

import os

import numpy as np

from .graph import Graph, Node, TensorInfo, UnsupportedOperatorError
from .ops import OPS

# Ops whose opset decides where an "axes"-like attribute lives: op -> (opset from which it is an input,
# attribute name, input position).
_ATTR_TO_INPUT = {
    "Squeeze": (13, "axes", 1),
    "Unsqueeze": (13, "axes", 1),
    "ReduceSum": (13, "axes", 1),
    "ReduceMean": (18, "axes", 1),
    "ReduceMax": (18, "axes", 1),
    "ReduceMin": (18, "axes", 1),
    "ReduceProd": (18, "axes", 1),
    "ReduceL2": (18, "axes", 1),
    "ReduceLogSumExp": (18, "axes", 1),
    "Split": (13, "split", 1),
    "Reshape": (5, "shape", 1),
}


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError("loading ONNX models needs the 'onnx' package: pip install onnx "
                          "(or pip install lepton-kernels[onnx])") from None
    return onnx, numpy_helper


def _attr_value(onnx, numpy_helper, a):
    T = onnx.AttributeProto
    if a.type == T.FLOAT:
        return float(a.f)
    if a.type == T.INT:
        return int(a.i)
    if a.type == T.STRING:
        return a.s.decode("utf-8", "replace")
    if a.type == T.TENSOR:
        return numpy_helper.to_array(a.t)
    if a.type == T.FLOATS:
        return [float(v) for v in a.floats]
    if a.type == T.INTS:
        return [int(v) for v in a.ints]
    if a.type == T.STRINGS:
        return [s.decode("utf-8", "replace") for s in a.strings]
    return None  # graphs, sparse tensors, type protos: no operator we run uses them


def _np_dtype(onnx, elem_type):
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None


def _read_model(onnx, source):
    if isinstance(source, onnx.ModelProto):
        return source, "<ModelProto>"
    if isinstance(source, (bytes, bytearray)):
        return onnx.load_from_string(bytes(source)), "<bytes>"
    path = os.fspath(source)
    try:
        return onnx.load(path), path
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None


def load_onnx(source) -> Graph:
    """An lk.Graph from an ONNX model: a path, the file's bytes or an ``onnx.ModelProto``."""
    onnx, numpy_helper = _onnx()
    model, where = _read_model(onnx, source)
    if model.functions:
        try:
            from onnx import inliner
            model = inliner.inline_local_functions(model)
        except ImportError:  # old onnx: local functions stay, and show up as unsupported ops
            pass
    opset = 1
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = int(imp.version)
    shapes = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                shapes[vi.name] = tuple(int(d.dim_value) if d.HasField("dim_value") else None
                                        for d in tt.shape.dim)
    except Exception:  # shape inference is a hint only: models it cannot follow still load
        pass
    g = model.graph
    return _convert_graph(onnx, numpy_helper, g, opset, where, shapes, metadata={
        "source": "onnx", "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": opset, **{p.key: p.value for p in model.metadata_props}})


def _convert_graph(onnx, numpy_helper, g, opset, where, shapes, metadata):
    params = {}
    for t in g.initializer:
        params[t.name] = numpy_helper.to_array(t)
    inputs = []
    for vi in g.input:
        if vi.name in params:
            continue  # IR < 4 lists initializers among the inputs
        tt = vi.type.tensor_type
        dtype = _np_dtype(onnx, tt.elem_type) if tt.elem_type else np.dtype(np.float32)
        if dtype is None:
            raise ValueError(f"{where}: input {vi.name!r} has an unsupported element type {tt.elem_type}")
        shape = None
        if tt.HasField("shape"):
            shape = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                          for d in tt.shape.dim)
        inputs.append(TensorInfo(vi.name, shape, dtype))

    unsupported = set()
    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            unsupported.add(f"{n.domain}.{n.op_type}")
        elif n.op_type not in OPS and n.op_type != "Constant":
            unsupported.add(n.op_type)
    if unsupported:
        raise UnsupportedOperatorError(unsupported, where)

    nodes = []
    counter = [0]

    def const(value, hint):
        counter[0] += 1
        name = f"{hint}::const{counter[0]}"
        params[name] = np.asarray(value)
        return name

    for n in g.node:
        attrs = {a.name: _attr_value(onnx, numpy_helper, a) for a in n.attribute}
        ins, outs, op = list(n.input), list(n.output), n.op_type
        label = n.name or (outs[0] if outs else op)
        if op == "Constant":
            params[outs[0]] = _constant_value(onnx, numpy_helper, attrs, label)
            continue
        op, ins, outs, attrs = _upgrade(onnx, op, ins, outs, attrs, opset, lambda v: const(v, label))
        nodes.append(Node(op, ins, outs, attrs, label))
    return Graph(nodes, inputs, [o.name for o in g.output], params, metadata=metadata, value_shapes=shapes)


def _constant_value(onnx, numpy_helper, attrs, label):
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype)
    if "value_string" in attrs or "value_strings" in attrs:
        return np.asarray(attrs.get("value_string", attrs.get("value_strings")), object)
    raise ValueError(f"Constant node {label!r}: no supported value attribute in {sorted(attrs)}")


def _upgrade(onnx, op, ins, outs, attrs, opset, const):
    """(op, inputs, outputs, attrs) in the latest-opset form of the operator."""
    if op in ("Softmax", "LogSoftmax") and opset < 13:
        attrs = dict(attrs, axis=attrs.get("axis", 1), coerce_2d=1)
    rule = _ATTR_TO_INPUT.get(op)
    if rule and opset < rule[0] and rule[1] in attrs:
        value = np.asarray(attrs.pop(rule[1]), np.int64)
        ins = ins[:rule[2]] + [""] * (rule[2] - len(ins)) + [const(value)]
    if op == "Slice" and opset < 10:
        starts, ends = attrs.pop("starts"), attrs.pop("ends")
        ins = [ins[0], const(np.asarray(starts, np.int64)), const(np.asarray(ends, np.int64))]
        if "axes" in attrs:
            ins.append(const(np.asarray(attrs.pop("axes"), np.int64)))
    if op == "Pad" and opset < 11:
        ins = [ins[0], const(np.asarray(attrs.pop("pads"), np.int64)),
               const(np.asarray(attrs.pop("value", 0.0), np.float32))]
    if op == "Clip" and opset < 11:
        lo, hi = attrs.pop("min", None), attrs.pop("max", None)
        ins = [ins[0], "" if lo is None else const(np.float32(lo)), "" if hi is None else const(np.float32(hi))]
    if op == "BatchNormalization" and len(outs) > 1 and not int(attrs.get("training_mode", 0)):
        outs = outs[:1]  # opsets < 9 list the training statistics as outputs even in inference
    if op == "Cast":
        attrs = dict(attrs, to=np.dtype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"])).name)
    if op in ("Add", "Sub", "Mul", "Div", "Pow") and opset < 7 and attrs.pop("broadcast", 0) and "axis" in attrs:
        # Legacy broadcasting (opset < 7): B aligns with A from `axis` on, not at the trailing axes.
        attrs = dict(attrs, legacy_axis=attrs.pop("axis"))
        op = "Legacy" + op
    for k in ("consumed_inputs", "is_test", "spatial"):
        attrs.pop(k, None)
    return op, ins, outs, attrs
