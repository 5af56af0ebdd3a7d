"""Judging a Keras model loaded by lk.load_model.

Keras' float32 output is no reference at the 1e-5 level: its torch backend
computes in float32 even for a float64 model, and a Dense layer of a few
thousand positive features (ReLU then max-pool) with weights of both signs,
then a softmax, leaves it up to 1e-5 from the exact result (measured: median
1.7e-6, largest 9.5e-6 over 100 random founding-document models at batch 1;
lepton's float32 network in the same runs: median 2.7e-7, largest 1.2e-6).

So the loaded graph, run in float64 (its parameters widened, its operators
lepton's float64 kernels), is the reference: lepton's float32 output must be
within RTOL of it, and Keras' own output within KERAS_RTOL, ten times Keras'
largest measured error. A loader that misreads the model (a layout, an
activation, a padding) is off by far more than that, so the second check is
what pins the loaded graph to Keras' meaning.
"""

from __future__ import annotations

import numpy as np

from lepton_kernels.models.graph import Graph, TensorInfo

RTOL = 1e-5
KERAS_RTOL = 1e-4


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)


def float64_twin(loaded):
    """The loaded model's graph with float64 input and parameters."""
    g = getattr(loaded, "graph", loaded)
    inputs = [TensorInfo(i.name, i.shape, np.dtype(np.float64)) for i in g.inputs]
    params = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in g.params.items()}
    return Graph(g.nodes, inputs, g.outputs, params, metadata=g.metadata, simplify_graph=False)


def check_against_keras(loaded, keras_out, x, context=""):
    """lepton's output on x within RTOL of the float64 twin's, Keras' within KERAS_RTOL."""
    want = float64_twin(loaded)(np.asarray(x, np.float64))
    err = rel_err(loaded(x), want)
    assert err < RTOL, f"{context}: lepton float32 against float64: {err:.3g}"
    err = rel_err(keras_out, want)
    assert err < KERAS_RTOL, f"{context}: Keras against the loaded graph in float64: {err:.3g}"
