"""`capbalancer demo`: the point of capbalancer on a laptop, in about a minute, without a GPU.

A simulated heterogeneous cluster (one fast GPU, two slow ones, served by `capbalancer sim --cluster`)
gets the same open-loop load (same seed, same arrival times, same prompts) twice: through the proxy
with `round_robin`, as nginx or a router would spread it, and with `capacity`. The rate is one the
cluster as a whole serves comfortably but that swamps the slow instances when each gets a third of it,
so round robin builds queues on the slow GPUs while capacity sends them only what they can take.
"""

from __future__ import annotations

import asyncio
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from capbalancer.loadtest.procs import (
    ManagedProcess,
    ProcessGroup,
    capbalancer_argv,
    process_group,
    start_process,
    wait_http,
)
from capbalancer.loadtest.runner import LoadtestConfig, LoadtestResult, run_loadtest
from capbalancer.loadtest.stats import Slo
from capbalancer.loadtest.workloads import SyntheticWorkload, parse_length

MODEL = "llama-3.1-8b"


@dataclass(frozen=True, slots=True)
class DemoInstance:
    name: str
    profile: str


# One H100 and two L4s serving Llama-3.1-8B: the fast GPU has ~10x the throughput and ~12x the KV cache
# of each slow one (shipped estimated profiles), so an even split is badly wrong.
DEMO_INSTANCES = (
    DemoInstance("h100-0", "h100-80g/llama-3.1-8b-tp1"),
    DemoInstance("l4-0", "l4/llama-3.1-8b-tp1"),
    DemoInstance("l4-1", "l4/llama-3.1-8b-tp1"),
)


@dataclass(slots=True)
class DemoSettings:
    time_scale: float = 2.0  # the sim runs this many times slower than the GPUs, to fit 2 CPU cores
    request_rate_per_s: float = 9.0  # real seconds; each L4 gets ~1.5x what it sustains under round robin
    duration_s: float = 20.0
    prompt_len: str = "uniform:600:1000"
    output_len: str = "uniform:30:60"
    seed: int = 0
    # 100 ms per token (10 tok/s) is a usual interactive target; 2 s to the first token.
    slo: Slo = field(default_factory=lambda: Slo(ttft_ms=2000.0, tpot_ms=100.0))
    drain_s: float = 12.0  # after the last send, requests still queued get this long to finish
    request_timeout_s: float = 45.0
    policies: tuple[str, ...] = ()


@dataclass(slots=True)
class DemoRow:
    policy: str
    result: LoadtestResult

    def cells(self) -> dict[str, Any]:
        s = self.result.summary
        return {
            "policy": self.policy,
            "completed": s["completed"],
            "failed": s["failed"],
            "request_throughput": s["request_throughput"],
            "output_throughput": s["output_throughput"],
            "request_goodput": s["request_goodput"],
            "slo_attainment": s.get("slo_attainment"),
            "p50_ttft_ms": s["p50_ttft_ms"] if "p50_ttft_ms" in s else s["median_ttft_ms"],
            "p99_ttft_ms": s["p99_ttft_ms"],
            "p99_tpot_ms": s["p99_tpot_ms"],
            "shares": {name: b["share"] for name, b in self.result.backends.items()},
        }


def comparison_policies() -> tuple[str, str]:
    """round_robin against capacity; least_requests stands in where capacity is not in this build."""
    from capbalancer.sched.policies import policy_names

    return ("round_robin", "capacity" if "capacity" in policy_names() else "least_requests")


def write_fleet(directory: Path, ports: list[int], time_scale: float) -> Path:
    fleet = {
        "model": MODEL,
        "instances": [{"name": inst.name, "engine": "vllm", "profile": inst.profile, "host": "127.0.0.1",
                       "port": port, "time_scale": time_scale}
                      for inst, port in zip(DEMO_INSTANCES, ports, strict=True)],
    }
    path = directory / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet, sort_keys=False))
    return path


def free_ports(n: int) -> list[int]:
    import socket

    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def start_cluster(group: ProcessGroup, fleet_path: Path, instance_urls: list[str], log_dir: Path,
                  timeout_s: float = 60.0) -> ManagedProcess:
    sim = group.add(start_process("sim", capbalancer_argv("sim", "--cluster", str(fleet_path)), log_dir))
    for url in instance_urls:
        wait_http(url + "/health", timeout_s, sim)
    return sim


def proxy_argv(policy: str, fleet_path: Path, instance_urls: list[str], port: int) -> list[str]:
    # The fleet file gives the proxy each instance's name and profile, which the capacity policy reads.
    config = fleet_path.parent / "proxy.yaml"
    config.write_text(yaml.safe_dump({"fleet": fleet_path.name}))
    return capbalancer_argv("serve", "--config", str(config), "--policy", policy, "--host", "127.0.0.1",
                            "--port", str(port))


def start_proxy(group: ProcessGroup, policy: str, fleet_path: Path, instance_urls: list[str], log_dir: Path,
                timeout_s: float = 60.0) -> tuple[ManagedProcess, str]:
    (port,) = free_ports(1)
    proxy = group.add(start_process(f"proxy-{policy}", proxy_argv(policy, fleet_path, instance_urls, port),
                                    log_dir))
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/models", timeout_s, proxy)
    return proxy, url


def loadtest_config(url: str, settings: DemoSettings, label: str) -> LoadtestConfig:
    return LoadtestConfig(
        url=url, api="completions", model=MODEL,
        workload=SyntheticWorkload(parse_length(settings.prompt_len), parse_length(settings.output_len),
                                   seed=settings.seed),
        request_rate_per_s=settings.request_rate_per_s, duration_s=settings.duration_s, seed=settings.seed,
        ignore_eos=True, request_timeout_s=settings.request_timeout_s, drain_s=settings.drain_s,
        slo=settings.slo, label=label)


def run_demo(settings: DemoSettings, work_dir: Path, say=print, progress_factory=None) -> list[DemoRow]:
    policies = settings.policies or comparison_policies()
    ports = free_ports(len(DEMO_INSTANCES))
    instance_urls = [f"http://127.0.0.1:{p}" for p in ports]
    fleet_path = write_fleet(work_dir, ports, settings.time_scale)
    rows: list[DemoRow] = []
    with process_group() as group:
        t0 = time.monotonic()
        start_cluster(group, fleet_path, instance_urls, work_dir)
        say(f"simulated cluster up in {time.monotonic() - t0:.1f} s: "
            + ", ".join(f"{i.name} ({i.profile})" for i in DEMO_INSTANCES)
            + f", time_scale {settings.time_scale:g}")
        for policy in policies:
            proxy, url = start_proxy(group, policy, fleet_path, instance_urls, work_dir)
            say(f"[{policy}] {settings.request_rate_per_s:g} req/s Poisson for {settings.duration_s:g} s "
                f"(seed {settings.seed}) through {url} ...")
            progress = progress_factory(policy) if progress_factory else None
            try:
                result = _run(run_loadtest(loadtest_config(url, settings, policy), progress=progress))
            finally:
                if progress is not None:
                    progress.close()
            group.stop(proxy)
            rows.append(DemoRow(policy, result))
            _wait_idle(instance_urls, timeout_s=settings.drain_s)
    return rows


def _wait_idle(instance_urls: list[str], timeout_s: float) -> None:
    """Let the instances finish what the previous run left (cancelled streams) before the next run."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = 0.0
        for url in instance_urls:
            try:
                with urllib.request.urlopen(url + "/metrics", timeout=2.0) as resp:
                    for line in resp.read().decode().splitlines():
                        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                            busy += float(line.rsplit(" ", 1)[1])
            except (OSError, ValueError):
                return
        if busy == 0:
            return
        time.sleep(0.2)


def _run(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro) if hasattr(uvloop, "run") else asyncio.run(coro)


def _num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_comparison(rows: list[DemoRow], settings: DemoSettings) -> str:
    names = [i.name for i in DEMO_INSTANCES]
    header = ["policy", "done", "failed", "req/s", "tok/s", "goodput", "SLO %", "p50 TTFT", "p99 TTFT",
              "p99 TPOT", *[f"{n} %" for n in names]]
    table = [header]
    for row in rows:
        c = row.cells()
        shares = c["shares"]
        table.append([
            c["policy"], str(c["completed"]), str(c["failed"]), _num(c["request_throughput"], 2),
            _num(c["output_throughput"], 0), _num(c["request_goodput"], 2),
            _num(None if c["slo_attainment"] is None else 100 * c["slo_attainment"], 0),
            _num(c["p50_ttft_ms"], 0), _num(c["p99_ttft_ms"], 0), _num(c["p99_tpot_ms"], 0),
            # An instance the proxy never chose served 0 %; "-" only when the header was absent.
            *[_num(100 * shares.get(n, 0.0), 0) if shares else "-" for n in names],
        ])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    slo = settings.slo
    notes = [f"TTFT/TPOT in ms; goodput = requests/s meeting TTFT <= {slo.ttft_ms:g} ms and TPOT <= "
             f"{slo.tpot_ms:g} ms; share = requests each instance served (x-capbalancer-backend)."]
    if len(rows) == 2:
        a, b = rows[0].result.summary, rows[1].result.summary
        if a.get("request_goodput") and b.get("request_goodput") is not None:
            notes.append(f"{rows[1].policy} vs {rows[0].policy}: goodput x{b['request_goodput'] / max(a['request_goodput'], 1e-9):.2f}, "
                         f"p99 TTFT x{b['p99_ttft_ms'] / max(a['p99_ttft_ms'], 1e-9):.2f}")
    return "\n".join(lines + notes)


_DEFAULTS = DemoSettings()


@click.command(name="demo")
@click.option("--time-scale", type=float, default=_DEFAULTS.time_scale, show_default=True,
              help="Run the simulated GPUs this many times slower (more headroom on a small machine).")
@click.option("--request-rate", type=float, default=_DEFAULTS.request_rate_per_s, show_default=True,
              help="Requests per second (Poisson).")
@click.option("--duration", type=float, default=_DEFAULTS.duration_s, show_default=True,
              help="Seconds of load per policy.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--policy", "policies", multiple=True,
              help="Policies to compare (default: round_robin and capacity).")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default="capbalancer-demo.png",
              show_default=True, help="Where to save the comparison plot (if matplotlib is installed).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write both runs' full results (loadtest JSON documents) to this file.")
@click.option("--logs", "log_dir", type=click.Path(file_okay=False), default=None,
              help="Keep the sim's and proxies' logs here (default: a temporary directory).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(time_scale: float, request_rate: float, duration: float, seed: int, policies: tuple[str, ...],
         plot_out: str, json_out: str | None, log_dir: str | None, quiet: bool) -> None:
    """Compare round_robin and capacity on a simulated H100 + 2x L4 cluster, side by side."""
    from capbalancer.loadtest.plot import matplotlib_available, plot_results
    from capbalancer.loadtest.progress import ProgressBar

    settings = DemoSettings(time_scale=time_scale, request_rate_per_s=request_rate, duration_s=duration,
                            seed=seed, policies=tuple(policies))

    def progress_factory(policy: str) -> ProgressBar | None:
        bar = ProgressBar(None, duration, label=policy, enabled=False if quiet else None)
        return bar if bar.enabled else None

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="capbalancer-demo-") as tmp:
        work_dir = Path(log_dir) if log_dir else Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            rows = run_demo(settings, work_dir, say=lambda m: click.echo(m, err=True),
                            progress_factory=progress_factory)
        except Exception as exc:  # a child that failed to start: say which, with its log
            raise click.ClickException(str(exc)) from None
    click.echo(format_comparison(rows, settings))
    click.echo(f"(demo took {time.monotonic() - started:.0f} s)", err=True)
    if json_out:
        import json

        from capbalancer.loadtest.report import _json_safe, result_document
        Path(json_out).write_text(json.dumps(_json_safe({r.policy: result_document(r.result) for r in rows})))
        click.echo(f"wrote {json_out}", err=True)
    if plot_out:
        if matplotlib_available():
            plot_results({r.policy: r.result for r in rows}, plot_out,
                          title=f"capbalancer demo: H100 + 2x L4, {request_rate:g} req/s")
            click.echo(f"wrote {plot_out}", err=True)
        else:
            click.echo("no plot: matplotlib is not installed (pip install 'capbalancer[plot]')", err=True)
    if any(r.result.summary["completed"] == 0 for r in rows):
        sys.exit(1)
