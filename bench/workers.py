"""`serve --workers N` against one worker and vllm-router, side by side in one interleaved run (issue 17).

    .venv/bin/python bench/workers.py [--seconds 20] [--rounds 4] [--connections 128] [--workers 2]
                                      [--no-vllm-router] [--cache-dir ~/.cache/capbalancer-peers]
                                      [--proxy-cpus 0,1]

An instant backend (bench/proxy_overhead.py's: aiohttp, one process) stands in for the engine; wrk (Debian
`wrk`) drives non-streamed chat completions with `--connections` connections. Targets, each in turn per
round so background load hits them alike: direct to the backend, capbalancer with one process, capbalancer
`--workers N` (sharing through the local redis-server it starts), and vllm-router (PyPI, pip-installed into
its own venv under --cache-dir, as bench/peers.py does) with round_robin. All with the default policy
(capacity) for capbalancer. Prints req/s per target and the ratios to direct and to one worker.
Client, backend and proxies share this machine's cores, unless `--proxy-cpus` gives each router cores of its own.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from cpus import group_stats, keep_off, parse_cpus, pin_group  # noqa: E402
from proxy_overhead import BODY, free_port, wait_up  # noqa: E402

WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group `pgid` (a proxy and its workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    return sum((int(fields[11]) + int(fields[12])) / tick for _, fields in group_stats(pgid))


def children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children: the wrk runs
    return r.ru_utime + r.ru_stime


def wrk_rps(url: str, seconds: float, connections: int, script: str) -> tuple[float, int]:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "-s", script, url],
                         check=True, capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    n_bad = int(bad.group(1)) if bad else 0
    if errors:
        n_bad += sum(int(x) for x in errors.groups())
    return rps, n_bad


Target = tuple[str, str, int]  # name, base URL, process group (0: none, the backend itself)


def measure_interleaved(targets: list[Target], backend_pgid: int, seconds: float, rounds: int, connections: int,
                        script: str) -> tuple[dict[str, float], dict[str, int], dict[str, list[float]]]:
    """wrk against each target in turn, `rounds` times (so background load hits them alike). Per target: mean
    req/s, non-2xx and socket errors, and CPU seconds [backend, router (its process group), wrk] with requests."""
    totals = {t[0]: 0.0 for t in targets}
    bad = dict.fromkeys(totals, 0)
    cpu = {name: [0.0, 0.0, 0.0, 0.0] for name in totals}
    slice_s = seconds / rounds
    for _ in range(rounds):
        for name, url, pgid in targets:
            b0, r0, w0 = group_cpu_s(backend_pgid), group_cpu_s(pgid) if pgid else 0.0, children_cpu_s()
            rps, n_bad = wrk_rps(url + "/v1/chat/completions", slice_s, connections, script)
            c = cpu[name]
            c[0] += group_cpu_s(backend_pgid) - b0
            c[1] += (group_cpu_s(pgid) - r0) if pgid else 0.0
            c[2] += children_cpu_s() - w0
            c[3] += rps * slice_s
            totals[name] += rps / rounds
            bad[name] += n_bad
    return totals, bad, cpu


def cpu_us_per_request(c: list[float]) -> list[float]:
    """[backend, router, wrk] CPU microseconds per request served, from `measure_interleaved`'s counters."""
    return [x / max(1.0, c[3]) * 1e6 for x in c[:3]]


def stop_all(procs: list[subprocess.Popen[bytes]], tmp: str) -> None:
    """SIGTERM every process group at once, then wait (SIGKILL after 15 s); remove the scratch folder."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, 15)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="per target, over all rounds")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--connections", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-vllm-router", action="store_true")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "capbalancer-peers"))
    ap.add_argument("--proxy-cpus", default=None, metavar="0,1",
                    help="pin each proxy (all its workers and threads) to these cores and the backend and wrk to "
                         "the others (bench/cpus.py): on a host with cores to spare")
    args = ap.parse_args()
    proxy_cpus = parse_cpus(args.proxy_cpus) if args.proxy_cpus else None
    if proxy_cpus:
        keep_off(proxy_cpus)
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="capb-workers-")
    script = os.path.join(tmp, "post.lua")
    Path(script).write_text(WRK_SCRIPT.format(body=BODY.decode()))
    procs: list[subprocess.Popen[bytes]] = []

    def start(cmd: list[str], name: str, **kw) -> subprocess.Popen[bytes]:
        log = open(os.path.join(tmp, f"{name}.log"), "wb")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True, **kw)
        procs.append(p)
        return p

    try:
        bport = free_port()
        backend = f"http://127.0.0.1:{bport}"
        wait_up(backend, start([sys.executable, str(BENCH / "proxy_overhead.py"), "--serve-backend", str(bport)],
                               "backend"))
        backend_pgid = procs[0].pid
        targets = [("direct", backend, 0)]
        for name, n in (("capbalancer x1", 1), (f"capbalancer --workers {args.workers}", args.workers)):
            port = free_port()
            cmd = [sys.executable, "-m", "capbalancer.cli", "serve", "--backend", backend, "--port", str(port),
                   "--log-level", "warning"]
            if n > 1:
                cmd += ["--workers", str(n)]
            p = start(cmd, name.replace(" ", "_"))
            wait_up(f"http://127.0.0.1:{port}", p)
            targets.append((name, f"http://127.0.0.1:{port}", p.pid))
        skipped = ""
        if not args.no_vllm_router:
            from peers import Skip, peer_venv, rust_router_argv

            try:
                venv = peer_venv(Path(args.cache_dir), "vllm-router")
                port = free_port()
                p = start(rust_router_argv(venv, "vllm-router", "round_robin", port, free_port(), [backend]),
                          "vllm_router")
                wait_up(f"http://127.0.0.1:{port}", p, timeout_s=60)
                targets.append(("vllm-router round_robin", f"http://127.0.0.1:{port}", p.pid))
            except (Skip, RuntimeError, TimeoutError) as exc:
                skipped = f"vllm-router skipped: {exc}"
        if len(targets) > 1:  # let every target finish starting (health polls, detection) before timing
            import time

            time.sleep(2.0)
        if proxy_cpus:  # every router, vllm-router too, gets the same cores
            for name, _, pgid in targets:
                if pgid:
                    print(f"{name}: {pin_group(pgid, proxy_cpus)} threads pinned to cores {sorted(proxy_cpus)}")
        totals, bad, cpu = measure_interleaved(targets, backend_pgid, args.seconds, args.rounds, args.connections,
                                               script)
        slice_s = args.seconds / args.rounds
        print(f"wrk -t2 -c{args.connections}, non-streamed chat completions, instant backend; {args.rounds} "
              f"interleaved rounds of {slice_s:g} s per target; cpus={os.cpu_count()}"
              + (f", routers pinned to {sorted(proxy_cpus)}" if proxy_cpus else ""))
        direct = totals["direct"]
        one = totals["capbalancer x1"]
        print(f"| {'target':34s} | req/s | / direct | / one worker | errors | CPU us/req: router | backend | wrk |")
        print(f"|{'-' * 36}|-------|----------|--------------|--------|--------------------|---------|-----|")
        for name, _, _ in targets:
            per = cpu_us_per_request(cpu[name])
            print(f"| {name:34s} | {totals[name]:5.0f} | {totals[name] / direct:8.2f} | {totals[name] / one:12.2f} | "
                  f"{bad[name]:6d} | {per[1]:18.0f} | {per[0]:7.0f} | {per[2]:3.0f} |")
        if skipped:
            print(skipped)
        return 0
    finally:
        stop_all(procs, tmp)


if __name__ == "__main__":
    sys.exit(main())
