"""Shared fixtures: reproducible fresh randomness, the ISA level, thread count.

Every run draws new random data. The seed of each test's generator is shown
in the report of a failing test; set LEPTON_TEST_SEED to replay it. Tests
driven by hypothesis draw their data seed as part of the example, so it is
printed in the falsifying example (and replayed from hypothesis' database).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import lepton_kernels as lk
from fake_cupy import FakeCupy, RecordingKernels
from lepton_kernels import _cuda_emu, _device

ISA_LEVELS = ("generic", "avx2", "avx512")

# When a hypothesis test fails, its pytest plugin imports libcst to suggest a
# patch; some libcst versions warn on import (mypy_extensions.TypedDict), and
# -W error turns that into an internal error that hides the real failure.
# Import it once here with that one warning silenced.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "mypy_extensions.TypedDict is deprecated", DeprecationWarning)
    try:
        import libcst  # noqa: F401
    except ImportError:
        pass

# The fixtures that hypothesis tests use (the ISA level) set process state
# that holds for every example, so a function-scoped fixture is what we want.
# No deadline: timing on a shared 2-core machine is too noisy to mean anything.
# LEPTON_HYPOTHESIS_PROFILE=thorough runs many more examples (minutes).
_common = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("lepton", max_examples=60, **_common)
settings.register_profile("thorough", max_examples=500, **_common)
settings.load_profile(os.environ.get("LEPTON_HYPOTHESIS_PROFILE", "lepton"))


_SEED_KEY = pytest.StashKey[int]()


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (or LEPTON_TEST_SEED), reported when the test fails."""
    env = os.environ.get("LEPTON_TEST_SEED")
    value = int(env) if env else np.random.SeedSequence().entropy
    request.node.stash[_SEED_KEY] = value
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and _SEED_KEY in item.stash:
        report.sections.append(("random seed", f"reproduce with LEPTON_TEST_SEED={item.stash[_SEED_KEY]}"))
    return report


@pytest.fixture(params=ISA_LEVELS)
def isa(request):
    """Run the test with kernels capped at each ISA level the CPU supports."""
    level = request.param
    detected = lk.get_config()["isa_detected"]
    if ISA_LEVELS.index(level) > ISA_LEVELS.index(detected):
        pytest.skip(f"the CPU supports ISA levels up to {detected!r}, not {level!r}")
    previous = lk.get_isa()
    lk.set_isa(level)
    try:
        # Make sure the cap really switched kernels, or every level would
        # silently test the same code.
        assert lk.get_isa() == level
        assert lk.get_config()["ukernels"]["f32_gemm_wide"].endswith(level)
        assert lk.get_config()["ukernels"]["f32_gemm_tall"].endswith(level)
        yield level
    finally:
        lk.set_isa(previous)


@pytest.fixture
def restore_threads():
    """Restores the library's thread count after a test that changes it."""
    previous = lk.get_num_threads()
    yield previous
    lk.set_num_threads(previous)


# Device arrays without a GPU (tests/fake_cupy.py): CuPy stand-ins over host
# memory, with the emulated CUDA kernels as the device backend.
@pytest.fixture
def fake():
    """(fake CuPy with 2 devices, recording emulated kernels), installed as the runtime."""
    xp = FakeCupy(device_count=2)
    kernels = RecordingKernels(xp)
    with _device.use_runtime(_device.Runtime(xp, kernels, "")):
        yield xp, kernels
    _cuda_emu.device.set_emulated_devices([132])


@pytest.fixture
def fallback():
    """Fake CuPy without kernels: the CPU fallback, its warning armed again."""
    xp = FakeCupy(device_count=2)
    _device._reset_fallback_warning()
    with _device.use_runtime(_device.Runtime(xp, None, "lepton_kernels was built without CUDA")):
        yield xp
    _device._reset_fallback_warning()
