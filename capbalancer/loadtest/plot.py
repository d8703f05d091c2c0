"""Latency CDFs and throughput over time for one or more runs (matplotlib, an optional extra)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from capbalancer.loadtest.runner import LoadtestResult
from capbalancer.loadtest.stats import latency_samples, throughput_timeline


class PlotUnavailable(RuntimeError):
    pass


MISSING_MATPLOTLIB = ("plotting needs matplotlib, which is not installed: "
                      "pip install 'capbalancer[plot]' (or pip install matplotlib)")


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_results(results: Mapping[str, LoadtestResult], path: str | Path, title: str = "") -> Path:
    """One figure: CDFs of TTFT, TPOT and E2E latency, and output tokens/s over time, a line per run."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(MISSING_MATPLOTLIB) from None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = (("ttft", "TTFT (ms)", axes[0][0]), ("tpot", "TPOT (ms)", axes[0][1]),
              ("e2el", "End-to-end latency (ms)", axes[1][0]))
    for label, result in results.items():
        samples = latency_samples(result.records)
        for metric, xlabel, ax in panels:
            values = np.sort(np.asarray(samples[metric]) * 1e3)
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=label)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("fraction of requests")
            ax.grid(True, alpha=0.3)
        timeline = throughput_timeline(result.records)
        axes[1][1].plot(timeline["t_s"], timeline["output_tokens_per_s"], label=label)
    axes[1][1].set_xlabel("time since start (s)")
    axes[1][1].set_ylabel("output tokens/s")
    axes[1][1].grid(True, alpha=0.3)
    for ax in (axes[0][0], axes[0][1], axes[1][0], axes[1][1]):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
