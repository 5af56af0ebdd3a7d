"""The lepton:: ops on CUDA tensors: routed to lepton's device kernels, torch as the array module.

Without a GPU, the device path runs over the emulated CUDA kernels
(``_cuda_emu``: the CUDA sources compiled as C++ over host memory). A CPU
tensor subclass stands in for a CUDA tensor: it reports a CUDA device and a
CUDA array interface whose pointer is its host memory, and the array module
(torch, through ``_cuda.TorchArrays``) makes its outputs of that subclass.
Each op must launch the device kernels on torch's current stream, return
tensors of the input's kind and agree with float64 torch. On a machine with
a CUDA build of torch and a GPU, the last tests run the real thing.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch integration needs PyTorch")
import torch.nn.functional as F  # noqa: E402

import lepton_kernels as lk  # noqa: E402
import lepton_kernels.torch as lkt  # noqa: E402
from lepton_kernels import _cuda_emu, _device  # noqa: E402
from lepton_kernels.torch import _cuda  # noqa: E402

from fake_cupy import RecordingKernels  # noqa: E402

ops = torch.ops.lepton
TORCH_STREAM = 0x5EED  # the emulated torch.cuda.current_stream()


class EmuCuda(torch.Tensor):
    """A CPU tensor posing as a CUDA tensor for the emulated kernels (never for a real CUDA runtime)."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    @property
    def __cuda_array_interface__(self):
        item = self.element_size()
        return {"version": 3, "shape": tuple(self.shape), "typestr": np.dtype(str(self.dtype)[6:]).str,
                "data": (self.data_ptr(), False), "strides": tuple(s * item for s in self.stride()), "stream": None}


class EmuTorchArrays(_cuda.TorchArrays):
    """torch as the array module, over EmuCuda tensors in host memory, with one emulated device."""

    device_count, current_device = 1, 0

    def __init__(self):
        super().__init__(device_type="cpu")

    def _device(self, index):
        assert index == 0
        return contextlib.nullcontext()

    def _current_stream(self):
        return _cuda._Stream(TORCH_STREAM)

    def _wrap(self, t):
        return t.as_subclass(EmuCuda)

    def empty(self, shape, dtype):
        t = super().empty(shape, dtype)
        with torch.no_grad():
            t.fill_(float("nan") if t.is_floating_point() else -7)  # an unwritten output fails the comparison
        return t

    def device_of(self, ptr):
        return 0


@pytest.fixture
def emu():
    """The recording emulated kernels, installed as the lepton:: ops' device runtime."""
    kernels = RecordingKernels(EmuTorchArrays())
    with _cuda.using(_device.Runtime(kernels.xp, kernels, "")):
        yield kernels
    _cuda_emu.device.set_emulated_devices([132])


def dev(t):
    return t.detach().clone().as_subclass(EmuCuda)


def host64(t):
    return torch.Tensor.as_subclass(t, torch.Tensor).detach().double()


def close(got, want, tol):
    """Norm-wise relative error of a device result against float64 torch."""
    assert type(got) is EmuCuda, f"expected the device kind back, got {type(got).__name__}"
    got = host64(got)
    assert got.shape == want.shape
    err = (got - want).norm() / max(want.norm().item(), 1e-30)
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"


# float32 sums of at most ~100 products here: sqrt(K) * eps is under 2e-6; 1e-5 leaves room for the
# different summation orders of the device kernels without hiding a wrong index or a missing term.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def launched(kernels, *names):
    got = [(op, stream) for op, _, stream in kernels.launches]
    assert [op for op, _ in got] == list(names)
    assert all(stream == TORCH_STREAM for _, stream in got), got
    kernels.launches.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_conv2d_forward_and_backward_on_the_device(emu, rng, dtype, relu):
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    x = torch.randn(2, 4, 9, 8, generator=g, dtype=dtype)
    w = torch.randn(6, 2, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(6, generator=g, dtype=dtype)
    args = ([2, 1], [1, 0], [1, 2], 2)
    y = ops.conv2d(dev(x), dev(w), dev(b), *args, relu)
    launched(emu, "conv2d")
    xr, wr, br = (host64(t).requires_grad_() for t in (x, w, b))
    yr = F.conv2d(xr, wr, br, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    if relu:
        yr = yr.relu()
    close(y, yr.detach(), TOL[dtype])

    go = torch.randn(y.shape, generator=g, dtype=dtype)
    yr.backward(host64(go))
    grads = ops.conv2d_backward(dev(go), dev(x), dev(w), y if relu else None, *args, [True, True, True])
    launched(emu, *(["relu_backward"] if relu else []), "conv2d_backward")
    for got, want in zip(grads, (xr.grad, wr.grad, br.grad)):
        close(got, want, TOL[dtype])


def test_unbatched_conv_and_linear_on_the_device(emu, rng):
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    x, w = torch.randn(3, 7, 7, generator=g), torch.randn(5, 3, 2, 2, generator=g)
    y = ops.conv2d(dev(x), dev(w), None, [1, 1], [1, 1], [1, 1], 1, False)
    close(y, F.conv2d(host64(x), host64(w), padding=1), TOL[torch.float32])
    grads = ops.conv2d_backward(dev(torch.ones(y.shape)), dev(x), dev(w), None, [1, 1], [1, 1], [1, 1], 1,
                                [True, True, False])
    xr, wr = host64(x).requires_grad_(), host64(w).requires_grad_()
    F.conv2d(xr, wr, padding=1).sum().backward()
    close(grads[0], xr.grad, TOL[torch.float32])
    close(grads[1], wr.grad, TOL[torch.float32])
    assert grads[2].numel() == 0  # not asked for

    # linear of a 3-D input, ReLU fused, and its backward through the rows view
    x, w, b = torch.randn(2, 3, 9, generator=g), torch.randn(4, 9, generator=g), torch.randn(4, generator=g)
    y = ops.linear(dev(x), dev(w), dev(b), True)
    launched(emu, "conv2d", "conv2d_backward", "linear")
    xr, wr, br = (host64(t).requires_grad_() for t in (x, w, b))
    yr = F.linear(xr, wr, br).relu()
    close(y, yr.detach(), TOL[torch.float32])
    go = torch.randn(y.shape, generator=g)
    yr.backward(host64(go))
    grads = ops.linear_backward(dev(go), dev(x), dev(w), y, [True, True, True])
    launched(emu, "relu_backward", "linear_backward")
    for got, want in zip(grads, (xr.grad, wr.grad, br.grad)):
        close(got, want, TOL[torch.float32])


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_pooling_and_the_fused_pass_on_the_device(emu, rng, ceil_mode):
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    x = torch.randn(2, 3, 9, 9, generator=g)
    pool = ([3, 3], [2, 2], [1, 1], [1, 1], ceil_mode)
    y, idx = ops.max_pool2d_with_indices(dev(x), *pool)
    assert type(idx) is EmuCuda and idx.dtype == torch.int64
    yr, idxr = F.max_pool2d(host64(x), 3, 2, 1, ceil_mode=ceil_mode, return_indices=True)
    close(y, yr, 1e-12)  # a max is exact
    assert torch.equal(torch.Tensor.as_subclass(idx, torch.Tensor), idxr)
    close(ops.max_pool2d(dev(x), *pool), yr, 1e-12)
    go = torch.randn(y.shape, generator=g)
    gi = ops.max_pool2d_backward(dev(go), idx, list(x.shape))
    launched(emu, "max_pool2d", "max_pool2d", "max_pool2d_backward")
    xr = host64(x).requires_grad_()
    F.max_pool2d(xr, 3, 2, 1, ceil_mode=ceil_mode).backward(host64(go))
    close(gi, xr.grad, 1e-6)  # overlapping 3x3 windows: up to 4 float32 gradients added per element

    # conv -> ReLU -> max-pool: the fused kernel without indices; conv then pooling with them
    w, b = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    fused_pool = ([2, 2], [2, 2], [0, 0], [1, 1], ceil_mode)
    xr, wr, br = (host64(t).requires_grad_() for t in (x, w, b))
    want = F.max_pool2d(F.conv2d(xr, wr, br, padding=1).relu(), 2, 2, ceil_mode=ceil_mode)
    close(ops.conv2d_relu_max_pool2d(dev(x), dev(w), dev(b), *conv, *fused_pool), want.detach(), 1e-5)
    launched(emu, "conv2d_max_pool2d")
    y, idx = ops.conv2d_relu_max_pool2d_with_indices(dev(x), dev(w), dev(b), *conv, *fused_pool)
    close(y, want.detach(), 1e-5)
    go = torch.randn(y.shape, generator=g)
    want.backward(host64(go))
    grads = ops.conv2d_relu_max_pool2d_backward(dev(go), dev(x), dev(w), y, idx, *conv, [True, True, True])
    for got, ref in zip(grads, (xr.grad, wr.grad, br.grad)):
        close(got, ref, 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_relu_and_cross_entropy_on_the_device(emu, rng, reduction):
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    y = ops.relu(dev(x))
    close(y, host64(x).relu(), 0)
    go = torch.randn(x.shape, generator=g, dtype=torch.float64)
    close(ops.relu_backward(dev(go), y), host64(go) * (x > 0), 0)
    launched(emu, "relu", "relu_backward")

    target = torch.tensor([0, 6, 3, -100, 2])
    loss = ops.cross_entropy(dev(x), dev(target), reduction, -100)
    xr = host64(x).requires_grad_()
    want = F.cross_entropy(xr, target, reduction=reduction, ignore_index=-100)
    close(loss, want.detach(), 1e-12)
    gl = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want.backward(gl)
    close(ops.cross_entropy_backward(dev(gl), dev(x), dev(target), reduction, -100), xr.grad, 1e-12)
    launched(emu, "cross_entropy", "cross_entropy_backward")


def test_device_errors_name_the_argument(emu):
    x, w = dev(torch.randn(1, 2, 5, 5)), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="lepton::conv2d: weight is on cpu, but input is on cuda:0"):
        ops.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1, False)
    y, idx = ops.max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(ValueError, match="indices is on cpu, but the data is on cuda:0"):
        ops.max_pool2d_backward(y, torch.Tensor.as_subclass(idx, torch.Tensor).clone(), [1, 2, 5, 5])
    with pytest.raises(ValueError, match="input: expected 4 channels, got 2|channels"):
        ops.conv2d(x, dev(torch.randn(3, 4, 3, 3)), None, [1, 1], [0, 0], [1, 1], 1, False)
    assert not emu.launches[1:]  # nothing launched for the refused calls (the pooling ran)


def test_cuda_tensors_without_device_kernels_fall_back_with_a_warning(rng):
    """A build without CUDA: the ops copy CUDA tensors to the host, compute, and copy back."""
    _device._reset_fallback_warning()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    try:
        with _cuda.using(_device.Runtime(EmuTorchArrays(), None, "lepton_kernels was built without CUDA")):
            with pytest.warns(_device.LeptonFallbackWarning, match="built without CUDA"):
                y = ops.conv2d(dev(x), dev(w), None, [1, 1], [1, 1], [1, 1], 1, True)
            assert not _cuda.kernels_usable()
    finally:
        _device._reset_fallback_warning()
    close(y, F.conv2d(x, w, padding=1).relu(), 1e-12)


def test_swapped_modules_take_the_device_path_only_with_device_kernels(emu):
    from lepton_kernels.torch.modules import _runs

    x = torch.randn(1, 2, 4, 4)
    assert _runs(x, torch.randn(3))
    assert _runs(dev(x), dev(torch.randn(3)))  # the emulated kernels are usable
    assert not _runs(dev(x), torch.randn(3))  # parameters elsewhere: torch's own forward
    with _cuda.using(_device.Runtime(EmuTorchArrays(), None, "no kernels")):
        assert not _runs(dev(x), dev(torch.randn(3)))  # torch's forward beats a host round trip


# --- a real GPU ------------------------------------------------------------------------------------------


cuda_ready = pytest.mark.skipif(
    not (torch.cuda.is_available() and lk.get_config()["cuda_devices"]),
    reason="needs a CUDA build of torch, lepton_kernels built with CUDA and a GPU")


@cuda_ready
def test_real_cuda_tensors_train_like_cpu_ones(rng):
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    x = torch.randn(4, 3, 12, 12, generator=g)
    w = torch.randn(8, 3, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    fw = torch.randn(10, 8 * 6 * 6, generator=g, requires_grad=True)
    target = torch.randint(0, 10, (4,), generator=g)

    def step(device):
        ws = [t.detach().to(device).requires_grad_() for t in (w, b, fw)]
        s = torch.cuda.Stream() if device == "cuda" else None
        with torch.cuda.stream(s) if s is not None else contextlib.nullcontext():
            h = lkt.conv2d_relu_max_pool2d(x.to(device), ws[0], ws[1], padding=1)
            loss = lkt.cross_entropy(lkt.linear(h.flatten(1), ws[2]), target.to(device))
            loss.backward()
        if s is not None:
            torch.cuda.current_stream().wait_stream(s)
        return [loss.detach().cpu()] + [t.grad.cpu() for t in ws]

    with warnings.catch_warnings():
        warnings.simplefilter("error", _device.LeptonFallbackWarning)
        got = step("cuda")
    for a, b_ in zip(got, step("cpu")):
        assert torch.allclose(a, b_, rtol=1e-4, atol=1e-5)
