"""`capbalancer serve` and `capbalancer check-config`."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from dataclasses import replace

import click

from capbalancer.config import Config, ConfigError, config_from_backends, config_from_fleet, load_config
from capbalancer.sched import BUILD as SCHED_BUILD

log = logging.getLogger("capbalancer.server")


def _override(config: Config, host: str | None, port: int | None, policy: str | None) -> Config:
    server = config.server
    if host is not None:
        server = replace(server, host=host)
    if port is not None:
        server = replace(server, port=port)
    models = config.models
    if policy is not None:
        models = {k: replace(m, policy=policy) for k, m in models.items()}
    return replace(config, server=server, models=models)


def _check_policy(policy: str | None) -> None:
    if policy is None:
        return
    from capbalancer.sched.policies import policy_names

    if policy not in policy_names():
        raise click.BadParameter(f"unknown policy {policy!r}; known: {', '.join(policy_names())}",
                                 param_hint="--policy")


MAX_WORKERS = 256


class WorkersParam(click.ParamType):
    """--workers: a count from 1 to 256, or 'auto'."""

    name = "N|auto"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) or str(value).strip().isdigit():
            n = int(value)  # type: ignore[call-overload]
            if 1 <= n <= MAX_WORKERS:
                return n
            self.fail(f"{n} is not in the range 1-{MAX_WORKERS}", param, ctx)
        if str(value).strip().lower() == "auto":
            return "auto"
        self.fail(f"{value!r} is neither a number of workers nor 'auto'", param, ctx)


def _auto_workers() -> int:
    from capbalancer.cluster.workers import usable_cpus

    cpus = usable_cpus()
    n = min(cpus.count, MAX_WORKERS)
    log.info("--workers auto: %s", cpus.describe())
    return n


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML config file (see docs/config.md).")
@click.option("--host", default=None, help="Listen address (overrides server.host; default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Listen port (overrides server.port; default 8000).")
@click.option("--backend", "backends", multiple=True, metavar="URL",
              help="A backend base URL (repeatable): serve them as one pool without a config file.")
@click.option("--policy", default=None, help="Routing policy for every pool (round_robin, least_requests, capacity, ...).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--loop", "loop_choice", default="uvloop", type=click.Choice(["uvloop", "asyncio"]),
              help="Event loop (uvloop when installed, else asyncio). bench/overload.py measures both.")
@click.option("--workers", "workers_arg", type=WorkersParam(), default="1", show_default=True,
              help="Proxy processes on one port (SO_REUSEPORT), sharing reservations (docs/replicas.md); 'auto': "
                   "one per core this process may use (its CPU affinity, capped by its cgroup's CPU quota).")
def serve(config_path: str | None, host: str | None, port: int | None, backends: tuple[str, ...],
          policy: str | None, log_level: str, loop_choice: str = "uvloop", workers_arg: int | str = 1) -> None:
    """Run the proxy in front of a fleet (or, with no --config/--backend, an embedded simulated one)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _check_policy(policy)
    if config_path and backends:
        raise click.UsageError("give either --config or --backend, not both")
    from capbalancer.server.limits import raise_fd_limit
    from capbalancer.server.serve import install_uvloop
    from capbalancer.server.serve import serve as run_server

    loop_kind = install_uvloop() if loop_choice == "uvloop" else "asyncio"
    fd_soft, fd_hard = raise_fd_limit()  # the default 1024 is what starved accept under overload (issue 14)
    try:
        if config_path:
            config = _override(load_config(config_path), host, port, policy)
        elif backends:
            config = _override(config_from_backends(list(backends), policy), host, port, None)
        else:
            config = None
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    from capbalancer.cluster.workers import reuse_port, worker_config
    from capbalancer.server.preflight import port_problem

    listen = config.server if config is not None else Config().server
    # A worker of `--workers N` shares the port its siblings already hold (SO_REUSEPORT): its parent checked it.
    problem = None if reuse_port() else port_problem(host or listen.host, port if port is not None else listen.port)
    if problem is not None:  # before the embedded cluster or any client session starts
        raise click.ClickException(problem)
    workers = workers_arg if isinstance(workers_arg, int) else _auto_workers()
    if workers > 1:
        _run_workers(workers, config, config_path, host, port, backends, policy, log_level, loop_choice)
        return
    if config is not None:
        config = worker_config(config)  # a worker of `--workers N` shares through its parent's store

    async def main() -> None:
        log.info("file descriptors: limit %d (hard %d); scheduling core: %s", fd_soft, fd_hard,
                 SCHED_BUILD)  # compiled or plain Python (capbalancer/sched/__init__.py)
        if config is not None:
            log.info("event loop: %s; %s", loop_kind, config.summary().replace("\n", "\n    "))
            await run_server(config, config_path=config_path)
            return
        try:
            embedded = importlib.import_module("capbalancer.sim.embedded")
        except ModuleNotFoundError as exc:
            if exc.name not in ("capbalancer.sim.embedded", "capbalancer.sim"):
                raise
            raise click.ClickException(
                "no backends: pass --config FILE or --backend URL (the embedded simulated cluster is not "
                "available in this build)") from None
        fleet, stop = await embedded.start_embedded_cluster()
        log.info("no --config or --backend: serving an EMBEDDED SIMULATED cluster of %d instance(s) "
                 "(not real GPUs): %s", len(fleet.instances),
                 ", ".join(f"{i.name}={i.url}" for i in fleet.instances))
        cfg = _override(config_from_fleet(fleet, policy), host, port, None)
        log.info("event loop: %s; %s", loop_kind, cfg.summary().replace("\n", "\n    "))
        await run_server(cfg, on_exit=stop)

    try:
        asyncio.run(main())
    except OSError as exc:  # port in use, address not available
        raise click.ClickException(f"cannot serve: {exc.strerror or exc}") from None
    except KeyboardInterrupt:
        pass


def _run_workers(n: int, config: Config | None, config_path: str | None, host: str | None, port: int | None,
                 backends: tuple[str, ...], policy: str | None, log_level: str, loop_choice: str = "uvloop") -> None:
    if config is None:
        raise click.UsageError("--workers needs --config or --backend (the embedded simulated cluster is one process)")
    if config.server.port == 0:
        raise click.UsageError("--workers needs a fixed port: with port 0 each worker would get its own")
    from capbalancer.cluster.workers import run_workers

    args = ["--log-level", log_level, "--loop", loop_choice]
    if config_path:
        args += ["--config", config_path]
    for url in backends:
        args += ["--backend", url]
    for flag, value in (("--host", host), ("--port", port), ("--policy", policy)):
        if value is not None:
            args += [flag, str(value)]
    sys.exit(run_workers(n, args, config))


@click.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    """Validate a config file without starting anything; print a summary, or every error (exit 1)."""
    from capbalancer.config_check import check_config_file

    config, errors = check_config_file(path)
    if errors or config is None:
        for exc in errors:
            click.echo(f"error: {exc}", err=True)
        click.echo(f"{len(errors)} error(s)", err=True)
        sys.exit(1)
    click.echo(config.summary())
    click.echo("ok")
