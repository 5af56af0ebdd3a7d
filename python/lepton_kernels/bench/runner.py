"""Side-by-side timing of lepton and its peers, and the command line around it.

Everything a table row compares is measured in one process and one run: the
matmul ceiling first, then per workload every implementation, interleaved
round-robin so that drifts in clock speed or memory state hit all of them
alike. Outputs are fresh on every call, each implementation allocating its
own as a user's call would; the minor page faults this costs are counted.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

import lepton_kernels as lk

from . import peers as peers_mod
from . import workloads as wl

__all__ = ["Timing", "ImplResult", "WorkloadResult", "measure_ceiling", "time_interleaved", "run", "main"]

DEFAULTS = {"repeat": 21, "min_time": 0.002, "ceiling_size": 2048, "ceiling_repeat": 5}
QUICK = {"repeat": 5, "min_time": 0.001, "ceiling_size": 1024, "ceiling_repeat": 3}


# --- timing -----------------------------------------------------------------


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _settle(max_wait: float = 0.05) -> None:
    """Wait until no thread of this process is still running, or ``max_wait`` seconds.

    Thread pools (OpenMP's, ONNX Runtime's) keep spinning for a while after a
    call; on a machine with few cores that steals a core from whichever
    implementation runs next. Waiting until the process's CPU time stops
    growing lets each loop start on an idle machine, whatever pools are loaded.
    """
    deadline = time.perf_counter() + max_wait
    while time.perf_counter() < deadline:
        cpu = time.process_time()
        time.sleep(0.001)
        if time.process_time() - cpu < 0.0002:
            return


def _loop(prepared: wl.Prepared, calls: int):
    """Nanoseconds and minor page faults for ``calls`` back-to-back calls, after one untimed call."""
    run = prepared.run
    _settle()
    with prepared.context():
        run()  # wakes the implementation's threads and caches up after the previous one
        faults = _minor_faults()
        start = time.perf_counter_ns()
        for _ in range(calls):
            run()
        elapsed = time.perf_counter_ns() - start
        faults = _minor_faults() - faults
    return elapsed, faults


def _calibrate(prepared: wl.Prepared, min_ns: int) -> int:
    """Calls per repeat so that one repeat lasts at least ``min_ns``; also warms the implementation up."""
    calls = 1
    while True:
        elapsed, _ = _loop(prepared, calls)
        if elapsed >= min_ns:
            return calls
        # Aim 20% past the target so the next try usually succeeds.
        calls = max(calls + 1, math.ceil(1.2 * calls * min_ns / max(elapsed, 1)))


class CpuLoad:
    """CPUs kept busy by other processes between ``start()`` and ``stop()``, on average (Linux only).

    Another process's work on a 2-core machine makes every multi-threaded
    timing meaningless, so the load it caused is measured and reported.
    """

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def start(self) -> "CpuLoad":
        self._start = self._sample()
        return self

    def stop(self) -> Optional[float]:
        end = self._sample()
        if self._start is None or end is None or end[2] <= self._start[2]:
            return None
        others = (end[0] - self._start[0]) - (end[1] - self._start[1])
        return max(others, 0.0) / (end[2] - self._start[2])


@dataclass
class Timing:
    median_s: float
    min_s: float
    calls_per_repeat: int
    repeats: int
    page_faults_per_call: float


def time_interleaved(prepared: Dict[str, wl.Prepared], repeat: int, min_time: float) -> Dict[str, Timing]:
    """Time each implementation: per repeat, one loop of each in turn (round-robin).

    The times reported are per call: the median and the fastest over repeats.
    """
    min_ns = int(min_time * 1e9)
    calls = {name: _calibrate(p, min_ns) for name, p in prepared.items()}
    samples: Dict[str, List[float]] = {name: [] for name in prepared}
    faults = dict.fromkeys(prepared, 0)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one loop would be charged to whichever implementation ran
    try:
        for name, p in prepared.items():  # one untimed round, so every loop below follows another one
            _loop(p, calls[name])
        for _ in range(repeat):
            for name, p in prepared.items():
                elapsed, f = _loop(p, calls[name])
                samples[name].append(elapsed / calls[name] / 1e9)
                faults[name] += f
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        name: Timing(statistics.median(samples[name]), min(samples[name]), calls[name], repeat,
                     faults[name] / (calls[name] * repeat))
        for name in prepared
    }


# --- the ceiling --------------------------------------------------------------


def _numpy_blas() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "numpy BLAS"
    for lib in threadpool_info():
        if lib.get("user_api") == "blas" and "numpy" in lib.get("filepath", ""):
            arch = f", {lib['architecture']} kernels" if lib.get("architecture") else ""
            return f"{lib.get('internal_api', 'blas')} {lib.get('version', '')}{arch}".strip()
    return "numpy BLAS"


def _blas_threads(n: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def _best_time(fn, repeat: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn()
        best = min(best, (time.perf_counter_ns() - start) / 1e9)
    return best


def measure_ceiling(size: int, threads: int, repeat: int, peers: Sequence[peers_mod.Peer] = ()) -> dict:
    """The fastest fp32 matmul this process runs: numpy's, and each peer's.

    Each library's best repeat counts; the best library is the ceiling. The
    environment is left as it is (OPENBLAS_CORETYPE, for one, may select
    slower kernels for numpy), so the libraries are named in the result.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    c = np.empty((size, size), np.float32)  # written in place: no page faults in the timing
    flops = 2 * size ** 3
    libraries = {}
    with _blas_threads(threads):
        t = _best_time(lambda: np.matmul(a, b, out=c), repeat)
    libraries["numpy"] = {"gflops": flops / t / 1e9, "library": _numpy_blas()}
    for peer in peers:
        peer.set_threads(threads)
        fn, library = peer.matmul(a, b, c)
        _settle()
        libraries[peer.name] = {"gflops": flops / _best_time(fn, repeat) / 1e9, "library": library}
    best = max(libraries, key=lambda k: libraries[k]["gflops"])
    return {"size": size, "threads": threads, "gflops": libraries[best]["gflops"], "source": best,
            "libraries": libraries}


# --- one run ---------------------------------------------------------------


@dataclass
class ImplResult:
    name: str
    check: str = "ok"  # "ok", "mismatch" or "error": only "ok" is timed
    error: Optional[float] = None  # max |difference| / RMS of the output checked against
    detail: str = ""
    setup_s: Optional[float] = None  # building the callable (an ONNX session, for one)
    first_call_s: Optional[float] = None  # includes plan creation and weight packing
    median_s: Optional[float] = None
    min_s: Optional[float] = None
    gflops: Optional[float] = None
    pct_ceiling: Optional[float] = None
    ratio: Optional[float] = None  # this implementation's median / lepton's: > 1 means lepton is faster
    page_faults_per_call: Optional[float] = None
    calls_per_repeat: Optional[int] = None
    repeats: Optional[int] = None


@dataclass
class WorkloadResult:
    name: str
    group: str
    description: str
    input_shape: List[int]
    flops: int
    unit: str
    tolerance: float
    results: Dict[str, ImplResult] = field(default_factory=dict)
    other_load_cpus: Optional[float] = None  # CPUs other processes kept busy while this row was timed


def _first_call(prepared: wl.Prepared):
    with prepared.context():
        start = time.perf_counter_ns()
        y = prepared.run()
        elapsed = (time.perf_counter_ns() - start) / 1e9
    return prepared.to_numpy(y), elapsed


def run_workload(workload: wl.Workload, peers: Sequence[peers_mod.Peer], repeat: int, min_time: float,
                 ceiling_gflops: float) -> WorkloadResult:
    """Check lepton against the float64 reference and each peer against lepton, then time those that agree."""
    inst = workload.build()
    tol = wl.tolerance(workload)
    res = WorkloadResult(workload.name, workload.group, workload.describe(), list(workload.input_shape),
                         workload.flops, workload.unit, tol)

    prepared: Dict[str, wl.Prepared] = {}
    ours = None
    for impl in (wl.LEPTON, *peers):
        r = res.results[impl.name] = ImplResult(impl.name)
        try:
            start = time.perf_counter_ns()
            p = impl.prepare(inst)
            r.setup_s = (time.perf_counter_ns() - start) / 1e9
            y, r.first_call_s = _first_call(p)
        except Exception as e:  # a peer lacking an op must not stop the run
            r.check, r.detail = "error", f"{type(e).__name__}: {e}"
            if impl is wl.LEPTON:
                return res
            continue
        if impl is wl.LEPTON:
            ok, r.error = wl.compare(y, wl.reference(inst), tol)
            against, allowed = "the float64 reference", tol
            ours = y.astype(np.float64)
        else:
            # Both sides carry float32 rounding: allow twice the error.
            ok, r.error = wl.compare(y, ours, 2 * tol)
            against, allowed = "lepton", 2 * tol
        if not ok:
            r.check = "mismatch"
            r.detail = f"max error {r.error:.3g} x RMS against {against} (tolerance {allowed:.3g})"
            if impl is not wl.LEPTON:
                continue  # lepton is timed even when wrong, so that a regression shows both ways
        prepared[impl.name] = p

    load = CpuLoad().start()
    timings = time_interleaved(prepared, repeat, min_time)
    res.other_load_cpus = load.stop()
    base = timings[wl.LEPTON.name].median_s
    for name, t in timings.items():
        r = res.results[name]
        r.median_s, r.min_s = t.median_s, t.min_s
        r.calls_per_repeat, r.repeats, r.page_faults_per_call = t.calls_per_repeat, t.repeats, t.page_faults_per_call
        r.gflops = workload.flops / t.median_s / 1e9
        if workload.unit == "GFLOP/s":
            r.pct_ceiling = 100.0 * r.gflops / ceiling_gflops
        r.ratio = t.median_s / base
    return res


def run(workloads: Sequence[wl.Workload], peers: Sequence[peers_mod.Peer], threads: int, repeat: int,
        min_time: float, ceiling_gflops: float, on_result=None) -> List[WorkloadResult]:
    """Run the workloads in order on ``threads`` threads; ``on_result`` sees each result as it is done."""
    for impl in (wl.LEPTON, *peers):
        impl.set_threads(threads)
    results = []
    for w in workloads:
        r = run_workload(w, peers, repeat, min_time, ceiling_gflops)
        results.append(r)
        if on_result is not None:
            on_result(r)
    return results


# --- machine description --------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int, peers: Sequence[peers_mod.Peer]) -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "lepton": lk.get_config(),
        "peers": {p.name: ({"version": p.version} if p.available else {"skipped": p.reason}) for p in peers},
        "outputs": "fresh array per call from each implementation's own allocator",
    }


# --- text table ---------------------------------------------------------------


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt_work(flops: int) -> str:
    mflop = flops / 1e6
    return f"{mflop:.3f}" if mflop < 1 else f"{mflop:.1f}"


class Table:
    """An aligned text table printed one row at a time (column widths are fixed up front)."""

    def __init__(self, columns, file=sys.stdout):
        self.columns = columns  # (title, width, align)
        self.file = file

    def row(self, cells):
        parts = []
        for (_, width, align), cell in zip(self.columns, cells):
            parts.append(f"{cell:<{width}}" if align == "<" else f"{cell:>{width}}")
        print("  ".join(parts).rstrip(), file=self.file, flush=True)

    def header(self):
        self.row([title for title, _, _ in self.columns])
        self.row(["-" * width for _, width, _ in self.columns])


def _result_table(workloads, peers, file):
    name_width = max([len("workload")] + [len(w.name) for w in workloads])
    columns = [("workload", name_width, "<"), ("MFLOP", 8, ">"), ("median", 10, ">"), ("fastest", 10, ">"),
               ("GFLOP/s", 8, ">"), ("%ceil", 6, ">"), ("flt/call", 8, ">"), ("busy", 4, ">"), ("check", 8, "<")]
    columns += [(f"{p.name} x", 9, ">") for p in peers]
    return Table(columns, file)


def _cells(r: WorkloadResult, peers) -> List[str]:
    ours = r.results[wl.LEPTON.name]
    rate = "-" if ours.gflops is None else f"{ours.gflops:.1f}" + ("*" if r.unit != "GFLOP/s" else "")
    pct = "-" if ours.pct_ceiling is None else f"{ours.pct_ceiling:.1f}"
    faults = "-" if ours.page_faults_per_call is None else f"{ours.page_faults_per_call:.1f}"
    busy = "-" if r.other_load_cpus is None else f"{r.other_load_cpus:.1f}"
    cells = [r.name, _fmt_work(r.flops), _fmt_time(ours.median_s), _fmt_time(ours.min_s), rate, pct, faults, busy,
             "ok" if ours.check == "ok" else ours.check.upper()]
    for p in peers:
        pr = r.results.get(p.name)
        if pr is None:
            cells.append("-")
        elif pr.check == "error":
            cells.append("ERROR")
        elif pr.check == "mismatch":
            cells.append("MISMATCH")
        else:
            cells.append(f"{pr.ratio:.2f}")
    return cells


def _notes(results: Sequence[WorkloadResult]) -> List[str]:
    notes = []
    for r in results:
        for impl in r.results.values():
            if impl.check != "ok":
                notes.append(f"{r.name}: {impl.name} {impl.check}: {impl.detail}")
    return notes


# --- command line -------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m lepton_kernels.bench",
        description="Time lepton-kernels on the reference workloads next to every installed peer.")
    ap.add_argument("--filter", metavar="SUBSTR", help="only workloads whose name contains SUBSTR")
    ap.add_argument("--threads", type=int, metavar="N",
                    help="threads for lepton and every peer (default: lepton's current setting)")
    ap.add_argument("--repeat", type=int, metavar="R",
                    help=f"timed repeats per implementation (default {DEFAULTS['repeat']}, "
                         f"{QUICK['repeat']} with --quick)")
    ap.add_argument("--min-time", type=float, metavar="S",
                    help=f"seconds each repeat lasts at least (default {DEFAULTS['min_time']}, "
                         f"{QUICK['min_time']} with --quick)")
    ap.add_argument("--json", metavar="PATH", help="also write every result and the machine description here")
    ap.add_argument("--quick", action="store_true",
                    help="fewer repeats and a 1024^3 ceiling matmul: a rough table in seconds")
    ap.add_argument("--list", action="store_true", help="list the selected workloads and exit")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    settings = dict(QUICK if args.quick else DEFAULTS)
    if args.repeat is not None:
        if args.repeat < 1:
            ap.error("--repeat: must be at least 1")
        settings["repeat"] = args.repeat
    if args.min_time is not None:
        if not args.min_time > 0:
            ap.error("--min-time: must be positive")
        settings["min_time"] = args.min_time
    threads = lk.get_num_threads() if args.threads is None else args.threads
    if threads < 1:
        ap.error("--threads: must be at least 1")

    workloads = wl.select(args.filter)
    if not workloads:
        ap.error(f"--filter: no workload name contains {args.filter!r}")
    if args.list:
        for w in workloads:
            print(f"{w.name:<{max(len(x.name) for x in workloads)}}  {_fmt_work(w.flops):>8} MFLOP  {w.describe()}")
        return 0

    peers = peers_mod.available()
    machine = machine_info(threads, peers_mod.PEERS)

    out = sys.stdout
    print(f"lepton-kernels {lk.__version__}, isa {lk.get_isa()}, {threads} thread(s) on {machine['cpu']} "
          f"({machine['usable_cpus']} usable CPUs)", file=out)
    for p in peers_mod.PEERS:
        print(f"peer {p.name}: " + (f"{p.version}" if p.available else f"skipped, {p.reason}"), file=out)
    ceiling = measure_ceiling(settings["ceiling_size"], threads, settings["ceiling_repeat"], peers)
    libs = "; ".join(f"{k} {v['gflops']:.1f} ({v['library']})" for k, v in ceiling["libraries"].items())
    n = ceiling["size"]
    print(f"fp32 matmul ceiling, {n}x{n}x{n}: {ceiling['gflops']:.1f} GFLOP/s from {ceiling['source']} "
          f"[{libs}]; OPENBLAS_CORETYPE={machine['openblas_coretype'] or 'unset'}", file=out)
    print(f"timing: {settings['repeat']} repeats of >= {settings['min_time'] * 1e3:g} ms per implementation, "
          f"round-robin; times are per call", file=out, flush=True)
    print(file=out)

    table = _result_table(workloads, peers, out)
    table.header()
    start = time.perf_counter()
    load = CpuLoad().start()
    results = run(workloads, peers, threads, settings["repeat"], settings["min_time"], ceiling["gflops"],
                  on_result=lambda r: table.row(_cells(r, peers)))
    elapsed = time.perf_counter() - start
    other_load = load.stop()

    print(file=out)
    print("median/fastest: lepton's time per call over repeats; %ceil: lepton's GFLOP/s against the ceiling above;",
          file=out)
    print("flt/call: minor page faults per lepton call (outputs are fresh arrays); "
          "'<peer> x': peer median / lepton median, > 1 means lepton is faster;", file=out)
    print("busy: CPUs other processes kept busy meanwhile (anything above 0 disturbs the timing); "
          "* pool rows count comparisons: Gop/s, no %ceil.", file=out)
    if other_load is not None and other_load >= 0.1:
        print(f"warning: other processes kept {other_load:.2f} of {machine['usable_cpus']} CPUs busy on average "
              f"during the run: these timings are not reliable", file=out)
    for note in _notes(results):
        print(f"note: {note}", file=out)
    print(f"{len(results)} workloads in {elapsed:.1f} s", file=out)

    if args.json:
        doc = {
            "settings": {**settings, "threads": threads, "filter": args.filter, "quick": args.quick},
            "machine": machine,
            "ceiling": ceiling,
            "elapsed_s": elapsed,
            "other_load_cpus": other_load,
            "workloads": [asdict(r) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}", file=out)
    return 0
