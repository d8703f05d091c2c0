"""Our Prometheus text parser against prometheus_client's, on a real vLLM 0.32 /metrics page.

    .venv/bin/python bench/promparse_speed.py [--page tests/data/real/vllm-cpu-metrics.txt] [--repeat 7]

Prints the best-of-N time per page for: the library's full parse, our full parse, our selective parse
of the vLLM adapter's series, and the whole adapter (selective parse + snapshot); then the ratios.
The library can only parse everything; the selective parse is what the monitor runs every poll.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from capbalancer.fleet.adapters import ENGINES, snapshot_from_metrics  # noqa: E402
from capbalancer.fleet.promtext import parse, parse_all  # noqa: E402


def best_per_call_s(fn, repeat: int) -> float:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=repeat, number=number)) / number


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--page", type=Path, default=REPO / "tests/data/real/vllm-cpu-metrics.txt")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    text = args.page.read_text()
    wanted = ENGINES["vllm"].wanted
    n_samples = sum(len(f.samples) for f in text_string_to_metric_families(text))
    ours = sum(len(v) for v in parse_all(text).values())
    assert ours == n_samples, (ours, n_samples)  # both parsers see the same page

    lib = best_per_call_s(lambda: list(text_string_to_metric_families(text)), args.repeat)
    full = best_per_call_s(lambda: parse_all(text), args.repeat)
    selective = best_per_call_s(lambda: parse(text, wanted), args.repeat)
    adapter = best_per_call_s(lambda: snapshot_from_metrics("vllm", text, 0.0), args.repeat)

    print(f"page: {args.page.relative_to(REPO) if args.page.is_relative_to(REPO) else args.page} "
          f"({len(text)} bytes, {n_samples} samples); vLLM adapter reads {len(wanted)} names")
    print(f"{'parser':<44}{'time/page':>12}{'vs library':>12}")
    for label, t in (("prometheus_client text_string_to_metric_families", lib),
                     ("promtext.parse_all (every sample)", full),
                     ("promtext.parse (the vLLM adapter's names)", selective),
                     ("adapters.snapshot_from_metrics('vllm')", adapter)):
        print(f"{label:<44}{t * 1e6:>10.1f}us{lib / t:>11.1f}x")


if __name__ == "__main__":
    main()
