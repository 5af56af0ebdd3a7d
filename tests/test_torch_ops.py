"""The lepton:: custom ops: registration (opcheck), gradients (gradcheck), agreement with torch, torch.compile."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch integration needs PyTorch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import lepton_kernels.torch as lkt  # noqa: E402
from lepton_kernels.torch import _ops  # noqa: E402

ops = torch.ops.lepton
EPS32 = float(np.finfo(np.float32).eps)

# (input shape, weight shape, stride, padding, dilation, groups): small shapes for gradcheck,
# covering strides, padding, dilation, groups (depthwise too) and an unbatched input.
CONV_CASES = [
    ((2, 3, 7, 6), (4, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1),
    ((1, 4, 8, 7), (6, 2, 3, 2), (2, 1), (1, 0), (1, 1), 2),
    ((2, 2, 9, 9), (3, 2, 3, 3), (1, 2), (2, 1), (2, 1), 1),
    ((1, 3, 6, 6), (3, 1, 3, 3), (1, 1), (1, 1), (1, 1), 3),
    ((3, 5, 5), (2, 3, 2, 2), (1, 1), (1, 1), (1, 1), 1),
]
# (input shape, kernel, stride, padding, dilation, ceil_mode)
POOL_CASES = [
    ((2, 3, 8, 8), (2, 2), (2, 2), (0, 0), (1, 1), False),
    ((1, 2, 9, 7), (3, 3), (2, 2), (1, 1), (1, 1), True),
    ((2, 2, 9, 9), (3, 2), (1, 2), (1, 0), (2, 1), False),
    ((3, 7, 7), (2, 2), (2, 2), (0, 0), (1, 1), True),
]


def gen(seed):
    return torch.Generator().manual_seed(seed % 2**63)


def randn(g, shape, dtype=torch.float64, requires_grad=False):
    return torch.randn(shape, generator=g, dtype=dtype).requires_grad_(requires_grad)


def conv_args(case):
    _, w_shape, stride, padding, dilation, groups = case
    return list(stride), list(padding), list(dilation), groups


# --- opcheck: schema, fake implementations, autograd registration, AOT dispatch -------------------------------


def _opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CONV_CASES[:4])
@pytest.mark.parametrize("relu", [False, True])
def test_opcheck_conv2d(seed, dtype, case, relu):
    g = gen(seed)
    x, w, b = randn(g, case[0], dtype, True), randn(g, case[1], dtype, True), randn(g, case[1][0], dtype, True)
    _opcheck(ops.conv2d, (x, w, b, *conv_args(case), relu))
    _opcheck(ops.conv2d, (x, w, None, *conv_args(case), relu))
    y = ops.conv2d(x, w, b, *conv_args(case), relu).detach()
    _opcheck(ops.conv2d_backward, (torch.randn_like(y), x.detach(), w.detach(), y if relu else None,
                                   *conv_args(case), [True, True, True]))
    _opcheck(ops.conv2d_backward, (torch.randn_like(y), x.detach(), w.detach(), None, *conv_args(case),
                                   [False, True, False]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", POOL_CASES)
def test_opcheck_max_pool2d(seed, dtype, case):
    g = gen(seed)
    x = randn(g, case[0], dtype, True)
    args = tuple(list(a) for a in case[1:5]) + (case[5],)
    _opcheck(ops.max_pool2d_with_indices, (x, *args))
    _opcheck(ops.max_pool2d, (x.detach(), *args))
    y, idx = ops.max_pool2d_with_indices(x.detach(), *args)
    _opcheck(ops.max_pool2d_backward, (torch.randn_like(y), idx, list(x.shape)))


FUSED_CASES = [
    # (conv case, pool kernel, stride, padding, dilation, ceil_mode)
    (CONV_CASES[0], [2, 2], [2, 2], [0, 0], [1, 1], False),
    (CONV_CASES[2], [3, 3], [2, 2], [1, 1], [1, 1], True),
    (CONV_CASES[3], [2, 2], [1, 1], [0, 0], [2, 2], False),
    (CONV_CASES[4], [2, 2], [2, 2], [0, 0], [1, 1], True),
]


def fused_inputs(g, case, dtype, requires_grad):
    conv = case[0]
    x = randn(g, conv[0], dtype, requires_grad)
    w = randn(g, conv[1], dtype, requires_grad)
    b = randn(g, conv[1][0], dtype, requires_grad)
    return x, w, b, (*conv_args(conv), *case[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", FUSED_CASES)
def test_opcheck_conv2d_relu_max_pool2d(seed, dtype, case):
    x, w, b, args = fused_inputs(gen(seed), case, dtype, True)
    _opcheck(ops.conv2d_relu_max_pool2d_with_indices, (x, w, b, *args))
    _opcheck(ops.conv2d_relu_max_pool2d_with_indices, (x, w, None, *args))
    _opcheck(ops.conv2d_relu_max_pool2d, (x.detach(), w.detach(), b.detach(), *args))
    y, idx = ops.conv2d_relu_max_pool2d_with_indices(x.detach(), w.detach(), b.detach(), *args)
    _opcheck(ops.conv2d_relu_max_pool2d_backward, (torch.randn_like(y), x.detach(), w.detach(), y, idx, *args[:4],
                                                   [True, True, True]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("x_shape", [(5, 7), (2, 3, 7), (7,)])
@pytest.mark.parametrize("relu", [False, True])
def test_opcheck_linear(seed, dtype, x_shape, relu):
    g = gen(seed)
    x, w, b = randn(g, x_shape, dtype, True), randn(g, (4, 7), dtype, True), randn(g, 4, dtype, True)
    _opcheck(ops.linear, (x, w, b, relu))
    _opcheck(ops.linear, (x, w, None, relu))
    y = ops.linear(x, w, b, relu).detach()
    _opcheck(ops.linear_backward, (torch.randn_like(y), x.detach(), w.detach(), y if relu else None,
                                   [True, True, True]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_relu_and_cross_entropy(seed, dtype):
    g = gen(seed)
    x = randn(g, (3, 4, 5), dtype, True)
    _opcheck(ops.relu, (x,))
    _opcheck(ops.relu_backward, (torch.randn_like(x), ops.relu(x.detach())))
    logits = randn(g, (6, 5), dtype, True)
    target = torch.randint(0, 5, (6,), generator=g)
    target[2] = -100
    for reduction in ("mean", "sum", "none"):
        _opcheck(ops.cross_entropy, (logits, target, reduction, -100))
        loss = ops.cross_entropy(logits.detach(), target, reduction, -100)
        _opcheck(ops.cross_entropy_backward, (torch.randn_like(loss), logits.detach(), target, reduction, -100))


# --- gradcheck in float64 ----------------------------------------------------------------------------------


def _gradcheck(fn, inputs):
    # Fast mode compares v' J u for random u, v against finite differences: one pass per input instead of
    # one per element, and a wrong gradient still fails with probability 1.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_conv2d(seed, case, relu, bias):
    g = gen(seed)
    x, w = randn(g, case[0], requires_grad=True), randn(g, case[1], requires_grad=True)
    b = randn(g, case[1][0], requires_grad=True) if bias else None
    _gradcheck(lambda x, w, b: ops.conv2d(x, w, b, *conv_args(case), relu), (x, w, b))
    # Only the input's gradient, only the weight's: each mask of the backward op.
    _gradcheck(lambda x: ops.conv2d(x, w.detach(), b, *conv_args(case), relu), (x,))
    _gradcheck(lambda w: ops.conv2d(x.detach(), w, None, *conv_args(case), relu), (w,))


@pytest.mark.parametrize("case", POOL_CASES)
def test_gradcheck_max_pool2d(seed, case):
    x = randn(gen(seed), case[0], requires_grad=True)
    args = tuple(list(a) for a in case[1:5]) + (case[5],)
    _gradcheck(lambda x: ops.max_pool2d_with_indices(x, *args)[0], (x,))
    _gradcheck(lambda x: lkt.max_pool2d(x, *args), (x,))


@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_conv2d_relu_max_pool2d(seed, case, bias):
    x, w, b, args = fused_inputs(gen(seed), case, torch.float64, True)
    b = b if bias else None
    _gradcheck(lambda x, w, b: ops.conv2d_relu_max_pool2d_with_indices(x, w, b, *args)[0], (x, w, b))
    _gradcheck(lambda w: lkt.conv2d_relu_max_pool2d(x.detach(), w, None, *args[:4], *args[4:]), (w,))


@pytest.mark.parametrize("x_shape", [(5, 7), (2, 3, 7), (7,)])
@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_linear(seed, x_shape, relu):
    g = gen(seed)
    x, w, b = randn(g, x_shape, requires_grad=True), randn(g, (4, 7), requires_grad=True), randn(g, 4,
                                                                                                 requires_grad=True)
    _gradcheck(lambda x, w, b: ops.linear(x, w, b, relu), (x, w, b))
    _gradcheck(lambda x, w: ops.linear(x, w, None, relu), (x, w))


def test_gradcheck_relu_and_cross_entropy(seed):
    g = gen(seed)
    _gradcheck(ops.relu, (randn(g, (3, 4, 5), requires_grad=True),))
    _gradcheck(lambda x: ops.relu(x.transpose(0, 2)), (randn(g, (3, 4, 5), requires_grad=True),))
    logits = randn(g, (6, 5), requires_grad=True)
    target = torch.randint(0, 5, (6,), generator=g)
    target[1] = 3
    target[4] = -1  # ignored
    for reduction in ("mean", "sum", "none"):
        _gradcheck(lambda x: ops.cross_entropy(x, target, reduction, -1), (logits,))


# --- against torch's own ops in float32 -------------------------------------------------------------------


def assert_close(ours, theirs, exact, reduction):
    """Our float32 result is as close to the float64 one as torch's float32 result is (or within rounding).

    The floor is a few float32 roundings of a sum of ``reduction`` terms at the
    result's scale; above it, our error may be at most twice torch's.
    """
    assert ours.shape == exact.shape and ours.dtype == torch.float32
    exact = exact.double()
    scale = exact.abs().max().item() or 1.0
    err = (ours.double() - exact).abs().max().item()
    theirs_err = (theirs.double() - exact).abs().max().item()
    bound = max(2 * theirs_err, 4 * EPS32 * math.sqrt(reduction) * scale)
    assert err <= bound, f"error {err:.3g} > bound {bound:.3g} (torch's float32 error {theirs_err:.3g})"


def dyadic(t):
    """``t`` rounded to multiples of 1/16: products and sums of a few hundred such values are exact in float32.

    Then every convolution output is exact in any summation order, so ReLU and
    max-pool decide alike in float32 and float64 (the same signs, the same
    argmax, ties to the first index in both): the comparisons below measure
    rounding, not a maximum that moved between two values a rounding apart.
    """
    return torch.round(t * 16) / 16


def run_both(fn_ours, fn_torch, inputs, grad_seed):
    """Outputs and input gradients of our op (float32), torch's (float32) and torch's in float64."""
    results = []
    inputs = [None if t is None else dyadic(t) for t in inputs]
    for fn, dtype in ((fn_ours, torch.float32), (fn_torch, torch.float32), (fn_torch, torch.float64)):
        xs = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
        y = fn(*xs)
        # A non-contiguous incoming gradient, as a transposing consumer would send.
        gy = torch.randn(y.shape[::-1], generator=gen(grad_seed), dtype=torch.float64).permute(
            *reversed(range(y.dim()))).to(dtype)
        y.backward(gy)
        results.append((y.detach(), [None if t is None else t.grad for t in xs]))
    return results


def compare(results, reductions):
    (ours, ours_g), (theirs, theirs_g), (exact, exact_g) = results
    assert_close(ours, theirs, exact, reductions[0])
    for a, b, c, r in zip(ours_g, theirs_g, exact_g, reductions[1:]):
        if c is not None:
            assert_close(a, b, c, r)


def random_conv(rng):
    groups = int(rng.choice([1, 1, 2, 3]))
    C, K = groups * int(rng.integers(1, 5)), groups * int(rng.integers(1, 6))
    R, S = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    stride = [int(v) for v in rng.integers(1, 4, 2)]
    dilation = [int(v) for v in rng.integers(1, 3, 2)]
    padding = [int(v) for v in rng.integers(0, 3, 2)]
    N = int(rng.integers(1, 5))
    H = int(rng.integers(dilation[0] * (R - 1) + 1, 20))
    W = int(rng.integers(dilation[1] * (S - 1) + 1, 20))
    return (N, C, H, W), (K, C // groups, R, S), stride, padding, dilation, groups


@pytest.mark.parametrize("trial", range(6))
def test_conv2d_matches_torch(rng, seed, trial):
    x_shape, w_shape, stride, padding, dilation, groups = random_conv(rng)
    g = gen(seed)
    x, w, b = randn(g, x_shape), randn(g, w_shape), randn(g, w_shape[0])
    relu = bool(rng.integers(2))

    def torch_fn(x, w, b):
        y = F.conv2d(x, w, b, stride, padding, dilation, groups)
        return F.relu(y) if relu else y

    def ours(x, w, b):
        return lkt.conv2d(x, w, b, stride, padding, dilation, groups, activation="relu" if relu else None)

    y_shape = torch_fn(x, w, b).shape
    red = w_shape[1] * w_shape[2] * w_shape[3]
    compare(run_both(ours, torch_fn, (x, w, b), seed + 1),
            (red, w_shape[0] // groups * w_shape[2] * w_shape[3], y_shape[0] * y_shape[2] * y_shape[3],
             y_shape[0] * y_shape[2] * y_shape[3]))


@pytest.mark.parametrize("trial", range(6))
def test_max_pool2d_matches_torch(rng, seed, trial):
    k = [int(v) for v in rng.integers(1, 4, 2)]
    s = [int(v) for v in rng.integers(1, 4, 2)]
    p = [int(rng.integers(0, kk // 2 + 1)) for kk in k]
    d = [int(v) for v in rng.integers(1, 3, 2)]
    ceil = bool(rng.integers(2))
    shape = (int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(d[0] * (k[0] - 1) + 1, 16)),
             int(rng.integers(d[1] * (k[1] - 1) + 1, 16)))
    x = randn(gen(seed), shape)
    results = run_both(lambda x: lkt.max_pool2d(x, k, s, p, d, ceil), lambda x: F.max_pool2d(x, k, s, p, d, ceil),
                       (x,), seed + 1)
    (ours, (ours_g,)), (theirs, (theirs_g,)), _ = results
    # A maximum is exact and its gradient only routes values: equal to torch's, bit for bit.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(ours_g, theirs_g, rtol=0, atol=0)
    y, idx = lkt.max_pool2d(x.float(), k, s, p, d, ceil, return_indices=True)
    assert torch.equal(idx, F.max_pool2d(x.float(), k, s, p, d, ceil, return_indices=True)[1])


@pytest.mark.parametrize("trial", range(6))
def test_conv2d_relu_max_pool2d_matches_torch(rng, seed, trial):
    x_shape, w_shape, stride, padding, dilation, groups = random_conv(rng)
    g = gen(seed)
    x, w, b = randn(g, x_shape), randn(g, w_shape), randn(g, w_shape[0])
    conv_shape = F.conv2d(x, w, None, stride, padding, dilation, groups).shape
    k = [int(rng.integers(1, min(3, conv_shape[2]) + 1)), int(rng.integers(1, min(3, conv_shape[3]) + 1))]
    pool = (k, k, [0, 0], [1, 1], bool(rng.integers(2)))

    def torch_fn(x, w, b):
        return F.max_pool2d(F.relu(F.conv2d(x, w, b, stride, padding, dilation, groups)), *pool)

    def ours(x, w, b):
        return lkt.conv2d_relu_max_pool2d(x, w, b, stride, padding, dilation, groups, *pool)

    red = w_shape[1] * w_shape[2] * w_shape[3]
    n_pos = conv_shape[0] * conv_shape[2] * conv_shape[3]
    compare(run_both(ours, torch_fn, (x, w, b), seed + 1),
            (red, w_shape[0] // groups * w_shape[2] * w_shape[3], n_pos, n_pos))


@pytest.mark.parametrize("trial", range(4))
def test_linear_matches_torch(rng, seed, trial):
    lead = tuple(int(v) for v in rng.integers(1, 6, int(rng.integers(1, 3))))
    K, N = int(rng.integers(1, 300)), int(rng.integers(1, 40))
    g = gen(seed)
    x, w, b = randn(g, (*lead, K)), randn(g, (N, K)), randn(g, N)
    relu = bool(rng.integers(2))

    def torch_fn(x, w, b):
        y = F.linear(x, w, b)
        return F.relu(y) if relu else y

    rows = int(np.prod(lead))
    compare(run_both(lambda x, w, b: lkt.linear(x, w, b, activation="relu" if relu else None), torch_fn, (x, w, b),
                     seed + 1), (K, N, rows, rows))


def test_relu_and_cross_entropy_match_torch(seed):
    g = gen(seed)
    x = randn(g, (4, 6, 5))
    (ours, (ours_g,)), (theirs, (theirs_g,)), _ = run_both(lkt.relu, F.relu, (x,), seed + 1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(ours_g, theirs_g, rtol=0, atol=0)
    logits = randn(g, (33, 10)) * 3
    target = torch.randint(0, 10, (33,), generator=g)
    target[5] = -100
    for reduction in ("mean", "sum", "none"):
        results = []
        for fn, dtype in ((lkt.cross_entropy, torch.float32), (F.cross_entropy, torch.float32),
                          (F.cross_entropy, torch.float64)):
            z = logits.to(dtype).detach().requires_grad_()
            loss = fn(z, target, reduction=reduction)
            loss.sum().backward()
            results.append((loss.detach(), [z.grad]))
        compare(results, (10, 10))


# --- layouts, errors ----------------------------------------------------------------------------------------


def test_non_contiguous_inputs(seed):
    g = gen(seed)
    # Channels-last input, a transposed weight, a strided bias: values and gradients still match.
    x = randn(g, (2, 9, 10, 3), requires_grad=True)
    w = randn(g, (5, 3, 4, 3), requires_grad=True)  # transposed: 3 filters of 3 x 4 x 5
    b = randn(g, (6,), requires_grad=True)
    xs, ws, bs = x.permute(0, 3, 1, 2), w.transpose(0, 3), b[::2]
    assert not xs.is_contiguous() and not ws.is_contiguous() and not bs.is_contiguous()
    _gradcheck(lambda x, w, b: ops.conv2d(x.permute(0, 3, 1, 2), w.transpose(0, 3), b[::2], [1, 1], [1, 1], [1, 1],
                                          1, True), (x, w, b))
    _gradcheck(lambda x: lkt.max_pool2d(x.permute(0, 3, 1, 2), 2), (x,))
    wl = randn(g, (5, 4), requires_grad=True)
    _gradcheck(lambda x, w: ops.linear(x.permute(0, 3, 1, 2)[..., ::2], w.T, None, False), (x, wl))
    # An expanded (stride 0) incoming gradient, as y.sum() sends.
    y = ops.conv2d(xs, ws, bs, [1, 1], [0, 0], [1, 1], 1, False)
    y.sum().backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (xs, ws, bs))
    F.conv2d(x2, w2, b2).sum().backward()
    torch.testing.assert_close(x.grad.permute(0, 3, 1, 2), x2.grad)
    torch.testing.assert_close(w.grad.transpose(0, 3), w2.grad)


def test_lazy_attribute():
    import lepton_kernels as lk

    assert lk.torch is lkt
    assert {"conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_with_indices", "max_pool2d_backward",
            "conv2d_relu_max_pool2d", "conv2d_relu_max_pool2d_with_indices", "conv2d_relu_max_pool2d_backward",
            "linear", "linear_backward", "relu", "relu_backward", "cross_entropy",
            "cross_entropy_backward"} <= set(dir(torch.ops.lepton))


def test_errors():
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(3, 2, 3, 3)
    with pytest.raises(TypeError, match="input.*float32 or torch.float64"):
        lkt.conv2d(x.half(), w.half())
    with pytest.raises(TypeError, match="weight: dtype torch.float64 does not match"):
        lkt.conv2d(x, w.double())
    with pytest.raises(TypeError, match="target.*int64"):
        lkt.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="groups"):
        lkt.conv2d(x, w, groups=2)
    with pytest.raises(ValueError, match="padding: 'same' with an even"):
        lkt.conv2d(x, torch.randn(3, 2, 2, 2), padding="same")
    with pytest.raises(ValueError, match="activation"):
        lkt.linear(torch.randn(2, 3), torch.randn(4, 3), activation="gelu")
    # Tensors on another device are refused with the reason (no device here: the meta device stands in).
    with pytest.raises(ValueError, match="input is on meta.*take CPU and CUDA tensors"):
        _ops._check("conv2d", input=torch.empty(2, device="meta"))
    # The inference-only ops have no gradient, and say which op has one.
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    y = ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="max_pool2d_with_indices"):
        y.sum().backward()


def test_same_padding_and_inference_paths(seed):
    g = gen(seed)
    x, w = randn(g, (2, 3, 8, 8), torch.float32), randn(g, (4, 3, 3, 3), torch.float32)
    torch.testing.assert_close(lkt.conv2d(x, w, padding="same"), F.conv2d(x, w, padding="same"))
    torch.testing.assert_close(lkt.conv2d(x, w, padding="valid"), F.conv2d(x, w, padding="valid"))
    with torch.no_grad():
        expected = F.max_pool2d(F.relu(F.conv2d(x, w)), 2)
        torch.testing.assert_close(lkt.conv2d_relu_max_pool2d(x, w), expected)
    with torch.inference_mode():
        torch.testing.assert_close(lkt.conv2d_relu_max_pool2d(x, w), expected)
        torch.testing.assert_close(lkt.max_pool2d(x, 2), F.max_pool2d(x, 2))


# --- torch.compile --------------------------------------------------------------------------------------------


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 6 * 6, 10)

    def forward(self, x):
        x = lkt.conv2d_relu_max_pool2d(x, self.conv1.weight, self.conv1.bias)
        x = lkt.max_pool2d(lkt.relu(lkt.conv2d(x, self.conv2.weight, self.conv2.bias, padding=1)), 2, 1)
        return lkt.linear(x.flatten(1), self.fc.weight, self.fc.bias)


# Inductor itself (torch 2.13) calls a deprecated torch.jit API while compiling.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph(seed):
    # Inductor compiles C++ with the machine's compiler, which this package's build needs anyway.
    torch.manual_seed(seed % 2**63)
    net = SmallNet()
    twin = SmallNet()
    twin.load_state_dict(net.state_dict())
    compiled = torch.compile(net, fullgraph=True)
    x = torch.randn(5, 1, 16, 16)
    target = torch.randint(0, 10, (5,))
    for model in (twin, compiled):
        lkt.cross_entropy(model(x), target).backward()
    torch.testing.assert_close(compiled(x), twin(x))
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), twin(x))


@pytest.mark.parametrize("bad, name", [(dict(stride=[1]), "stride"), (dict(stride=[-1, 1]), "stride"),
                                       (dict(stride=[0, 1]), "stride"), (dict(padding=[-1, 0]), "padding"),
                                       (dict(dilation=[0, 1]), "dilation")])
def test_raw_op_geometry_errors_name_the_argument(bad, name):
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    args = dict(stride=[1, 1], padding=[0, 0], dilation=[1, 1]) | bad
    with pytest.raises(ValueError, match=name):
        torch.ops.lepton.conv2d(x, w, None, args["stride"], args["padding"], args["dilation"], 1, False)
    pool = dict(kernel_size=[2, 2], stride=[2, 2], padding=[0, 0], dilation=[1, 1]) | bad
    with pytest.raises(ValueError, match=name):
        torch.ops.lepton.max_pool2d_with_indices(x, pool["kernel_size"], pool["stride"], pool["padding"],
                                                 pool["dilation"], False)


def test_raw_op_kernel_larger_than_input_names_input():
    with pytest.raises(ValueError, match="input"):
        torch.ops.lepton.conv2d(torch.randn(1, 2, 2, 2), torch.randn(3, 2, 3, 3), None, [1, 1], [0, 0], [1, 1], 1,
                                False)
