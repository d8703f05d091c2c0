"""The httptools server of the proxied routes (server/fastserver.py): what it serves itself, what it hands to
aiohttp, and that the hand-over keeps aiohttp's answers. Real proxy and backend processes, raw sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import pytest
from aiohttp import web
from faults import FaultBackend, Proxy, proxy_config

from capbalancer.config import parse_config
from capbalancer.server import proxy as proxy_module
from capbalancer.server.access_log import ACCESS_LOGGER
from capbalancer.server.app import build_app, build_state
from capbalancer.server.fastserver import FastServer

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def post(path: bytes, body: bytes = CHAT, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path, extra, len(body), body))


def read_answers(s: socket.socket, n: int, timeout_s: float = 10.0) -> list[tuple[int, dict[str, str], bytes]]:
    """`n` whole HTTP/1.1 answers (Content-Length or chunked) read off one connection."""
    s.settimeout(timeout_s)
    buf = b""
    out = []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"closed after {len(out)} answers: {buf[:200]!r}"
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in buf:
                    buf += s.recv(65536)
                size_line, _, buf = buf.partition(b"\r\n")
                size = int(size_line, 16)
                while len(buf) < size + 2:
                    buf += s.recv(65536)
                body, buf = body + buf[:size], buf[size + 2:]
                if size == 0:
                    break
        else:
            size = int(headers.get("content-length", "0"))
            while len(buf) < size:
                buf += s.recv(65536)
            body, buf = buf[:size], buf[size:]
        out.append((int(lines[0].split()[1]), headers, body))
    return out


@pytest.fixture(scope="module")
def proxy():
    with FaultBackend("b0") as b, Proxy([b], policy="capacity") as p:
        yield p, b


def test_keep_alive_and_pipelined_requests_answered_in_order(proxy) -> None:
    p, _ = proxy
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        for _ in range(3):  # one connection, one request after another
            s.sendall(post(b"/v1/chat/completions"))
            [(status, headers, body)] = read_answers(s, 1)
            assert status == 200 and json.loads(body)["choices"], body
            assert headers["x-capbalancer-backend"] == "b0" and "date" in headers and "server" in headers
        # Three at once in one send: a scheduled route, an aiohttp route behind it, then the fast path can no
        # longer take the connection (it went to aiohttp with the second request), which answers the third.
        s.sendall(post(b"/v1/chat/completions") + b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
                  + post(b"/v1/completions", json.dumps({"model": "m", "prompt": "hi"}).encode()))
        answers = read_answers(s, 3)
    assert [a[0] for a in answers] == [200, 200, 200], answers
    assert json.loads(answers[0][2])["object"] == "chat.completion"
    assert json.loads(answers[1][2])["object"] == "list"
    assert json.loads(answers[2][2])["object"] == "text_completion"


def test_streams_are_chunked_and_the_connection_reused(proxy) -> None:
    p, _ = proxy
    stream = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(post(b"/v1/chat/completions", stream) + post(b"/v1/chat/completions"))
        (status, headers, body), (status2, _, body2) = read_answers(s, 2)
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), headers
    assert body.count(b"data:") >= 2 and body.rstrip().endswith(b"data: [DONE]"), body[-200:]
    assert status2 == 200 and json.loads(body2)["choices"]


@pytest.mark.parametrize("raw", [
    # CL+TE, two Content-Lengths, broken chunking, TE alone with a smuggled request in its body.
    post(b"/v1/chat/completions", extra=b"Transfer-Encoding: chunked\r\n"),
    post(b"/v1/chat/completions", extra=b"Content-Length: 5\r\n"),
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
], ids=["cl-and-te", "two-cl", "bad-chunk", "negative-cl"])
def test_smuggling_attempts_on_the_fast_routes_meet_aiohttps_400(proxy, raw: bytes) -> None:
    p, b = proxy
    before = b.stats()["counts"].get("api", 0)
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(raw)
        answer = b""
        while chunk := s.recv(65536):  # answered, then closed
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400", answer[:300]
    assert json.loads(body)["error"]["code"] == "bad_http"
    assert b.stats()["counts"].get("api", 0) == before  # nothing reached the engine


def test_an_oversized_body_gets_the_413_shape_and_a_slow_one_408() -> None:
    with FaultBackend("b0") as b:
        cfg = proxy_config([b], policy="capacity",
                           overrides={"server": {"max_body_bytes": 4096, "body_read_timeout_s": 1.0}})
        with Proxy(config=cfg) as p:
            status, _, raw = p.request("POST", "/v1/chat/completions", b"x" * 5000)
            assert status == 413 and json.loads(raw)["error"]["code"] == "body_too_large"
            with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
                s.sendall(post(b"/v1/chat/completions", CHAT)[:-10])  # the body's last 10 bytes never come
                started = time.monotonic()
                [(status, _, raw)] = read_answers(s, 1)
            assert status == 408 and json.loads(raw)["error"]["code"] == "body_timeout"
            assert 0.8 <= time.monotonic() - started <= 8.0


def test_aiohttp_server_still_selectable() -> None:
    assert parse_config({"models": {"m": {"backends": [{"url": "http://127.0.0.1:1"}]}}}).server.http_server == \
        "httptools"
    with FaultBackend("b0") as b:
        cfg = proxy_config([b], policy="capacity", overrides={"server": {"http_server": "aiohttp"}})
        with Proxy(config=cfg) as p:
            status, headers, raw = p.request("POST", "/v1/chat/completions", CHAT)
            assert status == 200 and json.loads(raw)["choices"]
    with pytest.raises(Exception, match="http_server"):
        parse_config({"server": {"http_server": "nginx"}, "models": {"m": {"backends": [{"url": "http://x:1"}]}}})


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.mark.parametrize("extra_middleware", [False, True])
async def test_the_observed_fast_path_answers_and_logs_as_the_middleware_chain_does(monkeypatch,
                                                                                   extra_middleware: bool) -> None:
    """The app's own middlewares (observe, errors) are plain calls in the fast server; any other chain goes through
    aiohttp's. Both give a bug past the handler the errors middleware's 500 and an access line with its status."""
    async def broken(request):
        raise RuntimeError("a bug past the handler")

    monkeypatch.setattr(proxy_module, "handle", broken)
    state = build_state(parse_config({"models": {"m": {"backends": [{"url": "http://127.0.0.1:9", "name": "b0"}]}}}))
    app = build_app(state)
    if extra_middleware:
        @web.middleware
        async def passthrough(request, handler):
            return await handler(request)

        app.middlewares.append(passthrough)
    lines = _Lines()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        fast = FastServer(app, runner.server, state.config.server)
        assert (fast.observer is None) == extra_middleware
        server = await asyncio.get_running_loop().create_server(fast, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post(b"/v1/chat/completions"))
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        writer.close()
        server.close()
        assert head.startswith(b"HTTP/1.1 500 ")
        assert json.loads(body)["error"]["code"] == "internal_error"
        [line] = lines.lines
        assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/chat/completions", 500)
        assert line["ttft_ms"] is not None and line["duration_ms"] is not None
    finally:
        logger.removeHandler(lines)
        await runner.cleanup()
