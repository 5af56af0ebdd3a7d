"""lk.Sequential on device arrays: the reference networks through the emulated CUDA kernels
(tests/fake_cupy.py, as in test_gpu.py), the CPU fallback, and on a real GPU when there is one."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import lepton_kernels as lk
import reference as ref
from fake_cupy import FakeArray
from test_network import _input, cifar, mnist


@pytest.mark.parametrize("make,n", [(mnist, 1), (mnist, 5), (cifar, 1), (cifar, 3)])
def test_reference_networks_on_device(fake, make, n, rng):
    xp, kernels = fake
    net = make(rng)
    seq = net.sequential()
    x = _input(rng, net, n)
    cpu = seq(x)
    for device in (0, 1, 1):
        xp.log.clear()
        y = seq(xp.array(x, device=device))
        assert isinstance(y, FakeArray) and y.device.id == device
        assert y.dtype == np.float32 and y.shape == cpu.shape
        net.check(y.host, x, f"device {device} batch {n}")  # float64 reference
        # and the CPU network, within both sides' rounding
        net.check(cpu, x)
        assert "asnumpy" not in [e[0] for e in xp.log]  # no copy to the host
    # weights: uploaded once per device (2 devices), never again
    xp.log.clear()
    seq(xp.array(x, device=1))
    assert [e[0] for e in xp.log].count("asarray") == 0
    assert "device path: CUDA kernels" in seq.describe()


def test_explicit_stream(fake, rng):
    xp, kernels = fake
    net = mnist(rng)
    seq = net.sequential()
    dx = xp.array(_input(rng, net, 2))
    seq(dx, stream=0x5EA)
    assert kernels.launches and all(s == 0x5EA for _, _, s in kernels.launches)


def test_stage_fusion_and_kernels(fake, rng):
    xp, kernels = fake
    net = mnist(rng)
    seq = net.sequential()  # Conv2d(relu), MaxPool2d, Flatten, Linear, Softmax
    x = _input(rng, net, 2)
    dx = xp.array(x)
    seq(dx)  # uploads
    xp.log.clear()
    kernels.launches.clear()
    y = seq(dx)
    assert [op for op, _, _ in kernels.launches] == ["conv2d_max_pool2d", "linear", "softmax"]
    empties = [e for e in xp.log if e[0] == "empty"]
    # conv+relu+max-pool fused into one output, linear one output, softmax in place
    assert [e[1] for e in empties] == [(2, 32, 13, 13), (2, 10)]
    net.check(y.host, x)
    ref.assert_identical(dx.host, x)  # the input is untouched


def test_unbatched_out_relu_and_log_softmax(fake, rng):
    xp, kernels = fake
    w1, b1 = ref.randn(rng, (4, 3, 3, 3), np.float32), ref.randn(rng, (4,), np.float32)
    w2 = ref.randn(rng, (6, 4 * 3 * 3), np.float32)
    seq = lk.Sequential([lk.Conv2d(w1, b1), lk.ReLU(), lk.MaxPool2d(2), lk.Dropout(0.2), lk.Flatten(),
                         lk.Linear(w2), lk.ReLU(), lk.LogSoftmax(1)])
    x = ref.randn(rng, (3, 3, 8, 8), np.float32)
    # float64 reference, and beside each value the same chain over absolute values (the magnitude its
    # rounding errors scale with); log-softmax subtracts the row's log-sum-exp, whose error is that of
    # the row's largest logit, so each row's largest magnitude joins every element's
    x64, aw1, ab1 = x.astype(np.float64), np.abs(w1.astype(np.float64)), np.abs(b1.astype(np.float64))
    conv = ref.relu(ref.conv2d(x64, w1.astype(np.float64), b1.astype(np.float64)))
    conv_mag = ref.conv2d(np.abs(x64), aw1, ab1)
    logits = ref.relu(ref.linear(ref.max_pool2d(conv, 2)[0].reshape(3, -1), w2.astype(np.float64)))
    logits_mag = ref.linear(ref.max_pool2d(conv_mag, 2)[0].reshape(3, -1), np.abs(w2.astype(np.float64)))
    want = ref.log_softmax(logits, 1)
    magnitude = logits_mag + logits_mag.max(axis=1, keepdims=True) + np.abs(want)
    length = 27 + 36  # the convolution's taps, then the linear's
    out = xp.array(np.full(want.shape, np.nan, np.float32))
    kernels.launches.clear()
    assert seq(xp.array(x), out=out) is out
    # Conv2d+ReLU+MaxPool2d fused, Linear+ReLU fused, log-softmax writing `out` in place
    assert [op for op, _, _ in kernels.launches] == ["conv2d_max_pool2d", "linear", "softmax"]
    ref.assert_sum_close(out.host, want, magnitude, length, np.float32)
    y1 = seq(xp.array(x[1]))
    assert y1.shape == want.shape[1:]
    ref.assert_sum_close(y1.host, want[1], magnitude[1], length, np.float32)
    # a chain ending in Flatten copies into `out` on the device
    flat = lk.Sequential([lk.Conv2d(w1, b1, activation="relu"), lk.Flatten()])
    o2 = xp.array(np.full((3, 4 * 6 * 6), np.nan, np.float32))
    assert flat(xp.array(x), out=o2) is o2
    ref.assert_sum_close(o2.host, conv.reshape(3, -1), conv_mag.reshape(3, -1), 27, np.float32)


def test_device_errors(fake, rng):
    xp, _ = fake
    net = mnist(rng)
    seq = net.sequential()
    x = _input(rng, net, 2)
    with pytest.raises(TypeError, match="input: expected dtype float32"):
        seq(xp.array(x.astype(np.float64)))
    with pytest.raises(TypeError, match="out: expected a device array"):
        seq(xp.array(x), out=np.zeros((2, 10), np.float32))
    with pytest.raises(ValueError, match="out: expected shape"):
        seq(xp.array(x), out=xp.array(np.zeros((2, 9), np.float32)))


def test_result_cache_is_bypassed_for_device_arrays(fake, rng):
    xp, _ = fake
    net = mnist(rng)
    seq = net.sequential(result_cache=1 << 20)
    x = _input(rng, net, 2)
    net.check(seq(xp.array(x)).host, x)
    net.check(seq(xp.array(x)).host, x)
    assert seq.result_cache_info().hits == 0 and seq.result_cache_info().misses == 0


def test_fallback(fallback, rng):
    xp = fallback
    net = cifar(rng)
    seq = net.sequential()
    x = _input(rng, net, 2)
    with pytest.warns(lk.LeptonFallbackWarning, match="built without CUDA"):
        y = seq(xp.array(x, device=1))
    assert isinstance(y, FakeArray) and y.device.id == 1
    ref.assert_identical(y.host, seq(x))
    assert "CPU fallback" in seq.describe(xp.array(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = xp.array(np.zeros((2, 10), np.float32), device=1)
        assert seq(xp.array(x, device=1), out=out) is out
        ref.assert_identical(out.host, seq(x))


def test_numpy_input_keeps_the_cpu_path(rng):
    net = mnist(rng)
    seq = net.sequential()
    x = _input(rng, net, 3)
    net.check(seq(x), x)
    assert "device path" not in seq.describe()


@pytest.fixture
def cp():
    from test_gpu import _cupy_with_device

    return _cupy_with_device()


@pytest.mark.gpu
@pytest.mark.parametrize("make,n", [(mnist, 1), (mnist, 16), (cifar, 1), (cifar, 8)])
def test_gpu_reference_networks(cp, make, n, rng):
    net = make(rng)
    seq = net.sequential()
    x = _input(rng, net, n)
    y = seq(cp.asarray(x))
    assert isinstance(y, cp.ndarray)
    net.check(cp.asnumpy(y), x)
    net.check(cp.asnumpy(seq(cp.asarray(x))), x)
