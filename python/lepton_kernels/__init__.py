"""lepton-kernels: fast fused kernels for classic convolutional networks.

    import lepton_kernels as lk
    y = lk.conv2d(x, w, b, padding=1, activation="relu")
    y = lk.max_pool2d(y, 2)
"""

from ._core import __version__
from ._device import LeptonFallbackWarning
from .backward import (
    adam_step,
    conv2d_backward,
    conv2d_max_pool2d_backward,
    cross_entropy,
    cross_entropy_backward,
    linear_backward,
    max_pool2d_backward,
    relu_backward,
)
from .cache import (CacheInfo, WeightCacheInfo, cache_clear, cache_info, set_cache_capacity,
                    set_weight_cache_capacity, weight_cache_info)
from .config import (
    get_config,
    get_isa,
    get_num_threads,
    get_scheduler,
    set_isa,
    set_num_threads,
    set_scheduler,
    show_config,
)
from .explain import explain
from .functional import conv2d, conv2d_max_pool2d, linear, log_softmax, max_pool2d, relu, softmax
from .layers import Conv2d, Conv2dMaxPool2d, Linear, MaxPool2d
from .network import Dropout, Flatten, LogSoftmax, ReLU, ResultCacheInfo, Sequential, Softmax
from .models import Graph, UnsupportedOperatorError, load_model, save_model

__all__ = [
    "__version__",
    "conv2d",
    "max_pool2d",
    "conv2d_max_pool2d",
    "linear",
    "relu",
    "softmax",
    "log_softmax",
    "Conv2d",
    "Conv2dMaxPool2d",
    "Linear",
    "MaxPool2d",
    "Sequential",
    "ReLU",
    "Flatten",
    "Softmax",
    "LogSoftmax",
    "Dropout",
    "ResultCacheInfo",
    "Graph",
    "UnsupportedOperatorError",
    "load_model",
    "save_model",
    "cache_info",
    "cache_clear",
    "set_cache_capacity",
    "CacheInfo",
    "WeightCacheInfo",
    "weight_cache_info",
    "set_weight_cache_capacity",
    "get_num_threads",
    "set_num_threads",
    "get_isa",
    "set_isa",
    "get_scheduler",
    "set_scheduler",
    "explain",
    "get_config",
    "show_config",
    "LeptonFallbackWarning",
    "conv2d_backward",
    "conv2d_max_pool2d_backward",
    "max_pool2d_backward",
    "linear_backward",
    "relu_backward",
    "cross_entropy",
    "cross_entropy_backward",
    "adam_step",
]


def __getattr__(name):
    # lk.torch is imported on first use: importing lepton_kernels must not import torch.
    if name == "torch":
        import importlib

        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
