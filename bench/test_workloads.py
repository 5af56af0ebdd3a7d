"""One benchmark per reference workload, each also checked against a float64 reference.

With ``--benchmark-disable`` (the default addopts) every row runs once as a
plain correctness test; ``--benchmark-enable`` times them. Heavy rows are
timed for a few rounds only so that they do not dominate the run.
"""

import numpy as np
import pytest

import lepton_kernels as lk
from lepton_kernels.bench import workloads as wl

HEAVY_ROUNDS = 3


def _param(w):
    return pytest.param(w, id=w.name, marks=[pytest.mark.heavy] if w.heavy else [])


@pytest.mark.parametrize("workload", [_param(w) for w in wl.WORKLOADS])
def test_workload(benchmark, workload):
    inst = workload.build()
    run = wl.LEPTON.prepare(inst).run
    benchmark.group = workload.group
    if workload.heavy:
        y = benchmark.pedantic(run, rounds=HEAVY_ROUNDS, warmup_rounds=1)
    else:
        y = benchmark(run)

    benchmark.extra_info.update(
        group=workload.group,
        description=workload.describe(),
        gflop=workload.flops / 1e9,
        unit=workload.unit,
        threads=lk.get_num_threads(),
        isa=lk.get_isa(),
    )
    if benchmark.stats is not None:  # None when benchmarks are disabled
        benchmark.extra_info["gflops"] = workload.flops / benchmark.stats.stats.median / 1e9

    assert y.dtype == np.float32
    ok, err = wl.compare(y, wl.reference(inst), wl.tolerance(workload))
    assert ok, f"max error {err:.3g} x RMS, tolerance {wl.tolerance(workload):.3g}"
