"""PyTorch integration: lepton's kernels as ``torch.library`` custom ops, and ``swap(model)``.

    import lepton_kernels.torch as lkt
    y = lkt.conv2d(x, w, b, padding=1, activation="relu")   # differentiable
    lkt.swap(model)   # Conv2d / MaxPool2d / Linear / ReLU modules now run on lepton

The ops live in the ``lepton`` namespace (``torch.ops.lepton.conv2d``, ...),
each with a fake implementation (``torch.compile``, FakeTensor) and a
backward that calls lepton's backward kernels. They run float32 and float64
tensors of any strides, on the CPU and (with lepton's CUDA kernels) on CUDA
devices; tensors reach the kernels without copies.
Importing this module needs PyTorch 2.4 or later.
"""

try:
    import torch as _torch
except ImportError as e:
    raise ImportError("lepton_kernels.torch needs PyTorch, which is not installed (pip install torch); "
                      "the rest of lepton_kernels works without it") from e

if not hasattr(_torch.library, "custom_op"):
    raise ImportError(f"lepton_kernels.torch needs PyTorch 2.4 or later (torch.library.custom_op); "
                      f"found torch {_torch.__version__}")

from . import _ops as ops  # noqa: E402  (registers the lepton:: ops)
from .functional import conv2d, conv2d_relu_max_pool2d, cross_entropy, linear, max_pool2d, relu  # noqa: E402
from .modules import Conv2d, Conv2dReLUMaxPool2d, Linear, MaxPool2d, ReLU, swap  # noqa: E402

__all__ = [
    "ops",
    "conv2d",
    "max_pool2d",
    "conv2d_relu_max_pool2d",
    "linear",
    "relu",
    "cross_entropy",
    "swap",
    "Conv2d",
    "Conv2dReLUMaxPool2d",
    "Linear",
    "MaxPool2d",
    "ReLU",
]
