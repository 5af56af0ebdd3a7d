"""Benchmarks: the reference workloads, the peers and the timing harness.

Run ``python -m lepton_kernels.bench --help``. The workload table and the
float64 reference (``workloads``) import nothing beyond NumPy; the peers
(``peers``: PyTorch, ONNX Runtime) are optional and detected on import.
"""

from .workloads import WORKLOADS, Workload, reference, select, tolerance

__all__ = ["WORKLOADS", "Workload", "reference", "select", "tolerance"]
