"""A picture of a benchmark run: GFLOP/s per workload, ours beside each peer's."""

from __future__ import annotations

from typing import Sequence


def plot(results: Sequence, path: str, title: str) -> None:
    """Writes a PNG bar chart (log scale) of every implementation's median GFLOP/s per workload."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot: needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = sorted({impl for r in results for impl, res in r.results.items() if res.gflops})
    order = ["lepton"] + [n for n in names if n != "lepton"]
    rows = [r for r in results if r.results.get("lepton") and r.results["lepton"].gflops]
    width = 0.8 / max(1, len(order))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.45 * len(rows) * len(order)), 5.5))
    for i, impl in enumerate(order):
        xs, ys = [], []
        for j, r in enumerate(rows):
            res = r.results.get(impl)
            if res is not None and res.gflops:
                xs.append(j + (i - (len(order) - 1) / 2) * width)
                ys.append(res.gflops)
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.name for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("GFLOP/s (pool rows: Gop/s), median")
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
