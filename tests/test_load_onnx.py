"""lk.load_model on ONNX files: outputs equal ONNX Runtime's on every model.

Models come from torch.onnx.export (both exporters, several opsets), from
onnx.helper (each operator's attributes: auto_pad, pads, strides,
dilations, group, ceil_mode, Gemm's transA/transB/alpha/beta, MatMul+Add,
opsets 11 to 21) and from the reference models the onnx package ships
(with random weights). Inputs are fresh random data; the comparison is the
norm-wise relative error against ONNX Runtime, below 1e-5.
"""

from __future__ import annotations

import glob
import io
import os
import warnings

import numpy as np
import pytest

import lepton_kernels as lk

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

RTOL = 1e-5


def ort_run(model, feeds):
    blob = model if isinstance(model, bytes) else model.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ops_of(model):
    """The op types a loaded model runs (an lk.Sequential made from a chain keeps the graph it came from)."""
    return [n.op for n in getattr(model, "graph", model).nodes]


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    den = np.linalg.norm(want)
    return np.linalg.norm(got - want) / (den if den else 1.0)


def assert_matches_ort(model, feeds, graph=None):
    """Load `model` (ModelProto or bytes), run it on `feeds` and compare every output with ONNX Runtime's."""
    if graph is None:
        graph = lk.load_model(model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model))
    before = {k: v.copy() for k, v in feeds.items()}
    got = graph.run(**feeds)
    for k, v in feeds.items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"input {k} was modified")
    want = ort_run(model, feeds)
    for name, w in zip(graph.outputs, want):
        err = rel_err(got[name], w)
        assert err < RTOL, f"output {name}: relative error {err:.3g}"
    return graph


def make_model(nodes, inputs, outputs, initializers=(), opset=13):
    g = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = min(m.ir_version, 8 if opset <= 17 else 10)
    return m


def vinfo(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# --------------------------------------------------------------------------- torch exports

torch = None


def _torch():
    return pytest.importorskip("torch")


def export(model, x, dynamo=False, **kw):
    t = _torch()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        if dynamo:
            prog = t.onnx.export(model.eval(), (t.from_numpy(x),), dynamo=True, input_names=["x"],
                                 dynamic_shapes={"x": {0: t.export.Dim("N", min=1, max=1024)}}, verbose=False,
                                 **kw)
            return prog.model_proto.SerializeToString()
        t.onnx.export(model.eval(), (t.from_numpy(x),), f, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, **kw)
    return f.getvalue()


def seed_net():
    t = _torch()
    nn = t.nn
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 13 * 13, 10),
                         nn.Softmax(1))


def residual_net():
    t = _torch()
    nn, F = t.nn, t.nn.functional

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.c3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
            self.fc1 = nn.Linear(16 * 4 * 4, 32)
            self.fc2 = nn.Linear(32, 7)
            self.drop = nn.Dropout(0.5)
            for bn in (self.bn1, self.bn2):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.normal_()

        def forward(self, x):
            h = F.relu(self.bn1(self.c1(x)))
            h = F.relu(h + self.bn2(self.c2(h)))
            h = F.max_pool2d(F.relu(self.c3(h)), 2, ceil_mode=True)
            h = h.view(h.size(0), -1)  # Shape -> Gather -> Unsqueeze -> Concat -> Reshape
            h = self.drop(F.relu(self.fc1(h)))
            return F.log_softmax(self.fc2(h), dim=1)

    return Net()


def test_torch_seed_network(rng):
    t = _torch()
    t.manual_seed(int(rng.integers(1 << 31)))
    x = randn(rng, 5, 1, 28, 28)
    blob = export(seed_net(), x)
    g = assert_matches_ort(blob, {"x": x})
    # conv -> relu -> max-pool run as one fused pass, flatten + linear + softmax after it: a chain that
    # runs as one lk.Sequential.
    assert ops_of(g) == ["Conv", "Flatten", "Linear", "Softmax"]
    conv = g.graph.nodes[0]
    assert conv.attrs["activation"] == "relu" and conv.attrs["pool"]["kernel_shape"] == [2, 2]
    assert isinstance(g, lk.Sequential)
    assert [type(m).__name__ for m in g.layers] == ["Conv2dMaxPool2d", "Flatten", "Linear", "Softmax"]
    assert g.input_shape == (None, 1, 28, 28)
    # Other batch sizes through the same graph, including 1.
    for n in (1, 3):
        xb = randn(rng, n, 1, 28, 28)
        assert rel_err(g(xb), ort_run(blob, {"x": xb})[0]) < RTOL


@pytest.mark.parametrize("opset", [11, 13, 17, None])
def test_torch_residual_network(rng, opset):
    t = _torch()
    t.manual_seed(int(rng.integers(1 << 31)))
    x = randn(rng, 4, 3, 16, 16)
    kw = {} if opset is None else {"opset_version": opset}
    blob = export(residual_net(), x, **kw)
    g = assert_matches_ort(blob, {"x": x})
    ops = ops_of(g)
    assert isinstance(g, lk.Graph)  # the residual Add: not a chain
    assert "BatchNormalization" not in ops, f"batch norm not folded into the convolutions: {ops}"
    assert "Dropout" not in ops and "Shape" not in ops and "Gather" not in ops, ops
    assert ops.count("Linear") == 2 and "Flatten" in ops, ops


def test_torch_dynamo_export(rng):
    pytest.importorskip("onnxscript")
    t = _torch()
    t.manual_seed(int(rng.integers(1 << 31)))
    x = randn(rng, 3, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blob = export(residual_net(), x, dynamo=True)
    model = onnx.load_from_string(blob)
    name = model.graph.input[0].name
    g = lk.load_model(model)
    got = g(x)
    assert rel_err(got, ort_run(blob, {name: x})[0]) < RTOL


# --------------------------------------------------------------------------- operators built with onnx.helper

CONV_CASES = [
    # (input shape, weight shape, attributes)
    ((2, 3, 11, 13), (4, 3, 3, 3), {}),
    ((2, 3, 11, 13), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    ((2, 3, 11, 13), (4, 3, 3, 2), {"pads": [0, 1, 2, 0], "strides": [2, 1]}),
    ((2, 3, 11, 13), (4, 3, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((2, 3, 12, 12), (4, 3, 4, 4), {"auto_pad": "SAME_LOWER", "strides": [2, 3]}),
    ((2, 3, 11, 13), (4, 3, 3, 3), {"auto_pad": "VALID", "dilations": [2, 1]}),
    ((2, 6, 9, 9), (6, 2, 3, 3), {"group": 3, "pads": [1, 1, 1, 1], "dilations": [2, 2]}),
    ((2, 4, 9, 9), (4, 1, 3, 3), {"group": 4, "pads": [1, 1, 1, 1]}),  # depthwise
    ((1, 3, 7, 7), (5, 3, 1, 1), {"kernel_shape": [1, 1]}),
    ((2, 3, 17), (4, 3, 5), {"pads": [2, 1], "strides": [2]}),  # 1-D
]


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c[2]) for c in CONV_CASES])
def test_conv(rng, case, bias, opset):
    xs, ws, attrs = case
    x, w, b = randn(rng, *xs), randn(rng, *ws), randn(rng, ws[0])
    ins = ["x", "w"] + (["b"] if bias else [])
    node = helper.make_node("Conv", ins, ["y"], **attrs)
    inits = [init("w", w)] + ([init("b", b)] if bias else [])
    m = make_model([node], [vinfo("x", list(xs))], [vinfo("y", None)], inits, opset)
    assert_matches_ort(m, {"x": x})


POOL_CASES = [
    {"kernel_shape": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 1, 1], "ceil_mode": 1},
    {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_LOWER"},
    {"kernel_shape": [2, 3], "dilations": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "pads": [2, 1, 2, 2], "strides": [2, 3]},  # padding past half the window
]


@pytest.mark.parametrize("opset", [11, 13, 19])
@pytest.mark.parametrize("attrs", POOL_CASES, ids=[str(c) for c in POOL_CASES])
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_pooling(rng, op, attrs, opset):
    attrs = dict(attrs)
    if op == "AveragePool":
        attrs.setdefault("count_include_pad", int(rng.integers(2)))
        if "dilations" in attrs:
            opset = max(opset, 19)  # AveragePool has dilations from opset 19 on
    x = randn(rng, 2, 3, 11, 10)
    m = make_model([helper.make_node(op, ["x"], ["y"], **attrs)], [vinfo("x", [2, 3, 11, 10])],
                   [vinfo("y", None)], (), opset)
    assert_matches_ort(m, {"x": x})


def test_max_pool_indices(rng):
    x = randn(rng, 2, 3, 9, 8)
    node = helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1])
    m = make_model([node], [vinfo("x", [2, 3, 9, 8])], [vinfo("y", None), vinfo("i", None, TensorProto.INT64)])
    g = lk.load_model(m)
    y, i = g(x)
    wy, wi = ort_run(m, {"x": x})
    np.testing.assert_array_equal(y, wy)
    np.testing.assert_array_equal(i, wi)


def test_conv_relu_max_pool_fused(rng):
    """Conv -> Relu -> MaxPool becomes one fused node; ceil_mode and pool padding kept."""
    x, w, b = randn(rng, 3, 2, 15, 14), randn(rng, 6, 2, 3, 3), randn(rng, 6)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                              ceil_mode=1)]
    m = make_model(nodes, [vinfo("x", [None, 2, 15, 14])], [vinfo("y", None)], [init("w", w), init("b", b)])
    g = assert_matches_ort(m, {"x": x})
    assert ops_of(g) == ["Conv"]
    conv = getattr(g, "graph", g).nodes[0]
    assert conv.attrs["pool"]["ceil_mode"] == 1 and conv.attrs["activation"] == "relu"


GEMM_CASES = [
    ({}, (7,)),
    ({"transB": 1}, (1, 7)),
    ({"transA": 1}, (5, 7)),
    ({"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}, (7,)),
    ({"alpha": 1.5}, ()),
    ({"beta": 0.25}, (5, 1)),
    ({"transB": 1}, None),
]


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("case", GEMM_CASES, ids=[str(c) for c in GEMM_CASES])
def test_gemm(rng, case, opset):
    attrs, cshape = case
    M, K, N = 5, 9, 7
    a = randn(rng, *((K, M) if attrs.get("transA") else (M, K)))
    bmat = randn(rng, *((N, K) if attrs.get("transB") else (K, N)))
    ins = ["a", "b"] + ([] if cshape is None else ["c"])
    inits = [init("b", bmat)] + ([] if cshape is None else [init("c", randn(rng, *cshape))])
    m = make_model([helper.make_node("Gemm", ins, ["y"], **attrs)], [vinfo("a", list(a.shape))], [vinfo("y", None)],
                   inits, opset)
    g = assert_matches_ort(m, {"a": a})
    # Constant weights with a bias along the output features: one Linear node.
    if not attrs.get("transA") and (cshape is None or cshape in ((7,), (1, 7), ())):
        assert ops_of(g) == ["Linear"]


def test_gemm_with_runtime_weights(rng):
    a, bmat, c = randn(rng, 4, 6), randn(rng, 3, 6), randn(rng, 3)
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transB=1, alpha=2.0)
    m = make_model([node], [vinfo("a", [4, 6]), vinfo("b", [3, 6]), vinfo("c", [3])], [vinfo("y", None)])
    assert_matches_ort(m, {"a": a, "b": bmat, "c": c})


@pytest.mark.parametrize("xshape", [(6, 10), (2, 3, 10), (10,)])
def test_matmul_add(rng, xshape):
    x, w, b = randn(rng, *xshape), randn(rng, 10, 4), randn(rng, 4)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    m = make_model(nodes, [vinfo("x", list(xshape))], [vinfo("y", None)], [init("w", w), init("b", b)])
    g = assert_matches_ort(m, {"x": x})
    assert ops_of(g) == ["Linear"]


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [None, 0, 1, 2, -1])
def test_softmax_axis_semantics(rng, op, axis, opset):
    """Before opset 13 softmax flattens to 2-D at `axis` (default 1); from 13 it is over one axis (default -1)."""
    x = randn(rng, 3, 4, 5, scale=3.0)
    kw = {} if axis is None else {"axis": axis}
    m = make_model([helper.make_node(op, ["x"], ["y"], **kw)], [vinfo("x", [3, 4, 5])], [vinfo("y", None)], (),
                   opset)
    assert_matches_ort(m, {"x": x})


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_shape_ops_and_residual(rng, opset):
    """Flatten, Reshape (0 and -1), Dropout, Identity, standalone BatchNormalization, Add, global pooling."""
    C = 4
    x = randn(rng, 2, C, 6, 6)
    w = randn(rng, C, C, 3, 3)
    scale, bias, mean = randn(rng, C), randn(rng, C), randn(rng, C)
    var = rng.uniform(0.5, 2.0, C).astype(np.float32)
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "bb", "m", "v"], ["bn"], epsilon=1e-3),
        helper.make_node("Conv", ["bn", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "x"], ["r"]),
        helper.make_node("Relu", ["r"], ["rr"]),
        helper.make_node("Identity", ["rr"], ["id"]),
        helper.make_node("Dropout", ["id"], ["d"]),
        helper.make_node("GlobalAveragePool", ["d"], ["gap"]),
        helper.make_node("Reshape", ["d", "shape"], ["rs"]),
        helper.make_node("Flatten", ["rs"], ["f"], axis=2),
        helper.make_node("Flatten", ["gap"], ["g2"]),
    ]
    inits = [init("s", scale), init("bb", bias), init("m", mean), init("v", var), init("w", w),
             init("shape", np.array([0, C, -1, 3], np.int64))]
    m = make_model(nodes, [vinfo("x", [2, C, 6, 6])], [vinfo("f", None), vinfo("g2", None)], inits, opset)
    g = assert_matches_ort(m, {"x": x})
    assert {"Identity", "Dropout"}.isdisjoint(ops_of(g))


def test_constant_subgraph_folded(rng):
    """Constant / Shape / Gather / Unsqueeze / Concat computing a Reshape target fold at load time."""
    x = randn(rng, 3, 2, 4, 4)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Constant", [], ["i0"], value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
        helper.make_node("Constant", [], ["m1"], value_ints=[-1]),
        helper.make_node("Concat", ["n1", "m1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["y"]),
    ]
    w = randn(rng, 32, 5)
    m = make_model(nodes, [vinfo("x", ["N", 2, 4, 4])], [vinfo("y", None)],
                   [init("ax", np.array([0], np.int64)), init("w", w)], 13)
    g = assert_matches_ort(m, {"x": x})
    assert ops_of(g) == ["Flatten", "Linear"]


def test_float64_model(rng):
    x, w, b = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    m = make_model(nodes, [vinfo("x", [2, 3, 8, 8], TensorProto.DOUBLE)], [vinfo("y", None, TensorProto.DOUBLE)],
                   [init("w", w), init("b", b)])
    got = lk.load_model(m)(x)
    assert got.dtype == np.float64
    # float64 reference: direct summation.
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))
    want = np.maximum(np.einsum("nchwij,kcij->nkhw", win, w) + b[None, :, None, None], 0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- models shipped with onnx

def _light_models():
    root = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    return sorted(glob.glob(os.path.join(root, "light_*.onnx")))


def _randomize_weights(model, rng):
    """The 'light' models make their weights with ConstantOfShape (all one value): give them random ones."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    keep, new = [], []
    for n in model.graph.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in inits:
            shape = tuple(int(s) for s in inits[n.input[0]])
            if len(shape) <= 1:
                a = rng.uniform(0.5, 1.5, shape)
            else:
                a = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
            new.append(numpy_helper.from_array(a.astype(np.float32), n.output[0]))
        else:
            keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    model.graph.initializer.extend(new)
    return model


@pytest.mark.parametrize("path", [p for p in _light_models() if "vgg19" not in p and "zfnet" not in p],
                         ids=lambda p: os.path.basename(p))
def test_reference_models(rng, path):
    """AlexNet, DenseNet-121, Inception v1/v2, ResNet-50, ShuffleNet, SqueezeNet (random weights)."""
    model = _randomize_weights(onnx.load(path), rng)
    g = lk.load_model(model)
    shape = [d if d else 1 for d in g.input_shape]
    x = rng.uniform(0, 1, shape).astype(np.float32)
    got = g(x)
    want = ort_run(model, {g.inputs[0].name: x})[0]
    assert rel_err(got, want) < RTOL


# --------------------------------------------------------------------------- errors

def test_unsupported_operators_all_listed(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Einsum", ["a", "a"], ["b"], equation="ij,ij->ij"),
             helper.make_node("NonZero", ["b"], ["c"]),
             helper.make_node("Einsum", ["a", "a"], ["d"], equation="ij,ij->ij"),
             helper.make_node("MyOp", ["a"], ["e"], domain="com.example")]
    g = helper.make_graph(nodes, "t", [vinfo("x", [2, 2])], [vinfo("c", None), vinfo("d", None), vinfo("e", None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(m, str(path))
    with pytest.raises(lk.UnsupportedOperatorError) as e:
        lk.load_model(path)
    assert e.value.ops == ["Einsum", "NonZero", "com.example.MyOp"]
    assert "Einsum, NonZero, com.example.MyOp" in str(e.value) and "bad.onnx" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_bad_inputs(rng, tmp_path):
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x", ["N", 3, 4])], [vinfo("y", None)])
    path = tmp_path / "relu.onnx"
    onnx.save(m, str(path))
    g = lk.load_model(str(path))
    with pytest.raises(ValueError, match="x: expected shape"):
        g(randn(rng, 2, 5, 4))
    with pytest.raises(ValueError, match="x: expected 3 dimensions"):
        g(randn(rng, 3, 4))
    with pytest.raises(TypeError, match="x: expected a numpy.ndarray"):
        g("not an array")
    with pytest.raises(TypeError, match="takes 1 input"):
        g(randn(rng, 1, 3, 4), randn(rng, 1, 3, 4))
    # float64 data is converted to the model's float32
    x = rng.standard_normal((2, 3, 4))
    np.testing.assert_array_equal(g(x), np.maximum(x.astype(np.float32), 0))


def test_unreadable_files(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ValueError, match="junk.bin"):
        lk.load_model(junk)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07\xff\xff\xff")
    with pytest.raises(ValueError, match="broken.onnx"):
        lk.load_model(broken)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        lk.load_model(tmp_path / "missing.onnx")


def test_missing_onnx_package(monkeypatch, tmp_path):
    from lepton_kernels.models import onnx_import
    path = tmp_path / "m.onnx"
    path.write_bytes(make_model([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x", [1])],
                                [vinfo("y", None)]).SerializeToString())
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    with pytest.raises(ImportError, match="pip install onnx"):
        onnx_import.load_onnx(path)
