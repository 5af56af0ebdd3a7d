"""Device arrays through the public API.

Two parts:

* Tests that run everywhere: the dispatch of device arrays (interface
  parsing, devices, streams, contiguity, outputs, errors, the CPU fallback
  and its warning, the layers, GPU plans per device) driven through
  ``_device.use_runtime`` with a CuPy stand-in whose arrays live in host
  memory and the *emulated* CUDA kernels as the device backend
  (tests/fake_cupy.py explains why that is safe and how). The kernels run
  for real (emulated), so results are compared with float64 references.
* ``@pytest.mark.gpu`` tests with CuPy on a real device against the CPU
  library; skipped, with the reason, when CuPy or a device is missing.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import lepton_kernels as lk
import reference as ref
from fake_cupy import DLPackOnly, FakeArray, FakeCupy
from lepton_kernels import _cuda_emu, _device

DTYPES = [np.float32, np.float64]


def conv_magnitude(x, w, b, **kw):
    a = lambda v: None if v is None else np.abs(np.asarray(v, np.float64))  # noqa: E731
    return ref.conv2d(a(x), a(w), a(b), **kw)


# --------------------------------------------------------------------------
# The ops on emulated devices
# --------------------------------------------------------------------------

CONV_CASES = [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=(0, 2), dilation=(2, 1), groups=1),
    dict(stride=1, padding="same", dilation=1, groups=2),
]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("bias,activation", [(True, None), (False, "relu")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", CONV_CASES, ids=["plain", "strided-dilated", "same-grouped"])
def test_conv2d(fake, kw, dtype, bias, activation, batched, rng):
    xp, kernels = fake
    x = ref.randn(rng, (3, 4, 9, 8) if batched else (4, 9, 8), dtype)
    w = ref.randn(rng, (6, 4 // kw["groups"], 3, 3), dtype)
    b = ref.randn(rng, (6,), dtype) if bias else None
    dx, dw = xp.array(x, device=1), xp.array(w, device=1)
    db = None if b is None else xp.array(b, device=1)
    xp.streams[1] = 0x5EED
    y = lk.conv2d(dx, dw, db, activation=activation, **kw)
    assert isinstance(y, FakeArray) and y.device.id == 1
    want = ref.conv2d(x, w, b, activation=activation, **kw)
    ref.assert_sum_close(y.host, want, conv_magnitude(x, w, b, **kw), w[0].size + 1, dtype)
    assert kernels.launches == [("conv2d", 1, 0x5EED)]
    ref.assert_identical(dx.host, x)  # inputs untouched


def test_conv2d_max_pool2d_and_max_pool2d(fake, rng):
    xp, kernels = fake
    x, w, b = ref.randn(rng, (2, 3, 12, 11), np.float32), ref.randn(rng, (5, 3, 3, 3), np.float32), \
        ref.randn(rng, (5,), np.float32)
    dx, dw, db = xp.array(x), xp.array(w), xp.array(b)
    y = lk.conv2d_max_pool2d(dx, dw, db, padding=1, kernel_size=3, pool_stride=2, ceil_mode=True)
    conv = ref.conv2d(x, w, b, padding=1, activation="relu")
    want, _ = ref.max_pool2d(conv, 3, 2, ceil_mode=True)
    mag, _ = ref.max_pool2d(conv_magnitude(x, w, b, padding=1), 3, 2, ceil_mode=True)
    ref.assert_sum_close(y.host, want, mag, 28, np.float32)
    # max_pool2d: values and indices exactly as the float64 reference's.
    v, i = lk.max_pool2d(dx, (3, 2), stride=(2, 1), padding=1, return_indices=True)
    rv, ri = ref.max_pool2d(x, (3, 2), (2, 1), 1)
    assert isinstance(v, FakeArray) and isinstance(i, FakeArray) and i.dtype == np.int64
    ref.assert_identical(v.host, rv.astype(np.float32))
    ref.assert_identical(i.host, ri)
    assert [op for op, _, _ in kernels.launches] == ["conv2d_max_pool2d", "max_pool2d"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_shapes(fake, dtype, rng):
    xp, _ = fake
    x, w, b = ref.randn(rng, (2, 3, 7), dtype), ref.randn(rng, (5, 7), dtype), ref.randn(rng, (5,), dtype)
    y = lk.linear(xp.array(x), xp.array(w), xp.array(b), activation="relu")
    ref.assert_sum_close(y.host, ref.linear(x, w, b, "relu"),
                         ref.linear(np.abs(x), np.abs(w), np.abs(b)), 8, dtype)
    assert y.shape == (2, 3, 5)
    v = lk.linear(xp.array(x), xp.array(w[0]))  # a 1-D weight drops the feature axis, as in torch
    assert v.shape == (2, 3)
    ref.assert_sum_close(v.host, x.astype(np.float64) @ w[0], np.abs(x) @ np.abs(w[0]), 7, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_softmax(fake, dtype, rng):
    xp, _ = fake
    x = ref.randn(rng, (4, 70, 3), dtype)
    dx = xp.array(x)
    ref.assert_identical(lk.relu(dx).host, np.maximum(x, 0))
    for dim in (0, 1, -1):
        ref.assert_softmax_close(lk.softmax(dx, dim).host, x, dim, False)
        ref.assert_softmax_close(lk.log_softmax(dx, dim).host, x, dim, True)
    same = lk.relu(dx, out=dx)  # in place
    assert same is dx
    ref.assert_identical(dx.host, np.maximum(x, 0))


def test_out_argument(fake, rng):
    xp, kernels = fake
    x, w = ref.randn(rng, (1, 2, 5, 5), np.float32), ref.randn(rng, (3, 2, 2, 2), np.float32)
    dx, dw = xp.array(x), xp.array(w)
    out = xp.array(np.full((1, 3, 4, 4), np.nan, np.float32))
    assert lk.conv2d(dx, dw, out=out) is out
    ref.assert_sum_close(out.host, ref.conv2d(x, w), conv_magnitude(x, w, None), 8, np.float32)
    with pytest.raises(ValueError, match="out: expected shape"):
        lk.conv2d(dx, dw, out=xp.array(np.zeros((1, 3, 4, 5), np.float32)))
    with pytest.raises(TypeError, match="out: expected dtype float32"):
        lk.conv2d(dx, dw, out=xp.array(np.zeros((1, 3, 4, 4), np.float64)))
    with pytest.raises(ValueError, match="out: array is read-only"):
        lk.conv2d(dx, dw, out=xp.array(np.zeros((1, 3, 4, 4), np.float32), readonly=True))
    with pytest.raises(ValueError, match="out: must be C-contiguous"):
        lk.conv2d(dx, dw, out=xp.array(np.zeros((1, 3, 4, 8), np.float32))[..., ::2])
    big = xp.array(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="out: must not overlap an input"):
        lk.relu(big[:50], out=big[25:75])
    with pytest.raises(ValueError, match="out: is on device 1, but the input is on device 0"):
        lk.relu(big, out=xp.array(np.zeros(100, np.float32), device=1))


def test_edge_shapes(fake, rng):
    xp, _ = fake
    scalar = np.array(-1.5, np.float32)
    ref.assert_identical(lk.relu(xp.array(scalar)).host, np.array(0.0, np.float32))
    ref.assert_identical(lk.softmax(xp.array(scalar), 0).host, lk.softmax(scalar, 0))
    b = ref.randn(rng, (4,), np.float64)
    # No input features: the output is the bias.
    ref.assert_identical(lk.linear(xp.array(np.zeros((3, 0))), xp.array(np.zeros((4, 0))), xp.array(b)).host,
                         np.broadcast_to(b, (3, 4)))
    assert lk.linear(xp.array(np.zeros((0, 5))), xp.array(np.ones((4, 5)))).shape == (0, 4)
    x = ref.randn(rng, (3, 7, 5), np.float32)
    out = xp.array(np.full((3, 3, 2), np.nan, np.float32))
    assert lk.max_pool2d(xp.array(x), 2, out=out) is out  # unbatched, into out
    ref.assert_identical(out.host, lk.max_pool2d(x, 2))


def test_zero_batch_launches_nothing(fake):
    xp, kernels = fake
    y = lk.conv2d(xp.array(np.zeros((0, 2, 5, 5), np.float32)), xp.array(np.ones((3, 2, 3, 3), np.float32)))
    assert y.shape == (0, 3, 3, 3) and kernels.launches == []


# --------------------------------------------------------------------------
# Devices, streams, contiguity
# --------------------------------------------------------------------------


def test_mixed_devices_are_refused(fake, rng):
    xp, _ = fake
    x, w = xp.array(ref.randn(rng, (1, 2, 4, 4), np.float32), device=1), xp.array(np.ones((3, 2, 1, 1), np.float32))
    with pytest.raises(ValueError, match="weight: is on device 0, but the input is on device 1"):
        lk.conv2d(x, w)


def test_runs_on_the_current_stream_of_the_arrays_device(fake, rng):
    xp, kernels = fake
    xp.streams[0], xp.streams[1] = 0xA0, 0xB0
    x = xp.array(ref.randn(rng, (2, 8), np.float32), device=1)
    lk.relu(x)
    assert xp.current_device == 0  # restored after the call
    assert kernels.launches == [("relu", 1, 0xB0)] and kernels.waits == []


def test_explicit_stream_overrides_the_current_one(fake, rng):
    xp, kernels = fake
    xp.streams[0] = 0xA0
    x = xp.array(ref.randn(rng, (4, 2, 6, 6), np.float32))
    w = xp.array(ref.randn(rng, (3, 2, 3, 3), np.float32))
    cupy_stream = type("Stream", (), {"ptr": 0xC1})()
    torch_stream = type("Stream", (), {"cuda_stream": 0xC2})()
    lk.relu(x, stream=0xC0)
    lk.conv2d(x, w, stream=cupy_stream)
    lk.Conv2d(ref.randn(rng, (3, 2, 3, 3), np.float32))(x, stream=torch_stream)
    g = lk.max_pool2d(x, 2, stream=0xC3)
    lk.relu_backward(g, g, stream=0xC4)
    lk.relu(x)  # the stream held for that call only
    assert [s for _, _, s in kernels.launches] == [0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xA0]
    with pytest.raises(TypeError, match="stream: expected a CUDA stream"):
        lk.relu(x, stream="default")
    with pytest.raises(ValueError, match="stream: a handle cannot be negative"):
        lk.relu(x, stream=-1)
    # Host arrays run on the CPU: a stream means nothing to them.
    np.testing.assert_array_equal(lk.relu(np.ones(3, np.float32), stream=0xC0), np.ones(3, np.float32))


def test_waits_for_the_producers_stream_without_synchronising(fake, rng):
    xp, kernels = fake
    xp.streams[0] = 0xA0
    x = ref.randn(rng, (3, 9), np.float32)
    lk.relu(xp.array(x, stream=0xC0))  # written on another stream: ours waits for it (an event)
    lk.relu(xp.array(x, stream=0xA0))  # our own stream: nothing to wait for
    lk.relu(xp.array(x, stream=None))  # the producer asks for no synchronisation
    assert kernels.waits == [(0, 0xA0, 0xC0)]
    xp.streams[0] = 0  # CuPy's null stream is the interface's legacy default stream, 1
    lk.relu(xp.array(x, stream=1))
    assert kernels.waits == [(0, 0xA0, 0xC0)]
    assert [s for _, _, s in kernels.launches] == [0xA0, 0xA0, 0xA0, 0]


def test_non_contiguous_input_is_copied_once(fake, rng):
    xp, kernels = fake
    x, w = ref.randn(rng, (2, 3, 6, 14), np.float32), ref.randn(rng, (4, 3, 3, 3), np.float32)
    view = xp.array(x)[..., ::2]  # strided in the last dimension
    xp.log.clear()
    y = lk.conv2d(view, xp.array(w))
    assert [e[0] for e in xp.log] == ["ascontiguousarray", "empty"]
    ref.assert_sum_close(y.host, ref.conv2d(x[..., ::2], w), conv_magnitude(x[..., ::2], w, None), 27, np.float32)
    t = xp.array(ref.randn(rng, (5, 4), np.float64)).T
    ref.assert_identical(lk.relu(t).host, np.maximum(t.host, 0))


def test_cuda_array_interface_versions_and_errors(fake, rng):
    xp, _ = fake
    x = ref.randn(rng, (2, 3), np.float32)
    for version in (0, 1, 2):  # no stream field before version 3
        ref.assert_identical(lk.relu(xp.array(x, version=version, stream=0xDEAD)).host, np.maximum(x, 0))

    class Raw:
        def __init__(self, **cai):
            self.__cuda_array_interface__ = cai

    good = xp.array(x)
    base = good.__cuda_array_interface__
    cases = [
        (dict(base, version=4), ValueError, "input: unsupported __cuda_array_interface__ version 4"),
        ({k: v for k, v in base.items() if k != "typestr"}, ValueError, "lacks the required key 'typestr'"),
        (dict(base, typestr=">f4"), TypeError, "big-endian"),
        (dict(base, typestr="<i4"), TypeError, "input: expected dtype float32 or float64, got int32"),
        (dict(base, mask=(1, False)), ValueError, "masked device arrays"),
        (dict(base, data=(0, False)), ValueError, "null for a non-empty array"),
        (dict(base, strides=(4,)), ValueError, "1 strides for 2 dimensions"),
        (dict(base, stream=0), ValueError, "stream 0 is disallowed"),
        (dict(base, shape=(2, -3)), ValueError, "negative size"),
        (dict(base, data=(x.ctypes.data, False)), ValueError, "input: the data pointer is host memory"),
    ]
    for cai, exc, match in cases:
        with pytest.raises(exc, match=match):
            lk.relu(Raw(**cai))


def test_host_arrays_beside_device_arrays_are_refused(fake, rng):
    xp, _ = fake
    w = ref.randn(rng, (3, 2, 1, 1), np.float32)
    with pytest.raises(TypeError, match="weight: expected a device array like the input"):
        lk.conv2d(xp.array(np.ones((1, 2, 3, 3), np.float32)), w)
    with pytest.raises(TypeError, match="bias: expected a device array"):
        lk.linear(xp.array(np.ones((2, 3), np.float32)), xp.array(np.ones((4, 3), np.float32)), np.ones(4))
    with pytest.raises(TypeError, match="weight: dtype float64 does not match input dtype float32"):
        lk.conv2d(xp.array(np.ones((1, 2, 3, 3), np.float32)), xp.array(w.astype(np.float64)))
    with pytest.raises(ValueError, match="groups"):
        lk.conv2d(xp.array(np.ones((1, 2, 3, 3), np.float32)), xp.array(w), groups=2)


def test_dlpack_producer(fake, rng):
    xp, kernels = fake
    xp.streams[1] = 0x77
    x = ref.randn(rng, (3, 4, 5), np.float64)
    src = DLPackOnly(xp.array(x, device=1))
    y = lk.softmax(src, dim=1)
    ref.assert_softmax_close(y.host, x, 1, False)
    assert src.streams == [0x77]  # the producer orders its work before our stream
    assert kernels.launches == [("softmax", 1, 0x77)] and kernels.waits == []
    xp.streams[1] = 0
    strided = DLPackOnly(xp.array(x, device=1).transpose(2, 0, 1))  # element strides, not C order
    ref.assert_identical(lk.relu(strided).host, np.maximum(x.transpose(2, 0, 1), 0))
    assert strided.streams == [1]  # DLPack has no stream 0: the legacy default is 1
    offset = DLPackOnly(xp.array(x, device=1)[1], offset_elements=3)  # a byte_offset from a shifted base
    ref.assert_identical(lk.relu(offset).host, np.maximum(x[1], 0))

    class RefusesCai(DLPackOnly):
        # As a torch tensor that requires grad: the array interface raises, DLPack works.
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("can't export a tensor that requires grad")

    versioned = DLPackOnly(xp.array(x, device=1), versioned=True)
    ref.assert_identical(lk.relu(versioned).host, np.maximum(x, 0))
    frozen = DLPackOnly(xp.array(x, device=1), versioned=True, readonly=True)
    with pytest.raises(ValueError, match="out: array is read-only"):
        lk.relu(versioned, out=frozen)

    class BothV2(DLPackOnly):
        # As a torch CUDA tensor: array interface version 2 (no stream) and DLPack.
        @property
        def __cuda_array_interface__(self):
            return dict(self.fake.__cuda_array_interface__, version=2)

    xp.streams[1] = 0x99
    both = BothV2(xp.array(x, device=1))
    ref.assert_identical(lk.relu(both).host, np.maximum(x, 0))
    assert both.streams == [0x99]  # asked through DLPack, which orders the producer's work
    xp.streams[1] = 0

    refuses = RefusesCai(xp.array(x, device=0))
    assert _device.is_device_array(refuses)
    ref.assert_identical(lk.relu(refuses).host, np.maximum(x, 0))
    assert refuses.streams == [1]


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------


def test_layers_upload_weights_once_per_device(fake, rng):
    xp, kernels = fake
    w, b = ref.randn(rng, (4, 3, 3, 3), np.float32), ref.randn(rng, (4,), np.float32)
    conv = lk.Conv2dMaxPool2d(w, b, padding=1)
    x = ref.randn(rng, (2, 3, 8, 8), np.float32)
    want = conv(x)  # the CPU layer: pooled maxima of sums whose magnitude is at most the pooled magnitudes'
    magnitude = ref.max_pool2d(ref.conv2d(np.abs(x), np.abs(w), np.abs(b), padding=1), 2)[0]
    xp.log.clear()
    for device in (0, 1, 1):
        y = conv(xp.array(x, device=device))
        assert y.device.id == device
        ref.assert_sum_close(y.host, want, magnitude, 28, np.float32)
    assert [e[0] for e in xp.log].count("asarray") == 4  # weight and bias, once per device
    lin = lk.Linear(ref.randn(rng, (6, 5), np.float64), activation="relu")
    xl = ref.randn(rng, (7, 5), np.float64)
    ref.assert_sum_close(lin(xp.array(xl)).host, lin(xl), np.abs(xl) @ np.abs(lin.weight.T), 5, np.float64)
    pool = lk.MaxPool2d(2, return_indices=True)
    v, i = pool(xp.array(x))
    rv, ri = pool(x)
    ref.assert_identical(v.host, rv)
    ref.assert_identical(i.host, ri)
    c2 = lk.Conv2d(w, None, stride=2)
    ref.assert_sum_close(c2(xp.array(x[0])).host, c2(x[0]), conv_magnitude(x[0], w, None, stride=2), 27,
                         np.float32)


# --------------------------------------------------------------------------
# The CPU fallback
# --------------------------------------------------------------------------


def test_fallback_copies_computes_on_cpu_and_warns_once(fallback, rng):
    xp = fallback
    x, w, b = ref.randn(rng, (2, 3, 7, 7), np.float32), ref.randn(rng, (4, 3, 3, 3), np.float32), \
        ref.randn(rng, (4,), np.float32)
    dx, dw, db = xp.array(x, device=1), xp.array(w, device=1), xp.array(b, device=1)
    with pytest.warns(lk.LeptonFallbackWarning, match="built without CUDA") as record:
        y = lk.conv2d(dx, dw, db, padding=1)
    assert record[0].filename == __file__  # points at the caller's line
    assert isinstance(y, FakeArray) and y.device.id == 1
    ref.assert_identical(y.host, lk.conv2d(x, w, b, padding=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: never again
        v, i = lk.max_pool2d(dx, 2, return_indices=True)
        ref.assert_identical(v.host, lk.max_pool2d(x, 2))
        assert i.dtype == np.int64
        out = xp.array(np.zeros((2, 4, 2, 2), np.float32), device=1)
        assert lk.conv2d_max_pool2d(dx, dw, db, kernel_size=2, out=out) is out
        ref.assert_identical(out.host, lk.conv2d_max_pool2d(x, w, b, kernel_size=2))
        ref.assert_identical(lk.linear(dx[0, 0], dx[1, 0]).host, lk.linear(x[0, 0], x[1, 0]))
        ref.assert_identical(lk.log_softmax(dx, 1).host, lk.log_softmax(x, 1))
        layer = lk.Conv2d(w, b)
        ref.assert_identical(layer(dx).host, layer(x))
        with pytest.raises(TypeError, match="weight: expected a device array"):
            lk.conv2d(dx, w)
    assert issubclass(lk.LeptonFallbackWarning, UserWarning)


def test_without_cupy_device_arrays_raise(rng):
    xp = FakeCupy()
    with _device.use_runtime(_device.Runtime(None, None, "CuPy is not installed")):
        with pytest.raises(TypeError, match="input: a device array needs CuPy"):
            lk.relu(xp.array(np.ones(3, np.float32)))


def test_numpy_and_other_objects_are_not_device_arrays():
    assert not _device.is_device_array(np.ones(3))
    assert not _device.is_device_array([1.0, 2.0])

    class CpuDLPack:
        def __dlpack_device__(self):
            return (1, 0)

    assert not _device.is_device_array(CpuDLPack())


# --------------------------------------------------------------------------
# Configuration and plans per device
# --------------------------------------------------------------------------


def test_config_reports_the_device_path(fake, capsys):
    cfg = lk.get_config()
    assert cfg["device_arrays"].startswith("gpu:")
    assert cfg["array_module"] == "fakecupy 0-fake"
    lk.show_config()
    shown = capsys.readouterr().out
    assert "device_arrays" in shown and "cuda_device_count" in shown and "cuda_architectures" in shown
    assert isinstance(cfg["cuda_built"], bool) and isinstance(cfg["cuda_device_count"], int)
    with _device.use_runtime(_device.Runtime(FakeCupy(), None, "no CUDA device is usable")):
        assert lk.get_config()["device_arrays"] == "cpu-fallback: no CUDA device is usable"


def test_default_runtime_matches_this_build():
    rt = _device._resolve()
    built = lk.get_config()["cuda_built"]
    if rt.xp is None:
        assert rt.path == "unavailable" and "CuPy" in rt.reason
    elif not built:
        assert rt.path == "cpu-fallback" and "without CUDA" in rt.reason
    assert lk.get_config()["device_arrays"].split(":")[0] in ("gpu", "cpu-fallback", "unavailable")


def test_gpu_plans_are_cached_per_device(fake, rng):
    dev = _cuda_emu.device
    dev.set_emulated_devices([132, 1])  # a large and a one-SM GPU
    dev.plan_cache_clear()
    # One small image: 132 SMs want more, smaller tiles than one SM does.
    # (N, C, H, W, K, R, S, groups, stride, stride, pad x 4, dilation x 2)
    conv = (1, 16, 14, 14, 32, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1)
    pool = (2, 2, 2, 2, 0, 0, 1, 1, 0)
    big = dev.conv_pool_plan(False, conv, pool, True, True, 0)
    small = dev.conv_pool_plan(False, conv, pool, True, True, 1)
    assert big != small and big[0] * big[1] < small[0] * small[1]
    hits, misses, size = dev.plan_cache_info()
    assert (hits, misses, size) == (0, 2, 2)
    assert dev.conv_pool_plan(False, conv, pool, True, True, 1) == small
    assert dev.plan_cache_info()[:2] == (1, 2)
    # The plan a launch takes is the device's: both run, and agree with the CPU.
    xp, _ = fake
    x, w = ref.randn(rng, (1, 3, 20, 20), np.float32), ref.randn(rng, (8, 3, 3, 3), np.float32)
    ys = [lk.conv2d_max_pool2d(xp.array(x, device=d), xp.array(w, device=d), padding=1).host for d in (0, 1)]
    want, _ = ref.max_pool2d(ref.conv2d(x, w, padding=1, activation="relu"), 2)
    mag, _ = ref.max_pool2d(conv_magnitude(x, w, None, padding=1), 2)
    for y in ys:
        ref.assert_sum_close(y, want, mag, 27, np.float32)


# --------------------------------------------------------------------------
# Backward on emulated devices
# --------------------------------------------------------------------------


def test_backward_ops_on_device_arrays(fake, rng):
    from test_cuda_backward_emulation import conv2d_backward_ref, cross_entropy_backward_ref, cross_entropy_ref

    xp, kernels = fake
    x, w = ref.randn(rng, (2, 4, 7, 6), np.float64), ref.randn(rng, (6, 2, 3, 3), np.float64)
    go = ref.randn(rng, (2, 6, 4, 3), np.float64)
    gi, gw, gb = lk.conv2d_backward(xp.array(go), xp.array(x), xp.array(w), stride=2, padding=1, groups=2)
    want = conv2d_backward_ref(go, x, w, (2, 2), (1, 1, 1, 1), (1, 1), 2)
    mags = conv2d_backward_ref(np.abs(go), np.abs(x), np.abs(w), (2, 2), (1, 1, 1, 1), (1, 1), 2)
    for got, expected, mag, n in zip((gi, gw, gb), want, mags, (27, 24, 24)):
        assert isinstance(got, FakeArray)
        ref.assert_sum_close(got.host, expected, mag, n, np.float64)
    none_gi, gw_only, none_gb = lk.conv2d_backward(xp.array(go), xp.array(x), xp.array(w), 2, 1, 1, 2,
                                                   output_mask=(False, True, False))
    assert none_gi is None and none_gb is None
    ref.assert_identical(gw_only.host, gw.host)
    # Unbatched, as the CPU API takes it.
    gi3, _, _ = lk.conv2d_backward(xp.array(go[1]), xp.array(x[1]), xp.array(w), 2, 1, groups=2)
    ref.assert_sum_close(gi3.host, want[0][1], mags[0][1], 27, np.float64)

    xl, wl = ref.randn(rng, (5, 3, 4), np.float32), ref.randn(rng, (7, 4), np.float32)
    gl = ref.randn(rng, (5, 3, 7), np.float32)
    gi, gw, gb = lk.linear_backward(xp.array(gl), xp.array(xl), xp.array(wl))
    g2, x2 = gl.reshape(15, 7).astype(np.float64), xl.reshape(15, 4).astype(np.float64)
    ref.assert_sum_close(gi.host, (g2 @ wl).reshape(5, 3, 4), (np.abs(g2) @ np.abs(wl)).reshape(5, 3, 4), 7,
                         np.float32)
    ref.assert_sum_close(gw.host, g2.T @ x2, np.abs(g2).T @ np.abs(x2), 15, np.float32)
    ref.assert_sum_close(gb.host, g2.sum(0), np.abs(g2).sum(0), 15, np.float32)

    xpool = ref.randn(rng, (2, 3, 6, 6), np.float32)
    v, idx = lk.max_pool2d(xp.array(xpool), 3, stride=1, return_indices=True)
    gpool = ref.randn(rng, v.shape, np.float32)
    gi = lk.max_pool2d_backward(xp.array(gpool), idx, xpool.shape)
    want = np.zeros((6, 36))
    np.add.at(want, (np.repeat(np.arange(6), 16), idx.host.reshape(-1)), gpool.reshape(-1))
    mag = np.zeros((6, 36))
    np.add.at(mag, (np.repeat(np.arange(6), 16), idx.host.reshape(-1)), np.abs(gpool.reshape(-1)))
    ref.assert_sum_close(gi.host, want.reshape(xpool.shape), mag.reshape(xpool.shape), 9, np.float32)

    y = lk.relu(xp.array(xpool))
    grad = ref.randn(rng, xpool.shape, np.float32)
    ref.assert_identical(lk.relu_backward(xp.array(grad), y).host, np.where(y.host <= 0, 0, grad))

    logits, target = ref.randn(rng, (6, 10), np.float32), rng.integers(0, 10, 6).astype(np.int64)
    target[2] = -100
    for reduction in ("mean", "sum", "none"):
        loss = lk.cross_entropy(xp.array(logits), xp.array(target), reduction=reduction)
        ref._assert_within(loss.host, cross_entropy_ref(logits, target, reduction, -100), 1e-5, reduction)
    g = xp.array(np.array(1.5, np.float32))
    want = cross_entropy_backward_ref(1.5, logits, target, "mean", -100)
    ref._assert_within(lk.cross_entropy_backward(g, xp.array(logits), xp.array(target)).host, want, 1e-6, "mean")
    ref._assert_within(lk.cross_entropy_backward(1.5, xp.array(logits), xp.array(target)).host, want, 1e-6,
                       "a number as grad_loss")
    with pytest.raises(TypeError, match="target: expected dtype int64"):
        lk.cross_entropy(xp.array(logits), xp.array(target.astype(np.float32)))
    with pytest.raises(ValueError, match="reduction"):
        lk.cross_entropy(xp.array(logits), xp.array(target), reduction="avg")
    with pytest.raises(ValueError, match="input: expected a 2-D array"):
        lk.cross_entropy(xp.array(logits[0]), xp.array(target[:1]))
    with pytest.raises(TypeError, match="indices: expected a device array"):
        lk.max_pool2d_backward(xp.array(gpool), idx.host, xpool.shape)
    assert {op for op, _, _ in kernels.launches} >= {"conv2d_backward", "linear_backward", "max_pool2d_backward",
                                                     "relu_backward", "cross_entropy", "cross_entropy_backward"}


@pytest.mark.parametrize("batched", [True, False])
def test_fused_conv_pool_indices_and_backward(fake, batched, rng):
    xp, kernels = fake
    x, w, b = ref.randn(rng, (2, 3, 9, 8), np.float64), ref.randn(rng, (5, 3, 3, 3), np.float64), \
        ref.randn(rng, (5,), np.float64)
    if not batched:
        x = x[0]
    kw = dict(padding=1, kernel_size=3, pool_stride=2)
    y, idx = lk.conv2d_max_pool2d(xp.array(x), xp.array(w), xp.array(b), return_indices=True, **kw)
    cy, cidx = lk.conv2d_max_pool2d(x, w, b, return_indices=True, **kw)  # the CPU library
    conv = ref.conv2d(x, w, b, padding=1, activation="relu")
    magnitude = ref.max_pool2d(ref.conv2d(np.abs(x), np.abs(w), np.abs(b), padding=1), 3, 2)[0]
    ref.assert_sum_close(y.host, cy, magnitude, 28, np.float64)
    ref.assert_identical(idx.host, cidx)  # distinct random values: the same maxima
    go = ref.randn(rng, y.shape, np.float64)
    got = lk.conv2d_max_pool2d_backward(xp.array(go), xp.array(x), xp.array(w), y, idx, padding=1)
    want = lk.conv2d_max_pool2d_backward(go, x, w, cy, cidx, padding=1)
    P, Q = conv.shape[-2:]
    for g, c, n in zip(got, want, (5 * 9 * 4, 2 * P * Q * 4, 2 * P * Q)):
        ref._assert_within(g.host, c, 8 * n * np.finfo(np.float64).eps * (np.abs(c).max() + 1), "fused backward")
    assert "max_pool2d" in {op for op, _, _ in kernels.launches}  # indices: unfused on the device


def test_backward_fallback(fallback, rng):
    xp = fallback
    x, w = ref.randn(rng, (2, 3, 6, 6), np.float32), ref.randn(rng, (4, 3, 3, 3), np.float32)
    go = ref.randn(rng, (2, 4, 4, 4), np.float32)
    with pytest.warns(lk.LeptonFallbackWarning):
        got = lk.conv2d_backward(xp.array(go), xp.array(x), xp.array(w))
    for g, c in zip(got, lk.conv2d_backward(go, x, w)):
        assert isinstance(g, FakeArray)
        ref.assert_identical(g.host, c)
    logits, target = ref.randn(rng, (4, 5), np.float32), np.array([0, 4, -100, 2], np.int64)
    ref.assert_identical(lk.cross_entropy(xp.array(logits), xp.array(target)).host,
                         lk.cross_entropy(logits, target))
    with pytest.raises(ValueError, match="indices"):  # the CPU's checks hold in the fallback
        lk.max_pool2d_backward(xp.array(go), xp.array(np.full(go.shape, 99, np.int64)), (2, 4, 8, 8))


# --------------------------------------------------------------------------
# A real GPU with CuPy
# --------------------------------------------------------------------------


def _cupy_with_device():
    cp = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver
        pytest.skip(f"no CUDA device usable by CuPy ({e})")
    if n == 0:
        pytest.skip("no CUDA device")
    if not lk.get_config()["cuda_built"]:
        pytest.skip("lepton_kernels was built without CUDA (CuPy inputs take the CPU fallback)")
    return cp


@pytest.fixture
def cp():
    return _cupy_with_device()


def _tol_check(got_cp, cp, want, mag, length, dtype):
    ref.assert_sum_close(cp.asnumpy(got_cp), want, mag, length, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", CONV_CASES, ids=["plain", "strided-dilated", "same-grouped"])
def test_gpu_conv2d(cp, kw, dtype, rng):
    x, w, b = ref.randn(rng, (3, 4, 17, 15), dtype), ref.randn(rng, (70, 4 // kw["groups"], 3, 3), dtype), \
        ref.randn(rng, (70,), dtype)
    y = lk.conv2d(cp.asarray(x), cp.asarray(w), cp.asarray(b), activation="relu", **kw)
    assert isinstance(y, cp.ndarray) and y.dtype == dtype
    _tol_check(y, cp, ref.conv2d(x, w, b, activation="relu", **kw), conv_magnitude(x, w, b, **kw), w[0].size + 1,
               dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_ops_match_cpu(cp, dtype, rng):
    x, w, b = ref.randn(rng, (2, 3, 20, 18), dtype), ref.randn(rng, (8, 3, 3, 3), dtype), ref.randn(rng, (8,), dtype)
    dx, dw, db = cp.asarray(x), cp.asarray(w), cp.asarray(b)
    y = lk.conv2d_max_pool2d(dx, dw, db, padding=1)
    want, _ = ref.max_pool2d(ref.conv2d(x, w, b, padding=1, activation="relu"), 2)
    mag, _ = ref.max_pool2d(conv_magnitude(x, w, b, padding=1), 2)
    _tol_check(y, cp, want, mag, 28, dtype)
    v, i = lk.max_pool2d(dx, 3, stride=2, padding=1, return_indices=True)
    rv, ri = ref.max_pool2d(x, 3, 2, 1)
    ref.assert_identical(cp.asnumpy(v), rv.astype(dtype))
    ref.assert_identical(cp.asnumpy(i), ri)
    xl, wl = ref.randn(rng, (33, 70), dtype), ref.randn(rng, (10, 70), dtype)
    _tol_check(lk.linear(cp.asarray(xl), cp.asarray(wl)), cp, ref.linear(xl, wl), np.abs(xl) @ np.abs(wl.T), 70,
               dtype)
    ref.assert_identical(cp.asnumpy(lk.relu(dx)), np.maximum(x, 0))
    ref.assert_softmax_close(cp.asnumpy(lk.softmax(dx, 1)), x, 1, False)
    ref.assert_softmax_close(cp.asnumpy(lk.log_softmax(dx, -1)), x, -1, True)
    layer = lk.Conv2d(w, b, padding=1)
    _tol_check(layer(dx), cp, ref.conv2d(x, w, b, padding=1), conv_magnitude(x, w, b, padding=1), 28, dtype)


@pytest.mark.gpu
def test_gpu_streams_noncontiguous_and_no_sync(cp, rng):
    x = ref.randn(rng, (4, 3, 16, 30), np.float32)
    w = ref.randn(rng, (5, 3, 3, 3), np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        dx = cp.asarray(x)[..., ::2]  # non-contiguous: copied on this stream
        y = lk.conv2d(dx, cp.asarray(w))
    stream.synchronize()
    _tol_check(y, cp, ref.conv2d(x[..., ::2], w), conv_magnitude(x[..., ::2], w, None), 27, np.float32)


@pytest.mark.gpu
def test_gpu_other_device(cp, rng):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    x = ref.randn(rng, (2, 8), np.float32)
    with cp.cuda.Device(1):
        d = cp.asarray(x)
    y = lk.relu(d)  # runs on device 1 while device 0 is current
    assert y.device.id == 1 and cp.cuda.Device().id == 0
    ref.assert_identical(cp.asnumpy(y), np.maximum(x, 0))
    with pytest.raises(ValueError, match="weight: is on device 0"):
        lk.linear(d, cp.asarray(x))


@pytest.mark.gpu
def test_gpu_torch_dlpack_roundtrip(cp, rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    x = ref.randn(rng, (3, 7), np.float32)
    t = torch.from_numpy(x).cuda()
    y = lk.relu(t)
    assert isinstance(y, torch.Tensor) and y.is_cuda
    ref.assert_identical(y.cpu().numpy(), np.maximum(x, 0))


@pytest.mark.gpu
def test_gpu_backward_kernels(cp, rng):
    from test_cuda_backward_emulation import conv2d_backward_ref

    x, w = ref.randn(rng, (2, 4, 9, 8), np.float64), ref.randn(rng, (6, 4, 3, 3), np.float64)
    go = ref.randn(rng, (2, 6, 9, 8), np.float64)
    got = lk.conv2d_backward(cp.asarray(go), cp.asarray(x), cp.asarray(w), padding=1)
    want = conv2d_backward_ref(go, x, w, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    mags = conv2d_backward_ref(np.abs(go), np.abs(x), np.abs(w), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    for g, e, m, n in zip(got, want, mags, (54, 144, 144)):
        ref.assert_sum_close(cp.asnumpy(g), e, m, n, np.float64)


@pytest.mark.gpu
def test_gpu_forced_fallback_warns(cp, rng):
    x = ref.randn(rng, (2, 5), np.float32)
    _device._reset_fallback_warning()
    try:
        with _device.use_runtime(_device.Runtime(cp, None, "forced by the test")):
            with pytest.warns(lk.LeptonFallbackWarning, match="forced by the test"):
                y = lk.relu(cp.asarray(x))
    finally:
        _device._reset_fallback_warning()
    assert isinstance(y, cp.ndarray)
    ref.assert_identical(cp.asnumpy(y), np.maximum(x, 0))
    assert math.isfinite(float(cp.asnumpy(y).sum()))


@pytest.mark.gpu
def test_gpu_timed_with_cuda_events(cp, rng, capsys):
    """The reference workloads' GPU rows, timed with CUDA events on the call's stream, and checked
    against the CPU path. The times are printed (pytest -s), not asserted: a test is no benchmark."""
    cases = {
        "r18-c3": ((1, 128, 28, 28), (128, 128, 3, 3), dict(padding=1)),
        "fuse-mnist-b256": ((256, 1, 28, 28), (32, 1, 3, 3), None),
    }
    stream = cp.cuda.Stream(non_blocking=True)
    for name, (xs, ws, kw) in cases.items():
        x, w = ref.randn(rng, xs, np.float32), ref.randn(rng, ws, np.float32)
        dx, dw = cp.asarray(x), cp.asarray(w)
        if kw is None:
            run = lambda: lk.conv2d_max_pool2d(dx, dw, stream=stream)  # noqa: E731
            want = lk.conv2d_max_pool2d(x, w)
        else:
            run = lambda: lk.conv2d(dx, dw, stream=stream, **kw)  # noqa: E731
            want = lk.conv2d(x, w, **kw)
        run()  # plan and warm up
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        for _ in range(20):
            y = run()
        stop.record(stream)
        stop.synchronize()
        ms = cp.cuda.get_elapsed_time(start, stop) / 20
        mag = conv_magnitude(x, w, None, **(kw or {}))
        if kw is None:
            mag, _ = ref.max_pool2d(mag, 2)
        _tol_check(y, cp, want.astype(np.float64), mag, w[0].size, np.float32)
        with capsys.disabled():
            print(f"{name}: {ms * 1e3:.1f} us per call on {cp.cuda.runtime.getDeviceProperties(0)['name']}")
