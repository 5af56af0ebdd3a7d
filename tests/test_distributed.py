"""lk.Sequential inside dask.distributed workers: the network pickles (weights
and configuration), is rebuilt in each worker process, and infers a dask
array block by block with map_blocks. Skipped without dask.distributed."""

from __future__ import annotations

import math

import numpy as np
import pytest

import lepton_kernels as lk

import reference as ref

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")


def test_batch_inference_over_a_dask_array(rng):
    w1 = rng.uniform(-1 / 3, 1 / 3, (32, 1, 3, 3)).astype(np.float32)
    b1 = rng.uniform(-1 / 3, 1 / 3, 32).astype(np.float32)
    w2 = rng.uniform(-1 / math.sqrt(5408), 1 / math.sqrt(5408), (10, 5408)).astype(np.float32)
    b2 = rng.uniform(-1 / math.sqrt(5408), 1 / math.sqrt(5408), 10).astype(np.float32)
    net = lk.Sequential([lk.Conv2dMaxPool2d(w1, b1), lk.Flatten(), lk.Linear(w2, b2), lk.Softmax(dim=1)],
                        result_cache=1 << 20)
    x = rng.standard_normal((40, 1, 28, 28)).astype(np.float32)
    images = da.from_array(x, chunks=(16, 1, 28, 28))  # blocks of 16, 16 and 8 images

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        probs = images.map_blocks(net, dtype=np.float32, drop_axis=[2, 3], chunks=(images.chunks[0], (10,)))
        y = probs.compute()
        # The network ran in the workers, not here: its pickled copy made the plans there.
        assert net.plans_made == 0
        assert client.run(lambda: lk.get_num_threads())  # every worker imported the library

    expected = ref.softmax(ref.linear(ref.max_pool2d(ref.conv2d(x.astype(np.float64), w1, b1, activation="relu"), 2)[0]
                                      .reshape(40, -1), w2, b2), 1)
    tol = 8 * float(np.finfo(np.float32).eps) * math.sqrt(9 + 5408)
    assert y.shape == (40, 10) and y.dtype == np.float32
    ref._assert_within(y, expected, tol * (1 + np.abs(expected)), "dask map_blocks")
