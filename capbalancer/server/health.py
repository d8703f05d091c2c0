"""Backend polling: the fleet monitor (capbalancer.fleet.monitor) when it exists, else a /health poll.

Both expose the same surface (`start`, `stop`, `add_target`, `remove_target`) and report to a sink with
`on_health(backend_id, ok, reason)` (and, for the monitor, `on_snapshot`), so the proxy works
standalone and gains engine snapshots when the monitor is installed.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from capbalancer.background import stop_task
from capbalancer.config import BackendConfig
from capbalancer.server.limits import is_fd_exhaustion

log = logging.getLogger("capbalancer.health")
_OURS = "proxy out of file descriptors"


class HealthSink(Protocol):
    def on_health(self, backend_id: str, ok: bool, reason: str = "") -> None: ...


@dataclass(frozen=True, slots=True)
class PollTarget:
    """Same fields as capbalancer.fleet.monitor.PollTarget."""

    backend_id: str
    base_url: str
    engine: str
    headers: dict[str, str] = field(default_factory=dict)
    kv_capacity_tokens: int | None = None  # from the profile: for engines that report KV use only as a fraction


class HealthPoller:
    """GET {url}/health on every backend each interval; a status below 500 is alive."""

    def __init__(self, targets: Sequence[PollTarget], sink: HealthSink, interval_s: float = 1.0,
                 timeout_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._targets = {t.backend_id: t for t in targets}
        self._sink = sink
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def add_target(self, target: Any) -> None:
        self._targets[target.backend_id] = target

    def remove_target(self, backend_id: str) -> None:
        self._targets.pop(backend_id, None)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="health-poller")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            targets = list(self._targets.values())
            if targets:
                results = await asyncio.gather(*(self._probe(t) for t in targets))
                for target, (ok, reason) in zip(targets, results, strict=True):
                    if target.backend_id in self._targets and reason != _OURS:
                        try:
                            self._sink.on_health(target.backend_id, ok, reason)
                        except Exception:
                            log.exception("health sink failed for %s", target.backend_id)
            await asyncio.sleep(max(0.05, self._interval_s - (time.monotonic() - started)))

    async def _probe(self, target: PollTarget) -> tuple[bool, str]:
        assert self._session is not None
        try:
            async with self._session.get(target.base_url + "/health", headers=target.headers) as resp:
                await resp.read()
                if resp.status >= 500:
                    return False, f"/health answered {resp.status}"
                return True, ""
        except asyncio.TimeoutError:
            return False, f"/health timed out after {self._timeout_s:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            if is_fd_exhaustion(exc):  # the proxy's own overload: no news about the backend
                return False, _OURS
            return False, f"/health failed: {type(exc).__name__}"


def make_poller(targets: Sequence[PollTarget], sink: Any, interval_s: float, timeout_s: float,
                clock: Callable[[], float]) -> tuple[Any, str, Callable[[PollTarget], Any]]:
    """The fleet monitor if installed, else the /health poller; which one it is; and how to convert a
    PollTarget for its `add_target`."""
    try:
        monitor = importlib.import_module("capbalancer.fleet.monitor")
    except ModuleNotFoundError as exc:
        if exc.name not in ("capbalancer.fleet.monitor",):
            raise
        return HealthPoller(targets, sink, interval_s, timeout_s, clock), "health poll", lambda t: t

    def convert(t: PollTarget) -> Any:
        return monitor.PollTarget(backend_id=t.backend_id, base_url=t.base_url, engine=t.engine,
                                  headers=dict(t.headers), kv_capacity_tokens=t.kv_capacity_tokens)

    poller = monitor.FleetMonitor([convert(t) for t in targets], sink, interval_s=interval_s, timeout_s=timeout_s,
                                  clock=clock)
    return poller, "fleet monitor", convert


def poll_target(b: BackendConfig) -> PollTarget:
    api_key = b.resolved_api_key()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # The profile's KV capacity lets the monitor turn a usage fraction into tokens when the engine does not
    # say its capacity (vLLM without cache_config_info, TGI before the capacity gauge); the engine's own
    # figure wins when it has one.
    capacity = b.profile.kv_capacity_tokens if b.profile is not None else None
    return PollTarget(backend_id=b.name, base_url=b.url, engine=b.engine, headers=headers,
                      kv_capacity_tokens=capacity)
