"""Run the proxy: one process, one event loop; SIGTERM drains, SIGHUP reloads."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

from aiohttp import web

from capbalancer.config import Config, ServerSettings
from capbalancer.server import access_log
from capbalancer.server.admin import reload_config
from capbalancer.server.app import build_app, build_state, hold_queues_full, probe_answer
from capbalancer.server.fastserver import FastServer
from capbalancer.server.frontdoor import FrontDoor, bind_listeners
from capbalancer.server.http_errors import json_http_errors
from capbalancer.server.limits import default_max_connections, fd_soft_limit
from capbalancer.server.overload import OverloadGate
from capbalancer.server.proxy import ProxyState

log = logging.getLogger("capbalancer.server")


def install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def start_front_door(settings: ServerSettings, state: ProxyState, server: web.Server,
                     loop: asyncio.AbstractEventLoop, fast: FastServer | None = None) -> FrontDoor:
    """Listen on a thread of its own that answers probes and caps connections (server/frontdoor.py)."""
    cap = settings.max_connections or default_max_connections(fd_soft_limit())
    # aiohttp's live connections (a dict; len() of it is atomic under the GIL, so the thread may read it).
    connections = getattr(server, "_connections", None)
    count = (lambda: len(connections)) if isinstance(connections, dict) else (lambda: len(server.connections))
    if fast is not None:  # its own connections and those it handed to aiohttp
        count = fast.connection_count
    from capbalancer.cluster.workers import reuse_port

    # `serve --workers N`: N processes listen on one port (SO_REUSEPORT), the kernel spreads connections.
    # Refusal at arrival: the loop publishes what a newcomer would face, the door judges each new request.
    gate = state.gate = OverloadGate(state.driver.scheduler)
    gate.start()
    door = FrontDoor(bind_listeners(settings.host, settings.port, reuse_port=reuse_port()), loop, fast or server,
                     lambda path: probe_answer(state, path), count, cap, shed=lambda: hold_queues_full(state),
                     judge=gate.judge_head, on_refused=lambda head, status: _log_refused(state, head, status),
                     passes=lambda: gate.passed_total, on_pass_read=gate.pass_read)
    # The thread needs the GIL for a few microseconds per connection; a busy loop thread hands it over only every
    # switch interval (5 ms by default), several times per probe. 0.5 ms bounds that wait (measured:
    # bench/results/robust-server.md); the loop thread is only asked to switch while the door waits.
    sys.setswitchinterval(0.0005)
    door.start()
    log.info("accepting on a front-door thread: /health and /ready answered there; at most %d connections", cap)
    return door


def _log_refused(state: ProxyState, head: bytes, status: int) -> None:
    """A request the front door refused gets its access-log line too (the switch is read live: reloads)."""
    if state.config.server.access_log:
        access_log.emit_refused_at_the_door(head, status)


async def serve(config: Config, *, config_path: str | None = None,
                ready: Callable[[str], None] | None = None,
                on_exit: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and let in-flight requests finish (drain_timeout_s)."""
    settings = config.server
    access_log.install_handler()  # used while server.access_log is on (a reload may switch it)
    state = build_state(config, config_path)
    app = build_app(state)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=settings.drain_timeout_s,
                           # A client that goes away cancels its handler: held requests leave the queue and
                           # upstream requests are closed at once.
                           handler_cancellation=True,
                           max_line_size=settings.max_header_bytes, max_field_size=settings.max_header_bytes,
                           # aiohttp closes a connection waiting for a request after this, counted from its start
                           # or its last response, whether or not header bytes trickle in (slow-loris).
                           keepalive_timeout=settings.idle_timeout_s)
    await runner.setup()
    json_http_errors(runner.server)
    from capbalancer.cluster.workers import reuse_port

    loop = asyncio.get_running_loop()
    door = None
    # The proxied routes on httptools, the rest handed to aiohttp's server (server/fastserver.py).
    fast = FastServer(app, runner.server, settings) if settings.http_server == "httptools" else None
    listener: asyncio.AbstractServer | None = None
    try:
        if settings.accept_thread:
            door = start_front_door(settings, state, runner.server, loop, fast)
        elif fast is not None:
            listener = await loop.create_server(fast, settings.host, settings.port, backlog=4096, reuse_address=True,
                                                reuse_port=reuse_port() or None)
        else:
            site = web.TCPSite(runner, settings.host, settings.port, backlog=4096, reuse_address=True,
                               reuse_port=reuse_port() or None)  # `serve --workers N`: N processes on one port
            await site.start()
    except OSError:  # taken since the pre-flight check: close what was opened, then say so (the caller does)
        await runner.cleanup()
        if on_exit is not None:
            await on_exit()
        raise
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reload_config(state))
    # Everything built so far lives as long as the process: out of the collector's sight, so that the older
    # generations' collections do not walk it. A young generation of 10,000 objects (700 by default) lets a
    # request's short-lived objects die by refcount before a collection looks at them, and fewer survivors
    # climb to the older generations. Together ~30 us CPU a request (bench/results/dataplane.md).
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    n_backends = len(state.config.backends())
    log.info("capbalancer listening on http://%s:%d (%d model(s), %d backend(s), polling by %s, admin API %s)",
             settings.host, settings.port, len(state.config.models), n_backends, state.poller_kind,
             "on" if state.admin_token else "off")
    if ready is not None:
        ready(f"http://{settings.host}:{settings.port}")
    try:
        await stop.wait()
        log.info("shutting down: no new connections; draining in-flight requests (up to %gs)",
                 settings.drain_timeout_s)
        state.draining = True
        if door is not None:
            door.stop()
    finally:
        if door is not None:
            door.stop()
        if state.gate is not None:
            await state.gate.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        if listener is not None:
            listener.close()
        if fast is not None:  # its requests in progress finish first (then the upstream pools close)
            await fast.shutdown(settings.drain_timeout_s)
        await runner.cleanup()
        if on_exit is not None:
            await on_exit()
        log.info("stopped")
