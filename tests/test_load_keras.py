"""lk.load_model on Keras 3 .keras files written by Keras itself.

The loaded model takes the same NHWC input as the Keras model and must give
the same outputs (Keras runs on its torch backend here, in float32; how the
outputs are judged is in keras_reference.py). Loading never
imports Keras: the .keras zip is read with the standard library and h5py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import lepton_kernels as lk
from keras_reference import check_against_keras

pytest.importorskip("h5py")
pytest.importorskip("torch")
os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported: the only backend installed
keras = pytest.importorskip("keras")
L = keras.layers

# Keras' torch backend converts its variables with np.array(x), which NumPy 2 flags; it is Keras' own
# warning, raised while Keras saves, and says nothing about the model.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _randomize(model, rng):
    """Random weights everywhere (Keras zero-initialises biases and sets BN statistics to 0/1)."""
    for v in model.weights:
        shape = tuple(int(d) for d in v.shape)
        if len(shape) == 1:  # biases, batch-norm scales, shifts, means and variances (positive)
            a = rng.uniform(0.5, 1.5, shape)
        else:
            a = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        v.assign(a.astype(np.float32))


def save_and_load(model, tmp_path, rng, name="model.keras"):
    _randomize(model, rng)
    path = tmp_path / name
    model.save(path)
    return lk.load_model(path), path


def check(model, tmp_path, rng, batch=4):
    g, path = save_and_load(model, tmp_path, rng)
    shape = (batch,) + tuple(model.input_shape[1:])
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    want = keras.ops.convert_to_numpy(model(x))
    check_against_keras(g, want, x)
    return g, x


def test_founding_model(tmp_path, rng):
    """Conv2D(32, 3x3, relu) -> MaxPooling2D(2x2) -> Flatten -> Dense(10, softmax) on 28x28x1."""
    model = keras.Sequential([keras.Input((28, 28, 1)), L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(2),
                              L.Flatten(), L.Dense(10, activation="softmax")])
    g, x = check(model, tmp_path, rng)
    assert g.input_shape == (None, 28, 28, 1)
    assert g.layout == "nhwc"
    # One transpose at the edge, conv+relu+pool fused, the Dense reads the NCHW features directly; the
    # chain runs as one lk.Sequential (the transpose a view of the input).
    assert [n.op for n in getattr(g, "graph", g).nodes] == ["Transpose", "Conv", "Flatten", "Linear", "Softmax"]
    assert isinstance(g, lk.Sequential)
    np.testing.assert_allclose(g(x).sum(axis=1), 1, rtol=1e-5)
    # Unbatched-size batches
    for n in (1, 7):
        xb = rng.uniform(-1, 1, (n, 28, 28, 1)).astype(np.float32)
        check_against_keras(g, keras.ops.convert_to_numpy(model(xb)), xb, f"batch {n}")


def test_padding_strides_batch_norm_pooling(tmp_path, rng):
    model = keras.Sequential([
        keras.Input((15, 17, 3)),
        L.Conv2D(8, 3, padding="same", strides=2, activation="relu"),
        L.BatchNormalization(),
        L.Conv2D(6, (5, 3), padding="same", dilation_rate=1),
        L.AveragePooling2D(2, padding="same"),
        L.MaxPooling2D(3, strides=2, padding="same"),
        L.Flatten(),
        L.Dropout(0.3),
        L.Dense(16, activation="relu"),
        L.Dense(5),
        L.Softmax(),
    ])
    check(model, tmp_path, rng)


def test_batch_norm_folds_into_conv(tmp_path, rng):
    model = keras.Sequential([keras.Input((10, 10, 2)), L.Conv2D(4, 3), L.BatchNormalization(), L.ReLU(),
                              L.Conv2D(3, 3, dilation_rate=2), L.GlobalAveragePooling2D(),
                              L.Dense(4, activation="tanh")])
    g, _ = check(model, tmp_path, rng)
    assert "BatchNormalization" not in [n.op for n in getattr(g, "graph", g).nodes]


def test_depthwise_separable_and_leaky_layers(tmp_path, rng):
    """The mobile-style layers: depthwise (with a depth multiplier), separable, ReLU6 and leaky ReLUs."""
    model = keras.Sequential([
        keras.Input((13, 11, 3)),
        L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", activation="relu"),
        L.SeparableConv2D(8, (3, 2), strides=2, depth_multiplier=3),
        L.ReLU(max_value=6.0),
        L.DepthwiseConv2D((2, 3), dilation_rate=(1, 2), use_bias=False),
        L.LeakyReLU(negative_slope=0.2),
        L.SeparableConv2D(5, 1, use_bias=False, activation="relu"),
        L.ReLU(negative_slope=0.1),
        L.Flatten(),
        L.Dense(4),
    ])
    g, _ = check(model, tmp_path, rng)
    ops = [n.op for n in getattr(g, "graph", g).nodes]
    assert ops.count("Conv") == 6 and "Clip" in ops and ops.count("LeakyRelu") == 2


def test_no_convolution(tmp_path, rng):
    """Flatten straight on the NHWC input: no transposes at all."""
    model = keras.Sequential([keras.Input((6, 5, 3)), L.Flatten(), L.Dense(8, activation="relu"),
                              L.Dense(3, activation="linear")])
    g, _ = check(model, tmp_path, rng)
    assert "Transpose" not in [n.op for n in getattr(g, "graph", g).nodes]


def test_flatten_into_non_dense(tmp_path, rng):
    """A Flatten whose features do not go into a Dense is restored to Keras' (H, W, C) order."""
    model = keras.Sequential([keras.Input((9, 9, 2)), L.Rescaling(1 / 255.0), L.ZeroPadding2D(1),
                              L.Conv2D(4, 3, groups=2, use_bias=False), L.Activation("relu"), L.Flatten(),
                              L.Activation("softmax")])
    check(model, tmp_path, rng)


def test_load_does_not_import_keras(tmp_path, rng):
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(2, 3, activation="relu"), L.MaxPooling2D(2),
                              L.Flatten(), L.Dense(3, activation="softmax")])
    _, path = save_and_load(model, tmp_path, rng)
    code = ("import sys, numpy as np, lepton_kernels as lk; m = lk.load_model(sys.argv[1]); "
            "m(np.zeros((1, 8, 8, 1), np.float32)); assert 'keras' not in sys.modules, 'keras imported'")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


def test_errors(tmp_path, rng):
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(2, 3), L.Flatten(), L.Dense(3)])
    g, path = save_and_load(model, tmp_path, rng)
    with pytest.raises(ValueError, match="input: expected shape"):
        g(np.zeros((2, 1, 8, 8), np.float32))  # NCHW given to an NHWC model
    # A layer lepton does not run: every unsupported layer class named.
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(2, 3), L.LayerNormalization(),
                              L.Conv2DTranspose(2, 3), L.Flatten(), L.Dense(3)])
    model.save(tmp_path / "bad.keras")
    with pytest.raises(lk.UnsupportedOperatorError, match="keras.Conv2DTranspose, keras.LayerNormalization"):
        lk.load_model(tmp_path / "bad.keras")
    # A functional model
    inp = keras.Input((4,))
    functional = keras.Model(inp, L.Dense(2)(inp))
    functional.save(tmp_path / "functional.keras")
    with pytest.raises(ValueError, match="Sequential"):
        lk.load_model(tmp_path / "functional.keras")
    # A zip that is neither
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match="other.zip"):
        lk.load_model(tmp_path / "other.zip")
    with zipfile.ZipFile(path) as z:
        assert json.loads(z.read("config.json"))["class_name"] == "Sequential"
