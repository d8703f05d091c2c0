"""Load held: many concurrent open streaming requests on ONE proxy process; RSS and fds before/during/after.

    .venv/bin/python bench/concurrency.py --streams 10000 --backends 4 --workers 4

Backends are fault servers (tests/faults.py) in `hold` mode: each stream sends its first chunk and then
stays open until released, so every request is open through the proxy at the same moment. Client worker
processes (aiohttp, so 10,000 sockets stay cheap) open their share, report when all are open, and read
every stream to its end once the backends are released. The proxy's RSS and fd count come from /proc.

fd budget: a stream in flight costs the proxy two sockets (client side and upstream). The hard
RLIMIT_NOFILE here is 20,000, which a plain process cannot raise, so 10,000 in flight would need ~20,050
fds: `--held` makes that many of the streams wait in the proxy's hold queue (one socket each), using the
capacity policy with a profile whose `max_num_seqs` caps what each backend takes. The script raises the
soft limit to the hard one; the proxy and the workers inherit it.

After the run it samples again at +3 s (client sockets must all be gone; idle upstream keep-alive
connections may remain) and at +`--wait-pool` s (aiohttp has closed idle pooled connections by ~2x its
60 s keep-alive timeout: fds should be back to the idle figure).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from faults import FaultBackend, Proxy, proc_sample, proc_tcp_sockets, proxy_config  # noqa: E402

PROFILE = REPO / "profiles" / "h100-80g" / "llama-2-13b-tp1.yaml"


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- client worker (a subprocess: its sockets do not count against the proxy or this script) -------

async def _worker(url: str, streams: int, open_timeout_s: float, total_timeout_s: float) -> None:
    import aiohttp

    body = json.dumps({"model": "m", "stream": True, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    first_chunk = 0
    outcome: dict[str, int] = {}
    all_open = asyncio.Event()
    started = asyncio.Event()

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal first_chunk
        got_first = False
        try:
            async with session.post(url + "/v1/chat/completions", data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
                if resp.status != 200:
                    key = f"http_{resp.status}"
                    await resp.read()
                else:
                    data = b""
                    async for chunk in resp.content.iter_any():
                        if not got_first:
                            got_first = True
                            first_chunk += 1
                            if first_chunk == streams:
                                all_open.set()
                        data += chunk
                    key = "complete" if data.rstrip().endswith(b"data: [DONE]") else "truncated"
        except Exception as exc:  # counted by kind: the report says what failed
            key = type(exc).__name__
        if not got_first:
            first_chunk_missing.append(1)
        outcome[key] = outcome.get(key, 0) + 1

    first_chunk_missing: list[int] = []
    timeout = aiohttp.ClientTimeout(total=total_timeout_s)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = []
        for i in range(streams):
            tasks.append(asyncio.create_task(one(session)))
            if i % 200 == 199:
                await asyncio.sleep(0.01)  # pace the connects: the proxy's accept backlog is finite
        started.set()
        # All requests are written; the orchestrator watches the proxy and backends to see them open.
        print(json.dumps({"event": "sent"}), flush=True)
        # Wait for the release (held streams get their first chunk only when dispatched).
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(all_open.wait(), open_timeout_s)
        except asyncio.TimeoutError:
            pass
        print(json.dumps({"event": "open", "streaming": first_chunk, "pending": streams - first_chunk,
                          "open_s": round(time.monotonic() - t0, 2)}), flush=True)
        await asyncio.gather(*tasks)
    print(json.dumps({"event": "done", "outcome": outcome}), flush=True)


def held_gauge(proxy: Proxy) -> int:
    for line in proxy.metrics_text().splitlines():
        if line.startswith("capbalancer_held_requests "):
            return int(float(line.split()[1]))
    return 0


def proxy_config_for(backends: list[FaultBackend], per_backend: int, held: int) -> dict:
    """least_requests when everything fits in the fd limit; else the capacity policy with a profile whose
    max_num_seqs is `per_backend`, so the rest wait in the proxy's hold queue (one socket each)."""
    if not held:
        return proxy_config(backends, policy="least_requests")
    import atexit
    import shutil
    import tempfile

    import yaml

    profile = yaml.safe_load(PROFILE.read_text())
    # Seats are the only limit: KV far larger than needed, the batch knee off (knee_throughput_fraction 1).
    profile.update(name="bench/hold-seats", max_num_seqs=per_backend, kv_capacity_tokens=10**9,
                   source="hand", notes="bench/concurrency.py: a seat limit, so that some requests are held")
    folder = tempfile.mkdtemp(prefix="capb-bench-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the proxy reads it for the whole run
    path = Path(folder) / "seats.yaml"
    path.write_text(yaml.safe_dump(profile))
    cfg = proxy_config(backends, policy="capacity", overrides={
        "timeouts": {"first_byte_s": 600, "stream_idle_s": 600, "total_s": 900}})
    pool = cfg["models"]["m"]
    # Hold as long as it takes (no TTFT objective): this bench measures held connections, not goodput.
    pool["policy_options"] = {"knee_throughput_fraction": 1.0, "ttft_objective_factor": 0,
                              "tpot_objective_factor": 0}
    pool["hold"] = {"max_requests": held + 1000, "timeout_s": 600}
    for row in pool["backends"]:
        row["profile"] = str(path)
    return cfg


# --- orchestrator -------------------------------------------------------------------------------------

def run(streams: int, n_backends: int, n_workers: int, held: int, open_timeout_s: float,
        proxy_env: dict[str, str] | None = None, verbose: bool = True, wait_pool_s: float = 0.0) -> dict:
    limit = raise_fd_limit()
    in_flight = streams - held
    per_backend = -(-in_flight // n_backends)
    # /metrics 404: no engine snapshot, so the profile's seats and KV are what the scheduler reads.
    backends = [FaultBackend(f"h{i}", api="hold", hold_s=600.0, chunks=3, metrics="404" if held else "ok")
                for i in range(n_backends)]
    report: dict = {"streams": streams, "held_target": held, "backends": n_backends, "fd_limit": limit}
    try:
        for b in backends:
            b.start()
        with Proxy(config=proxy_config_for(backends, per_backend, held), env=proxy_env) as proxy:
            pid = proxy.pid
            time.sleep(1.0)
            report["before"] = proc_sample(pid)
            share = [streams // n_workers + (1 if i < streams % n_workers else 0) for i in range(n_workers)]
            workers = [subprocess.Popen([sys.executable, __file__, "--worker", proxy.url, str(k),
                                         str(open_timeout_s)], stdout=subprocess.PIPE, text=True)
                       for k in share]
            t0 = time.monotonic()
            for w in workers:
                json.loads(w.stdout.readline())  # "sent"
            # Open = streaming on a backend through the proxy, or held in the proxy's queue.
            deadline = time.monotonic() + open_timeout_s
            while True:
                on_backends = sum(b.stats()["inflight"] for b in backends)
                held_now = held_gauge(proxy)
                if on_backends + held_now >= streams or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            report["open_s"] = round(time.monotonic() - t0, 2)
            report["open_on_backends"] = on_backends
            report["held_in_proxy"] = held_now
            samples = []
            for _ in range(3):
                samples.append(proc_sample(pid))
                time.sleep(0.5)
            report["during"] = {**max(samples, key=lambda s: s["rss_kb"]),
                                **proc_tcp_sockets(pid, proxy.port)}
            # Release in waves until every worker has read every stream to its end: held requests take
            # the seats the finished ones free and must be released in turn.
            stop = threading.Event()

            def keep_releasing() -> None:
                while not stop.wait(0.3):
                    for b in backends:
                        with contextlib.suppress(OSError):
                            b.release()

            releaser = threading.Thread(target=keep_releasing, daemon=True)
            releaser.start()
            opened = [json.loads(w.stdout.readline()) for w in workers]
            report["first_chunk_received"] = sum(o["streaming"] for o in opened)
            done = [json.loads(w.stdout.readline()) for w in workers]
            for w in workers:
                w.wait(timeout=60)
            stop.set()
            releaser.join()
            outcome: dict[str, int] = {}
            for d in done:
                for k, v in d["outcome"].items():
                    outcome[k] = outcome.get(k, 0) + v
            report["outcome"] = outcome
            report["all_done_s"] = round(time.monotonic() - t0, 2)
            # Right after: client sockets must be gone; idle upstream keep-alive connections may remain in the
            # pools (aiohttp keeps them keepalive_timeout=60 s), so they are counted apart.
            time.sleep(3.0)
            report["after"] = {**proc_sample(pid), **proc_tcp_sockets(pid, proxy.port)}
            if wait_pool_s:
                time.sleep(wait_pool_s)
                report[f"after_{wait_pool_s:g}s"] = {**proc_sample(pid), **proc_tcp_sockets(pid, proxy.port)}
            report["proxy_alive"] = proxy.alive()
    finally:
        for b in backends:
            b.stop()
    if verbose:
        print(json.dumps(report, indent=2))
    return report


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        raise_fd_limit()
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(_worker(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), 600.0))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--held", type=int, default=None,
                        help="streams left in the proxy's hold queue (default: whatever the fd limit needs)")
    parser.add_argument("--open-timeout", type=float, default=180.0)
    parser.add_argument("--wait-pool", type=float, default=140.0,
                        help="seconds to wait after the run for idle upstream connections to expire, then sample")
    args = parser.parse_args()
    limit = raise_fd_limit()
    held = args.held
    if held is None:  # two sockets per stream in flight, one per held stream, ~200 for the rest
        held = max(0, 2 * args.streams + 200 - limit)
    run(args.streams, args.backends, args.workers, held, args.open_timeout, wait_pool_s=args.wait_pool)


if __name__ == "__main__":
    main()
