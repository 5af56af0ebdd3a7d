"""lk.save_model / lk.load_model in lepton's own file: one .npz of plain arrays and JSON.

A saved and reloaded model gives bit-identical outputs (same weights, same
kernels); the file loads with np.load(allow_pickle=False); the graph runs
against a float64 NumPy reference.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import lepton_kernels as lk
from lepton_kernels.models import Node, TensorInfo


def small_cnn(rng, dtype=np.float32):
    """conv(3x3, pad 1) -> relu -> maxpool 2 -> conv(asymmetric pads) -> flatten -> linear -> softmax."""
    # Weights scaled by 1/sqrt(fan-in), as networks are initialised, keep the logits O(1): the softmax
    # then passes float32 rounding of the logits (~1e-7 relative) to the probabilities without
    # amplifying it past the 1e-5 tolerance of the tests (unscaled, logits near 100 did).
    def weight(shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(dtype)
    w1, b1 = weight((4, 2, 3, 3)), rng.standard_normal(4).astype(dtype)
    w2 = weight((3, 4, 2, 2))
    wl, bl = weight((5, 3 * 5 * 5)), rng.standard_normal(5).astype(dtype)
    nodes = [
        Node("Conv", ["x", "w1", "b1"], ["c1"], {"pads": [1, 1, 1, 1]}),
        Node("Relu", ["c1"], ["r1"]),
        Node("MaxPool", ["r1"], ["p1"], {"kernel_shape": [2, 2], "strides": [2, 2]}),
        Node("Conv", ["p1", "w2"], ["c2"], {"pads": [1, 0, 0, 1]}),
        Node("Flatten", ["c2"], ["f"], {"axis": 1}),
        Node("Linear", ["f", "wl", "bl"], ["l"]),
        Node("Softmax", ["l"], ["y"], {"axis": 1}),
    ]
    params = {"w1": w1, "b1": b1, "w2": w2, "wl": wl, "bl": bl}
    g = lk.Graph(nodes, [TensorInfo("x", (None, 2, 10, 10), np.dtype(dtype))], ["y"], params,
                 metadata={"source": "test"})
    return g, params


def reference(x, p):
    """float64 NumPy forward pass of small_cnn."""
    def conv(x, w, b, pads):
        t, l, bo, r = pads
        xp = np.pad(x, ((0, 0), (0, 0), (t, bo), (l, r)))
        win = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=(2, 3))
        y = np.einsum("nchwij,kcij->nkhw", win, w)
        return y if b is None else y + b[None, :, None, None]
    p = {k: v.astype(np.float64) for k, v in p.items()}
    x = x.astype(np.float64)
    h = np.maximum(conv(x, p["w1"], p["b1"], (1, 1, 1, 1)), 0)
    h = h.reshape(h.shape[0], 4, 5, 2, 5, 2).max(axis=(3, 5))
    h = conv(h, p["w2"], None, (1, 0, 0, 1))
    h = h.reshape(h.shape[0], -1) @ p["wl"].T + p["bl"]
    e = np.exp(h - h.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_graph_matches_reference(rng, dtype):
    g, params = small_cnn(rng, dtype)
    # conv -> relu -> max-pool fused into one node; relu not separate.
    assert [n.op for n in g.nodes] == ["Conv", "Conv", "Flatten", "Linear", "Softmax"]
    x = rng.standard_normal((3, 2, 10, 10)).astype(dtype)
    got = g(x)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, reference(x, params), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["model.lk", "model.npz", "model"])
def test_round_trip(rng, tmp_path, name):
    g, _ = small_cnn(rng)
    path = tmp_path / name
    lk.save_model(g, path, metadata={"labels": ["a", "b", "c", "d", "e"], "mean": [0.5]})
    assert path.exists() and (name.endswith(".npz") or not (tmp_path / (name + ".npz")).exists())
    with np.load(path, allow_pickle=False) as data:  # plain arrays only: loading runs no code
        assert all(data[k].dtype != object for k in data.files)
        arch = json.loads(data["__lepton_model__"].tobytes())
    assert arch["format"] == "lepton-kernels-model" and arch["version"] == 1
    g2 = lk.load_model(path)
    x = rng.standard_normal((4, 2, 10, 10)).astype(np.float32)
    np.testing.assert_array_equal(g2(x), g(x))
    assert g2.metadata["labels"] == ["a", "b", "c", "d", "e"] and g2.metadata["source"] == "test"
    assert g2.input_shape == (None, 2, 10, 10)
    assert "Linear" in g2.describe() and "+maxpool 2x2" in g2.describe()


def test_round_trip_of_loaded_onnx(rng, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
             helper.make_node("Shape", ["c"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["ones"],
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Mul", ["c", "ones"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 9])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    model = lk.load_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    path = tmp_path / "m.lk"
    lk.save_model(model, path)  # the ConstantOfShape's array attribute goes into the file too
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    np.testing.assert_array_equal(lk.load_model(path)(x), model(x))


def test_errors(rng, tmp_path):
    g, _ = small_cnn(rng)
    with pytest.raises(TypeError, match="model: expected an lk.Graph"):
        lk.save_model(object(), tmp_path / "x.lk")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="plain.npz"):
        lk.load_model(tmp_path / "plain.npz")
    path = tmp_path / "m.lk"
    lk.save_model(g, path)
    # A file from a newer version of the format
    with zipfile.ZipFile(path) as z:
        assert "__lepton_model__.npy" in z.namelist()
    with np.load(path, allow_pickle=False) as data:
        arch = json.loads(data["__lepton_model__"].tobytes())
        arrays = {k: data[k] for k in data.files if k != "__lepton_model__"}
    arch["version"] = 99
    np.savez(tmp_path / "new.npz", __lepton_model__=np.frombuffer(json.dumps(arch).encode(), np.uint8), **arrays)
    with pytest.raises(ValueError, match="version 99"):
        lk.load_model(tmp_path / "new.npz")
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 2, 10, 10\)"):
        g(np.zeros((1, 3, 10, 10), np.float32))


def test_unsupported_and_malformed_graphs():
    with pytest.raises(lk.UnsupportedOperatorError, match="Bogus, Nope"):
        lk.Graph([Node("Bogus", ["x"], ["a"]), Node("Nope", ["a"], ["y"])], ["x"], ["y"], {})
    with pytest.raises(ValueError, match="'q'"):
        lk.Graph([Node("Relu", ["q"], ["y"])], ["x"], ["y"], {})
    with pytest.raises(ValueError, match="outputs"):
        lk.Graph([Node("Relu", ["x"], ["y"])], ["x"], ["z"], {})


# --------------------------------------------------------------------------- lk.Sequential

def seed_sequential(rng):
    w = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    wl = (rng.standard_normal((10, 8 * 13 * 13)) * 0.05).astype(np.float32)
    bl = rng.standard_normal(10).astype(np.float32)
    return lk.Sequential([lk.Conv2dMaxPool2d(w, b), lk.Flatten(), lk.Dropout(0.5), lk.Linear(wl, bl),
                          lk.Softmax(dim=1)]), (w, b, wl, bl)


def seed_reference(x, w, b, wl, bl):
    x, w, b, wl, bl = (a.astype(np.float64) for a in (x, w, b, wl, bl))
    win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))
    h = np.maximum(np.einsum("nchwij,kcij->nkhw", win, w) + b[None, :, None, None], 0)
    h = h[:, :, :26, :26].reshape(len(x), 8, 13, 2, 13, 2).max(axis=(3, 5))
    z = h.reshape(len(x), -1) @ wl.T + bl
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_sequential_round_trip(rng, tmp_path):
    net, weights = seed_sequential(rng)
    path = tmp_path / "seed.lk"
    lk.save_model(net, path, metadata={"labels": [str(i) for i in range(10)]})
    loaded = lk.load_model(path)
    assert isinstance(loaded, lk.Sequential)  # a chain: back as one network
    assert [type(m).__name__ for m in loaded.layers] == ["Conv2dMaxPool2d", "Flatten", "Linear", "Softmax"]
    x = rng.standard_normal((6, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), net(x))
    np.testing.assert_allclose(loaded(x), seed_reference(x, *weights), rtol=1e-5, atol=1e-7)
    assert loaded.metadata["labels"][3] == "3"
    assert loaded.input_shape == (None, None, None, None)
    assert "Conv2d" in loaded.describe(x.shape) or "conv" in loaded.describe(x.shape).lower()
    # float64 data is converted to float32, as for graphs
    np.testing.assert_array_equal(loaded(x.astype(np.float64)), net(x))
    # Saved again from the loaded network: same file content, same results.
    lk.save_model(loaded, tmp_path / "again.lk")
    np.testing.assert_array_equal(lk.load_model(tmp_path / "again.lk")(x), net(x))


def test_graph_and_loaded_sequential_pickle(rng, tmp_path):
    import pickle
    g, _ = small_cnn(rng)
    x = rng.standard_normal((2, 2, 10, 10)).astype(np.float32)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(g))(x), g(x))
    net, _ = seed_sequential(rng)
    lk.save_model(net, tmp_path / "s.lk")
    loaded = lk.load_model(tmp_path / "s.lk")
    again = pickle.loads(pickle.dumps(loaded))
    xs = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(again(xs), loaded(xs))
    assert again.metadata == loaded.metadata
