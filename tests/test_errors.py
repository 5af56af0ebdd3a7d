"""Bad arguments raise the documented exception, with a message naming the argument."""

from __future__ import annotations

import numpy as np
import pytest

import lepton_kernels as lk

try:
    from numpy.exceptions import AxisError
except ImportError:  # numpy < 1.25
    from numpy import AxisError

F32 = np.float32
HUGE = 2**62


def arr(*shape, dtype=F32):
    return np.ones(shape, dtype)


X = arr(2, 4, 8, 8)
W = arr(6, 4, 3, 3)

# (call, exception type, the argument the message must start with)
CONV_CASES = {
    "input-2d": (lambda: lk.conv2d(arr(8, 8), W), ValueError, "input"),
    "input-5d": (lambda: lk.conv2d(arr(1, 2, 4, 8, 8), W), ValueError, "input"),
    "input-zero-channels": (lambda: lk.conv2d(arr(2, 0, 8, 8), arr(6, 0, 3, 3)), ValueError, "input|weight"),
    "input-zero-height": (lambda: lk.conv2d(arr(2, 4, 0, 8), W), ValueError, "input"),
    "weight-3d": (lambda: lk.conv2d(X, arr(6, 4, 3)), ValueError, "weight"),
    "weight-zero-kernel": (lambda: lk.conv2d(X, arr(6, 4, 0, 3)), ValueError, "weight"),
    "channel-mismatch": (lambda: lk.conv2d(X, arr(6, 3, 3, 3)), ValueError, "input|weight|groups"),
    "group-channel-mismatch": (lambda: lk.conv2d(X, arr(6, 4, 3, 3), groups=2), ValueError, "input|weight|groups"),
    "groups-not-dividing-channels": (lambda: lk.conv2d(X, arr(6, 1, 3, 3), groups=3), ValueError,
                                     "input|weight|groups"),
    "groups-not-dividing-out-channels": (lambda: lk.conv2d(X, arr(5, 2, 3, 3), groups=2), ValueError,
                                         "weight|groups"),
    "groups-zero": (lambda: lk.conv2d(X, W, groups=0), ValueError, "groups"),
    "groups-negative": (lambda: lk.conv2d(X, W, groups=-1), ValueError, "groups"),
    "groups-float": (lambda: lk.conv2d(X, W, groups=1.0), TypeError, "groups"),
    "stride-zero": (lambda: lk.conv2d(X, W, stride=0), ValueError, "stride"),
    "stride-negative": (lambda: lk.conv2d(X, W, stride=(1, -1)), ValueError, "stride"),
    "stride-float": (lambda: lk.conv2d(X, W, stride=1.5), TypeError, "stride"),
    "stride-str": (lambda: lk.conv2d(X, W, stride="2"), TypeError, "stride"),
    "stride-three": (lambda: lk.conv2d(X, W, stride=(1, 1, 1)), ValueError, "stride"),
    "stride-huge": (lambda: lk.conv2d(X, W, stride=HUGE), OverflowError, "stride"),
    "dilation-zero": (lambda: lk.conv2d(X, W, dilation=0), ValueError, "dilation"),
    "dilation-negative": (lambda: lk.conv2d(X, W, dilation=(-2, 1)), ValueError, "dilation"),
    "dilation-huge": (lambda: lk.conv2d(X, W, dilation=HUGE), OverflowError, "dilation"),
    "padding-negative": (lambda: lk.conv2d(X, W, padding=-1), ValueError, "padding"),
    "padding-pair-negative": (lambda: lk.conv2d(X, W, padding=(1, -1)), ValueError, "padding"),
    "padding-unknown-string": (lambda: lk.conv2d(X, W, padding="full"), ValueError, "padding"),
    "padding-float": (lambda: lk.conv2d(X, W, padding=0.5), TypeError, "padding"),
    "padding-four": (lambda: lk.conv2d(X, W, padding=(1, 1, 1, 1)), ValueError, "padding"),
    "padding-huge": (lambda: lk.conv2d(X, W, padding=HUGE), OverflowError, "padding"),
    "same-with-stride": (lambda: lk.conv2d(X, W, padding="same", stride=2), ValueError, "padding"),
    "same-with-stride-pair": (lambda: lk.conv2d(X, W, padding="same", stride=(1, 2)), ValueError, "padding"),
    "kernel-larger-than-input": (lambda: lk.conv2d(arr(2, 4, 2, 8), W), ValueError, "input|weight"),
    "dilated-kernel-larger-than-input": (lambda: lk.conv2d(X, W, dilation=4), ValueError, "input|weight"),
    "kernel-larger-than-padded-input": (lambda: lk.conv2d(arr(2, 4, 1, 1), W, padding=(0, 1)), ValueError,
                                        "input|weight"),
    "bias-wrong-size": (lambda: lk.conv2d(X, W, arr(5)), ValueError, "bias"),
    "bias-2d": (lambda: lk.conv2d(X, W, arr(6, 1)), ValueError, "bias"),
    "bias-scalar": (lambda: lk.conv2d(X, W, arr()), ValueError, "bias"),
    "activation-unknown": (lambda: lk.conv2d(X, W, activation="tanh"), ValueError, "activation"),
    # Padding of 2**39 is a legal int, but the output has (2**40)**2 pixels.
    "output-size-overflows": (lambda: lk.conv2d(arr(1, 1, 1, 1), arr(1, 1, 1, 1), padding=2**39), OverflowError,
                              "input|padding|out"),
    "input-int": (lambda: lk.conv2d(X.astype(np.int32), W), TypeError, "input"),
    "input-float16": (lambda: lk.conv2d(X.astype(np.float16), W.astype(np.float16)), TypeError, "input"),
    "input-complex": (lambda: lk.conv2d(X.astype(np.complex64), W), TypeError, "input"),
    "input-big-endian": (lambda: lk.conv2d(X.astype(">f4"), W.astype(">f4")), TypeError, "input"),
    "input-list": (lambda: lk.conv2d(X.tolist(), W), TypeError, "input"),
    "weight-list": (lambda: lk.conv2d(X, W.tolist()), TypeError, "weight"),
    "weight-other-dtype": (lambda: lk.conv2d(X, W.astype(np.float64)), TypeError, "weight"),
    "bias-other-dtype": (lambda: lk.conv2d(X, W, arr(6, dtype=np.float64)), TypeError, "bias"),
    "bias-list": (lambda: lk.conv2d(X, W, [0.0] * 6), TypeError, "bias"),
}

POOL_CASES = {
    "input-2d": (lambda: lk.max_pool2d(arr(8, 8), 2), ValueError, "input"),
    "input-5d": (lambda: lk.max_pool2d(arr(1, 1, 1, 8, 8), 2), ValueError, "input"),
    "input-zero-channels": (lambda: lk.max_pool2d(arr(2, 0, 8, 8), 2), ValueError, "input"),
    "input-zero-width": (lambda: lk.max_pool2d(arr(2, 3, 8, 0), 2), ValueError, "input"),
    "kernel-zero": (lambda: lk.max_pool2d(X, 0), ValueError, "kernel_size"),
    "kernel-negative": (lambda: lk.max_pool2d(X, (2, -2)), ValueError, "kernel_size"),
    "kernel-float": (lambda: lk.max_pool2d(X, 2.0), TypeError, "kernel_size"),
    "kernel-three": (lambda: lk.max_pool2d(X, (2, 2, 2)), ValueError, "kernel_size"),
    "kernel-huge": (lambda: lk.max_pool2d(X, HUGE), OverflowError, "kernel_size"),
    "kernel-larger-than-input": (lambda: lk.max_pool2d(X, 9), ValueError, "input|kernel_size"),
    "stride-zero": (lambda: lk.max_pool2d(X, 2, stride=0), ValueError, "stride"),
    "stride-float": (lambda: lk.max_pool2d(X, 2, stride=1.5), TypeError, "stride"),
    "stride-huge": (lambda: lk.max_pool2d(X, 2, stride=HUGE), OverflowError, "stride"),
    "padding-negative": (lambda: lk.max_pool2d(X, 2, padding=-1), ValueError, "padding"),
    "padding-over-half-kernel": (lambda: lk.max_pool2d(X, 3, padding=2), ValueError, "padding"),
    "padding-over-half-kernel-pair": (lambda: lk.max_pool2d(X, (4, 2), padding=(2, 2)), ValueError, "padding"),
    "padding-float": (lambda: lk.max_pool2d(X, 2, padding=0.5), TypeError, "padding"),
    "dilation-zero": (lambda: lk.max_pool2d(X, 2, dilation=0), ValueError, "dilation"),
    "dilated-window-larger-than-input": (lambda: lk.max_pool2d(X, 3, dilation=4), ValueError, "input|kernel_size"),
    # 2**61 input pixels (zero strides, no memory), three times as many outputs.
    "output-size-overflows": (lambda: lk.max_pool2d(np.broadcast_to(F32(1), (2**29, 2**30, 2, 1)), 2, stride=1,
                                                    padding=1), OverflowError, "input|out"),
    "input-int": (lambda: lk.max_pool2d(X.astype(np.int64), 2), TypeError, "input"),
    "input-list": (lambda: lk.max_pool2d(X.tolist(), 2), TypeError, "input"),
}

LINEAR_CASES = {
    "input-0d": (lambda: lk.linear(arr(), arr(3, 1)), ValueError, "input"),
    "weight-3d": (lambda: lk.linear(arr(2, 4), arr(3, 4, 1)), ValueError, "weight"),
    "weight-0d": (lambda: lk.linear(arr(2, 4), arr()), ValueError, "weight"),
    "features-mismatch": (lambda: lk.linear(arr(2, 4), arr(3, 5)), ValueError, "input|weight"),
    "features-mismatch-1d-weight": (lambda: lk.linear(arr(2, 4), arr(5)), ValueError, "input|weight"),
    "bias-wrong-size": (lambda: lk.linear(arr(2, 4), arr(3, 4), arr(4)), ValueError, "bias"),
    "bias-2d": (lambda: lk.linear(arr(2, 4), arr(3, 4), arr(1, 3)), ValueError, "bias"),
    "activation-unknown": (lambda: lk.linear(arr(2, 4), arr(3, 4), activation="gelu"), ValueError, "activation"),
    "output-size-overflows": (lambda: lk.linear(np.broadcast_to(F32(1), (2**40, 2**20, 1)), arr(2**10, 1)),
                              OverflowError, "input|out"),
    "input-int": (lambda: lk.linear(arr(2, 4).astype(np.int32), arr(3, 4)), TypeError, "input"),
    "weight-other-dtype": (lambda: lk.linear(arr(2, 4), arr(3, 4, dtype=np.float64)), TypeError, "weight"),
    "bias-other-dtype": (lambda: lk.linear(arr(2, 4), arr(3, 4), arr(3, dtype=np.float64)), TypeError, "bias"),
    "input-list": (lambda: lk.linear([[1.0] * 4], arr(3, 4)), TypeError, "input"),
}

ELEMENTWISE_CASES = {
    "relu-int": (lambda: lk.relu(np.arange(4)), TypeError, "input"),
    "relu-bool": (lambda: lk.relu(np.ones(4, bool)), TypeError, "input"),
    "relu-list": (lambda: lk.relu([1.0, -1.0]), TypeError, "input"),
    "relu-float": (lambda: lk.relu(1.0), TypeError, "input"),
    "softmax-int": (lambda: lk.softmax(np.arange(4), 0), TypeError, "input"),
    "log-softmax-float16": (lambda: lk.log_softmax(np.ones(4, np.float16), 0), TypeError, "input"),
    "softmax-list": (lambda: lk.softmax([1.0, 2.0], 0), TypeError, "input"),
    "softmax-dim-float": (lambda: lk.softmax(arr(2, 3), 1.0), TypeError, "dim"),
    "softmax-dim-none": (lambda: lk.softmax(arr(2, 3), None), TypeError, "dim"),
}

# Wrong `out=` arrays, for every op.
OUT_CALLS = {
    "conv2d": (lambda out: lk.conv2d(X, W, out=out), (2, 6, 6, 6)),
    "max_pool2d": (lambda out: lk.max_pool2d(X, 2, out=out), (2, 4, 4, 4)),
    "linear": (lambda out: lk.linear(arr(5, 4), arr(3, 4), out=out), (5, 3)),
    "relu": (lambda out: lk.relu(X, out=out), X.shape),
    "softmax": (lambda out: lk.softmax(X, 1, out=out), X.shape),
}


def bad_outs(shape):
    def read_only():
        out = np.empty(shape, F32)
        out.flags.writeable = False
        return out

    return {
        "wrong-shape": (lambda: np.empty(shape[:-1] + (shape[-1] + 1,), F32), ValueError),
        "wrong-ndim": (lambda: np.empty((1,) + shape, F32), ValueError),
        "flat": (lambda: np.empty(int(np.prod(shape)), F32), ValueError),
        # A result of the wrong dtype is a dtype mismatch like any other.
        "other-dtype": (lambda: np.empty(shape, np.float64), TypeError),
        "int-dtype": (lambda: np.empty(shape, np.int32), TypeError),
        "fortran": (lambda: np.asfortranarray(np.empty(shape, F32)), ValueError),
        "strided": (lambda: np.empty(shape[:-1] + (2 * shape[-1],), F32)[..., ::2], ValueError),
        "read-only": (read_only, ValueError),
        "list": (lambda: np.empty(shape, F32).tolist(), TypeError),
    }


def case_params(cases):
    return [pytest.param(*case, id=name) for name, case in cases.items()]


def check_raises(call, exception, names):
    with pytest.raises(exception, match=rf"^({names}):") as info:
        call()
    return info


@pytest.mark.parametrize("call, exception, names", case_params(CONV_CASES))
def test_conv2d(call, exception, names):
    check_raises(call, exception, names)


@pytest.mark.parametrize("name, value", [("stride", 1.0), ("stride", (1, 1.0)), ("padding", np.float64(1.0)),
                                         ("dilation", 1.0), ("groups", 1.0)])
def test_conv2d_float_equal_to_a_repeated_int(name, value):
    # Repeated calls take their converted arguments from a cache; 1.0 == 1
    # must not find the int's entry there.
    good = {name: (1, 1) if isinstance(value, tuple) else 1}
    lk.conv2d(X, W, **good)
    lk.conv2d(X, W, **good)
    check_raises(lambda: lk.conv2d(X, W, **{name: value}), TypeError, name)


@pytest.mark.parametrize("call, exception, names", case_params(POOL_CASES))
def test_max_pool2d(call, exception, names):
    check_raises(call, exception, names)


@pytest.mark.parametrize("name, good, value", [("kernel_size", 2, 2.0), ("stride", 2, 2.0), ("padding", 1, 1.0),
                                               ("dilation", 1, 1.0), ("kernel_size", (2, 2), (2.0, 2)),
                                               ("ceil_mode", True, 1)])
def test_max_pool2d_value_equal_to_a_repeated_one(name, good, value):
    # Repeated calls take their checked arguments from a cache; 2.0 == 2 (and 1 == True) must not find the
    # entry of the value that was checked. ceil_mode takes any truth value: there the result must match.
    args = {"kernel_size": 2, **{name: good}}
    expected = lk.max_pool2d(X, **args)
    lk.max_pool2d(X, **args)
    if name == "ceil_mode":
        np.testing.assert_array_equal(lk.max_pool2d(X, **{**args, name: value}), expected)
    else:
        check_raises(lambda: lk.max_pool2d(X, **{**args, name: value}), TypeError, name)


@pytest.mark.parametrize("name, good, value", [("stride", 1, 1.0), ("padding", (1, 1), (1.0, 1)), ("groups", 1, 1.0),
                                               ("kernel_size", 2, 2.0), ("pool_stride", 2, 2.0),
                                               ("pool_padding", 1, 1.0), ("pool_dilation", 1, 1.0)])
def test_conv2d_max_pool2d_value_equal_to_a_repeated_one(name, good, value):
    # As for conv2d and max_pool2d: the cache of checked arguments must not take 1.0 for 1.
    args = {"padding": 1, **{name: good}}
    lk.conv2d_max_pool2d(X, W, **args)
    lk.conv2d_max_pool2d(X, W, **args)
    check_raises(lambda: lk.conv2d_max_pool2d(X, W, **{**args, name: value}), TypeError, name)


@pytest.mark.parametrize("call, exception, names", case_params(LINEAR_CASES))
def test_linear(call, exception, names):
    check_raises(call, exception, names)


@pytest.mark.parametrize("call, exception, names", case_params(ELEMENTWISE_CASES))
def test_elementwise(call, exception, names):
    check_raises(call, exception, names)


@pytest.mark.parametrize("op", list(OUT_CALLS))
@pytest.mark.parametrize("kind", list(bad_outs((1,))))
def test_bad_out(op, kind):
    call, shape = OUT_CALLS[op]
    make_out, exception = bad_outs(shape)[kind]
    check_raises(lambda: call(make_out()), exception, "out")


@pytest.mark.parametrize("op", ["conv2d", "max_pool2d", "linear", "softmax", "relu"])
def test_out_overlapping_an_input(op):
    buf = np.ones(4 * 8 * 8 * 4, F32)
    x = buf[: 2 * 4 * 8 * 8].reshape(2, 4, 8, 8)
    w = buf[-6 * 4 * 9:].reshape(6, 4, 3, 3)
    calls = {
        "conv2d": lambda: lk.conv2d(x, w, out=buf[:2 * 6 * 36].reshape(2, 6, 6, 6)),
        "max_pool2d": lambda: lk.max_pool2d(x, 2, out=buf[64:64 + 128].reshape(2, 4, 4, 4)),
        "linear": lambda: lk.linear(x[0, 0], w.reshape(6, -1)[:, :8], out=buf[-48:].reshape(8, 6)),
        "softmax": lambda: lk.softmax(x, 1, out=buf[1:1 + x.size].reshape(x.shape)),
        "relu": lambda: lk.relu(buf[:-1], out=buf[1:]),
    }
    check_raises(calls[op], ValueError, "out")


def test_conv2d_out_overlapping_weight_or_bias():
    out_size = 2 * 6 * 6 * 6
    buf = np.ones(out_size, F32)
    with pytest.raises(ValueError, match="^out:"):
        lk.conv2d(X, buf[:W.size].reshape(W.shape), out=buf.reshape(2, 6, 6, 6))
    buf = np.ones(out_size, F32)
    with pytest.raises(ValueError, match="^out:"):
        lk.conv2d(X, W, buf[-6:], out=buf.reshape(2, 6, 6, 6))


@pytest.mark.parametrize("op", [lk.softmax, lk.log_softmax])
@pytest.mark.parametrize("shape, dim", [((2, 3), 2), ((2, 3), -3), ((4,), 1), ((), 1), ((), -2)])
def test_softmax_dim_out_of_range(op, shape, dim):
    # numpy's AxisError is both an IndexError (as torch raises) and a ValueError.
    info = check_raises(lambda: op(np.ones(shape, F32), dim), AxisError, "dim")
    assert isinstance(info.value, IndexError) and isinstance(info.value, ValueError)


def test_failed_allocation_raises_memory_error():
    # A 1 PiB output: valid arguments, no memory for the result. Nothing
    # may crash, and no partial result may come back.
    with pytest.raises(MemoryError):
        lk.conv2d(arr(1, 1, 1, 1), arr(1, 1, 1, 1), padding=2**23)


@pytest.mark.parametrize(
    "call, exception, names",
    [
        pytest.param(lambda: lk.set_num_threads(0), ValueError, "n", id="threads-zero"),
        pytest.param(lambda: lk.set_num_threads(-3), ValueError, "n", id="threads-negative"),
        pytest.param(lambda: lk.set_num_threads(2.0), TypeError, "n", id="threads-float"),
        pytest.param(lambda: lk.set_num_threads("2"), TypeError, "n", id="threads-str"),
        pytest.param(lambda: lk.set_num_threads(2**31), (ValueError, OverflowError), "n", id="threads-huge"),
        pytest.param(lambda: lk.set_isa("sse2"), ValueError, "isa|name", id="isa-unknown"),
        pytest.param(lambda: lk.set_isa("AVX2"), ValueError, "isa|name", id="isa-case"),
        pytest.param(lambda: lk.set_isa(2), TypeError, "isa|name", id="isa-int"),
    ],
)
def test_config(call, exception, names):
    threads, isa = lk.get_num_threads(), lk.get_isa()
    check_raises(call, exception, names)
    assert (lk.get_num_threads(), lk.get_isa()) == (threads, isa)
