"""Threads, instruction-set level, and what this build contains."""

from __future__ import annotations

import sys

from . import _core, _device

__all__ = [
    "get_num_threads",
    "set_num_threads",
    "get_isa",
    "set_isa",
    "get_scheduler",
    "set_scheduler",
    "get_config",
    "show_config",
]


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
    if not 1 <= n <= 4096:
        raise ValueError(f"n: number of threads must be in [1, 4096], got {n}")
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


_UNSET = object()


def get_scheduler() -> dict:
    """The scheduler's settings: memory_budget (bytes or None), memory_weight, autotune."""
    budget, weight, autotune = _core.get_scheduler()
    return {"memory_budget": None if budget >= 2**63 - 1 else budget, "memory_weight": weight, "autotune": autotune}


def set_scheduler(*, memory_budget=_UNSET, memory_weight=_UNSET, autotune=_UNSET) -> None:
    """Set how plans are chosen; arguments not given keep their value.

    Each op picks its algorithm, blocking and threads by minimising
    ``predicted time + memory_weight * workspace bytes`` among the candidates
    whose workspace fits ``memory_budget`` (bytes; None: no limit).
    ``memory_weight`` is in seconds per byte (default 1e-12: a megabyte of
    workspace must save a microsecond). With ``autotune=True`` the first call
    of each shape times the best candidates and keeps the fastest (also on
    disk when LEPTON_CACHE_DIR is set). Plans made under other settings stay
    cached under those settings.
    """
    import operator

    budget, weight, tune = _core.get_scheduler()
    if memory_budget is not _UNSET:
        if memory_budget is None:
            budget = 2**63 - 1
        else:
            try:
                budget = operator.index(memory_budget)
            except TypeError:
                raise TypeError(f"memory_budget: expected an int or None, got {type(memory_budget).__name__}") from None
            if budget < 0:
                raise ValueError(f"memory_budget: must be non-negative, got {budget}")
            if budget >= 2**63:
                raise OverflowError(f"memory_budget: {budget} is too large (use None for no limit)")
    if memory_weight is not _UNSET:
        if isinstance(memory_weight, bool) or not isinstance(memory_weight, (int, float)):
            raise TypeError(f"memory_weight: expected a number, got {type(memory_weight).__name__}")
        if not memory_weight >= 0:
            raise ValueError(f"memory_weight: must be non-negative, got {memory_weight}")
        weight = float(memory_weight)
    if autotune is not _UNSET:
        if not isinstance(autotune, bool):
            raise TypeError(f"autotune: expected a bool, got {type(autotune).__name__}")
        tune = autotune
    _core.set_scheduler(budget, weight, tune)


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
        "scheduler": get_scheduler(),
        "plan_store": _core.plan_store_path() or "off (set LEPTON_CACHE_DIR)",
        "cuda_built": build["cuda"],
        "cuda_architectures": build.get("cuda_architectures", ""),
        "cuda_runtime_version": _cuda_version(build.get("cuda_runtime_version", 0)),
        "cuda_device_count": len(devices),
        "cuda_devices": list(devices),
        "numpy_arrays": "CPU kernels",
        "device_arrays": _device_arrays(),
        "array_module": _device.describe()["array_module"],
    }


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


def _device_text(d: dict) -> str:
    major, minor = d["compute_capability"]
    return f"{d['name']} (compute capability {major}.{minor}, {d['sm_count']} SMs, {d['memory_bytes'] >> 20} MiB)"


def _device_arrays() -> str:
    """Which path CuPy (device) arrays take, and why."""
    info = _device.describe()
    return f"{info['path']}: {info['why']}"


def show_config(file=None) -> None:
    """Print the configuration (see get_config)."""
    file = file or sys.stdout
    cfg = get_config()
    width = max(map(len, cfg))
    for key, value in cfg.items():
        if key == "cuda_devices":
            value = "; ".join(map(_device_text, value)) or "none"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "none"
        print(f"{key:<{width}}  {value}", file=file)
