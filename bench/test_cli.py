"""The benchmark CLI end to end on one small row: the table, the JSON and the ceilings it reports."""

import json

from lepton_kernels.bench import peers, runner


def test_cli_writes_the_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert runner.main(["--quick", "--repeat", "3", "--filter", "mnist-pool-b16", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fp32 FMA peak" in out and "mnist-pool-b16" in out and "1 workloads in" in out
    doc = json.loads(path.read_text())
    assert doc["ceiling"]["fma_peak_gflops"] > 0 and doc["ceiling"]["gflops"] > 0
    (row,) = doc["workloads"]
    ours = row["results"]["lepton"]
    assert ours["check"] == "ok" and ours["median_s"] > 0
    assert ours["pct_fma"] is None  # a pool row counts comparisons, not FLOPs
    for p in peers.available():
        # The whole-network peer does not apply to a single layer; every other peer ran it.
        assert (p.name in row["results"]) == p.applies(runner.wl.select("mnist-pool-b16")[0])


def test_fma_peak_is_measured_at_every_level():
    import lepton_kernels as lk

    before = lk.get_isa()
    try:
        for isa in ("generic", "avx2", "avx512"):
            try:
                lk.set_isa(isa)
            except ValueError:  # a level this CPU lacks
                continue
            assert lk._core.fma_peak_flops(1) > 1e8
    finally:
        lk.set_isa(before)


def test_a_disturbed_row_is_timed_again_and_the_steadiest_attempt_kept(monkeypatch):
    # Timings handed out in turn: the first disturbed on the peer's side, the second steadier but still
    # disturbed on ours, the third worse again. Selection looks at steadiness only, never at the ratio.
    t = runner.Timing
    attempts = [
        {"lepton": t(1.0, 0.9, 1, 3, 0.0), "peer": t(3.0, 1.0, 1, 3, 0.0)},
        {"lepton": t(1.7, 1.0, 1, 3, 0.0), "peer": t(1.1, 1.0, 1, 3, 0.0)},
        {"lepton": t(1.0, 0.5, 1, 3, 0.0), "peer": t(1.0, 1.0, 1, 3, 0.0)},
    ]
    calls = []

    def fake(prepared, repeat, min_time, warmup=None):
        calls.append(1)
        return attempts[len(calls) - 1]

    monkeypatch.setattr(runner, "time_interleaved", fake)
    monkeypatch.setattr(runner.wl, "compare", lambda *a: (True, 0.0))

    class Peer:
        name = "peer"

        def applies(self, w):
            return True

        def prepare(self, inst):
            return runner.wl.LEPTON.prepare(inst)

    row = runner.wl.select("mnist-pool-b1")[0]
    for retries, expected_calls, kept in ((2, 3, 1), (1, 2, 1), (0, 1, 0)):
        calls.clear()
        settings = runner.Settings(repeat=3, retries=retries, retry_pause=0.0)
        res = runner.run_workload(row, [Peer()], settings, ceiling_gflops=1.0)
        assert len(calls) == expected_calls and res.attempts == expected_calls
        assert res.results["lepton"].median_s == attempts[kept]["lepton"].median_s
    # A steady first timing is not repeated.
    attempts[0] = attempts[1] = {"lepton": t(1.0, 0.9, 1, 3, 0.0), "peer": t(1.2, 1.0, 1, 3, 0.0)}
    calls.clear()
    res = runner.run_workload(row, [Peer()], runner.Settings(repeat=3, retry_pause=0.0), ceiling_gflops=1.0)
    assert len(calls) == 1 and res.attempts == 1


def test_a_fusion_row_times_our_unfused_sequence_in_its_loops(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert runner.main(["--quick", "--repeat", "2", "--filter", "fuse-c2-b1", "--json", str(path)]) == 0
    assert "unfused x" in capsys.readouterr().out
    fused, unfused = json.loads(path.read_text())["workloads"]
    assert fused["name"] == "fuse-c2-b1" and unfused["name"] == "fuse-c2-b1/unfused"
    baseline = fused["results"]["unfused"]
    assert baseline["check"] == "ok" and baseline["median_s"] > 0 and baseline["ratio"] > 0
    assert "unfused" not in unfused["results"]  # the unfused row is itself the sequence
