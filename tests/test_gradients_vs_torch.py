"""Backward ops against torch.autograd on randomised configurations.

Each test draws its shapes and arguments (stride, padding, dilation, groups,
ceil_mode, odd sizes, batch 1, channel counts that are not multiples of the
SIMD width) from the test's seed, runs the op forward and backward in torch
in float64 on the same values, and compares lepton's gradients in float32 and
float64. Tolerance: the norm-wise relative error of a sum of L products is
bounded by about sqrt(L) * eps for random data; we allow 8 * sqrt(L) * eps,
with L the longest reduction behind the compared array.
"""

from __future__ import annotations

import numpy as np
import pytest

import lepton_kernels as lk

torch = pytest.importorskip("torch", reason="the differential tests compare against PyTorch")
F = torch.nn.functional

DTYPES = (np.float32, np.float64)

# torch's notice that 'same' padding with an even kernel pads a copy of the input: about its speed only.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
CONFIGS = 24  # random configurations per test and dtype


def tol(dtype, reduction):
    return 8 * np.sqrt(max(reduction, 1)) * np.finfo(dtype).eps


def rel_err(got, want, magnitude=None):
    """Norm-wise error of got against want, relative to want or, given, to the magnitude its rounding scales
    with (the same sums over absolute values: a sum that cancels keeps the error of its terms)."""
    got = np.asarray(got, np.float64)
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN positions differ"
    got, want = np.nan_to_num(got), np.nan_to_num(want)
    scale = want if magnitude is None else magnitude.detach().numpy()
    return np.linalg.norm(got - want) / max(np.linalg.norm(scale), 1e-300)


def abs_grads(fn, arrays, gy):
    """The gradients of fn at |arrays| for |gy|: each gradient's sums over absolute values."""
    leaves = [leaf(np.abs(a)) for a in arrays]
    fn(*leaves).backward(torch.from_numpy(np.abs(gy).astype(np.float64)))
    return [t.grad for t in leaves]


def leaf(a):
    return torch.tensor(np.ascontiguousarray(a, np.float64), requires_grad=True)


def conv_config(rng):
    """Random conv arguments; returns None when torch itself rejects them (output size 0)."""
    groups = int(rng.choice([1, 1, 2, 3]))
    C, K = groups * int(rng.integers(1, 6)), groups * int(rng.integers(1, 6))
    if rng.random() < 0.15:  # depthwise
        groups = C = K = int(rng.integers(2, 8))
    R, S = (int(v) for v in rng.integers(1, 5, 2))
    stride = tuple(int(v) for v in rng.integers(1, 4, 2))
    dilation = tuple(int(v) for v in rng.integers(1, 3, 2))
    padding = tuple(int(v) for v in rng.integers(0, 3, 2))
    if stride == (1, 1) and rng.random() < 0.25:
        padding = "same"
    N = int(rng.choice([1, 2, 3]))
    H = int(rng.integers((R - 1) * dilation[0] + 1, 14))
    W = int(rng.integers((S - 1) * dilation[1] + 1, 14))
    return dict(N=N, C=C, K=K, groups=groups, R=R, S=S, stride=stride, dilation=dilation, padding=padding, H=H, W=W)


def pool_config(rng, H, W):
    """Random max-pool arguments whose every window holds at least one input element.

    torch reports an out-of-plane index for a window lying wholly in the
    padding (dilation skipping the only row), and its backward then writes
    outside the gradient; such windows are kept out of the comparison.
    """
    k = tuple(int(v) for v in rng.integers(1, 5, 2))
    d = tuple(int(v) for v in rng.integers(1, 3, 2))
    if H < (k[0] - 1) * d[0] + 1 or W < (k[1] - 1) * d[1] + 1:
        d = (1, 1)
        k = (min(k[0], H), min(k[1], W))
    s = tuple(int(v) for v in rng.integers(1, 4, 2))
    p = (int(rng.integers(0, k[0] // 2 + 1)), int(rng.integers(0, k[1] // 2 + 1)))
    return dict(kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=bool(rng.random() < 0.5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_backward_random(rng, dtype):
    done = 0
    for _ in range(CONFIGS):
        c = conv_config(rng)
        x = rng.standard_normal((c["N"], c["C"], c["H"], c["W"])).astype(dtype)
        w = rng.standard_normal((c["K"], c["C"] // c["groups"], c["R"], c["S"])).astype(dtype)
        b = rng.standard_normal(c["K"]).astype(dtype)
        args = (c["stride"], c["padding"], c["dilation"], c["groups"])
        xt, wt, bt = leaf(x), leaf(w), leaf(b)
        yt = F.conv2d(xt, wt, bt, *args)
        gy = rng.standard_normal(tuple(yt.shape)).astype(dtype)
        yt.backward(torch.from_numpy(gy.astype(np.float64)))
        unbatched = c["N"] == 1 and rng.random() < 0.3
        if unbatched:
            gx, gw, gb = lk.conv2d_backward(gy[0], x[0], w, *args)
            gx = gx[None]
        else:
            gx, gw, gb = lk.conv2d_backward(gy, x, w, *args)
        assert gx.dtype == gw.dtype == gb.dtype == dtype
        P, Q = yt.shape[2:]
        red_w = c["N"] * P * Q
        red_x = c["K"] // c["groups"] * c["R"] * c["S"]
        mx, mw, mb = abs_grads(lambda xa, wa, ba: F.conv2d(xa, wa, ba, *args), (x, w, b), gy)
        assert rel_err(gx, xt.grad, mx) < tol(dtype, red_x), c
        assert rel_err(gw, wt.grad, mw) < tol(dtype, red_w), c
        assert rel_err(gb, bt.grad, mb) < tol(dtype, red_w), c
        done += 1
    assert done == CONFIGS


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_backward_layouts(rng, dtype):
    """Non-contiguous, channels-last and negative-stride arrays give the gradients of their values."""
    x = rng.standard_normal((3, 13, 11, 7)).astype(dtype).transpose(0, 3, 1, 2)  # channels-last view (3, 7, 13, 11)
    w = rng.standard_normal((10, 7, 3, 5)).astype(dtype)[:, :, ::-1, :]
    gy_full = rng.standard_normal((3, 10, 7, 18)).astype(dtype)
    gy = gy_full[:, :, :, ::2]  # (3, 10, 7, 9)
    xt, wt = leaf(x), leaf(w)
    yt = F.conv2d(xt, wt, None, (2, 1), (1, 1), (1, 1), 1)
    assert tuple(yt.shape) == gy.shape
    yt.backward(torch.from_numpy(np.ascontiguousarray(gy, np.float64)))
    copies = [a.copy() for a in (x, w, gy)]
    gx, gw, gb = lk.conv2d_backward(gy, x, w, stride=(2, 1), padding=1)
    for a, c in zip((x, w, gy), copies):
        assert np.array_equal(a, c), "an input was modified"
    assert rel_err(gx, xt.grad) < tol(dtype, 10 * 15)
    assert rel_err(gw, wt.grad) < tol(dtype, 3 * 7 * 9)
    assert rel_err(gb, gy.astype(np.float64).sum((0, 2, 3))) < tol(dtype, 3 * 7 * 9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d_backward_random(rng, dtype):
    for _ in range(CONFIGS):
        N, C = int(rng.integers(1, 4)), int(rng.integers(1, 6))
        H, W = (int(v) for v in rng.integers(1, 14, 2))
        p = pool_config(rng, H, W)
        x = rng.standard_normal((N, C, H, W)).astype(dtype)
        if rng.random() < 0.3:  # ties: the first index wins in both
            x = np.round(x).astype(dtype)
        xt = leaf(x)
        yt, it = F.max_pool2d(xt, return_indices=True, **p)
        y, idx = lk.max_pool2d(x, return_indices=True, **p)
        assert np.array_equal(y, yt.detach().numpy()), p
        assert np.array_equal(idx, it.numpy()), p
        gy = rng.standard_normal(y.shape).astype(dtype)
        yt.backward(torch.from_numpy(gy.astype(np.float64)))
        gx = lk.max_pool2d_backward(gy, idx, x.shape)
        # overlapping windows add up to k*k values at most
        assert rel_err(gx, xt.grad) < tol(dtype, p["kernel_size"][0] * p["kernel_size"][1]), p


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_max_pool2d_backward_random(rng, dtype):
    done = 0
    while done < CONFIGS // 2:
        c = conv_config(rng)
        if c["padding"] == "same":
            continue
        x = rng.standard_normal((c["N"], c["C"], c["H"], c["W"])).astype(dtype)
        w = rng.standard_normal((c["K"], c["C"] // c["groups"], c["R"], c["S"])).astype(dtype)
        b = rng.standard_normal(c["K"]).astype(dtype)
        conv = (c["stride"], c["padding"], c["dilation"], c["groups"])
        xt, wt, bt = leaf(x), leaf(w), leaf(b)
        ct = F.relu(F.conv2d(xt, wt, bt, *conv))
        P, Q = ct.shape[2:]
        p = pool_config(rng, P, Q)
        yt = F.max_pool2d(ct, **p)
        y, idx = lk.conv2d_max_pool2d(x, w, b, *conv, kernel_size=p["kernel_size"], pool_stride=p["stride"],
                                      pool_padding=p["padding"], pool_dilation=p["dilation"],
                                      ceil_mode=p["ceil_mode"], return_indices=True)
        red_x = c["K"] // c["groups"] * c["R"] * c["S"]
        assert rel_err(y, yt) < tol(dtype, c["C"] // c["groups"] * c["R"] * c["S"]), (c, p)
        gy = rng.standard_normal(y.shape).astype(dtype)
        yt.backward(torch.from_numpy(gy.astype(np.float64)))
        gx, gw, gb = lk.conv2d_max_pool2d_backward(gy, x, w, y, idx, *conv)
        red_w = c["N"] * P * Q
        assert rel_err(gx, xt.grad) < tol(dtype, red_x), (c, p)
        assert rel_err(gw, wt.grad) < tol(dtype, red_w), (c, p)
        assert rel_err(gb, bt.grad) < tol(dtype, red_w), (c, p)
        done += 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_backward_random(rng, dtype):
    for lead in [(), (1,), (5,), (2, 3), (0,)]:
        fin, fout = (int(v) for v in rng.integers(1, 70, 2))
        x = rng.standard_normal(lead + (fin,)).astype(dtype)
        w = rng.standard_normal((fout, fin)).astype(dtype)
        if rng.random() < 0.5:
            w = np.asfortranarray(w)
        xt, wt = leaf(x), leaf(w)
        bt = leaf(np.zeros(fout))
        yt = F.linear(xt, wt, bt)
        gy = rng.standard_normal(tuple(yt.shape)).astype(dtype)
        yt.backward(torch.from_numpy(gy.astype(np.float64)))
        gx, gw, gb = lk.linear_backward(gy, x, w)
        assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == (fout,)
        rows = int(np.prod(lead, dtype=np.int64))
        if rows == 0:
            assert not gw.any() and not gb.any()
            continue
        mx, mw, mb = abs_grads(F.linear, (x, w, np.zeros(fout)), gy)
        assert rel_err(gx, xt.grad, mx) < tol(dtype, fout), (lead, fin, fout)
        assert rel_err(gw, wt.grad, mw) < tol(dtype, rows), (lead, fin, fout)
        assert rel_err(gb, bt.grad, mb) < tol(dtype, rows), (lead, fin, fout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_random(rng, dtype, reduction):
    for _ in range(8):
        N, C = int(rng.integers(1, 10)), int(rng.integers(1, 13))
        logits = (rng.standard_normal((N, C)) * 3).astype(dtype)
        target = rng.integers(0, C, N).astype(np.int64)
        if N > 1 and rng.random() < 0.5:
            target[rng.integers(0, N)] = -100
        lt = leaf(logits)
        loss_t = F.cross_entropy(lt, torch.from_numpy(target), reduction=reduction)
        g = rng.standard_normal(tuple(loss_t.shape)).astype(dtype)
        loss_t.backward(torch.from_numpy(np.asarray(g, np.float64)))
        loss = lk.cross_entropy(logits, target, reduction=reduction)
        assert loss.dtype == dtype
        # exp(x - lse) carries lse's rounding error, eps * |lse|, relative to every probability
        scale = 1 + np.abs(logits).max()
        assert rel_err(loss, loss_t) < tol(dtype, N * C) * scale
        grad = lk.cross_entropy_backward(np.asarray(g, dtype), logits, target, reduction=reduction)
        # softmax - onehot cancels where the target is nearly certain: measure the error against the
        # magnitudes subtracted, |grad_loss| / divisor * (softmax + onehot), not against the difference
        kept = target != -100
        div = max(kept.sum(), 1) if reduction == "mean" else 1
        onehot = np.zeros((N, C))
        onehot[np.flatnonzero(kept), target[kept]] = 1
        mag = np.abs(np.broadcast_to(np.asarray(g, np.float64), (N,)))[:, None] / div
        bound = mag * (torch.softmax(lt.detach(), 1).numpy() + onehot) * kept[:, None]
        err = np.linalg.norm(np.asarray(grad, np.float64) - lt.grad.numpy())
        assert err <= tol(dtype, C) * scale * max(np.linalg.norm(bound), 1e-300)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_backward_near_certain_rows(dtype):
    """softmax - onehot where the target's probability is 1 or nearly: no error of eps * grad_loss.

    A single class gives exactly 0; a row whose target dominates by 12 gives
    about -6e-6 per unit of grad_loss, which rounding the probability to float32
    before subtracting 1 would get wrong in its second digit.
    """
    x = np.array([[-2.5], [1.6], [0.3]], dtype)
    g = lk.cross_entropy_backward(np.asarray(1, dtype), x, np.zeros(3, np.int64))  # mean: scale 1/3
    assert not g.any()
    x = np.array([[12.0, 0.0], [0.0, 12.0], [3.0, -9.0]], dtype)
    t = np.array([0, 1, 0], np.int64)
    xt = leaf(x)
    F.cross_entropy(xt, torch.from_numpy(t)).backward()
    got = lk.cross_entropy_backward(np.asarray(1, dtype), x, t)
    want = xt.grad.numpy()
    # torch's float64 reference cancels in 1/sum - 1 too: eps64 * grad_loss / N absolute on each side
    assert np.all(np.abs(got - want) <= 4 * np.finfo(dtype).eps * np.abs(want) + 8 * np.finfo(np.float64).eps / 3)


def test_relu_backward_matches_threshold_backward(rng):
    y = rng.standard_normal((3, 5, 7)).astype(np.float32)
    y[0, 0, :3] = [0.0, -0.0, np.nan]
    g = rng.standard_normal(y.shape).astype(np.float32)
    want = torch.ops.aten.threshold_backward(torch.from_numpy(g), torch.from_numpy(y), 0.0)
    assert np.array_equal(lk.relu_backward(g, y), want.numpy(), equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_steps_match_torch(rng, dtype):
    shape = (7, 3, 5)
    p0 = rng.standard_normal(shape).astype(dtype)
    pt = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.Adam([pt], lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for step in range(1, 6):
        g = rng.standard_normal(shape).astype(dtype)
        pt.grad = torch.from_numpy(g.copy())
        opt.step()
        lk.adam_step(p, g[:, :, ::-1].copy()[:, :, ::-1], m, v, step=step, lr=3e-2, beta1=0.8, beta2=0.95, eps=1e-6,
                     weight_decay=0.1)
        assert rel_err(p, pt) < 16 * np.finfo(dtype).eps * step


class Outsider(torch.nn.Module):
    """A net written the way users write them: BatchNorm, a residual add, inplace ReLUs,
    functional calls, ceil-mode and padded pools, a depthwise conv, nested Sequentials."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 5, stride=2, padding=2), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1, ceil_mode=True))
        self.c1 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.act = nn.ReLU(inplace=True)
        self.dw = nn.Sequential(nn.Conv2d(12, 12, 3, groups=12, padding="same", dilation=2), nn.MaxPool2d(2),
                                nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(12 * 2 * 2, 33), nn.ReLU(), nn.Dropout(0.0),
                                  nn.Linear(33, 7))

    def forward(self, x):
        x = self.stem(x)
        x = self.act(x + self.bn(self.c1(x)))
        x = F.adaptive_avg_pool2d(self.dw(x), 2)
        return self.head(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_swap_trains_like_its_twin(dtype):
    """A swapped model and its unswapped twin stay together over a few Adam steps.

    Gradients and the trained outputs are compared in float64 only: in float32 two window values
    within rounding of each other are a tie the two convolutions may break differently, which routes
    that window's gradient to another pixel (measured: about one run in twenty moved the stem's
    weight gradient by 2e-4 to 4e-3 of its norm), and Adam carries the difference into every
    later step. Losses are compared in both."""
    import copy

    import lepton_kernels.torch as lkt

    torch.manual_seed(int(np.random.SeedSequence().entropy % (1 << 31)))
    a = Outsider().to(dtype)
    b = lkt.swap(copy.deepcopy(a))
    assert sum(isinstance(m, lkt.Conv2dReLUMaxPool2d) for m in b.modules()) == 2
    assert sum(isinstance(m, lkt.Linear) for m in b.modules()) == 2
    oa, ob = torch.optim.Adam(a.parameters(), 1e-2), torch.optim.Adam(b.parameters(), 1e-2)
    eps = torch.finfo(dtype).eps
    for _ in range(4):
        x = torch.randn(5, 3, 23, 29, dtype=dtype)
        t = torch.randint(0, 7, (5,))
        la, lb = F.cross_entropy(a(x), t), F.cross_entropy(b(x), t)
        oa.zero_grad()
        ob.zero_grad()
        la.backward()
        lb.backward()
        assert abs(la.item() - lb.item()) <= 1e3 * eps * abs(la.item())
        if dtype == torch.float64:
            for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
                assert ((pa.grad - pb.grad).norm() / pa.grad.norm()).item() < 1e3 * eps, name
        oa.step()
        ob.step()
    a.eval()
    b.eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 17, 17, dtype=dtype)
        if dtype == torch.float64:
            assert ((a(x) - b(x)).norm() / a(x).norm()).item() < 1e2 * eps
