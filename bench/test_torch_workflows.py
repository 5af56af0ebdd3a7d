"""PyTorch workflows on the seed network (training step, swapped inference), each implementation checked then timed.

Like the workload rows: with ``--benchmark-disable`` (the default addopts)
each case runs once as a correctness test; ``--benchmark-enable`` times it.
"""

import pytest

pytest.importorskip("torch", reason="the workflow rows compare against PyTorch")

from lepton_kernels.bench import torch_rows  # noqa: E402

ROUNDS = 5

CASES = [pytest.param(row, impl, id=f"{row.name}/{impl}", marks=[pytest.mark.heavy])
         for row in torch_rows.ROWS
         for impl in (("lepton", "torch", "torch+swap") if "train" in row.name else ("torch+swap", "torch"))]


@pytest.mark.parametrize("row, impl", CASES)
def test_workflow(benchmark, row, impl):
    prepared, checks, tol = row.build()
    ok, err = checks[impl]
    assert ok, f"{impl}: max error {err:.3g} x RMS against float64 PyTorch, tolerance {tol:.3g}"
    p = prepared[impl]
    benchmark.group = row.name
    benchmark.extra_info.update(description=row.description, implementation=impl)
    with p.context():
        benchmark.pedantic(p.run, rounds=ROUNDS, warmup_rounds=1)
