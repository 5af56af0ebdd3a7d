"""A picture of a benchmark run: GFLOP/s per workload, ours beside each peer's."""

from __future__ import annotations

from typing import Optional, Sequence

from .workloads import OURS


def plot(results: Sequence, path: str, title: str, fma_gflops: Optional[float] = None) -> None:
    """Writes a PNG of every implementation's median GFLOP/s per workload (log scale).

    One row of bars per workload, top to bottom in run order, each labelled
    with the faster peer's median over ours (> 1: ours is faster; our own
    unfused sequence is a bar, not a peer); a line marks the FMA peak when
    given.
    """
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot: needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = sorted({impl for r in results for impl, res in r.results.items() if res.gflops})
    order = ["lepton"] + [n for n in names if n != "lepton"]
    rows = [r for r in results if r.results.get("lepton") and r.results["lepton"].gflops]
    height = 0.8 / max(1, len(order))
    fig, ax = plt.subplots(figsize=(10.0, max(4.0, 1.5 + 0.12 * len(rows) * len(order))))
    for i, impl in enumerate(order):
        ys, xs = [], []
        for j, r in enumerate(rows):
            res = r.results.get(impl)
            if res is not None and res.gflops:
                ys.append(j + (i - (len(order) - 1) / 2) * height)
                xs.append(res.gflops)
        ax.barh(ys, xs, height, label=impl)
    for j, r in enumerate(rows):
        ours = r.results["lepton"]
        peers = [res.median_s for name, res in r.results.items() if name not in OURS and res.median_s]
        if peers:
            ax.annotate(f"{min(peers) / ours.median_s:.2f}x", (ours.gflops, j - (len(order) - 1) / 2 * height),
                        xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
    if fma_gflops:
        ax.axvline(fma_gflops, color="black", linewidth=0.8, linestyle="--", label=f"FMA peak {fma_gflops:.0f}")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r.name for r in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first row at the top
    ax.set_xscale("log")
    ax.set_xlabel("GFLOP/s (pool rows: Gop/s), median; beside our bar: the faster peer's median / ours")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the bars, covering none
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
