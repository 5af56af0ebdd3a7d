"""Configuration: threads, ISA level, environment variables, build information."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

import lepton_kernels as lk
import reference as ref

LEVELS = ("generic", "avx2", "avx512")
DETECTED = lk.get_config()["isa_detected"]


def capped(level):
    return LEVELS[min(LEVELS.index(level), LEVELS.index(DETECTED))]


def fresh_process(env_updates, code="import lepton_kernels as lk, json; print(json.dumps(lk.get_config()))"):
    """get_config() (or what `code` prints) in a new interpreter with the given environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("LEPTON_NUM_THREADS", "LEPTON_ISA")}
    env.update(env_updates)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_version():
    assert lk.__version__ == metadata.version("lepton-kernels")
    assert lk.get_config()["version"] == lk.__version__


def test_config_contents():
    cfg = lk.get_config()
    assert cfg["isa_detected"] in LEVELS
    assert cfg["isa_active"] == lk.get_isa()
    assert set(cfg["isa_kernels_built"]) <= set(LEVELS) and "generic" in cfg["isa_kernels_built"]
    assert cfg["num_threads"] == lk.get_num_threads() >= 1
    assert cfg["available_cores"] >= 1
    assert set(cfg["ukernels"]) >= {f"f{bits}_gemm_{shape}" for bits in (32, 64) for shape in ("wide", "tall", "narrow")}
    assert isinstance(cfg["cuda_built"], bool) and isinstance(cfg["cuda_devices"], list)
    json.dumps(cfg)  # plain data only


def test_show_config_prints_every_entry():
    buffer = io.StringIO()
    lk.show_config(file=buffer)
    text = buffer.getvalue()
    for key, value in lk.get_config().items():
        assert key in text
        if isinstance(value, str) and value:
            assert value in text


def test_show_config_defaults_to_stdout(capsys):
    lk.show_config()
    assert "isa_active" in capsys.readouterr().out


@pytest.mark.parametrize("level", LEVELS)
def test_set_isa_caps_at_what_the_cpu_has(level):
    previous = lk.get_isa()
    try:
        lk.set_isa(level)
        assert lk.get_isa() == capped(level)
        cfg = lk.get_config()
        assert cfg["isa_active"] == capped(level)
        assert cfg["isa_detected"] == DETECTED
        for name in cfg["ukernels"].values():
            assert name.endswith(capped(level)), name
    finally:
        lk.set_isa(previous)


def test_plans_follow_the_isa_cap(rng):
    # Plans are cached per shape: after a change of cap the same shapes must
    # run on the new level's kernels, not on a plan made under the old one.
    x = ref.randn(rng, (2, 32, 20, 20), np.float32)
    w = ref.randn(rng, (32, 32, 3, 3), np.float32)
    a = ref.randn(rng, (64, 256), np.float32)
    lw = ref.randn(rng, (300, 256), np.float32)
    previous = lk.get_isa()
    try:
        for level in LEVELS[: LEVELS.index(DETECTED) + 1] + (LEVELS[0],):
            lk.set_isa(level)
            lk.conv2d(x, w, padding=1)
            lk.linear(a, lw)
            for plan in (lk.explain(lk.conv2d, x, w, padding=1), lk.explain(lk.linear, a, lw)):
                kernel = next(t for t in plan.split() if t.startswith("ukernel="))
                assert kernel.endswith(level), (level, plan)
    finally:
        lk.set_isa(previous)


def test_isa_levels_agree(rng):
    # Every level computes the same function, within rounding.
    x = ref.randn(rng, (2, 8, 10, 11), np.float32)
    w = ref.randn(rng, (17, 8, 3, 3), np.float32)
    magnitude = ref.conv2d(np.abs(x), np.abs(w), padding=1)
    previous = lk.get_isa()
    try:
        results = {}
        for level in LEVELS[: LEVELS.index(DETECTED) + 1]:
            lk.set_isa(level)
            results[level] = lk.conv2d(x, w, padding=1)
    finally:
        lk.set_isa(previous)
    for level, y in results.items():
        ref.assert_sum_close(y, results["generic"], 2 * magnitude, 8 * 9, np.float32, level)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_set_num_threads(n, restore_threads, rng):
    lk.set_num_threads(n)
    assert lk.get_num_threads() == n
    assert lk.get_config()["num_threads"] == n
    x = ref.randn(rng, (2, 16, 24, 24), np.float32)
    w = ref.randn(rng, (32, 16, 3, 3), np.float32)
    ref.assert_sum_close(lk.conv2d(x, w, padding=1), ref.conv2d(x, w, padding=1),
                         ref.conv2d(np.abs(x), np.abs(w), padding=1), 16 * 9, np.float32, f"{n} threads")


def test_set_num_threads_accepts_numpy_ints(restore_threads):
    lk.set_num_threads(np.int64(1))
    assert lk.get_num_threads() == 1


def test_default_threads_are_the_available_cores():
    cfg = fresh_process({})
    assert cfg["num_threads"] == cfg["available_cores"]


@pytest.mark.parametrize("value, expected", [("1", 1), ("3", 3)])
def test_env_num_threads(value, expected):
    assert fresh_process({"LEPTON_NUM_THREADS": value})["num_threads"] == expected


@pytest.mark.parametrize("value", ["0", "-2", "two", ""])
def test_env_num_threads_invalid_falls_back_to_cores(value):
    cfg = fresh_process({"LEPTON_NUM_THREADS": value})
    assert cfg["num_threads"] == cfg["available_cores"]


@pytest.mark.parametrize("level", LEVELS)
def test_env_isa(level):
    cfg = fresh_process({"LEPTON_ISA": level})
    assert cfg["isa_active"] == capped(level)
    assert cfg["ukernels"]["f32_gemm_wide"].endswith(capped(level))
    assert cfg["ukernels"]["f32_gemm_tall"].endswith(capped(level))
    assert cfg["ukernels"]["f32_gemm_narrow"].endswith(capped(level))


def test_env_isa_unknown_is_conservative():
    # An ISA name the library does not know must not select kernels the CPU
    # may lack: it falls back to the portable level.
    assert fresh_process({"LEPTON_ISA": "avx1024"})["isa_active"] == "generic"


def test_env_isa_then_set_isa():
    code = ("import lepton_kernels as lk, json; a = lk.get_isa(); lk.set_isa('avx512'); "
            "print(json.dumps([a, lk.get_isa()]))")
    assert fresh_process({"LEPTON_ISA": "generic"}, code) == ["generic", capped("avx512")]
