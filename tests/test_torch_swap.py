"""swap(model): modules replaced in place, fused where they run in sequence, parameters shared, results unchanged."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch", reason="the torch integration needs PyTorch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import lepton_kernels.torch as lkt  # noqa: E402


class OpLog(TorchDispatchMode):
    """Records the name of every op dispatched (proves which kernels ran)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))

    def lepton(self):
        return {n for n in self.names if n.startswith("lepton::")}

    def aten(self, *names):
        return {n for n in self.names if n in {f"aten::{m}" for m in names}}


class LeNet(nn.Module):
    """LeNet-5 as it is usually written, with nested Sequentials."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class FunctionalNet(nn.Module):
    """The PyTorch tutorial style: modules for weights, F.* calls for the rest."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, dilation=2, padding=2)
        self.pool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self.fc1 = nn.Linear(12 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


class SeedNet(nn.Sequential):
    """The seed network: conv 1->32 3x3, ReLU, max-pool 2, flatten, dense 5408->10."""

    def __init__(self):
        super().__init__(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5408, 10))


def grads_close(a, b, **tol):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].grad is not None, name
        torch.testing.assert_close(pa[name].grad, pb[name].grad, msg=name, **tol)


def params_close(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=name, **tol)


def train_side_by_side(model, x, target, opt_cls, steps, **opt_kwargs):
    """Swap a copy made with its optimizer already in place; train both; compare along the way.

    In float64: in float32, a ReLU input or two max-pool candidates a rounding
    apart may decide differently in the two models, which moves a gradient
    element; in float64 that takes a difference of 1e-16 (the float32 values
    are compared against torch in test_torch_ops and below on exact data).
    """
    model.double()
    x = x.double()
    twin = copy.deepcopy(model)
    opt = opt_cls(model.parameters(), **opt_kwargs)  # made before the swap: must keep working
    twin_opt = opt_cls(twin.parameters(), **opt_kwargs)
    params_before = [id(p) for p in model.parameters()]
    swapped = lkt.swap(model)
    assert swapped is model
    assert [id(p) for p in model.parameters()] == params_before
    assert model.state_dict().keys() == twin.state_dict().keys()
    for step in range(steps):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            log = OpLog()
            with log:
                loss = F.cross_entropy(m(x), target)
                loss.backward()
            o.step()
            if m is model:
                ours_loss, ours_log = loss, log
            else:
                twin_loss, twin_log = loss, log
        assert ours_log.lepton() and not twin_log.lepton()
        # float64 defaults (rtol 1e-7): sums of at most a few thousand terms in another order.
        torch.testing.assert_close(ours_loss, twin_loss)
        if step == 0:
            grads_close(model, twin)
        params_close(model, twin)
    return ours_log


@pytest.mark.parametrize("opt_cls, kwargs", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                             (torch.optim.Adam, dict(lr=1e-3))])
def test_lenet(seed, opt_cls, kwargs):
    torch.manual_seed(seed % 2**63)
    model = LeNet()
    x, target = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    log = train_side_by_side(model, x, target, opt_cls, 4, **kwargs)
    f = model.features
    assert type(f[0]) is lkt.Conv2dReLUMaxPool2d and type(f[1]) is nn.Identity and type(f[2]) is nn.Identity
    assert type(f[3][0]) is lkt.Conv2dReLUMaxPool2d
    c = model.classifier
    assert type(c[0]) is nn.Flatten
    assert type(c[1]) is lkt.Linear and c[1].relu and type(c[2]) is nn.Identity
    assert type(c[3]) is lkt.Linear and c[3].relu and type(c[5]) is lkt.Linear and not c[5].relu
    assert isinstance(f[0], nn.Conv2d) and isinstance(c[1], nn.Linear)  # user isinstance checks still hold
    # Training ran the fused op with indices and its backward, and no torch conv, pool or matmul.
    assert {"lepton::conv2d_relu_max_pool2d_with_indices", "lepton::conv2d_relu_max_pool2d_backward",
            "lepton::linear", "lepton::linear_backward"} <= log.lepton()
    assert not log.aten("convolution", "convolution_backward", "max_pool2d_with_indices", "addmm", "mm")
    # Inference takes the fused op without indices.
    log = OpLog()
    with torch.no_grad(), log:
        model(x.double())
    assert "lepton::conv2d_relu_max_pool2d" in log.lepton()
    assert "lepton::conv2d_relu_max_pool2d_with_indices" not in log.lepton()


def test_functional_forward(seed):
    torch.manual_seed(seed % 2**63)
    model = FunctionalNet()
    x, target = torch.randn(4, 3, 15, 15), torch.randint(0, 5, (4,))
    log = train_side_by_side(model, x, target, torch.optim.Adam, 3, lr=1e-3)
    assert type(model.conv1) is lkt.Conv2d and not model.conv1.relu
    assert type(model.conv2) is lkt.Conv2d and type(model.pool) is lkt.MaxPool2d
    assert type(model.fc1) is lkt.Linear and type(model.fc2) is lkt.Linear
    assert {"lepton::conv2d", "lepton::max_pool2d_with_indices", "lepton::linear"} <= log.lepton()
    # F.relu calls stay torch's.
    assert "aten::relu" in log.names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seed_network_eval_and_dtypes(seed, dtype):
    torch.manual_seed(seed % 2**63)
    model = SeedNet().to(dtype).eval()
    x = torch.randn(16, 1, 28, 28, dtype=dtype)
    with torch.no_grad():
        # Inputs and conv parameters on multiples of 1/16: the 3x3 convolution is exact in float32, so ReLU and
        # max-pool decide alike in both models (see test_torch_ops.dyadic); only the dense layer rounds.
        for t in (x, model[0].weight, model[0].bias):
            t.copy_(torch.round(t * 16) / 16)
    twin = copy.deepcopy(model)
    lkt.swap(model)
    assert type(model[0]) is lkt.Conv2dReLUMaxPool2d and type(model[4]) is lkt.Linear
    # float32: sums of 5408 terms in another order differ by a few eps * sqrt(5408) (~1e-5) relative.
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    with torch.inference_mode():
        torch.testing.assert_close(model(x), twin(x), **tol)
    # A plain forward (grad enabled) and its gradients, also for the input.
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    model(xa).square().sum().backward()
    twin(xb).square().sum().backward()
    grads_close(model, twin, **tol)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)


def test_optimizer_step_reaches_forward(seed):
    torch.manual_seed(seed % 2**63)
    model = SeedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lkt.swap(model)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    model(x).sum().backward()
    opt.step()
    with torch.no_grad():
        after = model(x)
        # Recompute with the updated weights through torch: the swapped modules read the same Parameters.
        conv, lin = model[0], model[4]
        expected = F.linear(F.max_pool2d(F.relu(F.conv2d(x, conv.weight, conv.bias)), 2).flatten(1), lin.weight,
                            lin.bias)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)  # float32 sums of 5408 terms
    # Loading a state dict into the swapped model reaches its forward as well.
    fresh = SeedNet()
    model.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x))


def test_left_as_they_are():
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda m, i, o: None)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),  # padding mode
        nn.MaxPool2d(2, return_indices=True),  # indices returned
        nn.Conv2d(4, 4, 2, padding="same"),  # asymmetric 'same'
        nn.Linear(4, 4).half(),  # dtype
        nn.Conv2d(4, 4, 3, padding="same"), hooked, nn.MaxPool2d(2),  # a hook on the ReLU: no fusion
    )
    swapped = lkt.swap(model)
    assert type(swapped[0]) is nn.Conv2d and type(swapped[1]) is nn.MaxPool2d and type(swapped[2]) is nn.Conv2d
    assert type(swapped[3]) is nn.Linear
    # Each of the last three is swapped alone; the hook stays on the ReLU and still runs.
    assert type(swapped[4]) is lkt.Conv2d and not swapped[4].relu
    assert type(swapped[5]) is lkt.ReLU and swapped[5]._forward_hooks
    assert type(swapped[6]) is lkt.MaxPool2d
    # Subclasses are not ours to replace; a Sequential with its own forward is not fused.

    class MyConv(nn.Conv2d):
        pass

    class Chain(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    chain = Chain(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
    model = nn.Sequential(MyConv(1, 3, 3), chain)
    lkt.swap(model)
    assert type(model[0]) is MyConv
    assert type(chain[0]) is lkt.Conv2d and type(chain[1]) is lkt.ReLU
    # A model that is itself one of the modules comes back replaced.
    assert type(lkt.swap(nn.Linear(3, 4))) is lkt.Linear
    with pytest.raises(TypeError, match="model"):
        lkt.swap("not a model")


def test_pool_then_relu_and_fallback(seed):
    torch.manual_seed(seed % 2**63)
    # conv -> pool -> ReLU fuses too (ReLU and max-pool commute).
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.MaxPool2d(2), nn.ReLU())
    twin = copy.deepcopy(model)
    lkt.swap(model)
    assert type(model[0]) is lkt.Conv2dReLUMaxPool2d
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(model(x), twin(x))
    # An input the lepton ops do not take (float16 here, or a CUDA tensor) runs through torch's own forward.
    model, twin = model.half(), twin.half()
    log = OpLog()
    with log:
        y = model(x.half())
    assert not log.lepton()
    torch.testing.assert_close(y, twin(x.half()))
    relu = lkt.swap(nn.ReLU())
    torch.testing.assert_close(relu(x.half()), F.relu(x.half()))


def test_hooks_follow_the_swap(seed):
    torch.manual_seed(seed % 2**63)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(6, 3))
    seen = []
    handle = model[0].register_forward_hook(lambda m, i, o: seen.append(type(m)))
    lkt.swap(model)
    model(torch.randn(1, 1, 8, 8))
    assert seen == [lkt.Conv2d]
    handle.remove()  # a handle made before the swap removes the hook from the new module
    model(torch.randn(1, 1, 8, 8))
    assert seen == [lkt.Conv2d]


def test_swap_is_idempotent_and_keeps_mode():
    model = LeNet().eval()
    lkt.swap(model)
    first = [type(m) for m in model.modules()]
    lkt.swap(model)
    assert [type(m) for m in model.modules()] == first
    assert not any(m.training for m in model.modules())
    assert "relu=True" in repr(model.features[0]) and "pool_kernel_size=(2, 2)" in repr(model.features[0])


# Inductor itself (torch 2.13) calls a deprecated torch.jit API while compiling.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_swapped_model_compiles(seed):
    torch.manual_seed(seed % 2**63)
    model = LeNet().double()  # float64: see train_side_by_side
    twin = copy.deepcopy(model)
    compiled = torch.compile(lkt.swap(model), fullgraph=True)
    x, target = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (4,))
    loss = F.cross_entropy(compiled(x), target)
    F.cross_entropy(twin(x), target).backward()
    loss.backward()
    grads_close(model, twin)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), twin(x))
