"""Fault-injecting backends: a real OpenAI/TGI-shaped aiohttp server, one process each, that misbehaves on
demand. Tests start it as a subprocess (`FaultBackend`), point the proxy at it, and switch its faults at
runtime through a control API that keeps answering whatever the serving paths are doing:

    POST /_fault          {"api": "die", "after_chunks": 2, ...}   set knobs (others keep their value)
    GET  /_fault          the knobs and what the server has seen (counts, headers, bodies)
    POST /_fault/release  let every held stream finish now
    POST /_fault/reset    forget the counters

Faults on the API paths (`api` knob):
    ok      answer normally (streams `chunks` chunks, `chunk_delay_s` apart; `first_byte_delay_s` first)
    die     the process exits (os._exit) after `after_chunks` chunks of a stream; for a non-streaming
            request, before any byte (`after_chunks` 0) or after half the body: the proxy sees a
            reset/EOF, exactly as when an engine is killed
    hang    accept the request, never send a byte
    stall   send `after_chunks` chunks, then nothing more, with the connection left open
    status  answer `status` (5xx, 429, 503, 400...) with a JSON error body before any byte,
            plus `Retry-After` when `retry_after` is set
    hold    send the first chunk, then hold the stream open until released or `hold_s` passes
Health (`health` knob): ok | fail (503) | hang.  Metrics (`metrics` knob): ok | refuse (connection
aborted) | slow (`metrics_delay_s`) | empty | garbage | 404.

Run by hand: `python tests/faults.py --port 9001 --api ok`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

API_FAULTS = ("ok", "die", "hang", "stall", "status", "hold")
HEALTH_FAULTS = ("ok", "fail", "hang")
METRICS_FAULTS = ("ok", "refuse", "slow", "empty", "garbage", "404")
API_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/generate", "/generate_stream")


@dataclass
class Knobs:
    api: str = "ok"
    health: str = "ok"
    metrics: str = "ok"
    model: str = "m"
    chunks: int = 5
    chunk_delay_s: float = 0.0
    first_byte_delay_s: float = 0.0
    after_chunks: int = 1  # for die/stall: chunks sent before the fault
    status: int = 503
    retry_after: str | None = None
    hold_s: float = 60.0
    metrics_delay_s: float = 30.0
    # Extra headers on every API response (to check that the proxy strips hop-by-hop/internal ones).
    response_headers: dict[str, str] = field(default_factory=dict)

    def update(self, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if not hasattr(self, key):
                raise ValueError(f"unknown knob {key!r}")
            setattr(self, key, value)
        if self.api not in API_FAULTS or self.health not in HEALTH_FAULTS or self.metrics not in METRICS_FAULTS:
            raise ValueError(f"bad fault: api={self.api} health={self.health} metrics={self.metrics}")


# ---------------------------------------------------------------------------------------------------
# The server (runs in its own process)
# ---------------------------------------------------------------------------------------------------

def _server_main(argv: list[str]) -> None:
    from aiohttp import web

    parser = argparse.ArgumentParser(description="fault-injecting OpenAI/TGI test backend")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="fault")
    parser.add_argument("--knobs", default="{}", help="initial knobs as JSON")
    args = parser.parse_args(argv)

    knobs = Knobs()
    knobs.update(json.loads(args.knobs))
    counts: Counter[str] = Counter()
    recent: deque[dict[str, Any]] = deque(maxlen=50)  # last requests: path, method, headers, body
    state = {"inflight": 0, "max_inflight": 0, "streams_started": 0, "streams_completed": 0,
             "disconnects": 0, "release": asyncio.Event()}

    def error_body(status: int, message: str) -> bytes:
        return json.dumps({"error": {"message": message, "type": "server_error" if status >= 500
                                     else "invalid_request_error", "param": None, "code": status}}).encode()

    def chunk_payload(path: str, i: int, last: bool) -> bytes:
        if path == "/generate_stream":
            event = {"token": {"id": i, "text": f"t{i} ", "logprob": 0.0, "special": False},
                     "generated_text": None, "details": None}
            if last:
                event["generated_text"] = "".join(f"t{k} " for k in range(i + 1))
            return b"data:" + json.dumps(event).encode() + b"\n\n"
        if path == "/v1/completions":
            body = {"id": "cmpl-fault", "object": "text_completion", "created": 0, "model": knobs.model,
                    "choices": [{"index": 0, "text": f"t{i} ", "finish_reason": "stop" if last else None}]}
        else:
            body = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": 0,
                    "model": knobs.model, "choices": [{"index": 0, "delta": {"content": f"t{i} "},
                                                       "finish_reason": "stop" if last else None}]}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def full_body(path: str) -> dict[str, Any]:
        text = "".join(f"t{i} " for i in range(knobs.chunks))
        usage = {"prompt_tokens": 3, "completion_tokens": knobs.chunks, "total_tokens": 3 + knobs.chunks}
        if path == "/generate":
            return {"generated_text": text}
        if path == "/v1/embeddings":
            return {"object": "list", "model": knobs.model, "usage": {"prompt_tokens": 3, "total_tokens": 3},
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]}
        if path == "/v1/completions":
            return {"id": "cmpl-fault", "object": "text_completion", "created": 0, "model": knobs.model,
                    "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                    "usage": usage}
        return {"id": "chatcmpl-fault", "object": "chat.completion", "created": 0, "model": knobs.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}], "usage": usage}

    def die() -> None:
        # Flushing nothing, closing nothing: the kernel resets the sockets, as when an engine is killed.
        os._exit(17)

    async def api(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        counts[request.path] += 1
        counts["api"] += 1
        recent.append({"path": request.path, "method": request.method, "query": request.query_string,
                       "headers": dict(request.headers), "body": raw[:2000].decode(errors="replace"),
                       "at": time.time()})
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        stream = request.path == "/generate_stream" or (isinstance(body, dict) and bool(body.get("stream")))
        state["inflight"] += 1
        state["max_inflight"] = max(state["max_inflight"], state["inflight"])
        try:
            return await answer(request, stream)
        except (ConnectionResetError, asyncio.CancelledError):
            state["disconnects"] += 1
            raise
        finally:
            state["inflight"] -= 1

    async def answer(request: web.Request, stream: bool) -> web.StreamResponse:
        fault = knobs.api
        if knobs.first_byte_delay_s:
            await asyncio.sleep(knobs.first_byte_delay_s)
        if fault == "hang":
            await asyncio.sleep(3600)
        if fault == "status":
            headers = {"Retry-After": knobs.retry_after} if knobs.retry_after else {}
            return web.Response(status=knobs.status, body=error_body(knobs.status, f"fault: status {knobs.status}"),
                                content_type="application/json", headers=headers)
        if fault == "die" and not stream:
            if knobs.after_chunks <= 0:
                die()
            # Headers and half the body, then gone: a response that began and never ended.
            payload = json.dumps(full_body(request.path)).encode()
            resp = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Content-Length": str(len(payload))})
            await resp.prepare(request)
            await resp.write(payload[: len(payload) // 2])
            await asyncio.sleep(0.05)  # let the half reach the socket before the process vanishes
            die()
        if not stream:
            resp = web.Response(body=json.dumps(full_body(request.path)).encode(),
                                content_type="application/json", headers=knobs.response_headers)
            return resp
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **knobs.response_headers})
        await resp.prepare(request)
        state["streams_started"] += 1
        n = knobs.chunks
        for i in range(n):
            if fault in ("die", "stall") and i == knobs.after_chunks:
                if fault == "die":
                    die()
                await asyncio.sleep(3600)
            if fault == "hold" and i == 1:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(state["release"].wait(), knobs.hold_s)
            elif i and knobs.chunk_delay_s:
                await asyncio.sleep(knobs.chunk_delay_s)
            await resp.write(chunk_payload(request.path, i, i == n - 1))
        if request.path != "/generate_stream":
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        state["streams_completed"] += 1
        return resp

    async def health(request: web.Request) -> web.Response:
        counts["/health"] += 1
        if knobs.health == "hang":
            await asyncio.sleep(3600)
        if knobs.health == "fail":
            return web.Response(status=503, text="unhealthy")
        return web.Response(text="ok")

    async def metrics(request: web.Request) -> web.StreamResponse:
        counts["/metrics"] += 1
        fault = knobs.metrics
        if fault == "refuse":
            # Drop the connection without a byte: what a dead or firewalled metrics port looks like.
            if request.transport is not None:
                request.transport.abort()
            await asyncio.sleep(1)
            raise ConnectionResetError
        if fault == "slow":
            await asyncio.sleep(knobs.metrics_delay_s)
        if fault == "empty":
            return web.Response(text="", content_type="text/plain")
        if fault == "garbage":
            return web.Response(body=b"\x00\xffnot prometheus {{{ vllm:num_requests_running = lots\n\x89PNG",
                                content_type="text/plain")
        if fault == "404":
            return web.Response(status=404, text="no metrics here")
        running = state["inflight"]
        text = (
            "# HELP vllm:num_requests_running Number of requests in the running batch.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{knobs.model}"}} {running}\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="{knobs.model}"}} 0\n'
            "# TYPE vllm:gpu_cache_usage_perc gauge\n"
            f'vllm:gpu_cache_usage_perc{{model_name="{knobs.model}"}} {min(1.0, running * 0.01):.4f}\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{model_name="{knobs.model}"}} {min(1.0, running * 0.01):.4f}\n'
            "# TYPE vllm:cache_config_info gauge\n"
            f'vllm:cache_config_info{{block_size="16",num_gpu_blocks="1000"}} 1.0\n'
            "# TYPE vllm:num_preemptions_total counter\n"
            f'vllm:num_preemptions_total{{model_name="{knobs.model}"}} 0\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def models(request: web.Request) -> web.Response:
        counts["/v1/models"] += 1
        return web.json_response({"object": "list", "data": [{"id": knobs.model, "object": "model",
                                                               "created": 0, "owned_by": args.name}]})

    async def info(request: web.Request) -> web.Response:
        counts["/info"] += 1
        return web.json_response({"model_id": knobs.model, "max_input_length": 4096, "max_total_tokens": 8192})

    async def control_get(request: web.Request) -> web.Response:
        snapshot = {k: v for k, v in state.items() if k != "release"}
        return web.json_response({"name": args.name, "pid": os.getpid(), "knobs": knobs.__dict__,
                                  "counts": dict(counts), **snapshot, "recent": list(recent)})

    async def control_set(request: web.Request) -> web.Response:
        try:
            knobs.update(await request.json())
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if knobs.api != "hold":
            state["release"].set()
        else:
            state["release"] = asyncio.Event()
        return web.json_response(knobs.__dict__)

    async def control_release(request: web.Request) -> web.Response:
        state["release"].set()
        state["release"] = asyncio.Event()
        return web.json_response({"released": True})

    async def control_reset(request: web.Request) -> web.Response:
        counts.clear()
        recent.clear()
        for key in ("max_inflight", "streams_started", "streams_completed", "disconnects"):
            state[key] = 0
        return web.json_response({"reset": True})

    async def anything_else(request: web.Request) -> web.Response:
        # Any other path is recorded too: a security test asserts the proxy never sends us one.
        await request.read()
        counts["other"] += 1
        counts[f"other:{request.method} {request.path}"[:200]] += 1
        recent.append({"path": request.path, "method": request.method, "headers": dict(request.headers),
                       "body": "", "at": time.time()})
        return web.json_response({"error": {"message": "not found", "type": "invalid_request_error",
                                            "param": None, "code": 404}}, status=404)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/_fault", control_get)
    app.router.add_post("/_fault", control_set)
    app.router.add_post("/_fault/release", control_release)
    app.router.add_post("/_fault/reset", control_reset)
    for path in API_PATHS:
        app.router.add_post(path, api)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/info", info)
    app.router.add_route("*", "/{tail:.*}", anything_else)

    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    # backlog high enough for the 10,000-stream test; access log off (it would cost more than the handler)
    # handler_cancellation: a client (the proxy) that goes away cancels the handler, so `disconnects`
    # counts what an engine would see when the proxy closes its upstream request.
    web.run_app(app, host=args.host, port=args.port, backlog=4096, access_log=None, print=None,
                handle_signals=True, shutdown_timeout=0.5, handler_cancellation=True)


@contextlib.contextmanager
def blackhole_port():
    """A port whose kernel completes TCP handshakes (listen backlog) but no one ever reads or writes:
    the purest 'accepts connections but never answers'. Yields its URL."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# ---------------------------------------------------------------------------------------------------
# Process figures from /proc (no psutil in the venv)
# ---------------------------------------------------------------------------------------------------

def proc_rss_kb(pid: int) -> int:
    """Resident set size of a process, in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_fds(pid: int) -> int:
    """Open file descriptors of a process (sockets included)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_sample(pid: int) -> dict[str, int]:
    return {"rss_kb": proc_rss_kb(pid), "fds": proc_fds(pid)}


def proc_tcp_sockets(pid: int, own_port: int) -> dict[str, int]:
    """A process's TCP sockets by kind: `listen`, `client` (accepted on own_port) and `upstream` (connected
    out). Tells a leaked client connection from an idle keep-alive connection in an upstream pool."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    kinds = {"listen": 0, "client": 0, "upstream": 0}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[9] not in inodes:
                    continue
                local_port = int(cols[1].rsplit(":", 1)[1], 16)
                if cols[3] == "0A":
                    kinds["listen"] += 1
                elif local_port == own_port:
                    kinds["client"] += 1
                else:
                    kinds["upstream"] += 1
    return kinds


# ---------------------------------------------------------------------------------------------------
# The harness (runs in the test process)
# ---------------------------------------------------------------------------------------------------

class FaultBackend:
    """One fault server process, restartable on the same port (a killed engine coming back)."""

    def __init__(self, name: str = "fault", port: int | None = None, **knobs: Any) -> None:
        from support import free_port

        self.name = name
        self.port = port or free_port()
        self.initial_knobs = knobs
        self.proc: subprocess.Popen | None = None
        self._stderr: Any = None  # the server's stderr file (`_stderr_sink`)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0, **knobs: Any) -> FaultBackend:
        from support import wait_http

        self.stop()
        merged = {**self.initial_knobs, **knobs}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--port", str(self.port), "--name", self.name,
             "--knobs", json.dumps(merged)],
            stdout=subprocess.DEVNULL, stderr=self._stderr_sink(), start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_http(self.url + "/_fault", timeout_s, self.proc)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the engine vanishes with its sockets reset, nothing flushed."""
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=10)

    def _stderr_sink(self) -> Any:
        """A file for the server's stderr, never a pipe: aiohttp logs a traceback for each connection the proxy
        resets, and ~40 of them fill a 64 KB pipe nobody reads; the server then blocks in its next write, wedged
        (seen: tests/test_overload.py's connection-cap test hanging under load)."""
        self._stderr = tempfile.TemporaryFile()
        return self._stderr

    def stop(self) -> None:
        if self.proc is None:
            return
        self.kill()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self.proc = None

    def wait_exit(self, timeout_s: float = 10.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def _call(self, path: str, payload: dict[str, Any] | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())

    def set(self, **knobs: Any) -> dict[str, Any]:
        return self._call("/_fault", knobs)

    def stats(self) -> dict[str, Any]:
        return self._call("/_fault")

    def release(self) -> None:
        self._call("/_fault/release", {})

    def reset(self) -> None:
        self._call("/_fault/reset", {})

    def api_requests(self) -> int:
        return int(self.stats()["counts"].get("api", 0))

    def __enter__(self) -> FaultBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def fault_backends(n: int, prefix: str = "b", **knobs: Any):
    """n fault servers started in parallel (each process takes ~0.5 s of CPU to import aiohttp)."""
    backends = [FaultBackend(f"{prefix}{i}", **knobs) for i in range(n)]
    try:
        procs = []
        for b in backends:  # start all, then wait for all: startup overlaps
            b.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--port", str(b.port), "--name", b.name,
                 "--knobs", json.dumps(b.initial_knobs)],
                stdout=subprocess.DEVNULL, stderr=b._stderr_sink(), start_new_session=True)
            procs.append(b.proc)
        from support import wait_http

        for b in backends:
            wait_http(b.url + "/_fault", 30.0, b.proc)
        yield backends
    finally:
        for b in backends:
            b.stop()


if __name__ == "__main__":
    _server_main(sys.argv[1:])


# ---------------------------------------------------------------------------------------------------
# The proxy under test, as a real process with its log captured to a file
# ---------------------------------------------------------------------------------------------------

ADMIN_TOKEN_ENV = "CAPBALANCER_TEST_ADMIN_TOKEN"


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def proxy_config(backends: list[Any], *, model: str = "m", policy: str = "round_robin",
                 admin_token: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A proxy config serving `model` from `backends` (FaultBackend objects or URLs)."""
    rows = []
    for i, b in enumerate(backends):
        url = b if isinstance(b, str) else b.url
        name = f"b{i}" if isinstance(b, str) else b.name
        rows.append({"name": name, "url": url, "engine": "vllm"})
    config: dict[str, Any] = {"models": {model: {"policy": policy, "backends": rows}}}
    if admin_token:
        config["admin"] = {"token_env": ADMIN_TOKEN_ENV}
    return _deep_merge(config, overrides or {})


class Proxy:
    """`capbalancer serve --config FILE` on a free port; stdout+stderr go to a file (never a full pipe)."""

    def __init__(self, backends: list[Any] | None = None, *, config: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, admin_token: str | None = None,
                 policy: str = "round_robin", overrides: dict[str, Any] | None = None,
                 ready_path: str = "/health", extra_args: tuple[str, ...] = ()) -> None:
        import tempfile

        from support import free_port

        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="capb-proxy-")
        self.config_path = os.path.join(self.dir, "config.yaml")
        self.log_path = os.path.join(self.dir, "proxy.log")
        self.admin_token = admin_token
        self.env = {**(env or {})}
        if admin_token is not None:
            self.env[ADMIN_TOKEN_ENV] = admin_token
        self.config = config if config is not None else proxy_config(
            backends or [], policy=policy, admin_token=admin_token is not None, overrides=overrides)
        self.ready_path = ready_path
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def write_config(self, config: dict[str, Any] | str) -> None:
        import yaml

        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.config_path)  # atomic: a reload never reads half a file

    def start(self, timeout_s: float = 30.0) -> Proxy:
        from support import capbalancer, wait_http

        self.write_config(self.config)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            capbalancer("serve", "--config", self.config_path, "--host", "127.0.0.1", "--port", str(self.port),
                        *self.extra_args),
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        try:
            wait_http(self.url + self.ready_path, timeout_s, self.proc)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"proxy did not start: {exc}\n--- log ---\n{self.log()[-4000:]}") from exc
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is not None:
            from support import stop_process

            stop_process(self.proc, timeout_s)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        """One raw HTTP request; any status comes back (no exception for 4xx/5xx)."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def admin(self, method: str, path: str, body: Any = None, token: str | None = "default",
              timeout_s: float = 10.0) -> tuple[int, Any]:
        headers = {}
        tok = self.admin_token if token == "default" else token
        if tok is not None:
            headers["Authorization"] = f"Bearer {tok}"
        status, _, raw = self.request(method, "/admin/" + path.lstrip("/"), body, headers, timeout_s)
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def metrics_text(self) -> str:
        return self.request("GET", "/metrics")[2].decode()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop()
        if exc_type is None:  # keep the config and log of a failed test for a look afterwards
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
