"""Per-instance breakdown of proxied runs from the driver's full result files (with per-request records):
requests, output tokens, median TPOT/TTFT and SLO misses on each backend (named by x-capbalancer-backend).

    python3 bench/gpu/per_backend.py RES_DIR [--ttft-ms 1000 --tpot-ms 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("res")
    ap.add_argument("--ttft-ms", type=float, default=1000)
    ap.add_argument("--tpot-ms", type=float, default=50)
    a = ap.parse_args()
    print("| run | backend | requests | output tokens | TTFT p50 ms | TPOT p50 ms | SLO met | TTFT misses | TPOT misses |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for f in sorted(Path(a.res).glob("*.json")):
        d = json.loads(f.read_text())
        run = (d.get("runs") or {}).get("proxy")
        if not run or "requests" not in run:
            continue
        keys = run["requests"]["keys"]
        rows = [dict(zip(keys, r, strict=True)) for r in run["requests"]["rows"]]
        for b in sorted({r["backend"] for r in rows if r["backend"]}):
            ok = [r for r in rows if r["backend"] == b and r["success"]]
            if not ok:
                continue
            tt = [r["ttft_s"] * 1e3 for r in ok]
            tp = [(r["tpot_s"] or 0) * 1e3 for r in ok]
            good = sum(1 for x, y in zip(tt, tp, strict=True) if x <= a.ttft_ms and y <= a.tpot_ms)
            print(f"| {f.stem} | {b} | {len(ok)} | {sum(r['output_tokens'] for r in ok):,} | "
                  f"{statistics.median(tt):.0f} | {statistics.median(tp):.1f} | {100 * good / len(ok):.0f}% | "
                  f"{sum(1 for x in tt if x > a.ttft_ms)} | {sum(1 for y in tp if y > a.tpot_ms)} |")


if __name__ == "__main__":
    main()
