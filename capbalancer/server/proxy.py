"""One proxied request, start to end: parse, schedule (route or hold), relay with retries, account.

Accounting invariant: every attempt that the scheduler routed to a backend is `finish`ed exactly once
(in a `finally`), whatever happens — success, engine error, timeout, client gone — so the scheduler's
view of each backend's load never leaks.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from capbalancer.config import ClientKey, Config, ModelConfig
from capbalancer.fleet.models import AdapterIndex
from capbalancer.sched.estimates import PromptTokenEstimator
from capbalancer.sched.types import Demand, Dispatch, Expire, Hold, Reject
from capbalancer.server import access_log
from capbalancer.server.affinity import ObjectAffinity
from capbalancer.server.chat_template import ChatTemplate, plain_messages
from capbalancer.server.clients import ClientAuth
from capbalancer.server.deadline import Deadline
from capbalancer.server.driver import SchedulerDriver
from capbalancer.server.errors import ProxyError, error_response, from_exception, sse_error_event
from capbalancer.server.metrics import ProxyMetrics
from capbalancer.server.model_routing import body_for, pinned_backends, remember_created, resolve_pool
from capbalancer.server.parsing import ParsedRequest, prefix_key, session_of
from capbalancer.server.relay import (
    StreamCounter,
    Upstream,
    UpstreamError,
    Usage,
    classify_upstream_error,
    response_headers,
    usage_from_body,
)
from capbalancer.server.route_parsing import parse_route
from capbalancer.server.upstream_http import ResponseTooLarge, UpstreamHTTPError, UpstreamResponse

log = logging.getLogger("capbalancer.proxy")

PRIORITY_HEADER = "x-capbalancer-priority"
DEADLINE_HEADER = "x-capbalancer-deadline-ms"
BACKEND_HEADER = "x-capbalancer-backend"
DOOR_PASSED = "capbalancer.door_passed"  # request key: the front door judged this request and passed it on
HELD_HEADER = "x-capbalancer-held-ms"
MODEL_HEADER = "x-capbalancer-model"  # the pool of a request whose body names no model (TGI, SGLang native)
PROGRESS_EVERY_TOKENS = 16  # scheduler progress updates while streaming: often enough, cheap enough
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_HEADER_NUMBER = 1e9  # priority and deadline (ms, ~11 days) headers beyond this are refused: 400


@dataclass
class ProxyState:
    """Everything a request handler needs; one per app, swapped piecewise on reload."""

    config: Config
    driver: SchedulerDriver
    metrics: ProxyMetrics
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    estimators: dict[str, PromptTokenEstimator] = field(default_factory=dict)
    ids: itertools.count = field(default_factory=itertools.count)
    draining: bool = False
    config_path: str | None = None  # re-read by reload (None: nothing to reload)
    admin_token: str | None = field(default=None, repr=False)  # None: the admin API is off
    poller: Any = None  # FleetMonitor or HealthPoller
    poller_kind: str = ""
    make_target: Callable[[Any], Any] | None = None
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    kv_subscribers: dict[str, Any] = field(default_factory=dict)  # backend -> fleet.kv_events.KvEventSubscriber
    _client_auth: ClientAuth | None = None
    tokenizers: dict[str, Any] = field(default_factory=dict)  # tokenizer file -> loaded tokenizer
    chat_templates: dict[str, ChatTemplate | None] = field(default_factory=dict)  # tokenizer file -> its template
    # Backends added through the admin API, by name -> (model name, backend): a reload keeps them (the file
    # does not know them) until they are deleted, their model leaves the file, or the file names them itself.
    admin_added: dict[str, tuple[str, Any]] = field(default_factory=dict)
    adapters: AdapterIndex = field(default_factory=AdapterIndex)  # what each backend serves (its /v1/models)
    affinity: ObjectAffinity = field(default_factory=ObjectAffinity)  # stored responses -> their backend
    sharing: Any = None  # cluster.sharing.Sharing while replicas share reservations (for /ready)
    gate: Any = None  # server.overload.OverloadGate while the front door sheds at arrival

    def count_prompt_tokens(self, pool: ModelConfig, parsed: ParsedRequest) -> int:
        """Exact with the pool's tokenizer when it has one, else estimated from characters."""
        if pool.tokenizer is not None and parsed.prompt_text is not None:
            tok = self.tokenizers.get(pool.tokenizer)
            if tok is None:
                from tokenizers import Tokenizer

                tok = self.tokenizers[pool.tokenizer] = Tokenizer.from_file(pool.tokenizer)
            rendered = self._chat_prompt(pool.tokenizer, parsed) if parsed.messages is not None else None
            if rendered is not None:
                # The template writes the special tokens itself: the engine adds none (vLLM's chat default).
                parsed.token_ids = tok.encode(rendered, add_special_tokens=False).ids
            else:
                parsed.token_ids = tok.encode(parsed.prompt_text).ids
            return max(1, len(parsed.token_ids))
        return self.estimator(pool.name).estimate(parsed.prompt_chars)

    def _chat_prompt(self, tokenizer_file: str, parsed: ParsedRequest) -> str | None:
        """The chat request's prompt as the engine renders it, if the tokenizer's folder has the template."""
        if tokenizer_file in self.chat_templates:
            template = self.chat_templates[tokenizer_file]
        else:
            template = self.chat_templates[tokenizer_file] = ChatTemplate.beside(tokenizer_file)
        messages = plain_messages(parsed.messages) if template is not None else None
        if template is None or messages is None:
            return None
        return template.render(messages, parsed.add_generation_prompt, parsed.continue_final_message)

    def client_auth(self) -> ClientAuth:
        """The client keys of the current config (rebuilt, buckets and all, when a reload changes them)."""
        if self._client_auth is None or self._client_auth.keys is not self.config.clients:
            self._client_auth = ClientAuth(self.config.clients)
        return self._client_auth

    def estimator(self, pool: str) -> PromptTokenEstimator:
        est = self.estimators.get(pool)
        if est is None:
            est = self.estimators[pool] = PromptTokenEstimator()
        return est


STATE: web.AppKey[ProxyState] = web.AppKey("capbalancer_state", ProxyState)


# Generated request ids: a random per-process prefix and a counter. Unique across restarts and
# processes, and ~50x cheaper than uuid4() (which reads os.urandom on every call).
_ID_PREFIX = uuid.uuid4().hex[:12]
_id_counter = itertools.count(1)


def request_id_of(request: web.Request) -> str:
    given = request.headers.get("x-request-id")
    # Propagate a caller's id only if it is a sane token: it goes into logs and upstream headers.
    if given and len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return f"{_ID_PREFIX}-{next(_id_counter):x}"


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    # Compressed bodies are refused before a byte is read: aiohttp would inflate them past the size limit
    # (a small gzip bomb grows without bound), and engines do not accept them anyway.
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ProxyError(415, f"request bodies must not be compressed (Content-Encoding: {encoding[:40]})",
                         param="Content-Encoding", code="unsupported_content_encoding")
    length = request.content_length
    if length is not None and length > limit:
        raise ProxyError(413, f"request body is {length} bytes; the limit is {limit}", code="body_too_large")
    whole = getattr(request.content, "whole", None)  # the fast server's body (server/fastserver.py)
    if whole is not None and (data := whole()) is not None:
        if len(data) > limit:
            raise ProxyError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
        return data
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_any():
                buf += chunk
                if len(buf) > limit:
                    raise ProxyError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
    except TimeoutError:
        raise ProxyError(408, f"the request body took over {timeout_s:g}s to arrive", code="body_timeout") from None
    return bytes(buf)


def _header_number(request: web.Request, name: str) -> float | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        # Length first: int() of a long digit string costs time, and float() of a huge int overflows.
        if len(raw) > 64:
            value = math.inf
        else:
            value = float(int(raw)) if name == PRIORITY_HEADER else float(raw)
    except (ValueError, OverflowError):
        raise ProxyError(400, f"header {name} must be a number, got {raw[:40]!r}", param=name) from None
    if not abs(value) <= MAX_HEADER_NUMBER:  # inf and nan too
        raise ProxyError(400, f"header {name} must be a number within ±{MAX_HEADER_NUMBER:g}, got {raw[:40]!r}",
                         param=name)
    return value


def build_demand(state: ProxyState, request: web.Request, pool: ModelConfig, parsed: ParsedRequest,
                 client: ClientKey | None = None) -> Demand:
    now = state.driver.clock()
    priority = _header_number(request, PRIORITY_HEADER)
    if client is not None:
        # A key's priority is its ceiling: the header may lower it, never raise it.
        priority = client.priority if priority is None else min(priority, client.priority)
    deadline_ms = _header_number(request, DEADLINE_HEADER)
    if deadline_ms is not None and not deadline_ms > 0:
        raise ProxyError(400, f"header {DEADLINE_HEADER} must be > 0 (milliseconds from now)", param=DEADLINE_HEADER)
    return Demand(
        request_id=str(next(state.ids)),
        pool=pool.name,
        prompt_tokens=state.count_prompt_tokens(pool, parsed),
        # n / best_of sequences each generate up to max_tokens (and hold their own KV): counted as one
        # request of their sum, which is what the engine's usage reports.
        max_tokens=(parsed.max_tokens or pool.default_max_tokens) * parsed.sequences,
        arrival_s=now,
        priority=int(priority) if priority is not None else 0,
        deadline_s=now + deadline_ms / 1000.0 if deadline_ms is not None else None,
        stream=parsed.stream,
        api=parsed.api,
        prefix=prefix_key(parsed, pool.name, pool.aliases),
        session_id=session_of(request.headers.get("x-session-id"), parsed),
        prompt_tokens_exact=parsed.token_ids is not None,
        max_tokens_explicit=parsed.max_tokens is not None,
        sequences=parsed.sequences,
        door_passed=request.get(DOOR_PASSED, False),
    )


async def handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    started = time.monotonic()
    request_id = request_id_of(request)
    pool_name = "-"
    try:
        if state.draining:
            raise ProxyError(503, "the proxy is shutting down", retry_after_s=1.0, code="shutting_down")
        auth = state.client_auth()
        client = None
        if auth.enabled:  # checked before the body is read: an unknown caller costs nothing more
            client = auth.authenticate(request.headers.get("Authorization"))
            auth.admit(client, time.monotonic())
        raw = await read_body(request, state.config.server.max_body_bytes,
                                  state.config.server.body_read_timeout_s)
        # The text is the prefix index's key. Routes and their parsing: routes.py, route_parsing.py.
        parsed = parse_route(request.path, raw, request.headers.get("Content-Type", ""))
        pool, only_backends = resolve_pool(state, parsed.model or request.headers.get(MODEL_HEADER))
        pool_name = pool.name
        record = access_log.record_of(request)  # filled by attribute: once per request, not a **kwargs call each time
        if record is not None:
            record.request_id, record.model, record.pool = request_id, parsed.model, pool.name
        if client is not None:
            auth.check_model(client, pool.name)
        demand = build_demand(state, request, pool, parsed, client)
        pinned = await pinned_backends(state, parsed, state.driver.clock(), request.headers, request_id)
        demand.only_backends = pinned if pinned is not None else only_backends
        return await Forward(state, request, pool, parsed, demand, raw, request_id, started, record).run()
    except ProxyError as exc:
        state.metrics.count(pool_name, "-", exc.status)
        return from_exception(exc, {"x-request-id": request_id})


def _attempt_deadline(request: web.Request, loop: asyncio.AbstractEventLoop) -> Deadline:
    """The client connection's own deadline (the fast server's: its loop timer outlives each request), else one
    for this attempt alone (server/deadline.py)."""
    deadline = getattr(request, "attempt_deadline", None)
    return deadline if deadline is not None else Deadline(loop)


def _proxy_out_of_fds(exc: BaseException) -> bool:
    os_error = getattr(exc, "os_error", None) or exc
    return isinstance(os_error, OSError) and os_error.errno in (errno.EMFILE, errno.ENFILE)


class Forward:
    """The attempts of one request (first try, then retries on other backends)."""

    def __init__(self, state: ProxyState, request: web.Request, pool: ModelConfig, parsed: ParsedRequest,
                 demand: Demand, raw: bytes, request_id: str, started: float,
                 record: access_log.RequestRecord | None = None) -> None:
        self.state = state
        self.request = request
        self.pool = pool
        self.parsed = parsed
        self.demand = demand
        self.raw = raw
        self.request_id = request_id
        self.started = started
        self.held_s = 0.0
        self.record = record  # the access-log record (None: the request is not observed)
        self.tried: list[str] = []  # backends attempted, in order

    def retries_spent(self) -> bool:
        """No new attempt: `retries.max_attempts` made, or `retries.max_total_s` gone since the request arrived."""
        retries = self.state.config.retries
        return len(self.tried) >= retries.max_attempts or time.monotonic() - self.started >= retries.max_total_s

    def can_retry_elsewhere(self) -> bool:
        """Whether a retry could still go to a backend not tried yet (attempts and time left, one routable)."""
        if self.retries_spent():
            return False
        allowed = self.demand.only_backends
        return any(b.backend_id not in self.tried and (allowed is None or b.backend_id in allowed)
                   for b in self.state.driver.scheduler.routable_backends(self.pool.name))

    async def run(self) -> web.StreamResponse:
        state, demand = self.state, self.demand
        tried = self.tried
        last: UpstreamError | web.Response | None = None
        while True:
            decision = state.driver.submit(demand, tried)
            if state.gate is not None and not tried:  # the verdict the front door refuses by (server/overload.py)
                state.gate.on_decision(demand.pool, decision, len(self.raw), time.monotonic(),
                                       own_deadline=demand.deadline_s is not None)
                if demand.door_passed:  # held or sent now: counted by the scheduler, no longer in transit
                    self.request.door_pass_read()  # type: ignore[attr-defined]  # only the fast server sets it
            if isinstance(decision, Reject):
                return self._final_error(last, decision.status, decision.reason, decision.retry_after_s,
                                         decision.code)
            if isinstance(decision, Hold):
                held_at = time.monotonic()
                released = await state.driver.wait_released(demand.request_id)
                self.held_s += time.monotonic() - held_at
                state.metrics.hold_wait.observe(self.held_s)
                if isinstance(released, Expire):
                    return self._final_error(last, released.status, released.reason, released.retry_after_s)
                assert isinstance(released, Dispatch)
                backend = released.backend_id
            else:
                backend = decision.backend_id
            tried.append(backend)
            record = self.record
            if record is not None:
                record.backend, record.retries, record.held_ms = backend, len(tried) - 1, self.held_s * 1000.0
            upstream = state.upstreams.get(backend)
            if upstream is None:  # removed by a reload between decision and now
                state.driver.finish(demand.request_id, ok=False)
                continue
            outcome = await self.attempt(upstream)
            if isinstance(outcome, UpstreamError):  # engine answers are counted where they are relayed
                state.metrics.count(self.pool.name, backend, outcome.status)
            if isinstance(outcome, web.StreamResponse) and not isinstance(outcome, web.Response):
                return outcome  # a stream: already sent
            retryable = (outcome.retryable if isinstance(outcome, UpstreamError)
                         else outcome.status in RETRYABLE_STATUSES)
            if isinstance(outcome, UpstreamError) and outcome.code == "first_token_timeout":
                # Long past its objective already: judged afresh as it is sent again (its hold, its objective).
                demand.arrival_s, demand.deadline_s = state.driver.clock(), None
            if not retryable or self.retries_spent():
                return self._deliver(outcome, backend)
            state.metrics.retries.labels(backend, str(outcome.status)).inc()
            log.info("request %s: %s answered %s before any byte; retrying elsewhere", self.request_id, backend,
                     outcome.status)
            last = outcome

    def _final_error(self, last: UpstreamError | web.Response | None, status: int, reason: str,
                     retry_after_s: float, code: str = "") -> web.StreamResponse:
        if last is not None:  # the previous attempt's answer says more than "nothing else can serve"
            return self._deliver(last, "-")
        self.state.metrics.count(self.pool.name, "-", status)
        if status < 500 and status != 429:  # the request itself is wrong: retrying it later will not help
            return error_response(status, reason, code=code or "invalid_request", param="messages"
                                  if code == "context_length_exceeded" else None, headers=self._headers(None))
        resp = error_response(status, reason, retry_after_s=retry_after_s, code=code or ("no_capacity"
                              if status == 429 else "unavailable"), headers=self._headers(None))
        if status == 429:  # overloaded: the client's retry reconnects, and the front door sheds it cheaply
            resp.force_close()
        return resp

    def _deliver(self, outcome: UpstreamError | web.Response, backend: str) -> web.Response:
        if isinstance(outcome, UpstreamError):
            return error_response(outcome.status, outcome.message, code=outcome.code, headers=self._headers(
                backend if backend != "-" else None), retry_after_s=outcome.retry_after_s)
        return outcome

    def _headers(self, backend: str | None) -> dict[str, str]:
        headers = {"x-request-id": self.request_id, HELD_HEADER: str(int(self.held_s * 1000))}
        if backend:
            headers[BACKEND_HEADER] = backend
        return headers

    async def attempt(self, up: Upstream) -> web.StreamResponse | UpstreamError:
        """One try on one backend. Returns the response (sent if streamed), or why it failed before a byte."""
        state, request, demand = self.state, self.request, self.demand
        driver, metrics = state.driver, state.metrics
        loop = asyncio.get_running_loop()
        timeouts = up.timeouts
        t_start = loop.time()
        total_deadline = t_start + timeouts.total_s
        inflight = metrics.inflight_for(up.name)
        inflight.n += 1
        ok = False
        usage: Usage | None = None
        counter: StreamCounter | None = None
        upstream_resp: UpstreamResponse | None = None
        reuse_connection = False
        sresp: web.StreamResponse | None = None
        phase = "first byte"
        # Outlier evidence (sched/outlier.py): True the backend failed, False it answered, None no telling.
        fault: bool | None = None
        overdue = False
        try:
            try:
                with _attempt_deadline(request, loop).start(min(t_start + timeouts.first_byte_s, total_deadline)) as timer:
                    if state.config.retries.first_token_timeout:
                        def on_overdue() -> None:
                            # No first token within the first-token timer and nothing sent to the client yet:
                            # give up on this backend now (the upstream request is cancelled) and retry elsewhere.
                            # With nowhere else to go (one backend, or the retry budget spent: a non-streamed
                            # answer of 15 s is past max_total_s) it keeps waiting: cancelling would turn a slow
                            # answer into a 504, and the first-byte timeout still bounds a hung engine.
                            nonlocal overdue
                            if phase == "first byte" and self.can_retry_elsewhere():
                                overdue = True
                                timer.reschedule(loop.time())

                        driver.watch_first_token(demand.request_id, on_overdue)
                    raw_path = request.raw_path
                    try:
                        upstream_resp = await up.pool.request(
                            request.method, raw_path if raw_path.startswith("/") else request.path_qs,
                            up.request_header_list(request.headers, self.request_id,
                                                  drop_client_auth=bool(self.state.config.clients)),
                            body_for(state, self.pool, self.parsed, request.path, self.raw,
                                     request.headers.get("Content-Type", ""), up.name))
                    except (UpstreamHTTPError, OSError) as exc:
                        err = classify_upstream_error(exc, timeouts)
                        # Out of file descriptors is the proxy's own fault, never the backend's.
                        fault = not _proxy_out_of_fds(exc)
                        if err.backend_down and fault:
                            driver.report_failure(up.name, err.code)
                        return err
                    status = upstream_resp.status
                    headers = response_headers(upstream_resp.headers)
                    headers.update(self._headers(up.name))
                    if status >= 400 or not self.parsed.stream:
                        try:
                            body = await upstream_resp.read(state.config.server.max_upstream_body_bytes)
                        except ResponseTooLarge as exc:  # never held whole: 502, the connection closed
                            fault = True  # an endless or oversized body is the backend's failure (outlier)
                            return classify_upstream_error(exc, timeouts)
                        reuse_connection = True
                        metrics.observe_ttfb(up.name, time.monotonic() - self.started)
                        usage = Usage()
                        if status < 400:
                            usage_from_body(body, usage)
                            remember_created(state, request.path, up.name, body, driver.clock())
                        ok = status < 400
                        fault = status >= 500
                        metrics.count(self.pool.name, up.name, status)
                        return self._close_if_congested(web.Response(status=status, body=body, headers=headers))
                    # A stream: wait for its first bytes before answering, so that a first-byte timeout
                    # is still a clean 504 rather than a broken stream.
                    first = await upstream_resp.read_chunk()
                    metrics.observe_ttfb(up.name, time.monotonic() - self.started)
                    counter = StreamCounter()
                    if status < 400:
                        remember_created(state, request.path, up.name, first, driver.clock())
                    if first and counter.feed(first):
                        driver.on_first_token(demand.request_id)
                    sresp = self._close_if_congested(web.StreamResponse(status=status, headers=headers))
                    phase = "stream"
                    driver.watch_first_token(demand.request_id, None)
                    timer.reschedule(min(loop.time() + timeouts.stream_idle_s, total_deadline))
                    await sresp.prepare(request)
                    metrics.count(self.pool.name, up.name, status)
                    if first:
                        await sresp.write(first)
                    reported = counter.events
                    while True:
                        timer.reschedule(min(loop.time() + timeouts.stream_idle_s, total_deadline))
                        chunk = await upstream_resp.read_chunk()
                        if not chunk:
                            break
                        if counter.feed(chunk):
                            if reported == 0:
                                driver.on_first_token(demand.request_id)
                            if counter.events - reported >= PROGRESS_EVERY_TOKENS or reported == 0:
                                driver.on_progress(demand.request_id, counter.events)
                                reported = counter.events
                        await sresp.write(chunk)
                    timer.reschedule(None)
                reuse_connection = True
                ok = True
                fault = False
                await sresp.write_eof()
                return sresp
            except TimeoutError:
                fault = True
                if overdue:
                    return UpstreamError(504, f"backend {up.name} produced no first token within the first-token "
                                         "timer; cancelled there", retryable=True, backend_down=False,
                                         code="first_token_timeout")
                if phase == "first byte":
                    elapsed = loop.time() - t_start
                    which = "total" if elapsed >= timeouts.total_s - 1e-3 else "first-byte"
                    limit = timeouts.total_s if which == "total" else timeouts.first_byte_s
                    return UpstreamError(504, f"backend {up.name} sent no response within the {which} timeout "
                                         f"({limit:g}s)", retryable=False, backend_down=False,
                                         code="first_byte_timeout" if which == "first-byte" else "total_timeout")
                which = "total" if loop.time() >= total_deadline - 1e-3 else "stream idle"
                limit = timeouts.total_s if which == "total" else timeouts.stream_idle_s
                return await self._break_stream(sresp, 504, f"backend {up.name} exceeded the {which} timeout "
                                                f"({limit:g}s)", "stream_timeout")
            except (UpstreamHTTPError, aiohttp.ClientConnectionError) as exc:
                transport = request.transport
                if sresp is not None and sresp.prepared and (transport is None or transport.is_closing()):
                    return sresp  # the client left (a write to it failed): nothing more to tell it
                fault = True
                if sresp is None or not sresp.prepared:
                    return UpstreamError(502, f"backend {up.name} failed mid-response: {type(exc).__name__}",
                                         retryable=False, backend_down=False, code="backend_error")
                # A response cut off mid-way is an engine that died: mark it down now, not after N polls
                # (a live one comes back at its next good health poll).
                driver.report_failure(up.name, "connection lost mid-stream")
                return await self._break_stream(sresp, 502, f"backend {up.name} connection lost mid-stream",
                                                "backend_disconnected")
        finally:
            driver.watch_first_token(demand.request_id, None)
            inflight.n -= 1
            if upstream_resp is not None:
                if reuse_connection:
                    upstream_resp.release()
                else:
                    upstream_resp.close()  # closes the socket: the engine sees the client leave at once
            output_tokens = prompt_tokens = None
            if counter is not None:
                output_tokens, prompt_tokens = counter.output_tokens, counter.usage.prompt_tokens
            elif usage is not None:
                output_tokens, prompt_tokens = usage.completion_tokens, usage.prompt_tokens
            if demand.api == "embeddings":
                output_tokens = 0
            driver.finish(demand.request_id, output_tokens=output_tokens, prompt_tokens=prompt_tokens, ok=ok,
                          fault=fault)
            record = self.record
            if record is not None:
                record.tokens_in, record.tokens_out = prompt_tokens or demand.prompt_tokens, output_tokens
            if prompt_tokens and ok:
                state.estimator(self.pool.name).observe(self.parsed.prompt_chars, prompt_tokens)
            if ok:
                metrics.observe_latency(self.pool.name, time.monotonic() - self.started)

    def _close_if_congested(self, resp: web.StreamResponse) -> web.StreamResponse:
        """While the front door sheds at arrival, a keep-alive client's next request must meet it too."""
        gate = self.state.gate
        if gate is not None and gate.congested():
            resp.force_close()
        return resp

    async def _break_stream(self, sresp: web.StreamResponse | None, status: int, message: str,
                            code: str) -> web.StreamResponse | UpstreamError:
        """End a stream that already began with an SSE error event (and no [DONE]: it did not finish)."""
        log.warning("request %s: %s", self.request_id, message)
        if sresp is None or not sresp.prepared:
            return UpstreamError(status, message, retryable=False, backend_down=False, code=code)
        try:
            await sresp.write(sse_error_event(status, message, code))
            await sresp.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass  # the client is gone too
        return sresp
