"""Array layouts: strides, views, read-only and unaligned buffers, zero sizes.

Every op must give the reference result for any memory layout of any of its
array arguments, leave those arrays' buffers untouched, and return a new
C-contiguous array of the input's dtype.
"""

from __future__ import annotations

import numpy as np
import pytest

import lepton_kernels as lk
import reference as ref

DTYPES = [np.float32, np.float64]


def fortran(a):
    out = np.asfortranarray(a)
    return out, out


def strided(a):
    # Every other element of a NaN-filled buffer: reading a gap shows as NaN.
    owner = np.full(tuple(2 * s + 1 for s in a.shape), np.nan, a.dtype)
    view = owner[tuple(slice(1, None, 2) for _ in a.shape)]
    view[...] = a
    return view, owner


def reversed_(a):
    # Negative strides on every axis.
    flip = tuple(slice(None, None, -1) for _ in a.shape)
    owner = np.ascontiguousarray(a[flip])
    return owner[flip], owner


def channels_last(a):
    # What np.transpose of an NHWC array gives: axis 1 has the smallest stride.
    if a.ndim < 2:
        return reversed_(a)
    owner = np.ascontiguousarray(np.moveaxis(a, 1, -1))
    return np.moveaxis(owner, -1, 1), owner


def read_only(a):
    owner = a.copy()
    owner.flags.writeable = False
    return owner, owner


def unaligned(a):
    # A buffer that starts one byte off the element alignment.
    raw = np.zeros(a.nbytes + 1, np.uint8)
    view = raw[1:].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert a.size == 0 or not view.flags.aligned
    return view, raw


def broadcast(a):
    # Zero strides: the first item along axis 0 repeated (read-only).
    if a.ndim == 0 or a.shape[0] == 0:
        return read_only(a)
    owner = a[:1].copy()
    return np.broadcast_to(owner, a.shape), owner


LAYOUTS = {f.__name__.rstrip("_"): f for f in (fortran, strided, reversed_, channels_last, read_only, unaligned,
                                               broadcast)}


def run_op(op, arrays):
    """The op's result, and its reference and error bound, on `arrays`."""
    if op == "conv2d":
        x, w, b = arrays
        kwargs = dict(stride=(1, 2), padding=1, groups=2, activation="relu")
        got = lk.conv2d(x, w, b, **kwargs)
        expected = ref.conv2d(x, w, b, **kwargs)
        magnitude = ref.conv2d(np.abs(x), np.abs(w), np.abs(b), **{**kwargs, "activation": None})
        return got, expected, magnitude, w[0].size + 1
    if op == "conv2d-algorithms":
        # Each algorithm reads the input its own way (the layer copies the weights).
        x, w, b = arrays
        expected = ref.conv2d(x, w, b, stride=(2, 1), padding=(1, 2))
        magnitude = ref.conv2d(np.abs(x), np.abs(w), np.abs(b), stride=(2, 1), padding=(1, 2))
        for algorithm, ukernel in ref.CONV_KERNELS:
            got = lk.Conv2d(w, b, stride=(2, 1), padding=(1, 2), algorithm=algorithm, ukernel=ukernel)(x)
            ref.assert_sum_close(got, expected, magnitude, w[0].size + 1, x.dtype, f"{algorithm}/{ukernel}")
        return got, expected, magnitude, w[0].size + 1
    if op == "depthwise":
        x, w, b = arrays
        got = lk.conv2d(x, w, b, padding="same", groups=x.shape[1])
        expected = ref.conv2d(x, w, b, padding="same", groups=x.shape[1])
        magnitude = ref.conv2d(np.abs(x), np.abs(w), np.abs(b), padding="same", groups=x.shape[1])
        return got, expected, magnitude, w[0].size + 1
    if op == "max_pool2d":
        (x,) = arrays
        values, indices = lk.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
        ref_values, ref_indices = ref.max_pool2d(x, 3, stride=2, padding=1)
        ref.assert_identical(indices, ref_indices)
        return values, ref_values, None, None
    if op.startswith("linear"):
        x, w, b = arrays
        got = lk.linear(x, w, b)
        return got, ref.linear(x, w, b), ref.linear(np.abs(x), np.abs(w), np.abs(b)), x.shape[-1] + 1
    (x,) = arrays
    if op == "relu":
        return lk.relu(x), ref.relu(x), None, None
    return getattr(lk, op)(x, 1), None, None, None


OP_SHAPES = {
    "conv2d": [(2, 6, 7, 9), (16, 3, 3, 2), (16,)],
    "conv2d-algorithms": [(2, 5, 7, 9), (9, 5, 3, 2), (9,)],
    "depthwise": [(3, 5, 6, 7), (10, 1, 3, 4), (10,)],
    "max_pool2d": [(2, 3, 9, 8)],
    "linear": [(3, 5, 22), (13, 22), (13,)],
    "linear-few-rows": [(3, 22), (50, 22), (50,)],
    "linear-many-rows": [(4, 5, 22), (50, 22), (50,)],
    "relu": [(3, 4, 5, 6)],
    "softmax": [(3, 7, 5, 6)],
    "log_softmax": [(3, 7, 5, 6)],
}


def check_layouts(op, dtype, rng, layout_of):
    """Applies layout_of(i) to argument i, then checks result and inputs."""
    base = [ref.randn(rng, shape, dtype) for shape in OP_SHAPES[op]]
    arrays, owners = [], []
    for i, a in enumerate(base):
        view, owner = LAYOUTS[layout_of(i)](a) if layout_of(i) else (a, a)
        arrays.append(view)
        owners.append(owner)
    before = [o.tobytes() for o in owners]
    got, expected, magnitude, length = run_op(op, arrays)
    context = f"{op}, layouts {[layout_of(i) for i in range(len(base))]}"
    if op in ("softmax", "log_softmax"):
        ref.assert_softmax_close(got, np.asarray(arrays[0]), 1, op == "log_softmax", context)
    elif magnitude is None:
        ref.assert_identical(got, expected, context)
    else:
        ref.assert_sum_close(got, expected, magnitude, length, dtype, context)
    for i, (o, b) in enumerate(zip(owners, before)):
        assert o.tobytes() == b, f"argument {i} was modified; {context}"
    assert got.flags.c_contiguous and got.flags.writeable, context
    assert not any(np.shares_memory(got, o) for o in owners), context


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", list(OP_SHAPES))
def test_every_argument_in_layout(op, layout, dtype, rng):
    check_layouts(op, dtype, rng, lambda i: layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", ["conv2d", "depthwise", "linear", "linear-few-rows", "linear-many-rows"])
@pytest.mark.parametrize("argument", [0, 1, 2], ids=["input", "weight", "bias"])
def test_one_argument_in_layout(op, layout, argument, dtype, rng):
    check_layouts(op, dtype, rng, lambda i: layout if i == argument else None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_layouts(dtype, rng):
    check_layouts("conv2d", dtype, rng, lambda i: ("channels_last", "reversed", "strided")[i])
    check_layouts("linear", dtype, rng, lambda i: ("fortran", "strided", "unaligned")[i])


@pytest.mark.parametrize("dtype", DTYPES)
def test_slices_of_a_larger_batch(isa, dtype, rng):
    # Views that start mid-buffer: a channel slice and a crop of a batch.
    x = ref.randn(rng, (4, 10, 12, 13), dtype)
    w = ref.randn(rng, (8, 4, 3, 3), dtype)
    view = x[1:3, 3:7, 2:11, 1:12]
    ref.assert_sum_close(lk.conv2d(view, w, padding=1), ref.conv2d(view, w, padding=1),
                         ref.conv2d(np.abs(view), np.abs(w), padding=1), 36, dtype)
    ref.assert_identical(lk.max_pool2d(view, 2), ref.max_pool2d(view, 2)[0])
    ref.assert_identical(lk.relu(view), ref.relu(view))


@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_are_new_arrays(dtype, rng):
    x = ref.randn(rng, (2, 4, 6, 6), dtype)
    results = [
        lk.conv2d(x, ref.randn(rng, (4, 4, 1, 1), dtype)),
        lk.max_pool2d(x, 1),
        lk.linear(x, np.eye(6, dtype=dtype)),
        lk.relu(np.abs(x)),
        lk.softmax(x, 0),
    ]
    for y in results:
        assert y.dtype == dtype and y.flags.c_contiguous and y.flags.writeable
        assert not np.shares_memory(y, x)
        y[...] = 0  # writing the result must not touch the input
    assert (x != 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "op, shapes, out_shape",
    [
        pytest.param(lambda x, w: lk.conv2d(x, w, padding=1), [(0, 3, 5, 6), (7, 3, 3, 3)], (0, 7, 5, 6),
                     id="conv2d-no-batch"),
        pytest.param(lambda x, w: lk.conv2d(x, w, groups=3), [(0, 3, 5, 6), (3, 1, 3, 3)], (0, 3, 3, 4),
                     id="depthwise-no-batch"),
        pytest.param(lambda x: lk.max_pool2d(x, 2), [(0, 3, 5, 6)], (0, 3, 2, 3), id="max_pool2d-no-batch"),
        pytest.param(lambda x, w: lk.linear(x, w), [(0, 5), (7, 5)], (0, 7), id="linear-no-rows"),
        pytest.param(lambda x, w: lk.linear(x, w), [(3, 0, 5), (7, 5)], (3, 0, 7), id="linear-no-rows-3d"),
        pytest.param(lambda x, w: lk.linear(x, w), [(4, 5), (0, 5)], (4, 0), id="linear-no-features"),
        pytest.param(lambda x: lk.relu(x), [(3, 0, 2)], (3, 0, 2), id="relu-empty"),
        pytest.param(lambda x: lk.softmax(x, 1), [(3, 0, 2)], (3, 0, 2), id="softmax-empty-dim"),
        pytest.param(lambda x: lk.log_softmax(x, 1), [(0, 4)], (0, 4), id="log_softmax-empty-other"),
    ],
)
def test_zero_size(op, shapes, out_shape, dtype, rng):
    y = op(*(ref.randn(rng, s, dtype) for s in shapes))
    assert y.shape == out_shape and y.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_size_with_out_and_indices(dtype, rng):
    x = ref.randn(rng, (0, 3, 5, 6), dtype)
    out = np.empty((0, 3, 2, 3), dtype)
    values, indices = lk.max_pool2d(x, 2, return_indices=True, out=out)
    assert values is out and indices.shape == (0, 3, 2, 3) and indices.dtype == np.int64
    out = np.empty((0, 7, 5, 6), dtype)
    assert lk.conv2d(x, ref.randn(rng, (7, 3, 3, 3), dtype), padding=1, out=out) is out
    assert lk.relu(x, out=np.empty_like(x)).shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape", [((0, 4), (5, 4)), ((3, 4), (0, 4)), ((0, 4), (4,)), ((2, 0, 4), (5, 4))])
def test_zero_size_linear_with_out(dtype, x_shape, w_shape, rng):
    out = np.empty(x_shape[:-1] + w_shape[:-1], dtype)
    assert lk.linear(ref.randn(rng, x_shape, dtype), ref.randn(rng, w_shape, dtype), out=out) is out


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_size_after_nonempty_calls(dtype, rng):
    # A zero-size call between real ones must not disturb reused workspaces.
    x = ref.randn(rng, (2, 3, 8, 8), dtype)
    w = ref.randn(rng, (9, 3, 3, 3), dtype)
    first = lk.conv2d(x, w, padding=1)
    assert lk.conv2d(x[:0], w, padding=1).shape == (0, 9, 8, 8)
    ref.assert_identical(lk.conv2d(x, w, padding=1), first)


@pytest.mark.parametrize("out_channels", [2, 9], ids=["direct", "gemm"])
def test_huge_input_with_zero_strides(out_channels, rng):
    # A 65537 x 65537 image (2**32 pixels) that only costs one row of memory:
    # offsets and pool indices past 2**32 must not wrap.
    n = 2**16 + 1

    def image(row):
        return np.lib.stride_tricks.as_strided(row, shape=(1, 1, n, n), strides=(0, 0, 0, row.itemsize),
                                               writeable=False)

    row = ref.randn(rng, n, np.float32)
    x = image(row)
    values, indices = lk.max_pool2d(x, 3, stride=2**15, padding=1, return_indices=True)
    expected_values, expected_indices = ref.max_pool2d(x, 3, stride=2**15, padding=1)
    assert expected_indices.max() > 2**32
    ref.assert_identical(values, expected_values)
    ref.assert_identical(indices, expected_indices)
    w = ref.randn(rng, (out_channels, 1, 3, 3), np.float32)
    kwargs = dict(stride=2**15, padding=1, dilation=(1, 2**14))
    ref.assert_sum_close(lk.conv2d(x, w, **kwargs), ref.conv2d(x, w, **kwargs),
                         ref.conv2d(image(np.abs(row)), np.abs(w), **kwargs), 9, np.float32)


def large_calls(rng, dtype):
    """Calls whose outputs are big enough (256 KiB and up) to come from the reused-output pool."""
    x = ref.randn(rng, (2, 32, 33, 33), dtype)
    w = ref.randn(rng, (32, 32, 3, 3), dtype)
    dw = ref.randn(rng, (64, 1, 3, 3), dtype)
    a = ref.randn(rng, (300, 40), dtype)
    lw = ref.randn(rng, (250, 40), dtype)
    s = ref.randn(rng, (70, 1000), dtype)
    return {
        "conv2d": (lambda: lk.conv2d(x, w, padding=1),
                   lambda y: ref.assert_sum_close(y, ref.conv2d(x, w, padding=1),
                                                  ref.conv2d(np.abs(x), np.abs(w), padding=1), 288, dtype)),
        "conv2d-depthwise": (lambda: lk.conv2d(x, dw, groups=32, padding=1),
                             lambda y: ref.assert_sum_close(y, ref.conv2d(x, dw, groups=32, padding=1),
                                                            ref.conv2d(np.abs(x), np.abs(dw), groups=32, padding=1),
                                                            9, dtype)),
        "max_pool2d": (lambda: lk.max_pool2d(x, 3, stride=1, padding=1),
                       lambda y: ref.assert_identical(y, ref.max_pool2d(x, 3, stride=1, padding=1)[0])),
        "linear": (lambda: lk.linear(a, lw),
                   lambda y: ref.assert_sum_close(y, ref.linear(a, lw), ref.linear(np.abs(a), np.abs(lw)), 40, dtype)),
        "relu": (lambda: lk.relu(x), lambda y: ref.assert_identical(y, ref.relu(x))),
        "softmax": (lambda: lk.softmax(s, 1), lambda y: ref.assert_softmax_close(y, s, 1, False)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["conv2d", "conv2d-depthwise", "max_pool2d", "linear", "relu", "softmax"])
def test_reused_outputs_are_fully_written(op, dtype, rng):
    # Large outputs reuse memory that earlier results gave back. Give back
    # NaN-filled blocks of the right size first: an element the op does not
    # write would show the NaN.
    call, check = large_calls(rng, dtype)[op]
    size = call().size
    for _ in range(3):
        poison = lk.relu(np.full(size, np.nan, dtype))
        assert np.isnan(poison).all()
        del poison
        check(call())


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_stay_valid_after_later_calls(dtype, rng):
    # A result still referenced, directly or only through a view, must never
    # be handed out again as the memory of a later result.
    calls = large_calls(rng, dtype)
    kept = {name: call() for name, (call, _) in calls.items()}
    views = {name: call()[..., 1:] for name, (call, _) in calls.items()}
    snapshots = {name: (kept[name].copy(), views[name].copy()) for name in calls}
    for _ in range(3):
        for name, (call, check) in calls.items():
            check(call())
    for name in calls:
        ref.assert_identical(kept[name], snapshots[name][0], name)
        ref.assert_identical(views[name], snapshots[name][1], name)
        assert kept[name].flags.writeable and kept[name].flags.c_contiguous
