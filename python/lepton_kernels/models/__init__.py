"""Models in and out: ``lk.load_model(path)`` and ``lk.save_model(model, path)``.

Formats, chosen by the file's content (then its suffix):

- ONNX (``.onnx``; needs the ``onnx`` package): any graph of the operators in
  ``lepton_kernels.models.ops`` (convolutions, pooling, Gemm/MatMul, ReLU,
  softmax, batch normalisation, residual Add, the shape arithmetic of
  exported graphs, ...). Input layout as in the model: NCHW.
- Keras 3 (``.keras``; needs ``h5py``, not Keras): Sequential models. The
  model takes NHWC input, as the Keras model does, and returns the same
  outputs.
- lepton's own file (``.lk`` or ``.npz``), written by ``lk.save_model``: one
  .npz of plain arrays, read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import zipfile

from .graph import Graph, Node, TensorInfo, UnsupportedOperatorError
from .native import is_native, load_native, save_graph

__all__ = ["Graph", "Node", "TensorInfo", "UnsupportedOperatorError", "load_model", "save_model"]


def _zip_names(path):
    try:
        with zipfile.ZipFile(path) as z:
            return set(z.namelist())
    except (zipfile.BadZipFile, OSError):
        return None


def load_model(path):
    """Load a model from an ONNX, Keras 3 (.keras) or lepton (.lk/.npz) file.

    Returns a callable model, ``model(x) -> y`` on NumPy arrays, with
    ``input_shape`` (None for dimensions known only at run time),
    ``metadata`` and ``describe()``. Raises ValueError naming `path` for a
    file of no known format, :class:`UnsupportedOperatorError` (a ValueError)
    listing every operator of the model that lepton cannot run.
    """
    try:
        import onnx
        if isinstance(path, onnx.ModelProto):
            from .onnx_import import load_onnx
            return _maybe_sequential(load_onnx(path))
    except ImportError:
        pass
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"path: no such file: {p!r}")
    if os.path.isdir(p):
        raise ValueError(f"path: {p!r} is a directory, not a model file")
    suffix = os.path.splitext(p)[1].lower()
    names = _zip_names(p)
    if names is not None:
        if "__lepton_model__.npy" in names:
            return _maybe_sequential(load_native(p))
        if "config.json" in names and ("model.weights.h5" in names or suffix == ".keras"):
            from .keras_import import load_keras
            return _maybe_sequential(load_keras(p))
        raise ValueError(f"path: {p!r} is a zip archive but neither a Keras 3 .keras file nor a lepton model "
                         f"file")
    with open(p, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x89HDF"):
        raise ValueError(f"path: {p!r} is an HDF5 file (Keras 2 .h5?); save the model in the Keras 3 "
                         f".keras format")
    if suffix == ".onnx" or _looks_like_onnx(head):
        from .onnx_import import load_onnx
        return _maybe_sequential(load_onnx(p))
    raise ValueError(f"path: {p!r} is not a model file lepton-kernels reads (ONNX .onnx, Keras 3 .keras, "
                     f"lepton .lk/.npz)")


def _looks_like_onnx(head: bytes) -> bool:
    # A serialised ModelProto starts with field 1 (ir_version, varint: 0x08) in every exporter we know.
    return len(head) >= 2 and head[0] == 0x08 and 0 < head[1] < 0x80


def _maybe_sequential(graph):
    from .sequential import to_sequential
    return to_sequential(graph)


def save_model(model, path, *, metadata=None) -> None:
    """Write `model` (an lk.Graph or lk.Sequential) to `path` as one lepton model file (.lk or .npz).

    ``lk.load_model(path)`` reads it back; the file holds only plain arrays and JSON. `metadata` (a dict
    of JSON values) is stored with the model's own, e.g. ``{"labels": [...], "mean": [...], "std": [...]}``
    for ``python -m lepton_kernels predict``.
    """
    from .sequential import graph_of
    graph = graph_of(model)
    if graph is None:
        raise TypeError(f"model: expected an lk.Graph or lk.Sequential, got {type(model).__name__}")
    save_graph(graph, path, metadata=metadata)


__all__ += ["is_native"]
