"""The aiohttp application: routes, lifecycle, and applying a (new) config to the running proxy."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import hdrs, web
from multidict import CIMultiDict

from capbalancer.config import BackendConfig, ClientKey, Config, ModelConfig, backend_spec
from capbalancer.sched.scheduler import Scheduler
from capbalancer.server import admin, observe, proxy, routes
from capbalancer.server.access_log import RECORD_KEY
from capbalancer.server.driver import SchedulerDriver
from capbalancer.server.errors import ProxyError, error_body, error_response, from_exception
from capbalancer.server.health import make_poller, poll_target
from capbalancer.server.limits import read_body_bounded
from capbalancer.server.metrics import ProxyMetrics
from capbalancer.server.proxy import STATE, ProxyState
from capbalancer.server.relay import Upstream, response_headers
from capbalancer.server.upstream_http import ResponseTooLarge

log = logging.getLogger("capbalancer.server")


def build_state(config: Config, config_path: str | None = None,
                clock: Callable[[], float] = time.monotonic) -> ProxyState:
    scheduler = Scheduler(pools=[m.pool_settings() for m in config.models.values()],
                          health=config.health.to_scheduler(), outlier=config.outlier)
    metrics = ProxyMetrics()
    driver = SchedulerDriver(scheduler, metrics, clock)
    for model, b in config.backends():
        scheduler.add_backend(backend_spec(b, model.name), clock())
        metrics.set_health(b.name, True)
    return ProxyState(config=config, driver=driver, metrics=metrics, config_path=config_path,
                      admin_token=os.environ.get(config.server.admin_token_env) or None)


def build_app(state: ProxyState) -> web.Application:
    # Body size is enforced by the handler (an OpenAI-shaped 413), not by aiohttp's plain-text one.
    app = web.Application(client_max_size=1 << 62, middlewares=[_unexpected_errors])
    app[STATE] = state
    observe.install(app, state)
    app.on_response_prepare.append(errors_before_the_middlewares)
    routes.add_routes(app)  # every engine route: see routes.py and docs/routes.md
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/info", tgi_info)
    app.router.add_get("/health", liveness)
    app.router.add_get("/ready", readiness)
    app.router.add_route("*", "/ping", readiness)  # vLLM's SageMaker health route (GET and POST)
    app.router.add_get("/metrics", own_metrics)
    admin.add_routes(app)
    app.on_startup.append(_startup)
    app.on_cleanup.append(_cleanup)
    if state.config.sharing is not None:  # replicas share reservations through a store (docs/replicas.md)
        from capbalancer.cluster import sharing

        sharing.install(app, state.config.sharing, state.driver, state.metrics, state)
    return app


@web.middleware
async def _unexpected_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    try:
        return await handler(request)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        return unexpected_error_answer(request, exc)


async def errors_before_the_middlewares(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """on_response_prepare: an error aiohttp answers by itself before any middleware runs, which the errors
    middleware never sees (an Expect header other than 100-continue: 417 "Unknown Expect: ..."), in the API's
    own shape like every other error. An answer that went through the middlewares has an access-log record
    (server/observe.py) and is left as it is: a relayed engine's error stays the engine's."""
    if (response.status < 400 or not isinstance(response, web.Response) or response.content_type != "text/plain"
            or request.get(RECORD_KEY) is not None):
        return
    body = error_body(response.status, response.text or response.reason or "error")
    response.body = body
    response.content_type = "application/json"
    response.headers[hdrs.CONTENT_LENGTH] = str(len(body))  # the hook runs after the plain text's was set


def unexpected_error_answer(request: web.BaseRequest, exc: Exception) -> web.StreamResponse:
    """The errors middleware's answer to an exception past the handler (re-raised when it has none): a plain call,
    so that the fast server (server/fastserver.py) answers as the middleware does without a coroutine around it."""
    if isinstance(exc, web.HTTPException):
        if exc.status >= 400:  # aiohttp's own 404/405 etc., in the OpenAI shape
            return error_response(exc.status, f"{exc.reason}: {request.method} {request.path}",
                                  headers={"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None)
        raise exc
    log.exception("unexpected error on %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal error in the proxy (logged)", code="internal_error")


# --- lifecycle ---------------------------------------------------------------------------------------

async def _startup(app: web.Application) -> None:
    state = app[STATE]
    for _, b in state.config.backends():
        state.upstreams[b.name] = Upstream.create(b, state.config.server)
    state.driver.start()
    targets = [poll_target(b) for _, b in state.config.backends()]
    h = state.config.health
    state.poller, state.poller_kind, state.make_target = make_poller(targets, state.driver, h.interval_s,
                                                                     h.timeout_s, state.driver.clock)
    await state.poller.start()
    discovery = asyncio.get_running_loop().create_task(routes.discover_models(state))
    state.background.add(discovery)
    for _, b in state.config.backends():
        if b.kv_events:
            _subscribe_kv_events(state, b)


def _subscribe_kv_events(state: ProxyState, b: BackendConfig) -> None:
    """Precise prefix mode: the engine's KV events go to the scheduler's prefix index (read at start only)."""
    from capbalancer.fleet.kv_events import KvEventSubscriber

    driver = state.driver
    sub = KvEventSubscriber(b.name, b.kv_events or "",
                            lambda backend_id, events: driver.scheduler.observe_kv_events(backend_id, events,
                                                                                          driver.clock()))
    state.kv_subscribers[b.name] = sub
    state.background.add(sub.start())


async def _cleanup(app: web.Application) -> None:
    state = app[STATE]
    if state.poller is not None:
        await state.poller.stop()
    await state.driver.stop()
    for task in list(state.background):
        task.cancel()
    await asyncio.gather(*(u.close() for u in state.upstreams.values()), return_exceptions=True)


# --- changing the fleet at run time ---------------------------------------------------------------------

def add_backend(state: ProxyState, model: ModelConfig, b: BackendConfig) -> None:
    state.upstreams[b.name] = Upstream.create(b, state.config.server)
    state.driver.add_backend(backend_spec(b, model.name))
    if state.poller is not None and state.make_target is not None:
        state.poller.add_target(state.make_target(poll_target(b)))


def remove_backend(state: ProxyState, name: str) -> None:
    if state.poller is not None:
        state.poller.remove_target(name)
    if name in state.driver.scheduler.backends:
        state.driver.remove_backend(name)
    old = state.upstreams.pop(name, None)
    if old is not None:
        _close_later(state, old)


def _close_later(state: ProxyState, upstream: Upstream) -> None:
    """Close a replaced backend's pool once its in-flight requests are done (they hold a reference)."""

    async def close_when_idle() -> None:
        deadline = time.monotonic() + upstream.timeouts.total_s
        connector = upstream.session.connector
        while time.monotonic() < deadline and connector is not None and _busy(connector):
            await asyncio.sleep(0.5)
        await upstream.close()

    task = asyncio.get_running_loop().create_task(close_when_idle())
    state.background.add(task)
    task.add_done_callback(state.background.discard)


def _busy(connector: aiohttp.BaseConnector) -> bool:
    return bool(getattr(connector, "_acquired", None))


def apply_config(state: ProxyState, new: Config) -> list[str]:
    """Move the running proxy to `new` without dropping in-flight requests. Returns what changed."""
    old = state.config
    changes: list[str] = []
    # Set when the listening socket, its server and the pollers were made: a reload cannot change them.
    restart_only = [f"server.{k}" for k in ("host", "port", "max_header_bytes", "idle_timeout_s", "drain_timeout_s",
                                                 "http_server")
                    if getattr(new.server, k) != getattr(old.server, k)]
    if new.health != old.health:
        restart_only.append("health")
    if new.sharing != old.sharing:
        restart_only.append("sharing")
    if new.outlier != old.outlier:
        state.driver.scheduler.outlier.settings = new.outlier
        changes.append("outlier settings changed")
    if restart_only:
        changes.append(f"{', '.join(restart_only)} changed: takes effect on restart only")
    sched = state.driver.scheduler
    for m in new.models.values():
        if m.name not in sched.pools:
            changes.append(f"model {m.name} added")
        sched.add_pool(m.pool_settings())
    new_backends = {b.name: (m, b) for m, b in new.backends()}
    old_backends = {b.name: (m, b) for m, b in old.backends()}
    for name in old_backends.keys() - new_backends.keys():
        remove_backend(state, name)
        changes.append(f"backend {name} removed")
    for name, (m, b) in new_backends.items():
        before = old_backends.get(name)
        if before is None:
            add_backend(state, m, b)
            changes.append(f"backend {name} added")
        elif before[1] != b or before[0].name != m.name:
            old_up = state.upstreams.pop(name, None)
            if old_up is not None:
                _close_later(state, old_up)
            if state.poller is not None:
                state.poller.remove_target(name)
            add_backend(state, m, b)  # same name: the scheduler keeps its live state, takes the new spec
            changes.append(f"backend {name} updated")
    for name in old.models.keys() - new.models.keys():
        state.driver.remove_pool(name)
        changes.append(f"model {name} removed")
    state.config = new
    state.admin_token = os.environ.get(new.server.admin_token_env) or None
    return changes


# --- routes that are not proxied per request --------------------------------------------------------------

LIVE_BODY = b'{"status":"ok"}'


async def liveness(request: web.Request) -> web.Response:
    return web.Response(body=LIVE_BODY, content_type="application/json")


def readiness_answer(state: ProxyState) -> tuple[int, bytes]:
    """/ready's status and body. Only reads: the front door's thread calls it too (server/frontdoor.py)."""
    routable = [bid for bid, b in list(state.driver.scheduler.backends.items()) if b.routable()]
    ready = bool(routable) and not state.draining
    details: dict[str, Any] = {"status": "ready" if ready else "unavailable", "routable_backends": routable}
    if state.sharing is not None:  # degraded sharing still serves: it stays ready, and says so here
        details["sharing"] = state.sharing.describe()
    return (200 if ready else 503), orjson.dumps(details)


def hold_queues_full(state: ProxyState) -> bool:
    """Every pool's hold queue is full: a new request would be answered 429 anyway. Only reads (the front
    door's thread calls it to shed load before the event loop sees the request)."""
    pools = list(state.driver.scheduler.pools.values())
    return bool(pools) and all(len(p.hold) >= p.settings.hold_max_requests for p in pools)


def probe_answer(state: ProxyState, path: str) -> tuple[int, bytes] | None:
    if path == "/health":
        return 200, LIVE_BODY
    if path == "/ready":
        return readiness_answer(state)
    return None


async def readiness(request: web.Request) -> web.Response:
    status, body = readiness_answer(request.app[STATE])
    return web.Response(status=status, body=body, content_type="application/json",
                        headers=None if status == 200 else {"Retry-After": "1"})


async def own_metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.Response(body=state.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})


def _client_of(state: ProxyState, request: web.Request) -> ClientKey | None:
    """With client keys configured, every route that reveals or reaches the fleet needs one (issue 14)."""
    auth = state.client_auth()
    return auth.authenticate(request.headers.get("Authorization")) if auth.enabled else None


def _allowed(client: ClientKey | None, pool: str) -> bool:
    return client is None or not client.models or pool in client.models


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    config = state.config
    try:
        client = _client_of(state, request)
    except ProxyError as exc:
        return from_exception(exc)
    match_any = [m for m in config.models.values() if m.match_any and _allowed(client, m.name)]
    if match_any:
        # Pools from `--backend URL` serve whatever their engines serve: ask one of them.
        passed = await _pass_through_get(state, match_any[0], "/v1/models", request)
        if passed is not None:
            return passed
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "capbalancer"}
            for m in config.models.values() if not m.match_any or len(match_any) == len(config.models)
            if _allowed(client, m.name)
            for name in (m.name, *m.aliases)]
    data.extend(routes.adapter_cards(state))  # LoRA adapters the fleet holds, as vLLM lists them
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


async def tgi_info(request: web.Request) -> web.Response:
    state = request.app[STATE]
    pool = state.config.models[state.config.default_model]
    try:
        client = _client_of(state, request)
        if client is not None:
            state.client_auth().check_model(client, pool.name)
    except ProxyError as exc:
        return from_exception(exc)
    passed = await _pass_through_get(state, pool, "/info", request)
    if passed is None:
        return error_response(503, "no healthy backend answered /info", retry_after_s=1.0, code="unavailable")
    return passed


async def _pass_through_get(state: ProxyState, pool: ModelConfig, path: str,
                            request: web.Request) -> web.Response | None:
    """GET `path` from the first routable backend of `pool` that answers; its bytes, unchanged."""
    routable = {b.backend_id for b in state.driver.scheduler.routable_backends(pool.name)}
    for b in pool.backends:
        up = state.upstreams.get(b.name)
        if up is None or b.name not in routable:
            continue
        try:
            async with asyncio.timeout(b.timeouts.first_byte_s):
                headers = up.request_header_list(request.headers, proxy.request_id_of(request),
                                                 drop_client_auth=bool(state.config.clients))
                async with up.session.get(up.base_url + path, headers=CIMultiDict(headers)) as resp:
                    body = await read_body_bounded(resp, state.config.server.max_upstream_body_bytes,
                                                   ResponseTooLarge)
                    headers = response_headers(resp.headers)
                    headers[proxy.BACKEND_HEADER] = b.name
                    return web.Response(status=resp.status, body=body, headers=headers)
        except (aiohttp.ClientError, OSError, TimeoutError, ResponseTooLarge) as exc:
            log.info("GET %s from %s failed: %s", path, b.name, type(exc).__name__)
    return None


