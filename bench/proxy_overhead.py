"""What the proxy costs: the same load direct to a backend and through `capbalancer serve`, side by side.

    .venv/bin/python bench/proxy_overhead.py                 # ~1 minute, loopback only
    .venv/bin/python bench/proxy_overhead.py --seconds 3 --policy round_robin
    .venv/bin/python bench/proxy_overhead.py --seconds 6 --baseline HEAD   # also the committed proxy

A backend that answers at once (aiohttp, one process) stands in for the engine, so every microsecond
measured is the proxy's. Phases, each run direct and then through the proxy:
  light      one request at a time (non-streaming): p50/p99 latency, added latency
  saturated  `--concurrency` requests in flight (non-streaming): requests/s, p50/p99
  stream     one stream at a time, `--events` SSE events each: p50 time to last event
  stream-sat `--concurrency` streams in flight: SSE events/s relayed
Client, proxy and backend share this machine's cores, as in the issue's reference figures.
`--baseline REF` also runs the proxy as of git REF (exported to a temporary folder), interleaved with the
others in every round, so a change is compared with its predecessor under the same background load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BODY = b'{"model":"m","messages":[{"role":"user","content":"Hello there, how are you?"}],"max_tokens":16}'
STREAM_BODY = b'{"model":"m","messages":[{"role":"user","content":"Hello"}],"max_tokens":16,"stream":true}'
ANSWER = (b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
          b'"message":{"role":"assistant","content":"Fine, thanks."},"finish_reason":"stop"}],'
          b'"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}')


def serve_backend(port: int, events: int) -> None:
    from aiohttp import web

    event = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":'
             b'[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}\n\n')

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b'"stream":true' not in body:
            return web.Response(body=ANSWER, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(events):
            await resp.write(event)  # one write per event, as an engine sends them
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(url)


@dataclass
class Result:
    requests: int
    events: int
    seconds: float
    latencies_s: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def eps(self) -> float:
        return self.events / self.seconds

    def merge(self, other: Result) -> Result:
        return Result(self.requests + other.requests, self.events + other.events, self.seconds + other.seconds,
                      self.latencies_s + other.latencies_s)

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_s)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000.0 if xs else float("nan")


async def run_load(url: str, body: bytes, concurrency: int, seconds: float, stream: bool) -> Result:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=60)
    latencies: list[float] = []
    counts = {"requests": 0, "events": 0, "errors": 0}
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm the connection pool (and the proxy's) before timing.
        for _ in range(min(concurrency, 8) * 5):
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as r:
                    if stream:
                        n = 0
                        async for chunk in r.content.iter_any():
                            n += chunk.count(b"data:")
                        counts["events"] += n
                    else:
                        await r.read()
                    if r.status != 200:
                        counts["errors"] += 1
                latencies.append(time.perf_counter() - t0)
                counts["requests"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if counts["errors"]:
        raise RuntimeError(f"{url}: {counts['errors']} non-200 answers")
    return Result(counts["requests"], counts["events"], elapsed, latencies)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc): what one request costs, whatever else runs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_value(r: Result, key: str, cpu_s: float) -> float:
    if key == "cpu":
        return cpu_s / r.requests * 1e6
    if key == "p50":
        return r.pct(0.5)
    if key == "p99":
        return r.pct(0.99)
    return r.rps if key == "rps" else r.eps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="per phase and target")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--events", type=int, default=100, help="SSE events per streamed response")
    p.add_argument("--policy", default=None, help="proxy routing policy (default: the proxy's default)")
    p.add_argument("--rounds", type=int, default=4,
                   help="direct and proxy alternate this many times per phase, so background load hits both alike")
    p.add_argument("--baseline", default=None, metavar="REF",
                   help="also run the proxy as of this git ref (e.g. HEAD) as a third target")
    p.add_argument("--serve-backend", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_backend is not None:
        serve_backend(args.serve_backend, args.events)
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    bport, pport = free_port(), free_port()
    logdir = tempfile.mkdtemp(prefix="capb-bench-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(os.path.join(logdir, "backend.log"), "wb") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, "--serve-backend", str(bport), "--events",
                                           str(args.events)], stdout=log, stderr=subprocess.STDOUT))
        backend = f"http://127.0.0.1:{bport}"
        wait_up(backend, procs[0])
        cmd = [sys.executable, "-m", "capbalancer.cli", "serve", "--backend", backend, "--port", str(pport),
               "--log-level", "warning"]
        if args.policy:
            cmd += ["--policy", args.policy]
        with open(os.path.join(logdir, "proxy.log"), "wb") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO)))
        proxy = f"http://127.0.0.1:{pport}"
        wait_up(proxy, procs[1])
        targets = [("direct", backend, procs[0].pid), ("proxy", proxy, procs[1].pid)]
        if args.baseline:
            basedir = os.path.join(logdir, "baseline")
            os.makedirs(basedir)
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline, "capbalancer"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", basedir], input=archive, check=True)
            qport = free_port()
            qcmd = [c if c != str(pport) else str(qport) for c in cmd]
            with open(os.path.join(logdir, "baseline.log"), "wb") as log:
                procs.append(subprocess.Popen(qcmd, stdout=log, stderr=subprocess.STDOUT, cwd=basedir,
                                              env={**os.environ, "PYTHONPATH": basedir}))
            wait_up(f"http://127.0.0.1:{qport}", procs[2])
            targets.append((f"base:{args.baseline}", f"http://127.0.0.1:{qport}", procs[2].pid))

        phases = [("light (c=1)", BODY, 1, False), (f"saturated (c={args.concurrency})", BODY, args.concurrency, False),
                  (f"stream x{args.events} (c=1)", STREAM_BODY, 1, True),
                  (f"stream x{args.events} (c={args.concurrency})", STREAM_BODY, args.concurrency, True)]
        print(f"proxy overhead: {args.seconds:g}s per phase and target, backend answers at once; "
              f"policy={args.policy or 'default'}; cpus={os.cpu_count()}")
        names = [t[0] for t in targets]
        head = f"{'phase':<24} {'metric':<12} {'direct':>10}"
        for n in names[1:]:
            head += f" {n:>10} {'ratio':>6} {'added':>8}"
        print(head)
        for name, body, conc, stream in phases:
            res: dict[str, Result] = {}
            cpu = dict.fromkeys(names, 0.0)
            slice_s = args.seconds / args.rounds
            for _ in range(args.rounds):
                for tname, url, pid in targets:
                    c0 = cpu_seconds(pid)
                    r = asyncio.run(run_load(url + "/v1/chat/completions", body, conc, slice_s, stream))
                    cpu[tname] += cpu_seconds(pid) - c0
                    res[tname] = r if tname not in res else res[tname].merge(r)
            metrics: list[tuple[str, str, bool]] = [("req/s", "rps", False), ("p50 ms", "p50", True),
                                                    ("p99 ms", "p99", True)]
            if stream:
                metrics.insert(1, ("events/s", "eps", False))
            # Warm-up requests are not counted in `requests`, so CPU per request is a slight overestimate.
            # direct: the backend process's CPU; a proxy: the proxy process's own CPU.
            metrics.append(("cpu us/req", "cpu", False))
            for metric, key, show_added in metrics:
                vals = {t: metric_value(res[t], key, cpu[t]) for t in names}
                dv = vals["direct"]
                line = f"{name:<24} {metric:<12} {dv:>10.3f}"
                for tname in names[1:]:
                    xv = vals[tname]
                    ratio = xv / dv if dv else float("nan")
                    added = f"{xv - dv:+.3f}" if show_added else ""
                    line += f" {xv:>10.3f} {ratio:>6.2f} {added:>8}"
                print(line)
        print(f"(added = proxy - direct; logs in {logdir})")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
