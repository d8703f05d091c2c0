"""The sharing loop: every interval, publish this replica's reservations and fold in the others'.

Decisions never wait for the store: the scheduler routes on what it knows, and this loop only refreshes
what it knows about the other replicas. When the store does not answer within `timeout_ms` (down,
restarting, stalled), the replica forgets the others at once and counts alone, as without sharing; it says
so in /ready (`sharing.state`), in the log and in `capbalancer_sharing_connected`; the next call that
succeeds re-joins. No request waits on the store, so a store failure delays none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

from capbalancer.background import stop_requested, stop_task
from capbalancer.cluster import wire
from capbalancer.cluster.localstore import default_replica_id
from capbalancer.cluster.stores import StoreError, open_store
from capbalancer.config import SharingConfig
from capbalancer.server.driver import SchedulerDriver
from capbalancer.server.metrics import ProxyMetrics

log = logging.getLogger("capbalancer.sharing")


@dataclass
class SharingStatus:
    connected: bool = False
    replicas: int = 0  # other replicas counted now
    last_ok_at_s: float | None = None
    last_error: str = ""
    degraded_since_s: float | None = None
    exchanges: int = 0
    failures: int = 0


class _Metrics:
    def __init__(self, metrics: ProxyMetrics) -> None:
        r = metrics.registry
        self.connected = Gauge("capbalancer_sharing_connected",
                               "1 while the sharing store answers; 0: counting this replica's requests alone",
                               registry=r)
        self.replicas = Gauge("capbalancer_sharing_replicas", "Other replicas whose reservations count now",
                              registry=r)
        self.failures = Counter("capbalancer_sharing_failures_total", "Store calls that failed or timed out",
                                registry=r)
        self.exchange = Histogram("capbalancer_sharing_exchange_seconds", "One publish-and-read round trip",
                                  buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.2, 1.0),
                                  registry=r)


class Sharing:
    def __init__(self, settings: SharingConfig, driver: SchedulerDriver, metrics: ProxyMetrics) -> None:
        self.settings = settings
        self.driver = driver
        self.replica_id = settings.replica_id or default_replica_id()
        self.status = SharingStatus()
        self._metrics = _Metrics(metrics)
        self._store = open_store(settings.store_url, settings.namespace, settings.timeout_ms / 1000.0)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sharing")

    async def stop(self) -> None:
        await stop_task(self._task)
        # Leave at once so the others stop counting our (now finished) requests before the TTL ends.
        with contextlib.suppress(*StoreError):
            async with asyncio.timeout(self.settings.timeout_ms / 1000.0):
                await self._store.leave(self.replica_id)
        await self._store.close()

    def describe(self) -> dict[str, Any]:
        s = self.status
        return {"state": "shared" if s.connected else "degraded: counting this replica alone",
                "replica_id": self.replica_id, "store": _redact(self.settings.store_url),
                "other_replicas": s.replicas, "last_error": s.last_error or None}

    async def exchange_once(self) -> None:
        """One publish-and-read; on failure, degrade at once."""
        sched = self.driver.scheduler
        payload = wire.encode(sched.local_state(self.replica_id, self.driver.clock()))
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.settings.timeout_ms / 1000.0):
                others = await self._store.exchange(self.replica_id, payload, int(self.settings.staleness_ms))
        except StoreError as exc:
            self._degrade(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return
        self._metrics.exchange.observe(time.perf_counter() - t0)
        states = []
        for rid, body in others:
            try:
                states.append(wire.decode(rid, body))
            except wire.WireError as exc:
                log.warning("sharing: ignoring %s", exc)
        now = self.driver.clock()
        self.driver.handle(sched.observe_remote(states, now, self.settings.staleness_ms / 1000.0))
        s = self.status
        if not s.connected:
            log.info("sharing: store %s answers; counting %d other replica(s)", _redact(self.settings.store_url),
                     len(states))
        s.connected, s.replicas, s.last_ok_at_s, s.degraded_since_s = True, len(states), now, None
        s.exchanges += 1
        self._metrics.connected.set(1)
        self._metrics.replicas.set(len(states))

    def _degrade(self, reason: str) -> None:
        s = self.status
        s.failures += 1
        s.last_error = reason
        self._metrics.failures.inc()
        if s.connected or s.degraded_since_s is None:
            log.warning("sharing: store %s unreachable (%s): counting this replica's requests alone until it "
                        "returns", _redact(self.settings.store_url), reason)
            s.degraded_since_s = self.driver.clock()
        s.connected, s.replicas = False, 0
        self._metrics.connected.set(0)
        self._metrics.replicas.set(0)
        self.driver.handle(self.driver.scheduler.forget_remote(self.driver.clock()))

    async def _run(self) -> None:
        interval_s = self.settings.interval_ms / 1000.0
        while True:
            started = time.monotonic()
            try:
                await self.exchange_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in one round must not end sharing for good
                log.exception("sharing round failed")
                self._degrade(type(exc).__name__)
            if stop_requested():  # the store client may have swallowed our cancellation
                return
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))


def _redact(url: str) -> str:
    """The store URL without a password, for /ready and logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


SHARING: web.AppKey[Sharing] = web.AppKey("capbalancer_sharing", Sharing)


def install(app: web.Application, settings: SharingConfig, driver: SchedulerDriver, metrics: ProxyMetrics,
            state: Any = None) -> None:
    """Run sharing with the app: started after the scheduler, stopped before it; `state` (the ProxyState)
    gets it too, for /ready."""
    app[SHARING] = Sharing(settings, driver, metrics)
    if state is not None:
        state.sharing = app[SHARING]

    async def on_startup(app: web.Application) -> None:
        app[SHARING].start()

    async def on_cleanup(app: web.Application) -> None:
        sharing = app.get(SHARING)
        if sharing is not None:
            await sharing.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.insert(0, on_cleanup)
