"""The README's main job: training the seed network on scikit-learn's digits."""

import importlib.util
import os

import numpy as np
import pytest

import lepton_kernels as lk
from lepton_kernels import demo
from lepton_kernels.__main__ import main

_missing = [m for m in ("sklearn", "scipy", "tqdm", "matplotlib") if importlib.util.find_spec(m) is None]
needs_extra = pytest.mark.skipif(bool(_missing), reason=f"the demo extra is not installed: {_missing}")


def test_missing_extra_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "sklearn", None)
    assert main(["demo"]) == 2
    assert "pip install" in capsys.readouterr().err


@needs_extra
def test_demo_trains_to_97_percent(tmp_path, capsys):
    args = demo._parser().parse_args(["--out", str(tmp_path)])
    result = demo.run(args)
    assert result["test_accuracy"] >= 0.97
    history = result["history"]
    assert history.loss[-1] < history.loss[0] / 3
    assert os.path.getsize(result["plot_path"]) > 10_000
    with open(result["plot_path"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "test accuracy" in capsys.readouterr().out


def test_train_step_matches_float64_gradients():
    """One step's gradients, through lepton's kernels, against a float64 NumPy derivation."""
    rng = np.random.default_rng()
    net = demo.SeedNet(rng, hw=12, filters=4)
    x = rng.standard_normal((5, 1, 12, 12)).astype(np.float32)
    y = rng.integers(0, 10, 5)
    before = [p.copy() for p in net.params]
    loss, _ = net.train_step(x, y, lr=1e-3)

    # float64 forward and loss by hand.
    w1, b1, w2, b2 = (p.astype(np.float64) for p in before)
    cols = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64)[:, 0], (3, 3), axis=(1, 2))
    conv = np.einsum("npqrs,krs->nkpq", cols, w1[:, 0]) + b1[:, None, None]
    act = np.maximum(conv, 0)
    pooled = act.reshape(5, 4, 5, 2, 5, 2).max(axis=(3, 5))
    logits = pooled.reshape(5, -1) @ w2.T + b2
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    expected = -logp[np.arange(5), y].mean()
    assert loss == pytest.approx(expected, rel=1e-5)

    # Adam's first step moves every parameter by lr * sign(grad) (up to eps): check the direction.
    g_logits = (np.exp(logp) - np.eye(10)[y]) / 5
    g_w2 = g_logits.T @ pooled.reshape(5, -1)
    moved = before[2] - net.w2
    significant = np.abs(g_w2) > 1e-4
    assert np.array_equal(np.sign(moved[significant]), np.sign(g_w2[significant]))
    assert np.allclose(np.abs(moved[significant]), 1e-3, rtol=1e-2)


def test_saved_model_reads_back(tmp_path):
    net = demo.SeedNet(np.random.default_rng(0))
    path = str(tmp_path / "seed.lk")
    lk.save_model(net.to_model(), path)
    x = np.random.default_rng().standard_normal((3, 1, 28, 28)).astype(np.float32)
    expected = lk.softmax(net.logits(x), dim=1)
    np.testing.assert_allclose(lk.load_model(path)(x), expected, rtol=1e-5, atol=1e-7)
