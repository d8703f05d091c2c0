"""Every engine route the proxy serves, and how each is handled (docs/routes.md is this table in prose).

Kinds:
- `scheduled`: work on the GPU. Parsed (route_parsing.py), a pool chosen by `model` (alias, adapter),
  scheduled by the pool's policy (held when nothing has room), relayed with retries before the first byte,
  and accounted (prompt and output tokens) in the scheduler: proxy.handle.
- `pooling`: as `scheduled`, but the request generates nothing (embeddings, score, rerank, classify...).
- `light`: cheap CPU work on the engine (tokenize): one routable backend of the pool, no scheduling or
  accounting; the next backend is tried when one cannot be reached.
- `sticky`: an object a backend created (/v1/responses/{id}): only that backend (ObjectAffinity).
- `lora`: loading/unloading an adapter: forwarded to the pool's backends (or those that hold it).
- `info`: a GET answered by the default pool's first routable backend (/version).

Unknown paths are answered 404 in the OpenAI error shape (app.py's middleware): guessing a pool for a route
we do not know could send a GPU job where it is not accounted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from capbalancer.config import ModelConfig
from capbalancer.fleet.models import parse_model_list
from capbalancer.server import access_log, proxy
from capbalancer.server.errors import ProxyError, error_object, error_response, from_exception
from capbalancer.server.locate import locate_object
from capbalancer.server.model_routing import body_for, resolve_pool
from capbalancer.server.proxy import BACKEND_HEADER, MODEL_HEADER, STATE, ProxyState, read_body, request_id_of
from capbalancer.server.relay import Upstream, UpstreamError, classify_upstream_error, response_headers
from capbalancer.server.route_parsing import parse_route
from capbalancer.server.upstream_http import UpstreamHTTPError

log = logging.getLogger("capbalancer.routes")


@dataclass(frozen=True, slots=True)
class RouteRule:
    method: str
    path: str
    kind: str  # scheduled | pooling | light | sticky | lora | info
    engines: str  # which engines serve it (documentation; the proxy forwards it to any backend of the pool)


_GEN, _POOL = "scheduled", "pooling"
ROUTES: tuple[RouteRule, ...] = (
    # OpenAI-compatible (vLLM, SGLang; TGI serves the first two)
    RouteRule("POST", "/v1/completions", _GEN, "vllm sglang tgi"),
    RouteRule("POST", "/v1/chat/completions", _GEN, "vllm sglang tgi"),
    RouteRule("POST", "/v1/embeddings", _POOL, "vllm sglang"),
    RouteRule("POST", "/v1/responses", _GEN, "vllm sglang"),
    RouteRule("GET", "/v1/responses/{response_id}", "sticky", "vllm sglang"),
    RouteRule("POST", "/v1/responses/{response_id}/cancel", "sticky", "vllm sglang"),
    RouteRule("POST", "/v1/messages", _GEN, "vllm"),
    RouteRule("POST", "/v1/audio/transcriptions", _GEN, "vllm"),
    RouteRule("POST", "/v1/audio/translations", _GEN, "vllm"),
    RouteRule("POST", "/invocations", _GEN, "vllm tgi"),
    # pooling models
    RouteRule("POST", "/pooling", _POOL, "vllm"),
    RouteRule("POST", "/classify", _POOL, "vllm sglang"),
    RouteRule("POST", "/score", _POOL, "vllm"),
    RouteRule("POST", "/v1/score", _POOL, "vllm sglang"),
    RouteRule("POST", "/rerank", _POOL, "vllm"),
    RouteRule("POST", "/v1/rerank", _POOL, "vllm sglang"),
    RouteRule("POST", "/v2/rerank", _POOL, "vllm"),
    RouteRule("POST", "/encode", _POOL, "sglang"),
    # native generation APIs
    RouteRule("POST", "/generate", _GEN, "tgi sglang"),
    RouteRule("POST", "/generate_stream", _GEN, "tgi"),
    RouteRule("POST", "/", _GEN, "tgi"),
    # tokenizer
    RouteRule("POST", "/tokenize", "light", "vllm sglang"),
    RouteRule("POST", "/detokenize", "light", "vllm sglang"),
    # LoRA adapters
    RouteRule("POST", "/v1/load_lora_adapter", "lora", "vllm"),
    RouteRule("POST", "/v1/unload_lora_adapter", "lora", "vllm"),
    RouteRule("POST", "/load_lora_adapter", "lora", "sglang"),
    RouteRule("POST", "/unload_lora_adapter", "lora", "sglang"),
    # information
    RouteRule("GET", "/version", "info", "vllm"),
)


def add_routes(app: web.Application) -> None:
    handlers: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
        _GEN: proxy.handle, _POOL: proxy.handle, "light": handle_light, "sticky": handle_sticky,
        "lora": handle_lora, "info": handle_info}
    for rule in ROUTES:
        app.router.add_route(rule.method, rule.path, handlers[rule.kind])


# --- one request to one backend, outside the scheduler -------------------------------------------------

async def send_direct(state: ProxyState, request: web.Request, up: Upstream, body: bytes,
                      request_id: str, pool_name: str) -> web.Response | UpstreamError:
    """Relay to `up` and read the whole answer (these routes answer small bodies, and never stream)."""
    try:
        async with asyncio.timeout(min(up.timeouts.first_byte_s, up.timeouts.total_s)):
            resp = await up.pool.request(request.method, request.raw_path, up.request_header_list(
                request.headers, request_id, drop_client_auth=bool(state.config.clients)), body)
            try:
                data = await resp.read(state.config.server.max_upstream_body_bytes)
            except BaseException:
                resp.close()
                raise
            resp.release()
    except TimeoutError:
        return UpstreamError(504, f"backend {up.name} sent no complete answer within {up.timeouts.first_byte_s:g}s",
                             retryable=False, backend_down=False, code="first_byte_timeout")
    except (UpstreamHTTPError, OSError) as exc:
        err = classify_upstream_error(exc, up.timeouts)
        if err.backend_down:
            state.driver.report_failure(up.name, err.code)
        return err
    headers = response_headers(resp.headers)
    headers["x-request-id"] = request_id
    headers[BACKEND_HEADER] = up.name
    state.metrics.count(pool_name, up.name, resp.status)
    return web.Response(status=resp.status, body=data, headers=headers)


def _as_response(outcome: web.Response | UpstreamError, request_id: str, backend: str | None) -> web.Response:
    if isinstance(outcome, web.Response):
        return outcome
    headers = {"x-request-id": request_id, **({BACKEND_HEADER: backend} if backend else {})}
    return error_response(outcome.status, outcome.message, code=outcome.code, headers=headers)


async def _admitted_body(state: ProxyState, request: web.Request) -> tuple[bytes, object | None]:
    """Client auth (when keys are configured) and the body, within the limits."""
    auth = state.client_auth()
    client = None
    if auth.enabled:
        client = auth.authenticate(request.headers.get("Authorization"))
        auth.admit(client, time.monotonic())
    raw = await read_body(request, state.config.server.max_body_bytes, state.config.server.body_read_timeout_s)
    return raw, client


def _check_client(state: ProxyState, client: object | None, pool: ModelConfig) -> None:
    if client is not None:
        state.client_auth().check_model(client, pool.name)  # type: ignore[arg-type]


def _routable(state: ProxyState, pool: ModelConfig, only: frozenset[str] | None) -> list[str]:
    return [b.backend_id for b in state.driver.scheduler.routable_backends(pool.name)
            if only is None or b.backend_id in only]


# --- light: tokenize, detokenize ------------------------------------------------------------------------

async def handle_light(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    request_id = request_id_of(request)
    try:
        raw, client = await _admitted_body(state, request)
        parsed = parse_route(request.path, raw, request.headers.get("Content-Type", ""))
        pool, only = resolve_pool(state, parsed.model or request.headers.get(MODEL_HEADER))
        access_log.note(request, request_id=request_id, model=parsed.model, pool=pool.name)
        _check_client(state, client, pool)
        candidates = _routable(state, pool, only)
        if not candidates:
            raise ProxyError(503, "no healthy backend for this model", retry_after_s=1.0, code="unavailable")
        start = random.randrange(len(candidates))  # spread the (cheap) work; no accounting needed
        order = candidates[start:] + candidates[:start]
        outcome: web.Response | UpstreamError | None = None
        for backend in order[:max(1, state.config.retries.max_attempts)]:
            up = state.upstreams.get(backend)
            if up is None:
                continue
            body = body_for(state, pool, parsed, request.path, raw, request.headers.get("Content-Type", ""), backend)
            outcome = await send_direct(state, request, up, body, request_id, pool.name)
            if not (isinstance(outcome, UpstreamError) and outcome.retryable):
                return _as_response(outcome, request_id, backend)
        if outcome is None:
            raise ProxyError(503, "no healthy backend for this model", retry_after_s=1.0, code="unavailable")
        return _as_response(outcome, request_id, None)
    except ProxyError as exc:
        return from_exception(exc, {"x-request-id": request_id})


# --- sticky: objects a backend holds ---------------------------------------------------------------------

async def handle_sticky(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    request_id = request_id_of(request)
    try:
        raw, _ = await _admitted_body(state, request)
        object_id = request.match_info["response_id"]
        backend = state.affinity.backend_of(object_id, state.driver.clock())
        if backend is None:  # created through another worker or replica, or before a restart: ask the backends
            backend = await locate_object(state, object_id, request.headers, request_id)
        up = state.upstreams.get(backend) if backend is not None else None
        if up is None:
            raise ProxyError(404, f"response {object_id!r} is not held by any backend (never created, expired, or "
                             "its backend was removed)", param="response_id", code="not_found")
        pool_name = state.driver.scheduler.backends[backend].spec.pool if backend in \
            state.driver.scheduler.backends else "-"
        access_log.note(request, request_id=request_id, pool=pool_name)
        return _as_response(await send_direct(state, request, up, raw, request_id, pool_name), request_id, backend)
    except ProxyError as exc:
        return from_exception(exc, {"x-request-id": request_id})


# --- LoRA adapters ---------------------------------------------------------------------------------------

POOL_HEADER = "x-capbalancer-pool"  # which pool's backends load an adapter (default: the default pool)


async def handle_lora(request: web.Request) -> web.StreamResponse:
    """Load on every routable backend of the pool (header x-capbalancer-pool, else the default pool);
    unload from every backend that holds the adapter. One backend's answer passes through unchanged;
    several are summed up in one JSON answer, 200 only if all succeeded."""
    state = request.app[STATE]
    request_id = request_id_of(request)
    try:
        raw, _ = await _admitted_body(state, request)
        try:
            name = orjson.loads(raw).get("lora_name")
        except (orjson.JSONDecodeError, AttributeError):
            name = None
        if not isinstance(name, str) or not name:
            raise ProxyError(400, "'lora_name' (a string) is required", param="lora_name")
        loading = "unload" not in request.path
        pool_name = request.headers.get(POOL_HEADER)
        if pool_name is not None and pool_name not in state.config.models:
            raise ProxyError(404, f"pool {pool_name!r} (header {POOL_HEADER}) is not configured", param=POOL_HEADER)
        pool = state.config.models[pool_name or state.config.default_model]
        access_log.note(request, request_id=request_id, model=name, pool=pool.name)
        targets = _routable(state, pool, None)
        if not loading:
            holders = set(state.adapters.backends_with(name))
            targets = [b for b in targets if b in holders] or targets
        if not targets:
            raise ProxyError(503, "no healthy backend to load the adapter on", retry_after_s=1.0, code="unavailable")
        results: dict[str, web.Response | UpstreamError] = {}
        for backend in targets:
            up = state.upstreams.get(backend)
            if up is not None:
                results[backend] = await send_direct(state, request, up, raw, request_id, pool.name)
        for backend, outcome in results.items():
            if isinstance(outcome, web.Response) and outcome.status < 400:
                (state.adapters.loaded if loading else state.adapters.unloaded)(backend, name)
        if len(results) == 1:
            backend, outcome = next(iter(results.items()))
            return _as_response(outcome, request_id, backend)
        summary = {b: {"status": o.status, "message": o.message if isinstance(o, UpstreamError)
                       else bytes(o.body or b"").decode("utf-8", "replace")[:500]} for b, o in results.items()}
        status = _lora_status([v["status"] for v in summary.values()])
        answer: dict[str, object] = {"lora_name": name, "backends": summary}
        if status >= 400:
            answer["error"] = error_object(status, f"{'loading' if loading else 'unloading'} adapter {name!r} "
                                                   f"failed on {len(summary)} backend(s)", param="lora_name")
        return web.Response(status=status, content_type="application/json", body=orjson.dumps(answer),
                            headers={"x-request-id": request_id})
    except ProxyError as exc:
        return from_exception(exc, {"x-request-id": request_id})


def _lora_status(statuses: list[int]) -> int:
    """One status for the answers of several backends: 200 when all succeeded; the engines' own status when
    they all refused alike (a 4xx is the client's error: a bad path, an adapter none of them holds), so that a
    client's mistake is not reported as the gateway's; else 502 (some failed, or they disagree)."""
    if all(s < 400 for s in statuses):
        return 200
    if len(set(statuses)) == 1 and 400 <= statuses[0] < 500:
        return statuses[0]
    return 502


# --- info --------------------------------------------------------------------------------------------------

async def handle_info(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    request_id = request_id_of(request)
    pool = state.config.models[state.config.default_model]
    for backend in _routable(state, pool, None):
        up = state.upstreams.get(backend)
        if up is None:
            continue
        outcome = await send_direct(state, request, up, b"", request_id, pool.name)
        if isinstance(outcome, web.Response):
            return outcome
    return error_response(503, f"no healthy backend answered {request.path}", retry_after_s=1.0,
                          code="unavailable", headers={"x-request-id": request_id})


# --- discovery: what each backend serves ------------------------------------------------------------------

MODELS_POLL_INTERVAL_S = 15.0  # adapters change rarely (and load/unload through us updates at once)
MODELS_POLL_TIMEOUT_S = 2.0


async def discover_models(state: ProxyState, interval_s: float = MODELS_POLL_INTERVAL_S) -> None:
    """Poll every backend's /v1/models into state.adapters, first at once, then every `interval_s`."""
    while True:
        names = {b.name for _, b in state.config.backends()}
        for gone in set(state.adapters.backends) - names:
            state.adapters.forget(gone)
        await asyncio.gather(*(_discover_one(state, name) for name in names), return_exceptions=True)
        await asyncio.sleep(interval_s)


async def _discover_one(state: ProxyState, name: str) -> None:
    up = state.upstreams.get(name)
    if up is None:
        return
    try:
        async with asyncio.timeout(MODELS_POLL_TIMEOUT_S):
            async with up.session.get(up.base_url + "/v1/models", headers=up.request_headers(
                    _NO_HEADERS, f"models-{name}")) as resp:
                if resp.status != 200:
                    return
                body = await resp.content.read(1 << 20)  # bounded: a model list is small
        seen = parse_model_list(orjson.loads(body))
    except Exception as exc:  # noqa: BLE001  # best effort: a backend that cannot say keeps its last answer
        log.debug("GET /v1/models from %s failed: %s", name, type(exc).__name__)
        return
    if seen is not None:
        state.adapters.update(name, seen)


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def adapter_cards(state: ProxyState) -> list[dict[str, object]]:
    """/v1/models entries for the adapters the fleet holds (parent: the pool that serves them)."""
    cards = []
    for name, holders in sorted(state.adapters.adapters().items()):
        try:
            pool, _ = resolve_pool(state, name)
        except ProxyError:
            continue
        cards.append({"id": name, "object": "model", "created": 0, "owned_by": "capbalancer", "parent": pool.name,
                      "root": name, "backends": sorted(holders)})
    return cards

