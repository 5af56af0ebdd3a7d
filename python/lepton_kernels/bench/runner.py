"""Side-by-side timing of lepton and its peers, and the command line around it.

Everything a table row compares is measured in one process and one run: the
matmul ceiling first, then per workload every implementation, interleaved
round-robin so that drifts in clock speed or memory state hit all of them
alike. Each loop starts once every other thread of the process is idle, so no
library's pool still spinning from its own loop takes a core from the next.
Outputs are fresh on every call, each implementation allocating its
own as a user's call would; the minor page faults this costs are counted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

import lepton_kernels as lk

from . import peers as peers_mod
from . import workloads as wl

__all__ = ["Settings", "Timing", "ImplResult", "WorkloadResult", "measure_ceiling", "time_interleaved", "run", "main"]


@dataclass
class Settings:
    repeat: int = 21  # timed loops per implementation and workload
    min_time: float = 0.002  # seconds each timed loop lasts at least
    warmup: Optional[float] = None  # seconds of untimed calls before each loop (None: min_time)
    ceiling_size: int = 2048
    ceiling_repeat: int = 5
    retries: int = 2  # more timings of a row whose loops were disturbed (UNSTABLE); the steadiest is kept
    retry_pause: float = 0.5  # seconds between them, for a disturbance to pass


QUICK = Settings(repeat=5, min_time=0.001, ceiling_size=1024, ceiling_repeat=3, retries=0)


# --- timing -----------------------------------------------------------------


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _busy_threads() -> Optional[int]:
    """Threads of this process, other than the caller, running or waiting for a CPU (None: unknown).

    Read from each thread's state in /proc (Linux): exact at the moment it is read, where the
    process's CPU time is not (a thread running on another CPU adds its time only at the next
    scheduler tick, 4 ms apart here).
    """
    me = threading.get_native_id()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    busy = 0
    for tid in tids:
        if tid == str(me):
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # the thread has exited
            continue
        if stat[stat.rindex(b")") + 2:][:1] == b"R":  # the state follows the parenthesised name
            busy += 1
    return busy


def _settle(max_wait: float = 0.2) -> None:
    """Wait until no other thread of this process has run for a while, or ``max_wait`` seconds.

    Thread pools keep spinning after a call (ONNX Runtime 1.32's for about 50 ms, torch's
    OpenMP threads about 10 ms, measured here); on a machine with few cores that steals a
    core from whichever implementation runs next. Three quiet looks 0.5 ms apart let each
    loop start on an idle machine, whatever pools are loaded. Where thread states cannot be
    read, the process's CPU time standing still for 5 ms (past a scheduler tick) stands in.
    """
    deadline = time.perf_counter() + max_wait
    quiet = 0
    while time.perf_counter() < deadline:
        busy = _busy_threads()
        if busy is None:
            cpu = time.process_time()
            time.sleep(0.005)
            if time.process_time() - cpu < 0.0002:
                return
            continue
        quiet = quiet + 1 if busy == 0 else 0
        if quiet >= 3:
            return
        time.sleep(0.0005)


def _loop(prepared: wl.Prepared, calls: int, warmup_ns: int):
    """Nanoseconds and minor page faults for ``calls`` back-to-back calls, after untimed ones."""
    run = prepared.run
    _settle()
    with prepared.context():
        # Right after another library ran, the first calls can stall for
        # milliseconds while the scheduler places this one's threads (a whole
        # timer tick when two of them land on one core): run those untimed.
        end = time.perf_counter_ns() + warmup_ns
        run()
        while time.perf_counter_ns() < end:
            run()
        faults = _minor_faults()
        start = time.perf_counter_ns()
        for _ in range(calls):
            run()
        elapsed = time.perf_counter_ns() - start
        faults = _minor_faults() - faults
    return elapsed, faults


def _calibrate(prepared: wl.Prepared, min_ns: int, warmup_ns: int) -> int:
    """Calls per loop so that a loop lasts at least ``min_ns``.

    The estimate is the fastest of several single calls, so that one stalled
    call cannot leave every loop of the run too short.
    """
    run = prepared.run
    _settle()
    with prepared.context():
        end = time.perf_counter_ns() + warmup_ns
        run()
        while time.perf_counter_ns() < end:
            run()
        fastest, spent, n = math.inf, 0, 0
        while n < 3 or spent < min_ns:
            start = time.perf_counter_ns()
            run()
            elapsed = time.perf_counter_ns() - start
            fastest, spent, n = min(fastest, elapsed), spent + elapsed, n + 1
    return max(1, math.ceil(1.1 * min_ns / max(fastest, 1)))


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


def time_interleaved(prepared: Dict[str, wl.Prepared], repeat: int, min_time: float,
                     warmup: Optional[float] = None) -> Dict[str, Timing]:
    """Time each implementation: per repeat, one loop of each in turn (round-robin).

    Each loop lasts at least ``min_time`` seconds and follows ``warmup``
    seconds of untimed calls (default: ``min_time``). The times reported are
    per call: the median and the fastest over repeats.
    """
    min_ns = int(min_time * 1e9)
    warmup_ns = min_ns if warmup is None else int(warmup * 1e9)
    calls = {name: _calibrate(p, min_ns, warmup_ns) for name, p in prepared.items()}
    samples: Dict[str, List[float]] = {name: [] for name in prepared}
    total_calls = dict.fromkeys(prepared, 0)
    faults = dict.fromkeys(prepared, 0)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one loop would be charged to whichever implementation ran
    try:
        for _ in range(repeat):
            for name, p in prepared.items():
                n = calls[name]
                elapsed, f = _loop(p, n, warmup_ns)
                samples[name].append(elapsed / n / 1e9)
                total_calls[name] += n
                faults[name] += f
                # Re-aim the next loops when this one missed the target: too short
                # after a calibration on stalled calls, or far too long when the
                # implementation stalls now (which would stretch the run for nothing).
                if elapsed < min_ns or (n > 1 and elapsed > 4 * min_ns):
                    calls[name] = max(1, math.ceil(1.1 * n * min_ns / max(elapsed, 1)))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        name: Timing(statistics.median(samples[name]), min(samples[name]), calls[name], repeat,
                     faults[name] / total_calls[name])
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
    _settle()
    with _blas_threads(threads):
        t = _best_time(lambda: np.matmul(a, b, out=c), repeat)
    libraries["numpy"] = {"gflops": flops / t / 1e9, "library": _numpy_blas()}
    for peer in peers:
        peer.set_threads(threads)
        got = peer.matmul(a, b, c)
        if got is None:
            continue
        fn, library = got
        _settle()
        libraries[peer.name] = {"gflops": flops / _best_time(fn, repeat) / 1e9, "library": library}
    best = max(libraries, key=lambda k: libraries[k]["gflops"])
    _settle()
    fma = lk._core.fma_peak_flops(threads) / 1e9
    return {"size": size, "threads": threads, "gflops": libraries[best]["gflops"], "source": best,
            "libraries": libraries, "fma_peak_gflops": fma}


# --- one run ---------------------------------------------------------------


@dataclass
class ImplResult:
    name: str
    check: str = "ok"  # "ok", "mismatch" or "error"; a peer is timed only when "ok"
    error: Optional[float] = None  # max |difference| / RMS of the output checked against
    detail: str = ""
    setup_s: Optional[float] = None  # building the callable (an ONNX session, for one)
    first_call_s: Optional[float] = None  # includes plan creation and weight packing
    median_s: Optional[float] = None
    min_s: Optional[float] = None
    gflops: Optional[float] = None
    pct_ceiling: Optional[float] = None
    pct_fma: Optional[float] = None  # against the FMA peak
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
    attempts: int = 1  # timings of the row (Settings.retries)


def _first_call(prepared: wl.Prepared):
    with prepared.context():
        start = time.perf_counter_ns()
        y = prepared.run()
        elapsed = (time.perf_counter_ns() - start) / 1e9
    return prepared.to_numpy(y), elapsed


def run_workload(workload: wl.Workload, peers: Sequence[peers_mod.Peer], settings: Settings,
                 ceiling_gflops: float, fma_gflops: Optional[float] = None) -> WorkloadResult:
    """Check lepton against the float64 reference and each peer against lepton, then time those that agree."""
    inst = workload.build()
    tol = wl.tolerance(workload)
    res = WorkloadResult(workload.name, workload.group, workload.describe(), list(workload.input_shape),
                         workload.flops, workload.unit, tol)

    prepared: Dict[str, wl.Prepared] = {}
    ours = None
    for impl in (wl.LEPTON, wl.LEPTON_UNFUSED, *peers):
        if impl is not wl.LEPTON and not impl.applies(workload):
            continue
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

    _settle(max_wait=0.5)  # BLAS threads of the reference computation may spin for a while
    load = CpuLoad().start()
    timings = time_interleaved(prepared, settings.repeat, settings.min_time, settings.warmup)
    # On a shared machine a disturbance can last through a whole row (seconds in which every call of one
    # implementation runs up to twice as long). Such a row is timed again, all implementations side by side
    # as before, and the attempt whose loops were steadiest for every implementation is kept: a choice that
    # looks at no ratio, so it favours no side.
    while res.attempts <= settings.retries and _spread(timings) > UNSTABLE:
        time.sleep(settings.retry_pause)
        again = time_interleaved(prepared, settings.repeat, settings.min_time, settings.warmup)
        res.attempts += 1
        if _spread(again) < _spread(timings):
            timings = again
    res.other_load_cpus = load.stop()
    base = timings[wl.LEPTON.name].median_s
    for name, t in timings.items():
        r = res.results[name]
        r.median_s, r.min_s = t.median_s, t.min_s
        r.calls_per_repeat, r.repeats, r.page_faults_per_call = t.calls_per_repeat, t.repeats, t.page_faults_per_call
        r.gflops = workload.flops / t.median_s / 1e9
        if workload.unit == "GFLOP/s":
            r.pct_ceiling = 100.0 * r.gflops / ceiling_gflops
            if fma_gflops:
                r.pct_fma = 100.0 * r.gflops / fma_gflops
        r.ratio = t.median_s / base
    return res


def run(workloads: Sequence[wl.Workload], peers: Sequence[peers_mod.Peer], threads: int, settings: Settings,
        ceiling_gflops: float, on_result=None, fma_gflops: Optional[float] = None) -> List[WorkloadResult]:
    """Run the workloads in order on ``threads`` threads; ``on_result`` sees each result as it is done."""
    for impl in (wl.LEPTON, *peers):
        impl.set_threads(threads)
    results = []
    for w in workloads:
        r = run_workload(w, peers, settings, ceiling_gflops, fma_gflops)
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


# A median this far above the fastest loop means the loops were disturbed
# (threads stalled, other processes running): the table flags it with "?".
UNSTABLE = 1.5


def _unstable(r: ImplResult) -> bool:
    return r.median_s is not None and r.median_s > UNSTABLE * r.min_s


def _spread(timings: Dict[str, Timing]) -> float:
    """The largest median / fastest loop over the implementations of one timing."""
    return max(t.median_s / t.min_s for t in timings.values())


def _result_table(workloads, peers, file):
    name_width = max([len("workload")] + [len(w.name) for w in workloads])
    columns = [("workload", name_width, "<"), ("MFLOP", 8, ">"), ("median ", 11, ">"), ("fastest", 10, ">"),
               ("GFLOP/s", 8, ">"), ("%ceil", 6, ">"), ("%fma", 5, ">"), ("flt/call", 8, ">"), ("busy", 4, ">"), ("check", 8, "<")]
    columns += [(f"{p.name} x ", 10, ">") for p in peers]
    return Table(columns, file)


def _cells(r: WorkloadResult, peers) -> List[str]:
    ours = r.results[wl.LEPTON.name]
    rate = "-" if ours.gflops is None else f"{ours.gflops:.1f}" + ("*" if r.unit != "GFLOP/s" else "")
    pct = "-" if ours.pct_ceiling is None else f"{ours.pct_ceiling:.1f}"
    pct_fma = "-" if ours.pct_fma is None else f"{ours.pct_fma:.0f}"
    faults = "-" if ours.page_faults_per_call is None else f"{ours.page_faults_per_call:.1f}"
    busy = "-" if r.other_load_cpus is None else f"{r.other_load_cpus:.1f}"
    median = _fmt_time(ours.median_s) + ("?" if _unstable(ours) else " ")
    cells = [r.name, _fmt_work(r.flops), median, _fmt_time(ours.min_s), rate, pct, pct_fma, faults, busy,
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
            cells.append(f"{pr.ratio:.2f}" + ("?" if _unstable(pr) or _unstable(ours) else " "))
    return cells


def _notes(results: Sequence[WorkloadResult]) -> List[str]:
    notes = []
    for r in results:
        for impl in r.results.values():
            if impl.check != "ok":
                notes.append(f"{r.name}: {impl.name} {impl.check}: {impl.detail}")
    retried = [f"{r.name} ({r.attempts})" for r in results if r.attempts > 1]
    if retried:
        notes.append(f"timed again after disturbed loops, the steadiest attempt kept (attempts): {', '.join(retried)}")
    return notes


# --- command line -------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    full, quick = Settings(), QUICK
    ap = argparse.ArgumentParser(
        prog="python -m lepton_kernels.bench",
        description="Time lepton-kernels on the reference workloads next to every installed peer.")
    ap.add_argument("--filter", metavar="SUBSTR", help="only the workloads whose name contains SUBSTR")
    ap.add_argument("--threads", type=int, metavar="N",
                    help="threads for lepton and every peer (default: lepton's current setting)")
    ap.add_argument("--repeat", type=int, metavar="R",
                    help=f"timed loops per implementation (default {full.repeat}, {quick.repeat} with --quick)")
    ap.add_argument("--min-time", type=float, metavar="S",
                    help=f"seconds each timed loop lasts at least (default {full.min_time:g}, "
                         f"{quick.min_time:g} with --quick)")
    ap.add_argument("--warmup", type=float, metavar="S",
                    help="seconds of untimed calls before each timed loop (default: the --min-time)")
    ap.add_argument("--retries", type=int, metavar="N",
                    help=f"more timings of a row whose loops were disturbed, the steadiest kept "
                         f"(default {full.retries}, {quick.retries} with --quick)")
    ap.add_argument("--json", metavar="PATH", help="also write every result and the machine description here")
    ap.add_argument("--plot", metavar="PATH", help="also draw GFLOP/s per workload and implementation as a PNG "
                                                  "(needs matplotlib)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer and shorter loops and a 1024^3 ceiling matmul: a rough table in seconds")
    ap.add_argument("--list", action="store_true", help="list the selected workloads and exit")
    return ap


def _settings(ap, args) -> Settings:
    settings = dataclasses.replace(QUICK) if args.quick else Settings()
    if args.repeat is not None:
        if args.repeat < 1:
            ap.error("--repeat: must be at least 1")
        settings.repeat = args.repeat
    if args.min_time is not None:
        if not args.min_time > 0:
            ap.error("--min-time: must be positive")
        settings.min_time = args.min_time
    if args.warmup is not None:
        if not args.warmup >= 0:
            ap.error("--warmup: must not be negative")
        settings.warmup = args.warmup
    if args.retries is not None:
        if args.retries < 0:
            ap.error("--retries: must not be negative")
        settings.retries = args.retries
    return settings


def _print_header(out, threads, machine, ceiling, settings):
    print(f"lepton-kernels {lk.__version__}, isa {lk.get_isa()}, {threads} thread(s) on {machine['cpu']} "
          f"({machine['usable_cpus']} usable CPUs)", file=out)
    for p in peers_mod.PEERS:
        print(f"peer {p.name}: " + (p.version if p.available else f"skipped, {p.reason}"), file=out)
    n = ceiling["size"]
    libs = "; ".join(f"{k} {v['gflops']:.1f} ({v['library']})" for k, v in ceiling["libraries"].items())
    print(f"fp32 matmul ceiling, {n}x{n}x{n}: {ceiling['gflops']:.1f} GFLOP/s from {ceiling['source']} "
          f"[{libs}]; OPENBLAS_CORETYPE={machine['openblas_coretype'] or 'unset'}", file=out)
    print(f"fp32 FMA peak ({lk.get_isa()}, {threads} thread(s), independent multiply-adds in registers): "
          f"{ceiling['fma_peak_gflops']:.1f} GFLOP/s", file=out)
    warmup = settings.min_time if settings.warmup is None else settings.warmup
    print(f"timing: per implementation {settings.repeat} loops of >= {settings.min_time * 1e3:g} ms, each after "
          f"{warmup * 1e3:g} ms of untimed calls, round-robin; times are per call; a row with a median over "
          f"{UNSTABLE:g}x its fastest loop on any side timed up to {settings.retries} more time(s)", file=out)
    print(file=out, flush=True)


def _print_footer(out, results, n_workflows, other_load, usable_cpus, elapsed):
    print(file=out)
    print("median/fastest: lepton's time per call over the loops; %ceil, %fma: its GFLOP/s against the matmul "
          "ceiling and the FMA peak above;", file=out)
    print("flt/call: minor page faults per lepton call (outputs are fresh arrays); "
          "busy: CPUs other processes kept busy meanwhile;", file=out)
    print("'<peer> x': peer median / lepton median, > 1 means lepton is faster; "
          "* pool rows count comparisons: Gop/s, no %ceil;", file=out)
    print("'unfused x' (fusion rows): our one call per op, timed in the same loops, over the fused call;",
          file=out)
    print(f"?: a median more than {UNSTABLE:g}x the fastest loop (lepton's, or either side of a ratio): "
          f"disturbed loops, rerun before trusting it.", file=out)
    if other_load is not None and other_load >= 0.1:
        print(f"warning: other processes kept {other_load:.2f} of {usable_cpus} CPUs busy on average during the "
              f"run: these timings are not reliable", file=out)
    for note in _notes(results):
        print(f"note: {note}", file=out)
    done = [f"{len(results)} workloads"] if results or not n_workflows else []
    if n_workflows:
        done.append(f"{n_workflows} workflows")
    print(f"{' and '.join(done)} in {elapsed:.1f} s", file=out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    settings = _settings(ap, args)
    threads = lk.get_num_threads() if args.threads is None else args.threads
    if threads < 1:
        ap.error("--threads: must be at least 1")
    workloads = wl.select(args.filter)
    from . import torch_rows

    workflows = torch_rows.select(args.filter)  # whole PyTorch workflows (need torch), after the workloads
    if not workloads and not workflows:
        ap.error(f"--filter: no workload name contains {args.filter!r}")
    if args.list:
        width = max(len(w.name) for w in (*workloads, *workflows))
        for w in workloads:
            print(f"{w.name:<{width}}  {_fmt_work(w.flops):>8} MFLOP  {w.describe()}")
        for r in workflows:
            print(f"{r.name:<{width}}  {'':>8}        {r.description}")
        return 0

    out = sys.stdout
    peers = peers_mod.available()
    machine = machine_info(threads, peers_mod.PEERS)
    ceiling = measure_ceiling(settings.ceiling_size, threads, settings.ceiling_repeat, peers)
    _print_header(out, threads, machine, ceiling, settings)

    start = time.perf_counter()
    load = CpuLoad().start()
    results = []
    if workloads:
        # A column per peer that runs a row, and one for our unfused sequence when a fusion row runs.
        shown = [p for p in (*peers, wl.LEPTON_UNFUSED) if any(p.applies(w) for w in workloads)]
        table = _result_table(workloads, shown, out)
        table.header()
        results = run(workloads, peers, threads, settings, ceiling["gflops"],
                      on_result=lambda r: table.row(_cells(r, shown)), fma_gflops=ceiling["fma_peak_gflops"])
    workflow_results = torch_rows.run_rows(workflows, threads, settings, out) if workflows else []
    other_load = load.stop()
    elapsed = time.perf_counter() - start
    _print_footer(out, results, len(workflow_results), other_load, machine["usable_cpus"], elapsed)

    if args.json:
        doc = {
            "settings": {**asdict(settings), "threads": threads, "filter": args.filter, "quick": args.quick},
            "machine": machine,
            "ceiling": ceiling,
            "elapsed_s": elapsed,
            "other_load_cpus": other_load,
            "workloads": [asdict(r) for r in results],
            "workflows": workflow_results,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}", file=out)
    if args.plot:
        from .plot import plot

        plot(results, args.plot, f"lepton-kernels {lk.__version__} vs peers, {threads} thread(s), {machine['cpu']}",
             fma_gflops=ceiling["fma_peak_gflops"])
        print(f"wrote {args.plot}", file=out)
    return 0
