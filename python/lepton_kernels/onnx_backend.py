"""An ONNX backend (``onnx.backend.base.Backend``) that runs models through lepton-kernels.

    from lepton_kernels import onnx_backend
    rep = onnx_backend.prepare(model)           # an onnx.ModelProto or a path
    outputs = rep.run([x])                      # a tuple of NumPy arrays

or ``onnx_backend.run_model(model, [x])`` / ``run_node(node, [x, w])``. The
model is loaded once into an lk.Graph (weights packed, constant subgraphs
folded); float32 and float64 convolutions, max-pooling, Gemm/MatMul, ReLU
and softmax run in lepton's kernels, the rest in NumPy. CPU only.
"""

from __future__ import annotations

import numpy as np

try:
    import onnx
    from onnx.backend.base import Backend, BackendRep
except ImportError:
    raise ImportError("lepton_kernels.onnx_backend needs the 'onnx' package: pip install onnx") from None

from .models.graph import Graph
from .models.onnx_import import load_onnx

__all__ = ["LeptonBackend", "LeptonBackendRep", "prepare", "run_model", "run_node", "supports_device"]


class LeptonBackendRep(BackendRep):
    """A prepared model: ``run(inputs)`` with a list (graph input order) or a dict (by name)."""

    def __init__(self, graph: Graph):
        self.graph = graph

    def run(self, inputs, **kwargs):
        if isinstance(inputs, dict):
            res = self.graph.run(**inputs)
        else:
            if isinstance(inputs, np.ndarray):
                inputs = [inputs]
            res = self.graph.run(*inputs)
        return tuple(res[o] for o in self.graph.outputs)


class LeptonBackend(Backend):
    @classmethod
    def is_compatible(cls, model, device="CPU", **kwargs):
        return cls.supports_device(device)

    @classmethod
    def prepare(cls, model, device="CPU", **kwargs):
        if not cls.supports_device(device):
            raise ValueError(f"device: lepton's ONNX backend runs on 'CPU' only, got {device!r}")
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(model)
        super().prepare(model, device, **kwargs)  # the checker
        return LeptonBackendRep(load_onnx(model))

    @classmethod
    def run_model(cls, model, inputs, device="CPU", **kwargs):
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node, inputs, device="CPU", outputs_info=None, **kwargs):
        """Run one NodeProto on `inputs` (a list in the node's input order, or a dict by name)."""
        if not cls.supports_device(device):
            raise ValueError(f"device: lepton's ONNX backend runs on 'CPU' only, got {device!r}")
        if isinstance(inputs, dict):
            arrays = [np.asarray(inputs[n]) if n else None for n in node.input]
        else:
            arrays = [np.asarray(a) for a in inputs]
        names = [n for n in node.input if n]
        if len(arrays) != len(names) and not isinstance(inputs, dict):
            raise ValueError(f"inputs: the node takes {len(names)} input(s), got {len(arrays)}")
        arrays = [a for a in arrays if a is not None]
        vis = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
               for n, a in zip(names, arrays)]
        outs = [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o]
        graph = onnx.helper.make_graph([node], "node", vis, outs)
        opset = kwargs.get("opset_version") or onnx.defs.onnx_opset_version()
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(node.domain or "", opset)])
        return LeptonBackendRep(load_onnx(model)).run(arrays)

    @classmethod
    def supports_device(cls, device):
        return str(device).upper().split(":")[0] == "CPU"


prepare = LeptonBackend.prepare
run_model = LeptonBackend.run_model
run_node = LeptonBackend.run_node
supports_device = LeptonBackend.supports_device
