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
