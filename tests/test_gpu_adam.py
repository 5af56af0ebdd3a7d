"""lk.adam_step on device arrays: the CUDA kernel (emulated, via tests/fake_cupy.py) against the CPU
adam_step, the CPU fallback, and on a real GPU when there is one."""

from __future__ import annotations

import numpy as np
import pytest

import lepton_kernels as lk
import reference as ref

DTYPES = [np.float32, np.float64]


def _state(rng, shape, dtype):
    p, g, m = (ref.randn(rng, shape, dtype) for _ in range(3))
    v = np.abs(ref.randn(rng, shape, dtype))
    return p, g, m, v


def _close(got, want, before, dtype):
    # Same per-element arithmetic on both sides; only contraction (FMA) may differ: a few ulps of the
    # operands, the value before the step and the new one (an update that cancels most of a parameter
    # leaves a result far smaller than its rounding errors).
    eps = np.finfo(dtype).eps
    scale = np.abs(before) + np.abs(want) + float(np.max(np.abs(want)))
    ref._assert_within(got, want, 16 * eps * scale, "device against CPU")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (257,), (3, 5, 7, 11)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_step_on_device_matches_cpu(fake, dtype, shape, weight_decay, rng):
    xp, kernels = fake
    p, g, m, v = _state(rng, shape, dtype)
    dev = [xp.array(a, device=1) for a in (p, g, m, v)]
    kw = dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=weight_decay)
    for step in (1, 2, 7):
        before = [h.copy() for h in (p, g, m, v)]
        assert lk.adam_step(*dev, step=step, **kw) is None
        lk.adam_step(p, g, m, v, step=step, **kw)
        for d, h, b in zip(dev, (p, g, m, v), before):
            _close(d.host, h, b, dtype)
    assert [op for op, _, _ in kernels.launches] == ["adam_step"] * 3
    assert all(device == 1 for _, device, _ in kernels.launches)
    ref.assert_identical(dev[1].host, g)  # grad is read only
    assert "asnumpy" not in [e[0] for e in xp.log]


def test_adam_step_float64_reference(fake, rng):
    xp, _ = fake
    p, g, m, v = _state(rng, (100,), np.float64)
    dev = [xp.array(a) for a in (p, g, m, v)]
    lk.adam_step(*dev, step=3, lr=1e-2, weight_decay=0.1)
    gg = g + 0.1 * p
    m2 = 0.9 * m + 0.1 * gg
    v2 = 0.999 * v + 0.001 * gg * gg
    p2 = p - 1e-2 / (1 - 0.9 ** 3) * m2 / (np.sqrt(v2) / np.sqrt(1 - 0.999 ** 3) + 1e-8)
    for got, want in ((dev[0], p2), (dev[2], m2), (dev[3], v2)):
        np.testing.assert_allclose(got.host, want, rtol=1e-13, atol=1e-15)


def test_adam_step_noncontiguous_grad_and_errors(fake, rng):
    xp, _ = fake
    p, g, m, v = _state(rng, (4, 6), np.float32)
    gt = ref.randn(rng, (6, 4), np.float32)
    dp, dm, dv = xp.array(p), xp.array(m), xp.array(v)
    before = p.copy()
    lk.adam_step(dp, xp.array(gt).T, dm, dv, step=1)
    lk.adam_step(p, np.ascontiguousarray(gt.T), m, v, step=1)
    _close(dp.host, p, before, np.float32)
    with pytest.raises(ValueError, match="exp_avg: must be C-contiguous"):
        lk.adam_step(dp, xp.array(g), xp.array(gt).T, dv, step=2)
    with pytest.raises(ValueError, match="exp_avg_sq: expected shape"):
        lk.adam_step(dp, xp.array(g), dm, xp.array(v[:2]), step=2)
    with pytest.raises(TypeError, match="grad: dtype float64"):
        lk.adam_step(dp, xp.array(g.astype(np.float64)), dm, dv, step=2)
    with pytest.raises(TypeError, match="grad: expected a device array"):
        lk.adam_step(dp, g, dm, dv, step=2)
    with pytest.raises(ValueError, match="step: must be at least 1"):
        lk.adam_step(dp, xp.array(g), dm, dv, step=0)
    with pytest.raises(ValueError, match="must not overlap"):
        lk.adam_step(dp, xp.array(g), dp, dv, step=2)


def test_adam_step_fallback(fallback, rng):
    xp = fallback
    p, g, m, v = _state(rng, (33,), np.float32)
    dev = [xp.array(a, device=1) for a in (p, g, m, v)]
    with pytest.warns(lk.LeptonFallbackWarning, match="built without CUDA"):
        lk.adam_step(*dev, step=2, lr=1e-2)
    lk.adam_step(p, g, m, v, step=2, lr=1e-2)
    for d, h in zip(dev, (p, g, m, v)):
        ref.assert_identical(d.host, h)


@pytest.mark.gpu
def test_gpu_adam_step(rng):
    from test_gpu import _cupy_with_device

    cp = _cupy_with_device()
    p, g, m, v = _state(rng, (1000,), np.float32)
    dev = [cp.asarray(a) for a in (p, g, m, v)]
    before = [h.copy() for h in (p, g, m, v)]
    lk.adam_step(*dev, step=4, weight_decay=0.01)
    lk.adam_step(p, g, m, v, step=4, weight_decay=0.01)
    for d, h, b in zip(dev, (p, g, m, v), before):
        _close(cp.asnumpy(d), h, b, np.float32)
