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


_SLO_KEYS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2el": "e2el_ms"}


def _cdf(ax, values_ms: np.ndarray, label: str) -> None:
    values = np.sort(values_ms)
    ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=label)


def plot_results(results: Mapping[str, LoadtestResult], path: str | Path, title: str = "") -> Path:
    """One figure, a line per run: CDFs of TTFT, TPOT and E2E latency with the SLO as a vertical line, output
    tokens/s over time, and per backend (the proxy's x-capbalancer-backend) its TTFT CDF and completions/s.
    The PNG's Description names every series drawn, so a reader (or a test) can tell what is in it."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(MISSING_MATPLOTLIB) from None
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    panels = (("ttft", "TTFT (ms)", axes[0][0]), ("tpot", "TPOT (ms)", axes[0][1]),
              ("e2el", "End-to-end latency (ms)", axes[0][2]))
    tokens_ax, backend_ttft_ax, backend_rate_ax = axes[1]
    slo_drawn: set[str] = set()
    for label, result in results.items():
        samples = latency_samples(result.records)
        slo = result.config.get("slo") or {}
        for metric, xlabel, ax in panels:
            if len(samples[metric]):
                _cdf(ax, np.asarray(samples[metric]) * 1e3, label)
            limit = slo.get(_SLO_KEYS[metric])
            if limit is not None and metric not in slo_drawn:
                ax.axvline(float(limit), color="red", linestyle="--", label=f"SLO {float(limit):g} ms")
                slo_drawn.add(metric)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("fraction of requests")
        timeline = throughput_timeline(result.records)
        tokens_ax.plot(timeline["t_s"], timeline["output_tokens_per_s"], label=label)
        by_backend: dict[str, list] = {}
        for r in result.records:
            if r.backend is not None:
                by_backend.setdefault(r.backend, []).append(r)
        for backend, records in sorted(by_backend.items()):
            name = backend if len(results) == 1 else f"{label} {backend}"
            ttft = latency_samples(records)["ttft"]
            if ttft:
                _cdf(backend_ttft_ax, np.asarray(ttft) * 1e3, name)
            line = throughput_timeline(records)
            backend_rate_ax.plot(line["t_s"], line["requests_per_s"], label=name)
    tokens_ax.set_xlabel("time since start (s)")
    tokens_ax.set_ylabel("output tokens/s")
    backend_ttft_ax.set_xlabel("TTFT by backend (ms)")
    backend_ttft_ax.set_ylabel("fraction of requests")
    backend_rate_ax.set_xlabel("time since start (s)")
    backend_rate_ax.set_ylabel("completed requests/s by backend")
    series: list[str] = []
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize="small")
            series.append(f"{ax.get_xlabel()}: {', '.join(labels)}")
        else:
            ax.text(0.5, 0.5, "no successful request", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
            series.append(f"{ax.get_xlabel()}: none")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110, metadata={"Description": " | ".join(series)})
    plt.close(fig)
    return path
