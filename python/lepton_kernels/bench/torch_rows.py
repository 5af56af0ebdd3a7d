"""Rows that time whole PyTorch workflows on the seed network, next to lepton.

- ``torch-train-mnist-b64``: one training step (forward, backward, Adam update) at
  batch 64. ``lepton`` runs it all on NumPy arrays through the functional
  forward and backward API and ``adam_step``; ``torch`` is PyTorch eager
  (``nn.Sequential``, ``F.cross_entropy``, ``torch.optim.Adam``);
  ``torch+swap`` is the same PyTorch loop after ``lepton_kernels.torch.swap``.
- ``torch-swap-mnist-b256``: inference at batch 256 (``torch.inference_mode``) of
  the PyTorch model (``torch``) and of the same model swapped (``torch+swap``).

Each implementation is checked before it is timed: the training step's loss
and gradients against PyTorch's in float64, the swapped model's output
against the float64 model. Timing uses the harness of ``runner`` (round-robin
loops, medians). These rows need PyTorch; without it they are skipped.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import lepton_kernels as lk

from .workloads import Prepared

__all__ = ["TorchRow", "ROWS", "select", "run_rows"]

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except (ImportError, OSError) as e:
    torch = None
    MISSING: Optional[str] = f"torch not importable ({e})"
else:
    MISSING = None

EPS32 = float(np.finfo(np.float32).eps)


def seed_network():
    """The seed network as PyTorch writes it: conv 1->32 3x3, ReLU, max-pool 2, flatten, dense 5408->10."""
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 13 * 13, 10))


def _data(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = seed_network()
    x = torch.rand(batch, 1, 28, 28, generator=g)
    target = torch.randint(0, 10, (batch,), generator=g)
    return model, x, target


class NumpyTrainer:
    """The seed network trained with lepton alone: NumPy arrays, fused forward, backward kernels, Adam in place."""

    def __init__(self, model, x, target, lr=1e-3):
        conv, linear = model[0], model[4]
        self.params = [t.detach().numpy().copy() for t in (conv.weight, conv.bias, linear.weight, linear.bias)]
        self.state = [(np.zeros_like(p), np.zeros_like(p)) for p in self.params]
        self.x, self.target = x.numpy().copy(), target.numpy().copy()
        self.lr, self.step_count = lr, 0
        self.one = np.ones((), np.float32)

    def gradients(self):
        w1, b1, w2, b2 = self.params
        x, n = self.x, self.x.shape[0]
        y, idx = lk.conv2d_max_pool2d(x, w1, b1, return_indices=True)
        flat = y.reshape(n, -1)
        logits = lk.linear(flat, w2, b2)
        loss = lk.cross_entropy(logits, self.target)
        g_logits = lk.cross_entropy_backward(self.one, logits, self.target)
        g_flat, gw2, gb2 = lk.linear_backward(g_logits, flat, w2)
        _, gw1, gb1 = lk.conv2d_max_pool2d_backward(g_flat.reshape(y.shape), x, w1, y, idx,
                                                    output_mask=(False, True, True))
        return loss, [gw1, gb1, gw2, gb2]

    def step(self):
        loss, grads = self.gradients()
        self.step_count += 1
        for p, g, (m, v) in zip(self.params, grads, self.state):
            lk.adam_step(p, g, m, v, step=self.step_count, lr=self.lr)
        return loss


class TorchTrainer:
    """A PyTorch eager training loop: zero_grad, forward, cross-entropy, backward, Adam step."""

    def __init__(self, model, x, target, lr=1e-3):
        self.model, self.x, self.target = model, x, target
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)

    def gradients(self):
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.target)
        loss.backward()
        return loss.detach(), [p.grad for p in self.model.parameters()]

    def step(self):
        loss, _ = self.gradients()
        self.opt.step()
        return loss


def _rel_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = float(np.sqrt(np.mean(np.square(expected)))) or 1.0
    return float(np.abs(actual - expected).max(initial=0.0)) / scale


def _check_training(trainer, reference_grads, reference_loss, tol):
    loss, grads = trainer.gradients()
    errors = [_rel_error(np.asarray(loss), reference_loss)]
    errors += [_rel_error(np.asarray(g), r) for g, r in zip(grads, reference_grads)]
    return max(errors) <= tol, max(errors)


def _train_row(batch: int):
    model, x, target = _data(batch)
    exact = copy.deepcopy(model).double()
    exact_loss = F.cross_entropy(exact(x.double()), target)
    exact_loss.backward()
    ref_grads = [p.grad.numpy() for p in exact.parameters()]
    impls = {
        "lepton": NumpyTrainer(model, x, target),
        "torch": TorchTrainer(copy.deepcopy(model), x, target),
    }
    if MISSING is None:
        from lepton_kernels.torch import swap

        impls["torch+swap"] = TorchTrainer(swap(copy.deepcopy(model)), x, target)
    # The longest float32 sum is the conv weight's gradient, over the batch and 26 x 26 positions.
    tol = 8 * EPS32 * math.sqrt(batch * 26 * 26)
    checks = {name: _check_training(t, ref_grads, exact_loss.item(), tol) for name, t in impls.items()}
    return {name: Prepared(t.step) for name, t in impls.items()}, checks, tol


def _swap_row(batch: int):
    from lepton_kernels.torch import swap

    model, x, _ = _data(batch)
    model.eval()
    swapped = swap(copy.deepcopy(model))
    with torch.inference_mode():
        exact = copy.deepcopy(model).double()(x.double()).numpy()
        outputs = {"torch": model(x).numpy(), "torch+swap": swapped(x).numpy()}
    tol = 8 * EPS32 * math.sqrt(9 + 32 * 13 * 13)
    checks = {name: (_rel_error(y, exact) <= tol, _rel_error(y, exact)) for name, y in outputs.items()}
    prepared = {
        "torch+swap": Prepared(lambda: swapped(x), context=torch.inference_mode),
        "torch": Prepared(lambda: model(x), context=torch.inference_mode),
    }
    return prepared, checks, tol


@dataclass(frozen=True)
class TorchRow:
    name: str
    description: str
    build: Callable[[], Tuple[Dict[str, Prepared], Dict[str, Tuple[bool, float]], float]]


ROWS: Tuple[TorchRow, ...] = (
    TorchRow("torch-train-mnist-b64", "seed network training step (forward, backward, Adam) at batch 64: "
             "lepton on NumPy vs PyTorch eager", lambda: _train_row(64)),
    TorchRow("torch-swap-mnist-b256", "seed network inference at batch 256: lepton_kernels.torch.swap(model) vs the "
             "PyTorch model", lambda: _swap_row(256)),
)


def select(substr: Optional[str] = None) -> Tuple[TorchRow, ...]:
    """The rows whose name contains ``substr`` (all for None or ""); none without PyTorch."""
    if MISSING is not None:
        return ()
    return tuple(r for r in ROWS if not substr or substr in r.name)


def run_rows(rows: Sequence[TorchRow], threads: int, settings, out) -> List[dict]:
    """Check, then time each row's implementations side by side; print a table; return the results."""
    from .runner import UNSTABLE, Table, _fmt_time, time_interleaved

    lk.set_num_threads(threads)
    torch.set_num_threads(threads)
    width = max(len(r.name) for r in rows)
    table = Table([("workflow", width, "<"), ("implementation", 14, "<"), ("median ", 11, ">"),
                   ("fastest", 10, ">"), ("check", 8, "<"), ("x first", 8, ">")], out)
    print(file=out)
    table.header()
    results = []
    for row in rows:
        prepared, checks, tol = row.build()
        timed = {name: p for name, p in prepared.items() if checks[name][0]}
        timings = time_interleaved(timed, settings.repeat, settings.min_time, settings.warmup) if timed else {}
        first = next(iter(prepared))
        base = timings[first].median_s if first in timings else None
        entry = {"name": row.name, "description": row.description, "tolerance": tol, "threads": threads,
                 "results": {}}
        for i, name in enumerate(prepared):
            ok, err = checks[name]
            t = timings.get(name)
            ratio = t.median_s / base if t is not None and base else None
            median = _fmt_time(t and t.median_s) + ("?" if t is not None and t.median_s > UNSTABLE * t.min_s else " ")
            table.row([row.name if i == 0 else "", name, median, _fmt_time(t and t.min_s),
                       "ok" if ok else "MISMATCH", "-" if ratio is None else f"{ratio:.2f}"])
            entry["results"][name] = {"check": "ok" if ok else "mismatch", "error": err,
                                      "median_s": t and t.median_s, "min_s": t and t.min_s,
                                      "ratio_to_first": ratio}
        results.append(entry)
    print("workflows: 'x first' is each implementation's median / the first one's (> 1: the first is faster); "
          "check: loss and gradients (training) or outputs (inference) against float64 PyTorch; "
          f"?: median more than {UNSTABLE:g}x the fastest loop", file=out)
    return results
