"""Benchmark suite settings: the markers the workload rows use."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "heavy: a large workload row (batch 256/32, ResNet-18 layers, fusion chains); it runs once like any "
        "test, and for a few rounds only when benchmarks are enabled (deselect with -m 'not heavy')",
    )
