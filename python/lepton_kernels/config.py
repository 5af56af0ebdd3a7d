"""Threads, instruction-set level, and what this build contains."""

from __future__ import annotations

import sys

from . import _core

__all__ = ["get_num_threads", "set_num_threads", "get_isa", "set_isa", "get_config", "show_config"]


def get_num_threads() -> int:
    """Threads a call may use, the calling thread included."""
    return _core.get_num_threads()


def set_num_threads(n: int) -> None:
    """Set the threads a call may use (default: LEPTON_NUM_THREADS, else the cores this process may run on)."""
    import operator

    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n: expected an int, got {type(n).__name__}") from None
    _core.set_num_threads(n)


def get_isa() -> str:
    """The instruction-set level kernels use now: 'generic', 'avx2' or 'avx512'."""
    return _core.active_isa()


def set_isa(name: str) -> None:
    """Cap the instruction-set level ('generic', 'avx2' or 'avx512'; LEPTON_ISA at start-up).

    The level used is the lower of the cap and what the CPU supports. Affects
    calls made after it returns.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    _core.set_isa_cap(name)


def get_config() -> dict:
    """Build options and run-time choices, as a dict."""
    build = _core.build_info()
    devices = _core.cuda_devices()
    return {
        "version": _core.__version__,
        "compiler": build["compiler"],
        "build_type": build["build_type"],
        "isa_kernels_built": list(build["isa_kernels"]),
        "isa_detected": _core.detected_isa(),
        "isa_active": _core.active_isa(),
        "ukernels": dict(_core.ukernel_names()),
        "num_threads": _core.get_num_threads(),
        "available_cores": _core.available_cores(),
        "cuda_built": build["cuda"],
        "cuda_architectures": build.get("cuda_architectures", ""),
        "cuda_devices": list(devices),
        "numpy_arrays": "CPU kernels",
    }


def show_config(file=None) -> None:
    """Print the configuration (see get_config)."""
    file = file or sys.stdout
    cfg = get_config()
    width = max(map(len, cfg))
    for key, value in cfg.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "none"
        print(f"{key:<{width}}  {value}", file=file)
