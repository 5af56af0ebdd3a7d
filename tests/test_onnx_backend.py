"""The onnx package's own backend tests, run through lepton_kernels.onnx_backend.

Node tests for Conv, MaxPool, AveragePool, global pooling, Gemm, MatMul,
Relu, Flatten, Reshape, Softmax / LogSoftmax (and their expanded function
bodies), BatchNormalization, Add, Dropout and Identity, a few normalisations
and activations of newer exports (NumPy); the models converted
from PyTorch modules of those layers; the PyTorch operator models. Each test
compares with the reference outputs that ship with onnx.

Every excluded case is named in EXCLUDED with the reason it is out of scope.
"""

from __future__ import annotations

import re
import unittest
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import onnx.backend.test  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lepton_kernels import onnx_backend  # noqa: E402
from lepton_kernels.models import ops  # noqa: E402

INCLUDE = re.compile(
    r"^test_("
    # node tests
    r"conv_|maxpool_|averagepool_|globalaveragepool|globalmaxpool|gemm_|matmul_|relu|flatten_|reshape_"
    r"|softmax_|logsoftmax_|batchnorm_|add|dropout_|identity"
    # normalisations and activations of newer exports, run in NumPy
    r"|instancenorm_|layer_normalization_|gelu_|sigmoid|tanh|leakyrelu|clip|hardswish|hardsigmoid"
    # models converted from torch.nn modules, and torch operators
    r"|(Conv[12]d|MaxPool[12]d|AvgPool[12]d|BatchNorm[12]d|Linear|ReLU|Softmax|LogSoftmax|log_softmax|softmax)"
    r"|operator_"
    r").*_cpu$")

EXCLUDED = {
    "test_batchnorm_epsilon_training_mode_cpu": "training mode (running statistics as outputs); inference only",
    "test_batchnorm_example_training_mode_cpu": "training mode (running statistics as outputs); inference only",
    "test_identity_opt_cpu": "optional-typed values, not tensors",
    "test_identity_sequence_cpu": "sequence-typed values, not tensors",
    "test_operator_convtranspose_cpu": "ConvTranspose (transposed convolution) is not a supported operator",
}


def _backend_test():
    with warnings.catch_warnings():
        # Generating some of onnx's node-test data (casts to narrow types) overflows on purpose.
        warnings.simplefilter("ignore")
        return onnx.backend.test.BackendTest(onnx_backend.LeptonBackend, __name__)


def _test_classes():
    bt = _backend_test()
    classes = {}
    seen = set()
    for category, items in bt._test_items.items():
        cls = type(f"TestOnnxBackend{category}", (unittest.TestCase,), {"__module__": __name__})
        count = 0
        for name, item in sorted(items.items()):
            if not INCLUDE.search(name):
                continue
            seen.add(name)
            func = item.func
            if name in EXCLUDED:
                func = unittest.skip(EXCLUDED[name])(func)
            setattr(cls, name, func)
            count += 1
        if count:
            classes[cls.__name__] = cls
    stale = sorted(set(EXCLUDED) - seen)
    assert not stale, f"EXCLUDED names cases that do not exist: {stale}"
    return classes


globals().update(_test_classes())


def test_included_cases_cover_the_core_operators():
    names = [n for cls in _test_classes().values() for n in dir(cls) if n.startswith("test_")]
    for prefix in ("test_conv_", "test_maxpool_2d", "test_gemm_", "test_matmul_", "test_relu", "test_flatten_",
                   "test_softmax_", "test_Conv2d", "test_MaxPool2d", "test_Linear"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert len(names) > 150


class _CoreSpy:
    """Wraps the native module: records which kernels ran."""

    def __init__(self, core):
        self._core, self.calls = core, []

    def __getattr__(self, name):
        attr = getattr(self._core, name)
        if callable(attr):
            def wrapped(*a, **k):
                self.calls.append(name)
                return attr(*a, **k)
            return wrapped
        return attr


def test_float32_core_ops_run_in_lepton_kernels(monkeypatch, rng):
    """Conv, MaxPool, Gemm, MatMul, Relu and Softmax on float32 go through lepton's kernels, not NumPy."""
    spy = _CoreSpy(ops._core)
    monkeypatch.setattr(ops, "_core", spy)
    linear_calls = []
    real_linear = ops._lk_linear
    monkeypatch.setattr(ops, "_lk_linear", lambda *a, **k: linear_calls.append(1) or real_linear(*a, **k))
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    conv = onnx_backend.run_node(helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]), [x, w])[0]
    assert "Conv2dLayer" in spy.calls and conv.shape == (2, 4, 8, 8)
    pool = onnx_backend.run_node(helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
                                 [x])[0]
    assert "max_pool2d" in spy.calls and pool.shape == (2, 3, 4, 4)
    a, b = rng.standard_normal((5, 6)).astype(np.float32), rng.standard_normal((6, 7)).astype(np.float32)
    onnx_backend.run_node(helper.make_node("Gemm", ["a", "b"], ["y"]), [a, b])
    onnx_backend.run_node(helper.make_node("MatMul", ["a", "b"], ["y"]), [a, b])
    assert len(linear_calls) == 2
    # Constant weights: packed once into a linear layer.
    g = helper.make_graph([helper.make_node("Gemm", ["a", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [5, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 7])],
                          [numpy_helper.from_array(b, "b")])
    rep = onnx_backend.prepare(helper.make_model(g))
    np.testing.assert_allclose(rep.run([a])[0], a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)
    assert "LinearLayer" in spy.calls


def test_backend_api(rng):
    assert onnx_backend.supports_device("CPU") and not onnx_backend.supports_device("CUDA")
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y = onnx_backend.run_node(helper.make_node("Relu", ["x"], ["y"]), {"x": x})[0]
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    g = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])])
    out = onnx_backend.run_model(helper.make_model(g), [x])[0]
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(out, e / e.sum(axis=1, keepdims=True), rtol=1e-6)
    with pytest.raises(ValueError, match="device"):
        onnx_backend.prepare(helper.make_model(g), device="CUDA")
