"""Overload: 3,000+ client connections against ONE proxy in front of simulated engines (issue 14 item 1).

    .venv/bin/python bench/overload.py --connections 3000 --seconds 30 --loops uvloop,asyncio

Per event loop (uvloop and asyncio side by side), with the DEFAULT proxy config (policy capacity, hold queue
1024, front-door accept thread on):
  1. unloaded: `--unloaded-requests` streaming requests one at a time -> TTFT p50/p99 (the reference);
  2. overload: `--connections` keep-alive clients (in `--workers` subprocesses, raw asyncio: cheap) send
     streaming requests back to back for `--seconds`; a 429/503 is waited out as its Retry-After says. A thread
     of this process probes /health (and /ready) every 50 ms on fresh connections, as a kubelet does; another
     samples the proxy's RSS and the listening socket's accept-queue length (/proc/net/tcp) every 0.25 s.
Reported: /health p50/p99/max and timeouts, the 429s (count, latency p50/p99), the admitted requests' TTFT
p50/p99 (and how much of it was spent held), the most connections seen waiting in the kernel backlog, the
peak RSS. Targets (issue 14): /health p99 < 100 ms, 429 within 50 ms, admitted p99 TTFT within 2x unloaded.

Engines are `capbalancer sim` processes (vLLM API, continuous batching modelled from a profile); the load
generator and the engines share the machine with the proxy, so on a small box the figures are a lower
bound on what the proxy alone would do. `--json FILE` writes everything measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

sys.path.insert(0, str(REPO / "bench"))
from cpus import keep_off, parse_cpus, pin_group  # noqa: E402
from faults import ADMIN_TOKEN_ENV, Proxy, proc_rss_kb  # noqa: E402
from support import PYTHON, capbalancer, free_port, running  # noqa: E402

PROFILE = "a100-80g/llama-2-7b-tp1"
STEADY_AFTER_S = 5.0
HEAVY_REGIME_429_PER_200 = 0.3  # the heavy runs measured 0.6-0.9 429s per 200, the light ones 0.08-0.15


def request_bytes(max_tokens: int) -> bytes:
    body = json.dumps({"model": "m", "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "Tell me about load balancing. " * 8}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


# --- client worker (a subprocess) ---------------------------------------------------------------------------

# Where a 429 was decided, told by its message (the door's and the scheduler's refusals say different things).
REFUSAL_SOURCES = (
    (b"every hold queue of the proxy is full", "door: queues full"),
    (b"objective; retry later", "door: cannot start in time"),
    (b"overload needs; retry later", "door: queue at its bound"),
    (b"hold queue is full; retry later", "door: queue full"),
    (b"cannot start within its time-to-first-token objective", "scheduler: cannot start in time"),
    (b"as long as this sustained overload needs", "scheduler: queue at its bound"),
    (b"hold queue would take", "scheduler: queue too slow"),
    (b"seats for held requests", "scheduler: seats forecast"),
    (b"keep service fair", "scheduler: fair shedding"),
    (b"hold queue is full", "scheduler: queue full"),
    (b"held past its deadline", "held, then expired"),
    (b"cannot start before its deadline", "held, then refused at release"),
)


def refusal_source(body: bytes) -> str:
    return next((name for text, name in REFUSAL_SOURCES if text in body), "other")


async def _read_response(reader: asyncio.StreamReader, t0: float
                         ) -> tuple[int, dict[str, str], float | None, bytes]:
    """Status, headers, seconds to the first SSE event (None when no event came), and a non-chunked body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name:
            headers[name.strip().lower().decode()] = value.strip().decode()
    first: float | None = None
    body = b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            data = await reader.readexactly(size + 2)
            if first is None and b"data:" in data:
                first = time.monotonic() - t0
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, first, body


async def _connection(host: str, port: int, until: float, req: bytes, out: dict[str, Any]) -> None:
    t_conn = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), 30)
    except (OSError, TimeoutError) as exc:
        out["errors"][f"connect {type(exc).__name__}"] = out["errors"].get(f"connect {type(exc).__name__}", 0) + 1
        return
    out["connect_s"].append(time.monotonic() - t_conn)
    reused = False  # a request on a kept-alive connection meets the event loop, a new one the front door
    try:
        while time.monotonic() < until:
            t0 = time.monotonic()
            writer.write(req)
            status, headers, first, body = await asyncio.wait_for(_read_response(reader, t0), 120)
            took = time.monotonic() - t0
            if status == 200:
                out["ttft_s"].append(first if first is not None else took)
                if t0 >= out["steady_from"]:
                    out["steady_ttft_s"].append(first if first is not None else took)
                out["held_ms"].append(int(headers.get("x-capbalancer-held-ms", "0")))
            else:
                out["status"].setdefault(str(status), []).append(took)
                if status == 429 and t0 >= out["steady_from"]:
                    out["steady_429_s"].append(took)
                if status == 429:
                    where = "kept-alive connection" if reused else "new connection"
                    source = f"{refusal_source(body)} ({where})"
                    out["refusals"].setdefault(source, []).append(took)
                    # When in the run the slow ones (over 50 ms) were sent: the onset, or all along.
                    if took > 0.05:
                        second = str(int(t0 - out["start"]))
                        slow = out["slow_429_by_second"].setdefault(source, {})
                        slow[second] = slow.get(second, 0) + 1
            reused = True
            if status in (429, 503):
                await asyncio.sleep(float(headers.get("retry-after", "1")))
            if headers.get("connection", "").lower() == "close":
                writer.close()
                return await _connection(host, port, until, req, out)
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
        out["errors"][type(exc).__name__] = out["errors"].get(type(exc).__name__, 0) + 1
    finally:
        writer.close()


async def _own_lag(until: float, out: dict[str, Any], every_s: float = 0.05) -> None:
    """The load generator's own loop lag: every latency it measures includes it (it shares the box's cores)."""
    while time.monotonic() < until:
        asked = time.monotonic()
        await asyncio.sleep(every_s)
        out["client_lag_s"].append(max(0.0, time.monotonic() - asked - every_s))


async def _worker(host: str, port: int, connections: int, seconds: float, max_tokens: int, start_at: float) -> dict:
    out: dict[str, Any] = {"ttft_s": [], "held_ms": [], "status": {}, "errors": {}, "connect_s": [],
                           "refusals": {}, "client_lag_s": [], "steady_ttft_s": [], "steady_429_s": [],
                           "slow_429_by_second": {}}
    await asyncio.sleep(max(0.0, start_at - time.time()))
    until = time.monotonic() + seconds
    # After the onset: the first STEADY_AFTER_S of a run are the overload's onset (the queue's first fill, no drain
    # measured yet); what follows is the sustained overload, reported apart.
    out["start"] = time.monotonic()
    out["steady_from"] = out["start"] + min(STEADY_AFTER_S, seconds / 2)
    req = request_bytes(max_tokens)
    await asyncio.gather(_own_lag(until, out), *(_connection(host, port, until, req, out) for _ in range(connections)))
    return out


def worker_main(args: argparse.Namespace) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out = asyncio.run(_worker("127.0.0.1", args.port, args.connections, args.seconds, args.max_tokens,
                              args.start_at))
    Path(args.out).write_text(json.dumps(out))


# --- probes and samples (threads of this process) -------------------------------------------------------------

def probe_once(port: int, path: str, timeout_s: float = 2.0) -> float | None:
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"GET %s HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n" % path.encode())
            data = s.recv(4096)
        if not data.startswith(b"HTTP/1.1 "):
            return None
        return time.monotonic() - t0
    except OSError:
        return None


def listen_queue(port: int) -> int:
    """Connections waiting in the kernel's accept queue of the socket listening on `port` (LISTEN rx_queue)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        total += int(cols[4].split(":")[1], 16)
        except OSError:
            pass
    return total


class Watch(threading.Thread):
    def __init__(self, fn, every_s: float) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.fn, self.every_s = fn, every_s
        self.values: list[Any] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.values.append(self.fn())
            time.sleep(self.every_s)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def pms(values: list[float], q: float) -> float | None:
    """Percentile q of `values` (seconds), in milliseconds."""
    v = pct(values, q)
    return None if v is None else v * 1000


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (or one of its threads) so far; 0 once it is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_ids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


class CpuShare:
    """Where the box's CPU went during the overload (cores busy, averaged): the proxy's event-loop thread, its
    other threads (the front door), the engines, the load generator. On a small shared box every latency the
    bench reports includes waiting for a core, so this says whose work it waited behind."""

    def __init__(self, proxy_pid: int, engine_pids: list[int], worker_pids: list[int]) -> None:
        self.proxy_pid, self.engine_pids, self.worker_pids = proxy_pid, engine_pids, worker_pids
        self.start_s = time.monotonic()
        self.start = self.sample()

    def sample(self) -> dict[str, float]:
        main = cpu_seconds(self.proxy_pid, self.proxy_pid)
        return {"proxy_loop": main, "proxy_other_threads": cpu_seconds(self.proxy_pid) - main,
                "engines": sum(cpu_seconds(p) for p in self.engine_pids),
                "load_generator": sum(cpu_seconds(p) for p in self.worker_pids)}

    def cores(self) -> dict[str, float]:
        end, elapsed = self.sample(), time.monotonic() - self.start_s
        return {k: round((end[k] - self.start[k]) / elapsed, 2) for k in end}


# --- one run ------------------------------------------------------------------------------------------------

def admin_view(port: int) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/admin/backends", headers={"Authorization": "Bearer bench"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())
    except OSError:
        return {}


def proxy_ttfb_ms(port: int) -> dict[str, float | None]:
    """The proxy's own time to first byte (from when its loop read the request, all backends), p50/p99 as the
    upper bound of the histogram bucket that holds them: set against the client's TTFT, the difference is the
    time a request waited before the loop read it."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("capbalancer_time_to_first_byte_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    if not buckets or not buckets.get(float("inf")):
        return {}
    total = buckets[float("inf")]

    def q(f: float) -> float | None:
        for bound in sorted(buckets):
            if buckets[bound] >= f * total:
                return bound * 1000 if bound != float("inf") else None
        return None

    return {"p50_ms_le": q(0.5), "p99_ms_le": q(0.99)}


def unloaded_ttft(port: int, n: int, max_tokens: int) -> list[float]:
    async def run() -> list[float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        out = []
        req = request_bytes(max_tokens)
        for _ in range(n):
            t0 = time.monotonic()
            writer.write(req)
            status, _, first, _ = await _read_response(reader, t0)
            if status == 200 and first is not None:
                out.append(first)
        writer.close()
        return out

    return asyncio.run(run())


def run_one(variant: str, engines: list[str], args: argparse.Namespace, engine_pids: list[int]) -> dict[str, Any]:
    """`variant`: an event loop (uvloop, asyncio), `+noaccept` to accept on the loop (server.accept_thread off,
    the behaviour before issue 14) for comparison."""
    loop, _, flag = variant.partition("+")
    config: dict[str, Any] = {"models": {"m": {"backends": [
        {"url": u, "name": f"sim{i}", "engine": "vllm", "profile": PROFILE} for i, u in enumerate(engines)]}}}
    if args.policy_option:  # e.g. ttft_slo_ms=200: the user's own TTFT objective instead of the derived one
        config["models"]["m"]["policy_options"] = {k: float(v) for k, _, v in
                                                   (o.partition("=") for o in args.policy_option)}
    config["server"] = {"admin_token_env": ADMIN_TOKEN_ENV}  # /admin/backends at the end: the proxy's counts
    if flag == "noaccept":
        config["server"]["accept_thread"] = False
    extra = ("--loop", loop, "--log-level", "warning") + (
        ("--workers", str(args.proxy_workers)) if args.proxy_workers > 1 else ())
    with Proxy(config=config, extra_args=extra, admin_token="bench") as proxy:
        if args.proxy_cpus:
            pin_group(proxy.pid, parse_cpus(args.proxy_cpus))
        time.sleep(1.5)  # a few health/metrics polls: every engine routable and calibrated
        base = unloaded_ttft(proxy.port, args.unloaded_requests, args.max_tokens)
        tmp = tempfile.mkdtemp(prefix="capb-overload-")
        start_at = time.time() + 2.0  # every worker process imported and ready: start together
        per = [args.connections // args.workers + (1 if i < args.connections % args.workers else 0)
               for i in range(args.workers)]
        # --nice-clients: the load generator yields the CPU to the proxy and the engines (as clients on other
        # machines would): what is left of each latency is the proxy's (and the engines') own.
        workers = [subprocess.Popen([*(["nice", "-n", str(args.nice_clients)] if args.nice_clients else []),
                                     PYTHON, __file__, "--worker", "--port", str(proxy.port), "--connections",
                                     str(n), "--seconds", str(args.seconds), "--max-tokens", str(args.max_tokens),
                                     "--start-at", str(start_at), "--out", os.path.join(tmp, f"w{i}.json")])
                   for i, n in enumerate(per)]
        time.sleep(max(0.0, start_at - time.time()))
        cpu = CpuShare(proxy.pid, engine_pids, [w.pid for w in workers])
        # Sampled while every load-generator process runs (its CPU time is gone once it exits).
        cpu_watch = Watch(lambda: cpu.cores() if all(w.poll() is None for w in workers) else None, 0.5)
        health = Watch(lambda: probe_once(proxy.port, "/health"), 0.05)
        # The loop's own lag as the overload gate measures it (largest over the last 0.5 s), read via the admin
        # API every 0.5 s (that read waits for the loop too: it is late, the figure it returns is not).
        lag = Watch(lambda: admin_view(proxy.port), 0.5)
        ready = Watch(lambda: probe_once(proxy.port, "/ready"), 0.25)
        sample = Watch(lambda: (proc_rss_kb(proxy.pid), listen_queue(proxy.port)), 0.25)
        for w in (health, ready, sample, lag, cpu_watch):
            w.start()
        for p in workers:
            p.wait(timeout=args.seconds + 300)
        cores = next((c for c in reversed(cpu_watch.values) if c is not None), None)
        for w in (health, ready, sample, lag, cpu_watch):
            w.stop.set()
            w.join()
        alive = proxy.alive()
        admin = admin_view(proxy.port)
        proxy_ttfb = proxy_ttfb_ms(proxy.port)
    merged: dict[str, Any] = {"ttft_s": [], "held_ms": [], "status": {}, "errors": {}, "connect_s": [],
                              "refusals": {}, "client_lag_s": [], "steady_ttft_s": [], "steady_429_s": [],
                              "slow_429_by_second": {}}
    for i in range(args.workers):
        part = json.loads(Path(tmp, f"w{i}.json").read_text())
        merged["ttft_s"] += part["ttft_s"]
        merged["held_ms"] += part["held_ms"]
        merged["connect_s"] += part["connect_s"]
        merged["client_lag_s"] += part["client_lag_s"]
        merged["steady_ttft_s"] += part["steady_ttft_s"]
        merged["steady_429_s"] += part["steady_429_s"]
        for source, seconds in part["slow_429_by_second"].items():
            into = merged["slow_429_by_second"].setdefault(source, {})
            for second, n in seconds.items():
                into[second] = into.get(second, 0) + n
        for k, v in part["refusals"].items():
            merged["refusals"].setdefault(k, []).extend(v)
        for k, v in part["status"].items():
            merged["status"].setdefault(k, []).extend(v)
        for k, v in part["errors"].items():
            merged["errors"][k] = merged["errors"].get(k, 0) + v
    shutil.rmtree(tmp, ignore_errors=True)  # the workers' result files: merged above
    h_ok = [v for v in health.values if v is not None]
    r_ok = [v for v in ready.values if v is not None]
    r429 = merged["status"].get("429", [])
    ttft = merged["ttft_s"]
    return {
        "loop": variant, "connections": args.connections, "seconds": args.seconds, "proxy_alive": alive,
        "unloaded_ttft_p50_ms": pms(base, 0.5),
        "unloaded_ttft_p99_ms": pms(base, 0.99),
        "health_probes": len(health.values), "health_failed": len(health.values) - len(h_ok),
        "health_p50_ms": pms(h_ok, 0.5),
        "health_p99_ms": pms(h_ok, 0.99),
        "health_max_ms": max(h_ok) * 1000 if h_ok else None,
        "ready_p99_ms": pms(r_ok, 0.99), "ready_failed": len(ready.values) - len(r_ok),
        "served_200": len(ttft), "served_per_s": len(ttft) / args.seconds,
        "ttft_p50_ms": pms(ttft, 0.5), "ttft_p99_ms": pms(ttft, 0.99),
        "held_ms_p50": pct(merged["held_ms"], 0.5), "held_ms_p99": pct(merged["held_ms"], 0.99),
        "n_429": len(r429), "r429_p50_ms": pms(r429, 0.5),
        "r429_p99_ms": pms(r429, 0.99),
        # Each 429 by where it was decided: count, client-side latency p50 / p99 ms.
        "refusals": {k: (len(v), pms(v, 0.5), pms(v, 0.99)) for k, v in sorted(merged["refusals"].items())},
        "r429_within_50ms": (sum(1 for v in r429 if v <= 0.05) / len(r429)) if r429 else None,
        # Runs fall into one of two regimes that no code change decides alone (bench/results/robust5.md, fourth and
        # fifth passes): most clients refused and retrying every second or so (13-21k 429s in 30 s, 24-27k 200s), or
        # most held and served (3-5k 429s, 28-31k 200s). Compare runs within a regime.
        "regime": "heavy" if len(r429) > HEAVY_REGIME_429_PER_200 * max(1, len(ttft)) else "light",
        # After the onset (STEADY_AFTER_S): the sustained overload alone.
        "steady_429_p50_ms": pms(steady429 := merged["steady_429_s"], 0.5), "steady_429_p99_ms": pms(steady429, 0.99),
        "steady_429_within_50ms": (sum(1 for v in steady429 if v <= 0.05) / len(steady429)) if steady429 else None,
        "steady_ttft_p50_ms": pms(merged["steady_ttft_s"], 0.5),
        "steady_ttft_p99_ms": pms(merged["steady_ttft_s"], 0.99),
        "slow_429_by_second": {k: dict(sorted(v.items(), key=lambda kv: int(kv[0])))
                               for k, v in merged["slow_429_by_second"].items()},
        "client_lag_ms_p50": pms(merged["client_lag_s"], 0.5),
        "client_lag_ms_p99": pms(merged["client_lag_s"], 0.99),
        "other_status": {k: len(v) for k, v in merged["status"].items() if k != "429"},
        "other_p99_ms": {k: pms(v, 0.99) for k, v in merged["status"].items() if k != "429"},
        "errors": merged["errors"],
        "connected": len(merged["connect_s"]), "connect_p99_ms": pms(merged["connect_s"], 0.99),
        "backlog_max": max((q for _, q in sample.values), default=0),
        "rss_peak_mb": max((r for r, _ in sample.values), default=0) / 1024,
        # The proxy's own counts: held, refused at submit, expired in the queue; what the door shed at arrival.
        "pool": {k: admin.get("pools", {}).get("m", {}).get(k) for k in ("held_total", "rejected_total",
                                                                        "expired_total")},
        "overload": admin.get("overload"),
        "loop_lag_ms_p50": pct(lags := [v for a in lag.values if (v := (a.get("overload") or {}).get("loop_lag_ms"))
                                        is not None], 0.5),
        "loop_lag_ms_max": max(lags, default=None),
        # The hold queue as the loop saw it every 0.5 s: length, overload ratio, the length it allows.
        "hold_samples": [(p.get("held"), p.get("overload")) for a in lag.values
                         if (p := a.get("pools", {}).get("m")) is not None],
        "cpu_cores": cores,
        "proxy_ttfb": proxy_ttfb,
    }


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.0f}" if isinstance(v, float) else str(v)

    keys = [("loop", "event loop"), ("connections", "connections"), ("health_p50_ms", "/health p50 ms"),
            ("health_p99_ms", "/health p99 ms"), ("health_max_ms", "/health max ms"),
            ("health_failed", "/health failed"), ("ready_p99_ms", "/ready p99 ms"), ("n_429", "429s"),
            ("r429_p50_ms", "429 p50 ms"), ("r429_p99_ms", "429 p99 ms"), ("served_200", "200s"),
            ("unloaded_ttft_p99_ms", "unloaded TTFT p99 ms"), ("ttft_p50_ms", "admitted TTFT p50 ms"),
            ("ttft_p99_ms", "admitted TTFT p99 ms"), ("held_ms_p99", "held p99 ms"),
            ("backlog_max", "backlog max"), ("rss_peak_mb", "RSS peak MB"), ("errors", "client errors"),
            ("other_status", "other statuses")]
    lines = ["| " + " | ".join(label for _, label in keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f(r.get(k)) for k, _ in keys) + " |")
    return "\n".join(lines)


def refusal_table(rows: list[dict[str, Any]]) -> str:
    """Each 429 by where it was decided, with the client-side latency, and the load generator's own loop lag."""
    lines = ["| event loop | refused by | 429s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for r in rows:
        for source, (n, p50, p99) in r.get("refusals", {}).items():
            lines.append(f"| {r['loop']} | {source} | {n} | {p50:.0f} | {p99:.0f} |")
        steady = r.get("steady_429_within_50ms")
        lines.append(f"| {r['loop']} | after the first {STEADY_AFTER_S:.0f} s: within 50 ms "
                     f"{steady * 100 if steady is not None else 0:.0f}% | | {r.get('steady_429_p50_ms') or 0:.0f} | "
                     f"{r.get('steady_429_p99_ms') or 0:.0f} |")
        lines.append(f"| {r['loop']} | after the first {STEADY_AFTER_S:.0f} s: admitted TTFT | | "
                     f"{r.get('steady_ttft_p50_ms') or 0:.0f} | {r.get('steady_ttft_p99_ms') or 0:.0f} |")
        share = r.get("r429_within_50ms")
        lines.append(f"| {r['loop']} | regime: {r.get('regime')} (compare runs within one) | | | |")
        lines.append(f"| {r['loop']} | all: within 50 ms {share * 100 if share is not None else 0:.0f}% | "
                     f"{r.get('n_429')} | load generator's own loop lag p50 {r.get('client_lag_ms_p50') or 0:.0f} ms,"
                     f" p99 {r.get('client_lag_ms_p99') or 0:.0f} ms | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--unloaded-requests", type=int, default=40)
    ap.add_argument("--loops", default="uvloop,asyncio",
                    help="comma-separated: uvloop, asyncio, and either with +noaccept (accept on the event loop)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--policy-option", action="append", default=[], metavar="NAME=NUMBER",
                    help="a capacity policy option for the proxy (repeatable), e.g. ttft_slo_ms=200")
    ap.add_argument("--nice-clients", type=int, default=0,
                    help="run the load generator at this nice level (0: same priority as the proxy)")
    ap.add_argument("--proxy-workers", type=int, default=1,
                    help="`serve --workers N` (each worker's front door takes part of the connections; the figures "
                         "read from /admin/backends and the loop's CPU are one worker's)")
    ap.add_argument("--proxy-cpus", default=None, metavar="0,1",
                    help="pin the proxy (every thread) to these cores and the engines and the load generator to the "
                         "others (bench/cpus.py): on a host with cores to spare")
    # worker mode (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.proxy_cpus:
        keep_off(parse_cpus(args.proxy_cpus))
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the workers inherit it
    ports = [free_port() for _ in range(args.engines)]
    rows = []
    with contextlib.ExitStack() as stack:
        engine_pids = [stack.enter_context(running(capbalancer("sim", "--engine", "vllm", "--profile", PROFILE,
                                                               "--model", "m", "--port", str(p)),
                                                   ready_url=f"http://127.0.0.1:{p}/health")).pid for p in ports]
        engines = [f"http://127.0.0.1:{p}" for p in ports]
        for loop in args.loops.split(","):
            row = run_one(loop, engines, args, engine_pids)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows))
    print(refusal_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
