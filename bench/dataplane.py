"""One proxy process against vllm-router and direct, side by side in one interleaved run (issue 17 item 1).

    .venv/bin/python bench/dataplane.py [--seconds 40] [--rounds 8] [--connections 128]
        [--proxy NAME=REF[,server_key=value...]] ... [--no-vllm-router] [--stream] [--floor]

The instant backend of bench/proxy_overhead.py (aiohttp, one process) stands in for the engine; wrk (Debian
`wrk`) drives non-streamed chat completions (`--stream`: streamed ones) over `--connections` connections.
Each `--proxy` is one capbalancer process with the default policy (capacity) and its access log on (the
defaults), as of git REF (`.`: this working tree; a folder holding a capbalancer package: that tree as it is; anything
else is `git archive`d into a temporary folder),
with `server:` settings added to its config file (e.g. `--proxy aio=.,http_server=aiohttp`; `policy=NAME` sets the
model's policy instead). Targets take
turns per round, so background load hits them alike. `--floor` adds bench/floor_relay.py, a Python relay that does
nothing but relay (what being a load balancer costs above it). Prints req/s, the ratio to direct and to the first
proxy, and CPU microseconds per request of the router, the backend and wrk (from /proc).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from proxy_overhead import BODY, STREAM_BODY, free_port, wait_up  # noqa: E402
from workers import WRK_SCRIPT, cpu_us_per_request, measure_interleaved, stop_all  # noqa: E402


def proxy_tree(ref: str, tmp: str) -> Path:
    """The capbalancer source to run: this tree, or REF unpacked from git."""
    if ref == ".":
        return REPO
    if Path(ref).is_dir():  # a prepared tree (e.g. a build variant), used as it is
        return Path(ref).resolve()
    dest = Path(tmp) / f"src-{ref.replace('/', '_')}"
    if not dest.exists():
        dest.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "capbalancer"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def write_config(path: Path, backend: str, port: int, settings: dict[str, str]) -> None:
    """`settings` go under `server:`, but for `policy`, which is the model's."""
    policy = settings.pop("policy", None)
    lines = ["server:", "  host: 127.0.0.1", f"  port: {port}"]
    lines += [f"  {k}: {v}" for k, v in settings.items()]
    lines += ["models:", "  m:", "    default: true"] + ([f"    policy: {policy}"] if policy else [])
    lines += ["    backends:", f"      - {{name: b0, url: '{backend}', engine: auto}}"]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=40.0, help="per target, over all rounds")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=128)
    ap.add_argument("--proxy", action="append", default=[], metavar="NAME=REF[,key=value...]")
    ap.add_argument("--no-vllm-router", action="store_true")
    ap.add_argument("--no-direct", action="store_true")
    ap.add_argument("--floor", action="store_true",
                    help="add bench/floor_relay.py: a Python relay that only relays (uvloop + httptools)")
    ap.add_argument("--stream", action="store_true", help="streamed chat completions (100 events each)")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "capbalancer-peers"))
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    proxies = args.proxy or ["capbalancer=."]
    tmp = tempfile.mkdtemp(prefix="capb-dataplane-")
    script = os.path.join(tmp, "post.lua")
    Path(script).write_text(WRK_SCRIPT.format(body=(STREAM_BODY if args.stream else BODY).decode()))
    procs: list[subprocess.Popen[bytes]] = []

    def start(cmd: list[str], name: str, **kw) -> subprocess.Popen[bytes]:
        log = open(os.path.join(tmp, f"{name}.log"), "wb")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        procs.append(p)
        return p

    try:
        bport = free_port()
        backend = f"http://127.0.0.1:{bport}"
        wait_up(backend, start([sys.executable, str(BENCH / "proxy_overhead.py"), "--serve-backend", str(bport)],
                               "backend", cwd=str(REPO)))
        backend_pgid = procs[0].pid
        targets: list[tuple[str, str, int]] = [] if args.no_direct else [("direct", backend, 0)]
        for spec in proxies:
            name, _, rest = spec.partition("=")
            ref, *pairs = (rest or ".").split(",")
            settings = dict(p.split("=", 1) for p in pairs)
            src = proxy_tree(ref, tmp)
            port = free_port()
            cfg = Path(tmp) / f"{name}.yaml"
            write_config(cfg, backend, port, settings)
            p = start([sys.executable, "-m", "capbalancer.cli", "serve", "--config", str(cfg), "--log-level",
                       "warning"], name, cwd=str(src), env={**os.environ, "PYTHONPATH": str(src)})
            wait_up(f"http://127.0.0.1:{port}", p)
            targets.append((name, f"http://127.0.0.1:{port}", p.pid))
        if args.floor:
            port = free_port()
            p = start([sys.executable, str(BENCH / "floor_relay.py"), "--port", str(port), "--upstream", backend],
                      "floor")
            wait_up(f"http://127.0.0.1:{port}", p)
            targets.append(("python floor relay", f"http://127.0.0.1:{port}", p.pid))
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
        time.sleep(2.0)  # every target done starting (health polls, engine detection) before timing
        names = [t[0] for t in targets]
        totals, bad, cpu = measure_interleaved(targets, backend_pgid, args.seconds, args.rounds, args.connections,
                                               script)
        slice_s = args.seconds / args.rounds
        kind = "streamed (100 events)" if args.stream else "non-streamed"
        print(f"wrk -t2 -c{args.connections}, {kind} chat completions, instant backend; {args.rounds} interleaved "
              f"rounds of {slice_s:g} s per target; cpus={os.cpu_count()}")
        direct = totals.get("direct")
        first = next((n for n in names if n != "direct"), names[0])
        print(f"| {'target':28s} | req/s | / direct | / {first:10s} | errors | CPU us/req: router | backend | wrk |")
        print(f"|{'-' * 30}|-------|----------|--------------|--------|--------------------|---------|-----|")
        for name in names:
            per = cpu_us_per_request(cpu[name])
            ratio = f"{totals[name] / direct:8.2f}" if direct else "       -"
            print(f"| {name:28s} | {totals[name]:5.0f} | {ratio} | {totals[name] / totals[first]:12.2f} | "
                  f"{bad[name]:6d} | {per[1]:18.0f} | {per[0]:7.0f} | {per[2]:3.0f} |")
        if skipped:
            print(skipped)
        return 0
    finally:
        stop_all(procs, tmp)


if __name__ == "__main__":
    sys.exit(main())
