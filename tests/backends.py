"""Small real OpenAI- and TGI-shaped backends for tests, one aiohttp process each.

    python -m tests.backends --port 9001 --kind openai --name a --chunks 8 --chunk-delay-s 0.01
    python tests/backends.py --port 9002 --kind tgi --first-byte-delay-s 0.5

Knobs (flags, and at run time POST /_knobs {...}): `first_byte_delay_s` before any byte, `chunk_delay_s`
between stream events, `chunks` (tokens per answer), `fail_status` (answer that status with an
OpenAI-shaped error body), `hang` (accept, never answer), `die_after_chunks` (the process exits mid-stream),
`model`, `metrics_file` (a Prometheus page served verbatim at GET /metrics, re-read on each scrape so a test
can change it; empty: /metrics answers 404, a plain OpenAI server). GET /_stats tells what the backend saw:
requests per path, disconnects (a client that left mid-answer), streams completed, the last request's
headers and body. Outputs are deterministic (`tok0 tok1 ...`), so a test can compare bytes through the proxy
with bytes direct.

`Backend` starts one as a subprocess (log to a file, never a full pipe) and always stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> bool:
    """Poll url/health until it answers; False if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1.0):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass
class Knobs:
    kind: str = "openai"  # openai | tgi (both serve every path; kind only picks /info and naming)
    name: str = "backend"
    model: str = "m"
    chunks: int = 5
    first_byte_delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    fail_status: int = 0  # 0: answer normally
    hang: bool = False
    die_after_chunks: int = -1  # >= 0: the process exits (sockets reset) after sending this many chunks
    metrics_file: str = ""  # a page to serve at GET /metrics; "": no metrics (404)


def stream_event(knobs: Knobs, path: str, i: int, last: bool) -> bytes:
    if path == "/generate_stream":
        event: dict[str, Any] = {"index": i, "token": {"id": i, "text": f"tok{i} ", "logprob": 0.0, "special": False},
                                 "generated_text": None, "details": None}
        if last:
            event["generated_text"] = "".join(f"tok{k} " for k in range(i + 1))
            event["details"] = {"finish_reason": "length", "generated_tokens": i + 1}
        return b"data:" + json.dumps(event).encode() + b"\n\n"
    if path == "/v1/completions":
        body: dict[str, Any] = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": knobs.model,
                                "choices": [{"index": 0, "text": f"tok{i} ", "logprobs": None,
                                             "finish_reason": "length" if last else None}]}
    else:
        body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": knobs.model,
                "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "logprobs": None,
                             "finish_reason": "length" if last else None}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def usage_event(knobs: Knobs, path: str, prompt_tokens: int) -> bytes:
    obj = "text_completion" if path == "/v1/completions" else "chat.completion.chunk"
    body = {"id": "x-1", "object": obj, "created": 1, "model": knobs.model, "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": knobs.chunks,
                      "total_tokens": prompt_tokens + knobs.chunks}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def full_body(knobs: Knobs, path: str, prompt_tokens: int) -> dict[str, Any]:
    text = "".join(f"tok{i} " for i in range(knobs.chunks))
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": knobs.chunks,
             "total_tokens": prompt_tokens + knobs.chunks}
    if path == "/generate":
        return {"generated_text": text, "details": {"finish_reason": "length", "generated_tokens": knobs.chunks}}
    if path == "/v1/embeddings":
        return {"object": "list", "model": knobs.model, "usage": {"prompt_tokens": prompt_tokens,
                                                                  "total_tokens": prompt_tokens},
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 1.0]}]}
    if path == "/v1/completions":
        return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": knobs.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}], "usage": usage}
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": knobs.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": "length"}], "usage": usage}


def make_app(knobs: Knobs):  # noqa: ANN201  # aiohttp imported lazily: the harness side does not need it
    from aiohttp import web

    stats: dict[str, Any] = {"requests": {}, "disconnects": 0, "streams_completed": 0, "inflight": 0,
                             "max_inflight": 0, "last_headers": {}, "last_body": None}

    def prompt_tokens_of(body: dict[str, Any]) -> int:
        text = body.get("prompt") or body.get("inputs") or body.get("input") or ""
        if isinstance(body.get("messages"), list):  # a fuzzed `messages: null` is not a list
            text = " ".join(str(m.get("content", "")) for m in body["messages"] if isinstance(m, dict))
        return max(1, len(str(text)) // 4)

    async def api(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        path = request.path
        stats["requests"][path] = stats["requests"].get(path, 0) + 1
        stats["last_headers"] = {k.lower(): v for k, v in request.headers.items()}
        stats["last_body"] = raw.decode(errors="replace")[:4000]
        stats["inflight"] += 1
        stats["max_inflight"] = max(stats["max_inflight"], stats["inflight"])
        try:
            return await answer(request, raw, path)
        except (asyncio.CancelledError, ConnectionResetError):
            stats["disconnects"] += 1
            raise
        finally:
            stats["inflight"] -= 1

    async def answer(request: web.Request, raw: bytes, path: str) -> web.StreamResponse:
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return web.json_response({"error": {"message": "bad json", "type": "invalid_request_error",
                                                "param": None, "code": 400}}, status=400)
        headers = {"X-Backend-Name": knobs.name, "Proxy-Authenticate": "Basic realm=should-be-stripped"}
        if knobs.hang:
            await asyncio.sleep(3600)
        if knobs.first_byte_delay_s:
            await asyncio.sleep(knobs.first_byte_delay_s)
        if knobs.fail_status:
            return web.json_response({"error": {"message": f"engine says {knobs.fail_status}", "type": "engine_error",
                                                "param": None, "code": knobs.fail_status}},
                                     status=knobs.fail_status, headers=headers)
        if body.get("max_tokens") == -7:  # an engine's own validation error, for passthrough tests
            return web.json_response({"object": "error", "message": "max_tokens must be at least 1, got -7.",
                                      "type": "BadRequestError", "param": None, "code": 400}, status=400)
        stream = path == "/generate_stream" or bool(body.get("stream"))
        ptoks = prompt_tokens_of(body)
        if not stream:
            return web.Response(body=json.dumps(full_body(knobs, path, ptoks)).encode(),
                                content_type="application/json", headers=headers)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers})
        await resp.prepare(request)
        for i in range(knobs.chunks):
            if i == knobs.die_after_chunks:
                os._exit(17)  # as when an engine is killed: no flush, no close
            if i and knobs.chunk_delay_s:
                await asyncio.sleep(knobs.chunk_delay_s)
            await resp.write(stream_event(knobs, path, i, i == knobs.chunks - 1))
        if path != "/generate_stream":
            if (body.get("stream_options") or {}).get("include_usage"):
                await resp.write(usage_event(knobs, path, ptoks))
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        stats["streams_completed"] += 1
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": knobs.model, "object": "model", "created": 1,
                                                               "owned_by": knobs.name}]})

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"model_id": knobs.model, "max_input_tokens": 4096, "max_total_tokens": 8192,
                                  "router": knobs.name})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(request: web.Request) -> web.Response:
        if not knobs.metrics_file:
            raise web.HTTPNotFound()
        return web.Response(text=Path(knobs.metrics_file).read_text(), content_type="text/plain")

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def set_knobs(request: web.Request) -> web.Response:
        for key, value in (await request.json()).items():
            if not hasattr(knobs, key):
                return web.json_response({"error": f"unknown knob {key}"}, status=400)
            setattr(knobs, key, value)
        return web.json_response(asdict(knobs))

    app = web.Application(client_max_size=64 * 1024 * 1024)
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/generate", "/generate_stream"):
        app.router.add_post(path, api)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/info", info)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/_stats", get_stats)
    app.router.add_post("/_knobs", set_knobs)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="small OpenAI/TGI-shaped test backend")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--kind", default="openai", choices=["openai", "tgi"])
    p.add_argument("--name", default="backend")
    p.add_argument("--model", default="m")
    p.add_argument("--chunks", type=int, default=5)
    p.add_argument("--first-byte-delay-s", type=float, default=0.0)
    p.add_argument("--chunk-delay-s", type=float, default=0.0)
    p.add_argument("--fail-status", type=int, default=0)
    p.add_argument("--hang", action="store_true")
    p.add_argument("--die-after-chunks", type=int, default=-1)
    p.add_argument("--metrics-file", default="")
    a = p.parse_args(argv)
    knobs = Knobs(kind=a.kind, name=a.name, model=a.model, chunks=a.chunks, first_byte_delay_s=a.first_byte_delay_s,
                  chunk_delay_s=a.chunk_delay_s, fail_status=a.fail_status, hang=a.hang,
                  die_after_chunks=a.die_after_chunks, metrics_file=a.metrics_file)
    from aiohttp import web

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(knobs), host=a.host, port=a.port, access_log=None, print=None, backlog=4096,
                shutdown_timeout=0.5)


# ---------------------------------------------------------------------------------------------------
# Harness: a backend as a subprocess
# ---------------------------------------------------------------------------------------------------

def _remove_dir(path: str, keep: bool, what: str) -> None:
    """Remove a harness's temp folder once its process is stopped. A failed test keeps it (as
    faults.Proxy does) and says where, in the test's captured output, so the log can still be read."""
    if keep:
        print(f"{what}: kept {path} for a look at its log")
    else:
        shutil.rmtree(path, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend:
    """`with Backend(name="a", chunks=8) as b:` a running backend at b.url; stopped on exit."""

    def __init__(self, name: str = "backend", kind: str = "openai", port: int | None = None, **knobs: Any) -> None:
        self.name = name
        self.kind = kind
        self.port = port or _free_port()
        self.knobs = knobs
        self.proc: subprocess.Popen[bytes] | None = None
        # Made by start(), removed by stop(): `Backend().port` (a port nothing listens on) leaves nothing.
        self.dir: str | None = None

    @property
    def log_path(self) -> str:
        assert self.dir is not None, "not started"
        return os.path.join(self.dir, "backend.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> Backend:
        args = [sys.executable, str(Path(__file__).resolve()), "--port", str(self.port), "--kind", self.kind,
                "--name", self.name]
        for key, value in self.knobs.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    args.append(flag)
            else:
                args += [flag, str(value)]
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="capb-backend-")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=str(REPO))
        if not _wait_healthy(self.proc, self.url, timeout_s):
            log = Path(self.log_path).read_text()[-2000:]
            proc = self.proc
            self.stop()  # the log tail is in the message, so the folder can go
            raise RuntimeError(f"backend {self.name} did not start (exit {proc.returncode}):\n{log}")
        return self

    def stop(self, keep_files: bool = False) -> None:
        """Stop the process, then remove the temp folder (its log) unless keep_files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if self.dir is not None:
            _remove_dir(self.dir, keep_files, f"backend {self.name}")
            self.dir = None

    def _call(self, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return self._call("/_stats")

    def set(self, **knobs: Any) -> dict[str, Any]:
        return self._call("/_knobs", knobs)

    def __enter__(self) -> Backend:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop(keep_files=exc_type is not None)


class ProxyProcess:
    """`capbalancer serve --config FILE` as a subprocess on a free port (log to a file); always stopped."""

    def __init__(self, config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        import yaml

        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="capb-proxy-")
        self.config_path = os.path.join(self.dir, "config.yaml")
        self.log_path = os.path.join(self.dir, "proxy.log")
        config = {**config, "server": {**config.get("server", {}), "port": self.port}}
        Path(self.config_path).write_text(yaml.safe_dump(config, sort_keys=False))
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, text: str) -> None:
        tmp = self.config_path + ".tmp"
        Path(tmp).write_text(text)
        os.replace(tmp, self.config_path)

    def start(self, timeout_s: float = 30.0) -> ProxyProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "capbalancer.cli", "serve", "--config", self.config_path],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(REPO),
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        if not _wait_healthy(self.proc, self.url, timeout_s):
            log = self.log()[-3000:]
            code = self.stop()  # the log tail is in the message, so the folder can go
            raise RuntimeError(f"proxy did not start (exit {code}):\n{log}")
        return self

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self, timeout_s: float = 15.0, keep_files: bool = False) -> int | None:
        """Stop the process (its exit code), then remove the temp folder (config, log) unless keep_files."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
            code = self.proc.returncode
            self.proc = None
        _remove_dir(self.dir, keep_files, "proxy")
        return code

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop(keep_files=exc_type is not None)


if __name__ == "__main__":
    main()
