"""CPU per request of each stage of the proxy's request path, function by function, under wrk load (issue 17).

    .venv/bin/python bench/dataplane_probe.py [--seconds 8] [--connections 128]

Starts the instant backend of bench/proxy_overhead.py and one capbalancer process (this tree, default policy,
access log on) whose named functions (PROBES) are wrapped to add up the thread's CPU time spent inside each
(`time.thread_time_ns`, inclusive of what they call; a coroutine's steps only, not its waits), drives it with wrk as bench/dataplane.py does, and prints
each function's CPU microseconds per request and calls per request, largest first.

Read it with care: each probe costs ~1 µs of CPU itself (two clock reads through a system call), which inflates
every enclosing function, and the whole path's figure is higher than bench/dataplane.py's. The shares, not the
absolute numbers, are the point. bench/dataplane_parts.py gives the uninstrumented split.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

# (module, attribute path, label): the request path from the fast server down to the scheduler and back.
PROBES: list[tuple[str, str, str]] = [
    ("capbalancer.server.fastserver", "FastProtocol._respond", "fast server: the request's task (all of it)"),
    ("capbalancer.server.fastserver", "_observed", "observe + proxy.handle"),
    ("capbalancer.server.fastserver", "_send_plain", "fast server: write the answer"),
    ("capbalancer.server.observe", "Observer.begin", "observe: begin"),
    ("capbalancer.server.observe", "Observer.end", "observe: end (tokens, access line)"),
    ("capbalancer.server.access_log", "emit", "access line"),
    ("capbalancer.server.proxy", "handle", "proxy.handle"),
    ("capbalancer.server.proxy", "read_body", "read body"),
    ("capbalancer.server.proxy", "parse_route", "parse body (route_parsing)"),
    ("capbalancer.server.proxy", "resolve_pool", "resolve pool"),
    ("capbalancer.server.proxy", "build_demand", "build demand"),
    ("capbalancer.server.proxy", "prefix_key", "prefix keys"),
    ("capbalancer.server.proxy", "pinned_backends", "pinned backends"),
    ("capbalancer.server.proxy", "Forward.run", "Forward.run (decision + attempt)"),
    ("capbalancer.server.proxy", "Forward.attempt", "attempt (upstream exchange, answer)"),
    ("capbalancer.server.driver", "SchedulerDriver.submit", "scheduler: submit"),
    ("capbalancer.server.driver", "SchedulerDriver.finish", "scheduler: finish"),
    ("capbalancer.server.upstream_http", "UpstreamPool.request", "upstream: send, wait for the head"),
    ("capbalancer.server.upstream_http", "UpstreamResponse.read", "upstream: read body"),
    ("capbalancer.server.relay", "response_headers", "upstream: answer headers"),
    ("capbalancer.server.relay", "usage_from_body", "answer: usage tokens"),
]

# The serving process: PROBES wrapped, totals written to $PROBE_OUT on SIGUSR1, then exit.
CHILD = r'''
import collections, functools, importlib, inspect, json, os, signal, sys, time
TOTAL_NS = collections.Counter(); CALLS = collections.Counter()
def wrap(owner, name, label):
    raw = inspect.getattr_static(owner, name)
    f = getattr(owner, name)
    clock = time.thread_time_ns
    if inspect.iscoroutinefunction(f):
        class Steps:  # times each step of the coroutine, not the waits between them (other tasks run then)
            __slots__ = ("coro",)
            def __init__(self, coro):
                self.coro = coro
            def __await__(self):
                coro, value, error = self.coro, None, None
                CALLS[label] += 1
                while True:
                    t = clock()
                    try:
                        yielded = coro.send(value) if error is None else coro.throw(error)
                    except StopIteration as stop:
                        return stop.value
                    finally:
                        TOTAL_NS[label] += clock() - t
                    try:
                        value, error = (yield yielded), None
                    except BaseException as exc:
                        value, error = None, exc
        async def w(*a, **k):  # a coroutine still (create_task takes only those)
            return await Steps(f(*a, **k))
    else:
        def w(*a, **k):
            t = clock()
            try:
                return f(*a, **k)
            finally:
                TOTAL_NS[label] += clock() - t; CALLS[label] += 1
    w = functools.wraps(f)(w)
    setattr(owner, name, staticmethod(w) if isinstance(raw, staticmethod) else w)
for module, path, label in json.loads(os.environ["PROBES"]):
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    wrap(owner, name, label)
def dump(*_):
    with open(os.environ["PROBE_OUT"], "w") as out:
        json.dump({"ns": TOTAL_NS, "calls": CALLS}, out)
    os._exit(0)
signal.signal(signal.SIGUSR1, dump)
sys.argv = ["capbalancer", *sys.argv[1:]]
from capbalancer.cli import main
main()
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--connections", type=int, default=128)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(BENCH))
    from dataplane import write_config
    from proxy_overhead import BODY, free_port, wait_up
    from workers import WRK_SCRIPT, stop_all, wrk_rps

    tmp = tempfile.mkdtemp(prefix="capb-probe-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        script = os.path.join(tmp, "post.lua")
        Path(script).write_text(WRK_SCRIPT.format(body=BODY.decode()))
        bport, port = free_port(), free_port()
        backend = f"http://127.0.0.1:{bport}"
        procs.append(subprocess.Popen([sys.executable, str(BENCH / "proxy_overhead.py"), "--serve-backend",
                                       str(bport)], cwd=str(REPO), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        wait_up(backend, procs[0])
        cfg = Path(tmp) / "proxy.yaml"
        write_config(cfg, backend, port, {})
        out = Path(tmp) / "probe.json"
        env = {**os.environ, "PYTHONPATH": str(REPO), "PROBES": json.dumps(PROBES), "PROBE_OUT": str(out)}
        proxy = subprocess.Popen([sys.executable, "-c", CHILD, "serve", "--config", str(cfg), "--log-level",
                                  "warning"], cwd=str(REPO), env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proxy)
        wait_up(f"http://127.0.0.1:{port}", proxy)
        time.sleep(1.0)
        rps, bad = wrk_rps(f"http://127.0.0.1:{port}/v1/chat/completions", args.seconds, args.connections, script)
        os.kill(proxy.pid, signal.SIGUSR1)
        proxy.wait(15)
        data = json.loads(out.read_text())
        n = max(1, data["calls"].get(PROBES[0][2], 1))
        print(f"wrk -c{args.connections} {args.seconds:g} s: {rps:.0f} req/s, {bad} non-2xx; {n} requests probed")
        print("| stage | CPU us/request | calls/request |\n|---|---|---|")
        for label, ns in sorted(data["ns"].items(), key=lambda kv: -kv[1]):
            print(f"| {label} | {ns / n / 1000:.1f} | {data['calls'][label] / n:.2f} |")
        return 0
    finally:
        stop_all(procs, tmp)


if __name__ == "__main__":
    sys.exit(main())
