"""Float64 references for the backward ops and Adam.

Written from the definitions (the chain rule through each forward op as
torch.nn.functional defines it), for clarity, not speed. They share no code
with the library. Each returns float64 arrays.
"""

from __future__ import annotations

import numpy as np

from reference import conv_paddings


def _pair(v):
    return tuple(v) * (2 if len(v) == 1 else 1) if isinstance(v, (tuple, list)) else (v, v)


def conv2d_backward(gy, x, w, stride=1, padding=0, dilation=1, groups=1):
    """(grad_input, grad_weight, grad_bias) of a cross-correlation.

    Tap by tap: output pixel (p, q) of tap (r, s) reads padded input pixel
    (p*sh + r*dh, q*sw + s*dw), so that pixel's gradient gathers gy times the
    tap's weight, and the tap's weight gradient sums gy times that pixel.
    """
    gy = np.asarray(gy, np.float64)
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    pt, pb, pl, pr = conv_paddings(padding, (R, S), (dh, dw))
    P, Q = gy.shape[2:]
    Kg = K // groups
    xp = np.zeros((N, C, H + pt + pb, W + pl + pr))
    xp[:, :, pt:pt + H, pl:pl + W] = x
    gxp = np.zeros_like(xp)
    gw = np.zeros_like(w)
    for g in range(groups):
        ks, cs = slice(g * Kg, (g + 1) * Kg), slice(g * Cg, (g + 1) * Cg)
        for r in range(R):
            for s in range(S):
                rows = slice(r * dh, r * dh + (P - 1) * sh + 1, sh)
                cols = slice(s * dw, s * dw + (Q - 1) * sw + 1, sw)
                patch = xp[:, cs, rows, cols]  # N x Cg x P x Q
                gw[ks, :, r, s] = np.einsum("nkpq,ncpq->kc", gy[:, ks], patch)
                gxp[:, cs, rows, cols] += np.einsum("nkpq,kc->ncpq", gy[:, ks], w[ks, :, r, s])
    gx = gxp[:, :, pt:pt + H, pl:pl + W]
    gb = gy.sum(axis=(0, 2, 3))
    return gx, gw, gb


def max_pool2d_backward(gy, indices, input_shape):
    """grad_output added at each flattened index of its plane (windows may overlap)."""
    gy = np.asarray(gy, np.float64)
    N, C, H, W = input_shape
    gx = np.zeros((N, C, H * W))
    for n in range(N):
        for c in range(C):
            np.add.at(gx[n, c], indices[n, c].ravel(), gy[n, c].ravel())
    return gx.reshape(N, C, H, W)


def conv2d_max_pool2d_backward(gy, x, w, output, indices, conv_shape, stride=1, padding=0, dilation=1, groups=1,
                               activation="relu"):
    """Max-pool's backward into the convolution output, ReLU's mask from the pooled output, then conv's."""
    gconv = max_pool2d_backward(gy * (output > 0) if activation == "relu" else gy, indices, conv_shape)
    return conv2d_backward(gconv, x, w, stride, padding, dilation, groups)


def linear_backward(gy, x, w):
    rows = int(np.prod(x.shape[:-1]))
    gy = np.asarray(gy, np.float64).reshape(rows, w.shape[0])
    x2 = np.asarray(x, np.float64).reshape(rows, w.shape[1])
    w = np.asarray(w, np.float64)
    return (gy @ w).reshape(x.shape), gy.T @ x2, gy.sum(axis=0)


def relu_backward(gy, y):
    return np.where(np.asarray(y) <= 0, 0.0, np.asarray(gy, np.float64))


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def cross_entropy(x, t, reduction="mean", ignore_index=-100):
    keep = t != ignore_index
    ls = _log_softmax(x)
    rows = np.where(keep, -ls[np.arange(len(t)), np.where(keep, t, 0)], 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        return rows.sum() / keep.sum()


def cross_entropy_backward(g, x, t, reduction="mean", ignore_index=-100):
    keep = t != ignore_index
    grad = np.exp(_log_softmax(x))
    grad[np.arange(len(t))[keep], t[keep]] -= 1
    g = np.asarray(g, np.float64)
    if reduction == "none":
        scale = g
    elif reduction == "sum":
        scale = np.full(len(t), float(g))
    else:
        scale = np.full(len(t), float(g) / max(keep.sum(), 1))
    return np.where(keep[:, None], grad * scale[:, None], 0.0)


def adam(param, grads, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """Parameters after len(grads) Adam steps from zero state, as torch.optim.Adam documents them."""
    p = np.asarray(param, np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for step, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64) + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1 ** step)
        v_hat = v / (1 - beta2 ** step)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v
