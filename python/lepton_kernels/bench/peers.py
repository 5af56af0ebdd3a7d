"""The libraries lepton is compared against, each optional.

A peer is detected when this module is imported; a missing one stays in
``PEERS`` with ``reason`` saying why it is skipped. An available peer turns a
workload ``Instance`` into a ``Prepared`` callable on the same input and
parameters as lepton, using its own best equivalent of the layer chain.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

from .workloads import Conv2d, Instance, Linear, MaxPool2d, Prepared, Softmax, chain

__all__ = ["Peer", "TorchPeer", "TorchCompilePeer", "OrtPeer", "PEERS", "available"]

try:
    import torch
    import torch.nn.functional as F
except (ImportError, OSError) as e:  # OSError: a wheel whose shared libraries fail to load
    torch = None
    _TORCH_MISSING: Optional[str] = f"not importable ({e})"
else:
    _TORCH_MISSING = None

try:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
except (ImportError, OSError) as e:
    ort = None
    _ORT_MISSING: Optional[str] = f"not importable ({e})"
else:
    _ORT_MISSING = None


class Peer:
    name = ""
    reason: Optional[str] = None  # why the peer is skipped; None when it is available

    @property
    def available(self) -> bool:
        return self.reason is None

    @property
    def version(self) -> Optional[str]:
        return None

    def applies(self, workload) -> bool:
        """Whether this peer runs `workload` (its cell is '-' otherwise)."""
        return True

    def set_threads(self, n: int) -> None:
        raise NotImplementedError

    def prepare(self, inst: Instance) -> Prepared:
        raise NotImplementedError

    def matmul(self, a, b, c):
        """A zero-argument callable computing ``c = a @ b`` in place (for the ceiling), and what runs it;
        None for a peer that adds nothing to the ceiling."""
        raise NotImplementedError


class TorchPeer(Peer):
    """torch.nn.functional on tensors sharing the NumPy arrays' memory, in inference mode."""

    name = "torch"
    reason = _TORCH_MISSING

    @property
    def version(self):
        return torch.__version__ if torch is not None else None

    def set_threads(self, n: int) -> None:
        torch.set_num_threads(n)

    @staticmethod
    def _step(layer, shape, p):
        t = {k: (None if v is None else torch.from_numpy(v)) for k, v in p.items()}
        if isinstance(layer, Conv2d):
            op = partial(F.conv2d, weight=t["weight"], bias=t["bias"], stride=layer.stride,
                         padding=layer.padding, groups=layer.groups)
        elif isinstance(layer, MaxPool2d):
            op = partial(F.max_pool2d, kernel_size=layer.kernel, stride=layer.step, padding=layer.padding)
        elif isinstance(layer, Linear):
            linear = partial(F.linear, weight=t["weight"], bias=t["bias"])
            op = linear if len(shape) == 2 else (lambda x: linear(x.flatten(1)))
        elif isinstance(layer, Softmax):
            op = partial(F.softmax, dim=1)
        else:
            raise TypeError(f"torch: no implementation for {type(layer).__name__}")
        if getattr(layer, "relu", False):
            # In place on the fresh output: the cheapest eager ReLU.
            return lambda x: torch.relu_(op(x))
        return op

    def prepare(self, inst: Instance) -> Prepared:
        steps = [self._step(layer, shape, p) for layer, shape, p in inst.steps()]
        first = partial(steps[0], torch.from_numpy(inst.x))
        return Prepared(chain(first, steps[1:]), to_numpy=lambda y: y.numpy(), context=torch.inference_mode)

    def matmul(self, a, b, c):
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
        config = torch.__config__.show()
        blas = config.split("BLAS_INFO=", 1)[1].split(",", 1)[0] if "BLAS_INFO=" in config else "unknown BLAS"

        def run():
            with torch.inference_mode():
                torch.matmul(ta, tb, out=tc)

        return run, f"torch {torch.__version__}, {blas}"


class TorchCompilePeer(TorchPeer):
    """The torch chain through ``torch.compile`` (inductor, static shapes), on the whole-network rows only:
    each row costs a compilation of several seconds, and a single layer gives inductor nothing to fuse."""

    name = "torch.compile"
    reason = _TORCH_MISSING or (None if torch is None or hasattr(torch, "compile") else "no torch.compile")

    def applies(self, workload) -> bool:
        return workload.network

    def prepare(self, inst: Instance) -> Prepared:
        steps = [self._step(layer, shape, p) for layer, shape, p in inst.steps()]

        def forward(x):
            for step in steps:
                x = step(x)
            return x

        # Compile in this process: inductor's pool of compile workers keeps the CPUs busy for a while after
        # the compilation, which would slow every implementation timed next to it.
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
        compiled = torch.compile(forward, dynamic=False)
        x = torch.from_numpy(inst.x)
        return Prepared(lambda: compiled(x), to_numpy=lambda y: y.numpy(), context=torch.no_grad)

    def matmul(self, a, b, c):
        return None


class OrtPeer(Peer):
    """ONNX Runtime's CPU provider on an in-memory model of the chain (Conv, Relu, MaxPool, Flatten, Gemm, Softmax).

    The session gets the benchmark's thread count for intra-op work, one
    inter-op thread and sequential execution; the input is bound once as a
    NumPy array (zero-copy) and the output is allocated by ONNX Runtime on
    each run, as lepton allocates its own.
    """

    name = "ort"
    reason = _ORT_MISSING
    # Opset 17 and IR version 8: old enough for any onnxruntime >= 1.14.
    OPSET = 17
    IR_VERSION = 8

    def __init__(self):
        self.threads = 1

    @property
    def version(self):
        return f"{ort.__version__} (onnx {onnx.__version__})" if ort is not None else None

    def set_threads(self, n: int) -> None:
        self.threads = n

    def model(self, inst: Instance):
        nodes, inits = [], []
        cur = "x"

        def add(op, inputs, **attrs):
            nonlocal cur
            out = f"t{len(nodes)}"
            nodes.append(helper.make_node(op, inputs, [out], **attrs))
            cur = out

        def init(name, array):
            inits.append(numpy_helper.from_array(array, name))
            return name

        for i, (layer, shape, p) in enumerate(inst.steps()):
            if isinstance(layer, Conv2d):
                inputs = [cur, init(f"w{i}", p["weight"])]
                if p["bias"] is not None:
                    inputs.append(init(f"b{i}", p["bias"]))
                k, s, pad = layer.kernel, layer.stride, layer.padding
                add("Conv", inputs, kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4, group=layer.groups)
            elif isinstance(layer, MaxPool2d):
                k, s, pad = layer.kernel, layer.step, layer.padding
                add("MaxPool", [cur], kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4)
            elif isinstance(layer, Linear):
                if len(shape) != 2:
                    add("Flatten", [cur], axis=1)
                inputs = [cur, init(f"w{i}", p["weight"])]
                if p["bias"] is not None:
                    inputs.append(init(f"b{i}", p["bias"]))
                add("Gemm", inputs, transB=1)
            elif isinstance(layer, Softmax):
                add("Softmax", [cur], axis=1)
            else:
                raise TypeError(f"ort: no implementation for {type(layer).__name__}")
            if getattr(layer, "relu", False):
                add("Relu", [cur])

        graph = helper.make_graph(
            nodes, inst.workload.name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, inst.x.shape)],
            [helper.make_tensor_value_info(cur, TensorProto.FLOAT, inst.workload.output_shape)], inits)
        return self._finish(graph)

    def _session(self, model):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3  # errors only: no notes about the graph on stderr
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def _finish(self, graph):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.OPSET)])
        model.ir_version = self.IR_VERSION
        onnx.checker.check_model(model)
        return model

    def prepare(self, inst: Instance) -> Prepared:
        sess = self._session(self.model(inst))
        binding = sess.io_binding()
        binding.bind_cpu_input("x", inst.x)
        binding.bind_output(sess.get_outputs()[0].name, "cpu")
        return Prepared(partial(sess.run_with_iobinding, binding),
                        to_numpy=lambda _: binding.copy_outputs_to_cpu()[0])

    def matmul(self, a, b, c):
        def value(name, x):
            return helper.make_tensor_value_info(name, TensorProto.FLOAT, x.shape)

        graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
                                  [value("a", a), value("b", b)], [value("c", c)])
        sess = self._session(self._finish(graph))
        binding = sess.io_binding()
        binding.bind_cpu_input("a", a)
        binding.bind_cpu_input("b", b)
        binding.bind_output("c", "cpu", 0, c.dtype, list(c.shape), c.ctypes.data)  # written in place
        return partial(sess.run_with_iobinding, binding), f"onnxruntime {ort.__version__}, MLAS"


PEERS: Tuple[Peer, ...] = (TorchPeer(), OrtPeer(), TorchCompilePeer())


def available() -> Tuple[Peer, ...]:
    return tuple(p for p in PEERS if p.available)
