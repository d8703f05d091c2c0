"""Peer routers against capbalancer, on the same simulated cluster and the same load.

    .venv/bin/python bench/peers.py [--duration 20] [--request-rate 6] [--targets direct,capbalancer-capacity,...]

Starts the demo's simulated cluster (one H100, two L4s; `capbalancer sim --cluster`), then puts each
target in front of it in turn and runs the identical open-loop load test (same seed, same arrivals):

- direct: the fast instance alone (what one GPU does with the whole load, for scale);
- capbalancer with round_robin and with capacity;
- vllm-router (PyPI `vllm-router`) and sglang-router (PyPI `sglang-router`), round_robin and
  power_of_two, each pip-installed by this script into its own venv under --cache-dir;
- nginx with least_conn (OS package `nginx-light`, installed with apt-get when missing and allowed).

Everything listens on 127.0.0.1 only (the routers default to 0.0.0.0: their host flags are set), every
process is stopped at the end, and each run is bounded by its duration plus a drain limit. A target that
cannot be installed or started is reported as skipped with the reason. Prints one table; --json writes
every run's full loadtest document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from capbalancer.fleet.adapters import snapshot_from_metrics  # noqa: E402
from capbalancer.loadtest.demo import (  # noqa: E402
    DEMO_INSTANCES,
    DemoSettings,
    _run,
    _wait_idle,
    free_ports,
    loadtest_config,
    start_cluster,
    start_proxy,
    write_fleet,
)
from capbalancer.loadtest.procs import ProcessGroup, process_group, start_process, wait_http  # noqa: E402
from capbalancer.loadtest.report import _json_safe, result_document  # noqa: E402
from capbalancer.loadtest.runner import LoadtestResult, run_loadtest  # noqa: E402
from capbalancer.loadtest.sessions import SessionWorkload, parse_workload_spec  # noqa: E402
from capbalancer.loadtest.workloads import parse_length  # noqa: E402

PEER_PACKAGES = {"vllm-router": "vllm-router==0.1.17", "sglang-router": "sglang-router==0.3.2"}
ALL_TARGETS = ("direct", "capbalancer-round_robin", "capbalancer-capacity", "vllm-router-round_robin",
               "vllm-router-power_of_two", "sglang-router-round_robin", "sglang-router-power_of_two",
               "nginx-least_conn",
               # prefix-aware (issue 13): the peers' own prefix routers; the sim serves what they call on workers
               # (/tokenize, /v1/completions/render, /v1/chat/completions/render)
               "capbalancer-cache_aware", "capbalancer-llm_d", "vllm-router-cache_aware",
               "sglang-router-cache_aware")
PREFIX_TARGETS = ("capbalancer-capacity", "capbalancer-cache_aware", "capbalancer-llm_d", "vllm-router-cache_aware",
                  "sglang-router-cache_aware")


class Skip(Exception):
    """A target that cannot run here; the message says why."""


@dataclass(slots=True)
class Outcome:
    target: str
    result: LoadtestResult | None = None
    skipped: str | None = None
    setup_s: float = 0.0
    hit_rate: float | None = None  # the engines' own prefix-cache hits over queried prompt tokens, this run


def cache_counters(worker_urls: list[str]) -> tuple[float, float]:
    """(hit, queried) prompt tokens summed over the workers' vllm:prefix_cache_* counters."""
    hits = queries = 0.0
    for url in worker_urls:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            snap = snapshot_from_metrics("vllm", resp.read().decode(), 0.0)
        hits += snap.prefix_cache_hits_tokens_total or 0.0
        queries += snap.prefix_cache_queries_tokens_total or 0.0
    return hits, queries


def reset_caches(worker_urls: list[str]) -> None:
    """Every target starts with empty prefix caches (POST /reset_prefix_cache, as vLLM's dev mode)."""
    for url in worker_urls:
        req = urllib.request.Request(url + "/reset_prefix_cache", data=b"", method="POST")
        with contextlib.suppress(OSError), urllib.request.urlopen(req, timeout=10):
            pass


def peer_venv(cache_dir: Path, name: str) -> Path:
    """A venv holding one peer router, created once and reused."""
    venv = cache_dir / name
    binary = venv / "bin" / name
    if binary.exists():
        return venv
    cache_dir.mkdir(parents=True, exist_ok=True)
    python = shutil.which("python3") or sys.executable
    try:
        subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", PEER_PACKAGES[name]], check=True,
                       capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        out = getattr(exc, "stderr", b"") or b""
        raise Skip(f"pip install {PEER_PACKAGES[name]} failed: {out.decode(errors='replace')[-300:]}") from None
    if not binary.exists():
        raise Skip(f"{PEER_PACKAGES[name]} installed no '{name}' command")
    return venv


def rust_router_argv(venv: Path, name: str, policy: str, port: int, metrics_port: int,
                     worker_urls: list[str]) -> list[str]:
    binary = str(venv / "bin" / name)
    head = [binary] if name == "vllm-router" else [binary, "launch"]
    return [*head, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *worker_urls,
            "--policy", policy, "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]


def nginx_binary(allow_apt: bool) -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if found:
        return found
    if not allow_apt:
        raise Skip("nginx not installed (run with --apt to apt-get install nginx-light)")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Skip("nginx not installed and apt-get is not usable here (needs root)")
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "nginx-light"], capture_output=True, timeout=600,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if proc.returncode != 0:
        raise Skip(f"apt-get install nginx-light failed: {proc.stderr.decode(errors='replace')[-300:]}")
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(found):
        raise Skip("nginx-light installed no nginx binary")
    return found


def nginx_config(directory: Path, port: int, worker_urls: list[str]) -> Path:
    servers = "\n".join(f"    server {u.removeprefix('http://')};" for u in worker_urls)
    temp = directory / "nginx-tmp"
    temp.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(f"""worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy; fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;
  upstream llm {{
    least_conn;
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://llm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 3600s;
    }}
  }}
}}
""")
    return conf


def start_target(target: str, group: ProcessGroup, fleet_path: Path, worker_urls: list[str], work_dir: Path,
                 cache_dir: Path, allow_apt: bool) -> str:
    """Start one target in front of the cluster; return the URL to load-test."""
    if target == "direct":
        return worker_urls[0]
    if target.startswith("capbalancer-"):
        policy = target.removeprefix("capbalancer-")
        _, url = start_proxy(group, policy, fleet_path, worker_urls, work_dir)
        return url
    port, metrics_port = free_ports(2)
    url = f"http://127.0.0.1:{port}"
    for name in ("vllm-router", "sglang-router"):
        if target.startswith(name + "-"):
            policy = target.removeprefix(name + "-")
            venv = peer_venv(cache_dir, name)
            proc = group.add(start_process(target, rust_router_argv(venv, name, policy, port, metrics_port,
                                                                    worker_urls), work_dir))
            wait_http(url + "/v1/models", 90.0, proc)
            return url
    if target == "nginx-least_conn":
        binary = nginx_binary(allow_apt)
        conf = nginx_config(work_dir, port, worker_urls)
        proc = group.add(start_process(target, [binary, "-p", str(work_dir), "-e", str(work_dir / "nginx-error.log"),
                                                "-c", str(conf), "-g", "daemon off;"], work_dir))
        wait_http(url + "/v1/models", 30.0, proc)
        return url
    raise Skip(f"unknown target {target!r}")


def run_targets(targets: list[str], settings: DemoSettings, work_dir: Path, cache_dir: Path,
                allow_apt: bool, say: Callable[[str], None], workload: str = "none") -> list[Outcome]:
    ports = free_ports(len(DEMO_INSTANCES))
    worker_urls = [f"http://127.0.0.1:{p}" for p in ports]
    fleet_path = write_fleet(work_dir, ports, settings.time_scale)
    outcomes = []
    with process_group() as cluster:
        start_cluster(cluster, fleet_path, worker_urls, work_dir)
        say(f"cluster: {', '.join(f'{i.name}={u}' for i, u in zip(DEMO_INSTANCES, worker_urls, strict=True))}")
        for target in targets:
            t0 = time.monotonic()
            with process_group() as group:
                try:
                    url = start_target(target, group, fleet_path, worker_urls, work_dir, cache_dir, allow_apt)
                except Skip as exc:
                    say(f"[{target}] skipped: {exc}")
                    outcomes.append(Outcome(target, skipped=str(exc)))
                    continue
                except Exception as exc:  # a router that would not start: keep going with the others
                    say(f"[{target}] failed to start: {str(exc)[:600]}")
                    outcomes.append(Outcome(target, skipped=f"did not start: {str(exc)[:200]}"))
                    continue
                setup_s = time.monotonic() - t0
                say(f"[{target}] {url} up in {setup_s:.1f} s; running load ...")
                config = loadtest_config(url, settings, target)
                kind, options = parse_workload_spec(workload)
                if kind != "none":
                    config.workload = SessionWorkload(kind, options, parse_length(settings.output_len),
                                                      seed=settings.seed)
                reset_caches(worker_urls)
                hits0, queries0 = cache_counters(worker_urls)
                result = _run(run_loadtest(config))
                hits1, queries1 = cache_counters(worker_urls)
                hit_rate = (hits1 - hits0) / (queries1 - queries0) if queries1 > queries0 else None
                outcomes.append(Outcome(target, result=result, setup_s=setup_s, hit_rate=hit_rate))
            _wait_idle(worker_urls, timeout_s=settings.drain_s)
    return outcomes


def format_table(outcomes: list[Outcome], settings: DemoSettings, workload: str = "none") -> str:
    header = ["target", "done", "failed", "req/s", "tok/s", "goodput", "SLO %", "hit", "p50 TTFT", "p99 TTFT",
              "p99 TPOT", "errors"]
    rows = [header]
    for o in outcomes:
        if o.result is None:
            rows.append([o.target, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", f"skipped: {o.skipped}"[:60]])
            continue
        s = o.result.summary
        rows.append([o.target, str(s["completed"]), str(s["failed"]), f"{s['request_throughput']:.2f}",
                     f"{s['output_throughput']:.0f}", f"{s['request_goodput']:.2f}",
                     f"{100 * s['slo_attainment']:.0f}", "-" if o.hit_rate is None else f"{o.hit_rate:.3f}",
                     f"{s['median_ttft_ms']:.0f}", f"{s['p99_ttft_ms']:.0f}",
                     f"{s['p99_tpot_ms']:.0f}", ",".join(f"{k}:{v}" for k, v in o.result.errors.items()) or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i in (0, len(header) - 1) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    what = (f"prompt {settings.prompt_len}" if workload == "none" else
            f"sessions {workload} (turns a second; hit = engines' prefix-cache hits / queried tokens)")
    lines.append(f"load: {settings.request_rate_per_s:g} req/s Poisson for {settings.duration_s:g} s, seed "
                 f"{settings.seed}, {what}, output {settings.output_len} (ignore_eos), "
                 f"time_scale {settings.time_scale:g}; SLO TTFT <= {settings.slo.ttft_ms:g} ms, "
                 f"TPOT <= {settings.slo.tpot_ms:g} ms; latencies in ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=None, help="comma-separated subset of: " + ", ".join(ALL_TARGETS)
                        + " (default: all; with --workload, the prefix-aware ones)")
    parser.add_argument("--workload", default="none",
                        help="sessions as `capbalancer loadtest --workload` sends them (multi-turn, shared-prompt, "
                             "agentic, options after ':'); the rate is then turns per second")
    parser.add_argument("--duration", type=float, default=defaults.duration_s)
    parser.add_argument("--request-rate", type=float, default=defaults.request_rate_per_s)
    parser.add_argument("--time-scale", type=float, default=defaults.time_scale)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "capbalancer" / "peers")
    parser.add_argument("--apt", action="store_true", help="apt-get install nginx-light if nginx is missing")
    parser.add_argument("--json", type=Path, default=None, help="write every run's loadtest document here")
    parser.add_argument("--logs", type=Path, default=None, help="keep process logs here")
    args = parser.parse_args(argv)
    if args.targets is None:
        args.targets = ",".join(PREFIX_TARGETS if args.workload != "none" else ALL_TARGETS)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)}")
    settings = DemoSettings(time_scale=args.time_scale, request_rate_per_s=args.request_rate,
                            duration_s=args.duration, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="capbalancer-peers-") as tmp:
        work_dir = args.logs or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        outcomes = run_targets(targets, settings, work_dir, args.cache_dir, args.apt,
                               say=lambda m: print(m, file=sys.stderr, flush=True), workload=args.workload)
    print(format_table(outcomes, settings, args.workload))
    if args.json:
        args.json.write_text(json.dumps(_json_safe({o.target: result_document(o.result) if o.result else
                                                    {"skipped": o.skipped} for o in outcomes})))
    return 0 if any(o.result for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
