"""Garbage from a backend (issue 14 §9): hypothesis-generated responses — raw bytes, broken status lines,
odd headers, bodies shorter or longer than they claim, broken chunked encoding, SSE streams of junk cut off
mid-way — from a real TCP server behind a real proxy process (default policy). The proxy never answers 500
(no generated response has status 500, so a 500 could only be the proxy's own crash); whatever it answers
itself is a clean OpenAI-shaped error, a stream it started ends (with an SSE error event when it broke), and
its log has no traceback through capbalancer/.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time

import pytest
from faults import Proxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
STATUSES = [200, 201, 204, 301, 400, 404, 418, 429, 501, 502, 503, 504, 599, 0, 99, 1000]


class GarbageServer:
    """Answers every request (after reading its head and body) with `self.response`, then closes."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        self.health = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        self.served = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5.0)
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(rest) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    rest += chunk
                path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
                if not path.startswith(b"/v1/"):
                    conn.sendall(self.health)  # /health and /metrics stay sane: only the API path is fuzzed
                    return
                self.served += 1
                conn.sendall(self.response)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                return

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture(scope="module")
def rig():
    server = GarbageServer()
    try:
        config = {"models": {"m": {"backends": [{"name": "junk", "url": f"http://127.0.0.1:{server.port}",
                                                  "engine": "openai"}]}},
                  "timeouts": {"first_byte_s": 2.0, "stream_idle_s": 2.0, "total_s": 5.0},
                  "retries": {"max_attempts": 1},
                  # A garbage answer may rightly mark the backend down (a stream cut mid-way does at once, and
                  # a /health answer starved on a loaded box can time out): each example first waits for it
                  # to be routable again (`wait_routable`). Polls every 0.1 s keep that wait short; a long
                  # poll timeout keeps a slow-but-sane /health from counting as a failure.
                  "health": {"interval_s": 0.1, "timeout_s": 10.0}}
        with Proxy(config=config) as proxy:
            yield server, proxy
            assert proxy.alive(), proxy.log()[-3000:]
            log = proxy.log()
            assert "unexpected error" not in log and "capbalancer/" not in log, log[-3000:]
    finally:
        server.close()


token = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
                min_size=1, max_size=20)
header_value = st.one_of(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
                         st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
                                                    .decode("latin-1")))


@st.composite
def http_response(draw) -> bytes:
    kind = draw(st.sampled_from(["raw", "status", "length", "chunked", "sse"]))
    if kind == "raw":
        return draw(st.binary(max_size=300))
    status = draw(st.sampled_from(STATUSES))
    reason = draw(st.sampled_from(["OK", "", "Weird Reason", "\xff\xfe"]))
    headers = draw(st.lists(st.tuples(token, header_value), max_size=6))
    body = draw(st.one_of(st.binary(max_size=200),
                          st.just(b'{"error": {"message": "x"}}'),
                          st.just(b'{"choices": [{"text": "hi"}], "usage": {"prompt_tokens": "many"}}')))
    head = f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")
    for name, value in headers:
        head += f"{name}: {value}\r\n".encode("latin-1", errors="replace")
    if kind == "status":
        return head + b"\r\n" + body
    if kind == "length":
        claimed = draw(st.sampled_from([len(body), len(body) + 50, max(0, len(body) - 5), -1, 10**12]))
        return head + f"Content-Length: {claimed}\r\n\r\n".encode() + body
    if kind == "chunked":
        size = draw(st.sampled_from([f"{len(body):x}", "zz", "ffffffff", "-1", f"{len(body) + 10:x}"]))
        tail = draw(st.sampled_from([b"\r\n0\r\n\r\n", b"", b"\r\n"]))
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + size.encode() + b"\r\n" + body + tail
    events = draw(st.lists(st.one_of(st.binary(max_size=80),
                                     st.just(b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'),
                                     st.just(b'data: {"usage": {"completion_tokens": -5}}\n\n'),
                                     st.just(b"data: [DONE]\n\n")), max_size=6))
    return (f"HTTP/1.1 {status} OK\r\nContent-Type: text/event-stream\r\n\r\n".encode()
            + b"".join(events))


def wait_routable(proxy: Proxy, timeout_s: float = 15.0) -> None:
    """Until /ready lists the backend as routable: what one example did to it (marked down by a cut stream)
    must not decide the next example's answer, or the fuzz fails on a 503 that belongs to the previous one."""
    deadline = time.monotonic() + timeout_s
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            conn.request("GET", "/ready")
            resp = conn.getresponse()
            if "junk" in json.loads(resp.read()).get("routable_backends", []):
                return
        finally:
            conn.close()
        assert time.monotonic() < deadline, "the backend never became routable again: " + proxy.log()[-2000:]
        time.sleep(0.02)


def ask(proxy: Proxy, stream: bool) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
    try:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                           "stream": stream})
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        try:
            data = resp.read()
        except http.client.IncompleteRead as exc:  # a relayed body that was cut off: the engine's doing
            data = exc.partial
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


@FUZZ_SETTINGS
@given(response=http_response(), stream=st.booleans())
def test_garbage_from_a_backend_never_makes_a_500(rig, response: bytes, stream: bool) -> None:
    server, proxy = rig
    server.response = response
    wait_routable(proxy)
    status, headers, body = ask(proxy, stream)
    assert status != 500, (response[:200], body[:300])
    generated = None
    if response.startswith(b"HTTP/1.1 "):
        try:
            generated = int(response[9:13].split(b" ")[0])
        except ValueError:
            generated = None
    if status != generated:
        # The proxy's own answer: a gateway error in the OpenAI shape, or a stream that it ended itself.
        if status >= 400:
            assert status in (502, 504), (status, response[:200], body[:300])
            err = json.loads(body)["error"]
            assert {"message", "type", "param", "code"} <= set(err), err


def test_the_fuzz_reached_the_backend(rig) -> None:
    server, proxy = rig
    server.response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    before = server.served
    status, _, body = ask(proxy, False)
    assert status == 200 and body == b"{}"
    assert server.served == before + 1
