"""Soak: steady load through one proxy for 10-30 minutes; the proxy's RSS and fds sampled every few seconds.

    .venv/bin/python bench/soak.py --minutes 15 --concurrency 64 --sample-s 5

Not part of the test suite. Backends are fault servers (tests/faults.py) answering normally, with a
small delay between stream chunks; a client subprocess keeps `--concurrency` requests open at all times
(half streaming, half not, a few abandoned mid-stream so the disconnect path is exercised too). The
script prints the series and the least-squares slope of RSS and fds over the second half of the run
(the first half includes warm-up: pools filling, allocator arenas growing), and exits non-zero when
either grows by more than the thresholds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from faults import FaultBackend, Proxy, proc_sample  # noqa: E402


async def _client(url: str, concurrency: int, seconds: float) -> None:
    import aiohttp

    counts: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    async def user(k: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            stream = (i + k) % 2 == 0
            abandon = stream and (i + k) % 25 == 0  # some clients walk away mid-stream
            body = {"model": "m", "stream": stream, "max_tokens": 8,
                    "messages": [{"role": "user", "content": f"soak {k} {i}"}]}
            try:
                async with session.post(url + "/v1/chat/completions", json=body) as resp:
                    if abandon:
                        await resp.content.readany()
                        resp.close()
                        key = "abandoned"
                    else:
                        await resp.read()
                        key = str(resp.status)
            except Exception as exc:
                key = type(exc).__name__
            counts[key] = counts.get(key, 0) + 1

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(user(k) for k in range(concurrency)))
    print(json.dumps(counts), flush=True)


def slope_per_min(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(_client(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--backends", type=int, default=2)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--max-rss-growth-kb-per-min", type=float, default=256.0)
    parser.add_argument("--max-fd-growth-per-min", type=float, default=1.0)
    args = parser.parse_args()
    seconds = args.minutes * 60
    backends = [FaultBackend(f"s{i}", chunks=8, chunk_delay_s=0.005) for i in range(args.backends)]
    series: list[tuple[float, int, int]] = []
    try:
        for b in backends:
            b.start()
        with Proxy(backends, policy="least_requests") as proxy:
            client = subprocess.Popen([sys.executable, __file__, "--client", proxy.url, str(args.concurrency),
                                       str(seconds)], stdout=subprocess.PIPE, text=True)
            t0 = time.monotonic()
            print("t_s\trss_kb\tfds", flush=True)
            while client.poll() is None:
                s = proc_sample(proxy.pid)
                t = time.monotonic() - t0
                series.append((t, s["rss_kb"], s["fds"]))
                print(f"{t:.0f}\t{s['rss_kb']}\t{s['fds']}", flush=True)
                time.sleep(args.sample_s)
            counts = json.loads(client.stdout.read() or "{}")
            time.sleep(2.0)
            idle = proc_sample(proxy.pid)
    finally:
        for b in backends:
            b.stop()
    half = [row for row in series if row[0] >= seconds / 2] or series
    rss_slope = slope_per_min([r[0] for r in half], [r[1] for r in half])
    fd_slope = slope_per_min([r[0] for r in half], [r[2] for r in half])
    summary = {"minutes": args.minutes, "concurrency": args.concurrency, "requests": counts,
               "rss_kb_first": series[0][1] if series else None, "rss_kb_last": series[-1][1] if series else None,
               "rss_kb_max": max(r[1] for r in series) if series else None,
               "fds_min": min(r[2] for r in series) if series else None,
               "fds_max": max(r[2] for r in series) if series else None,
               "idle_after": idle, "rss_slope_kb_per_min_second_half": round(rss_slope, 1),
               "fd_slope_per_min_second_half": round(fd_slope, 2)}
    print(json.dumps(summary, indent=2))
    if rss_slope > args.max_rss_growth_kb_per_min or fd_slope > args.max_fd_growth_per_min:
        print("FAIL: memory or fds still growing", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
