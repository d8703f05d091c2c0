"""`deploy --target local`: start a plan's instances and the proxy in front of them on this host, wait for
health (the proxy: /ready), stop them all on a signal.

With --engine sim each instance is a `capbalancer sim` process serving the instance's profile (how this is
tested without GPUs); with vllm or tgi the same command lines as the launch scripts run here. Every process
gets its own session, so stopping one stops whatever it spawned. On SIGINT/SIGTERM, or when an instance
dies on its own, everything is stopped (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from capbalancer.loadtest.procs import stop_process_group
from capbalancer.planning.plan import PlanFile, PlannedInstance
from capbalancer.planning.render_common import write_common, write_yaml
from capbalancer.planning.render_scripts import tgi_args, vllm_args

STOP_GRACE_S = 10.0


@dataclass
class LocalInstance:
    inst: PlannedInstance
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def command_for(inst: PlannedInstance, engine: str, port: int, profile_ref: str, model: str,
                time_scale: float) -> tuple[list[str], dict[str, str]]:
    if engine == "sim":
        argv = [sys.executable, "-m", "capbalancer.cli", "sim", "--engine", "vllm", "--profile", profile_ref,
                "--port", str(port), "--host", "127.0.0.1", "--model", model]
        if time_scale != 1.0:
            argv += ["--time-scale", f"{time_scale:g}"]
        return argv, {}
    local = dataclasses.replace(inst, port=port)
    argv = (vllm_args if engine == "vllm" else tgi_args)(local, model, model, host="127.0.0.1")
    return argv, {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in inst.gpu_ids)}


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1.0) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def stop_all(instances: list[LocalInstance], grace_s: float = STOP_GRACE_S) -> None:
    for li in instances:
        if li.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(li.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for li in instances:
        try:
            li.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(li.proc.pid, signal.SIGKILL)
            li.proc.wait(timeout=5)


ENGINE_INSTALL_HINT = {
    "vllm": "pip install vllm (on a host with the plan's GPUs)",
    "tgi": "install text-generation-inference (or run its container)",
}


def missing_engine(engine: str, argv: list[str]) -> str | None:
    """One line saying the engine cannot be started here, or None."""
    if engine == "sim" or shutil.which(argv[0]) is not None:
        return None
    return (f"cannot start the {engine} instances: `{argv[0]}` is not installed here "
            f"({ENGINE_INSTALL_HINT.get(engine, 'install it')}); to try the plan without GPUs, "
            f"use --engine sim")


def start_proxy(out_dir: Path, proxy_port: int, log_path: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "capbalancer.cli", "serve", "--config", str(out_dir / "capbalancer.yaml"),
            "--host", "127.0.0.1", "--port", str(proxy_port)]
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=1.0) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_local(plan: PlanFile, out_dir: Path, engine: str, time_scale: float = 1.0, base_port: int | None = None,
              proxy_port: int = 8080, ready_timeout_s: float = 120.0, exit_when_ready: bool = False,
              echo: Callable[[str], None] = print) -> int:
    """Returns the exit status: 0 after a clean stop, 1 when an instance or the proxy failed, 2 when the
    engine is not installed here."""
    from capbalancer.server.preflight import port_problem

    if plan.instances:
        probe, _ = command_for(plan.instances[0], engine, 0, "", plan.model, time_scale)
        problem = missing_engine(engine, probe)
        if problem is not None:
            echo(problem)
            return 2
    problem = port_problem("127.0.0.1", proxy_port)
    if problem is not None:
        echo(f"the proxy cannot start: {problem.replace('--port N (make run PORT=N)', '--proxy-port N')}")
        return 1
    # Written once everything is healthy: a stale one from an earlier run must not look like readiness.
    (out_dir / "local-instances.yaml").unlink(missing_ok=True)
    ports = ([base_port + i for i in range(len(plan.instances))] if base_port is not None
             else free_ports(len(plan.instances)))
    port_of = {inst.name: port for inst, port in zip(plan.instances, ports, strict=True)}
    write_common(plan, out_dir, engine=engine, proxy_port=proxy_port,
                 url_of=lambda inst: ("127.0.0.1", port_of[inst.name]), proxy_host="127.0.0.1",
                 absolute_profiles=True, time_scale=time_scale)
    fleet = out_dir / "fleet.yaml"
    refs = {row["name"]: row["profile"] for row in yaml.safe_load(fleet.read_text())["instances"]}
    stop_requested: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_requested.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started: list[LocalInstance] = []
    proxy: subprocess.Popen | None = None
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    try:
        for inst in plan.instances:
            port = port_of[inst.name]
            argv, extra_env = command_for(inst, engine, port, refs[inst.name], plan.model, time_scale)
            log_path = logs / f"{inst.name}.log"
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", **extra_env})
            started.append(LocalInstance(inst, port, proc, log_path))
        deadline = time.monotonic() + ready_timeout_s
        pending = list(started)
        while pending:
            if stop_requested:
                echo("interrupted while starting; stopping")
                return 0
            for li in list(pending):
                if li.proc.poll() is not None:
                    echo(f"{li.inst.name} exited with {li.proc.returncode} before it was healthy:\n{_tail(li.log_path)}")
                    return 1
                if healthy(li.url):
                    echo(f"{li.inst.name} healthy at {li.url} (TP{li.inst.tp}, profile {li.inst.profile_ref})")
                    pending.remove(li)
            if pending and time.monotonic() > deadline:
                echo(f"not healthy after {ready_timeout_s:g}s: {', '.join(li.inst.name for li in pending)}")
                return 1
            time.sleep(0.1)
        echo(f"all {len(started)} instances healthy; fleet: {fleet}; starting the proxy")
        proxy_log = logs / "proxy.log"
        proxy = start_proxy(out_dir, proxy_port, proxy_log)
        while not ready(proxy_url):
            if stop_requested:
                echo("interrupted while starting; stopping")
                return 0
            if proxy.poll() is not None:
                echo(f"the proxy exited with {proxy.returncode} before it was ready:\n{_tail(proxy_log)}")
                return 1
            if time.monotonic() > deadline:
                echo(f"the proxy was not ready after {ready_timeout_s:g}s (log: {proxy_log})")
                return 1
            time.sleep(0.1)
        write_yaml(out_dir / "local-instances.yaml",
                   {"proxy": {"url": proxy_url, "pid": proxy.pid},
                    "instances": [{"name": li.inst.name, "url": li.url, "pid": li.proc.pid} for li in started]})
        echo(f"proxy ready at {proxy_url} (OpenAI API at {proxy_url}/v1; config {out_dir / 'capbalancer.yaml'})")
        if exit_when_ready:
            return 0
        echo("running; Ctrl-C or SIGTERM stops them")
        while not stop_requested:
            if proxy.poll() is not None:
                echo(f"the proxy exited with {proxy.returncode}:\n{_tail(proxy_log)}")
                return 1
            for li in started:
                if li.proc.poll() is not None:
                    echo(f"{li.inst.name} exited with {li.proc.returncode}:\n{_tail(li.log_path)}")
                    return 1
            time.sleep(0.2)
        echo("stopping")
        return 0
    finally:
        if proxy is not None:
            stop_process_group(proxy, STOP_GRACE_S)
            echo("stopped the proxy")
        stop_all(started)
        for s, handler in previous.items():
            signal.signal(s, handler)
        echo(f"stopped {len(started)} instance(s)")
