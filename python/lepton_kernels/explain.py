"""What the scheduler would do for a call, without running it."""

from __future__ import annotations

from . import _core, functional, layers

__all__ = ["explain"]


def explain(op, *args, **kwargs) -> str:
    """The plan ``op(*args, **kwargs)`` runs with: algorithm, blocking, threads,
    predicted time and workspace, the next best candidates, and the machine
    ceilings the prediction is based on.

    ``op`` is ``lk.conv2d``, ``lk.conv2d_max_pool2d`` or ``lk.linear``, or a
    layer (``lk.Conv2d(...)`` etc.) followed by its input.
    """
    if isinstance(op, (layers.Conv2d, layers.Conv2dMaxPool2d)):
        (x,) = args
        text = op.describe(x)
    elif isinstance(op, layers.Linear):
        (x,) = args
        text = op.describe(x.shape[0] if x.ndim > 1 else 1)
    elif op in (functional.conv2d, functional.conv2d_max_pool2d):
        x, w, *rest = args
        layer_args = dict(zip(("bias", "stride", "padding", "dilation", "groups"), rest))
        layer_args.update(kwargs)
        layer_args.pop("out", None)
        cls = layers.Conv2d if op is functional.conv2d else layers.Conv2dMaxPool2d
        text = cls(w, **layer_args).describe(x)
    elif op is functional.linear:
        x, w, *rest = args
        kwargs = {k: v for k, v in kwargs.items() if k != "out"}
        text = layers.Linear(w, *rest, **kwargs).describe(max(1, x.size // max(1, x.shape[-1])))
    else:
        raise TypeError(f"op: expected lk.conv2d, lk.conv2d_max_pool2d, lk.linear or a layer, got {op!r}")
    return f"{text}\nmachine: {_core.machine_model()}"
