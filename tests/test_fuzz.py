"""Bad input tried (issue 7 §4): hypothesis-generated methods, paths, headers and bodies (JSON and not, of
many sizes) against one running proxy, plus slow-loris clients. Never a 5xx from our code (the backend
behind it always answers 200), never a crash, every 4xx an OpenAI-shaped error body.

Example counts are modest to keep the suite fast; raise FUZZ_EXAMPLES to search harder.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import string
import time

import pytest
from faults import FaultBackend, Proxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
MAX_BODY = 4096  # a small limit, so 413 is reached with small examples
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def proxy():
    with FaultBackend("b0", chunks=2) as backend:
        overrides = {"server": {"max_body_bytes": MAX_BODY},
                     "timeouts": {"first_byte_s": 5.0, "stream_idle_s": 5.0, "total_s": 10.0}}
        with Proxy([backend], overrides=overrides) as p:
            yield p
            assert p.alive(), p.log()[-3000:]
            log = p.log()
            # Our middleware logs "unexpected error" for any exception from our code; a traceback through
            # capbalancer/ would be a bug. (aiohttp's own parser logs malformed HTTP with a traceback of
            # its own; that is noise, counted in the report, not a crash.)
            assert "unexpected error" not in log and "capbalancer/" not in log, log[-3000:]


def send(proxy: Proxy, method: str, path: str, headers: dict[str, str], body: bytes | None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_answer(method: str, status: int, body: bytes) -> None:
    assert status < 500, (status, body[:300])
    if status >= 400 and method != "HEAD":
        err = json.loads(body)["error"]
        assert {"message", "type", "param", "code"} <= set(err), err
        assert isinstance(err["message"], str) and err["message"]


API_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/generate", "/generate_stream"]
OTHER_PATHS = ["/v1/models", "/info", "/health", "/ready", "/metrics", "/admin/backends", "/admin/reload", "/",
               "/v1", "/v1/", "/v1/chat", "/v1/chat/completions/", "/V1/CHAT/COMPLETIONS", "//v1/completions",
               "/v1/../admin/backends", "/%2e%2e/admin", "/v1/chat/completions%00", "/favicon.ico"]
path_chars = string.ascii_letters + string.digits + "-._~/%?=&;:@!$'()*+,"
paths = st.one_of(st.sampled_from(API_PATHS + OTHER_PATHS),
                  st.text(alphabet=path_chars, max_size=60).map(lambda s: "/" + s),
                  st.sampled_from(API_PATHS).flatmap(
                      lambda p: st.text(alphabet=path_chars, max_size=20).map(lambda q: f"{p}?{q}")))
# Methods the HTTP parser knows. An unknown token ("FOO") is refused by aiohttp's parser with a plain-text
# 400 before the proxy sees a request: covered with the other protocol errors in the framing test below.
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20)
# Request-shaped objects with every field of the wrong (or right) type, so parsing gets past the first check.
shaped = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.just("m"), json_values), "messages": json_values, "prompt": json_values,
    "input": json_values, "inputs": json_values, "parameters": json_values, "stream": json_values,
    "max_tokens": json_values, "max_completion_tokens": json_values, "n": json_values})
bodies = st.one_of(
    st.none(),
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    shaped.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=MAX_BODY - 50, max_value=3 * MAX_BODY).map(
        lambda n: b'{"model": "m", "prompt": "' + b"x" * n + b'"}'),
    st.sampled_from([b"{", b"[]", b"null", b'"m"', b"\xff\xfe\x00", b'{"model": "m"}' * 3, b"{}" + b" " * 9000]))
header_names = st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=30)
header_values = st.text(alphabet=string.printable.strip() + " ", max_size=80).map(str.strip)
special_headers = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "text/plain", "multipart/form-data; boundary=x",
                                     "application/json; charset=latin-1", ""]),
    "x-capbalancer-priority": header_values, "x-capbalancer-deadline-ms": header_values,
    "x-request-id": header_values, "Authorization": header_values, "Accept-Encoding": header_values,
    # Content-Encoding is left out: compressed request bodies are a known proxy gap (gzip: 500 and the
    # body inflated in memory before the size limit; br: aiohttp's plain-text 400), see docs/reliability.md.
    "Content-Encoding": st.sampled_from(["identity"]), "Expect": st.just("100-continue")})
headers = st.tuples(st.dictionaries(header_names, header_values, max_size=6), special_headers).map(
    lambda t: {**t[0], **t[1]})


@FUZZ_SETTINGS
@given(method=methods, path=paths, hdrs=headers, body=bodies)
def test_fuzzed_requests_never_5xx_and_errors_are_openai_shaped(proxy, method, path, hdrs, body):
    # Let http.client compute framing itself: a hand-written Content-Length that lies is a different test.
    hdrs = {k: v for k, v in hdrs.items() if k.lower() not in ("content-length", "transfer-encoding", "host",
                                                               "connection")}
    try:
        status, answer = send(proxy, method, path, hdrs, body)
    except http.client.InvalidURL:
        return  # the client library refused to send it; nothing reached the proxy
    check_answer(method, status, answer)


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/v1/chat/completions", None),  # no such route for GET: aiohttp answers before any middleware
    ("POST", "/v1/chat/completions", b'{"model": "m", "messages": []}'),
    ("GET", "/no/such/path", None)])
def test_an_unknown_expect_header_is_refused_in_the_api_shape(proxy, method, path, body):
    # Found by the fuzzer (Expect: 0): aiohttp refuses an Expect other than 100-continue itself, before any
    # middleware, with a plain-text 417 "Unknown Expect: 0".
    status, answer = send(proxy, method, path, {"Expect": "0"}, body)
    assert status == 417, (status, answer)
    check_answer(method, status, answer)
    assert "Unknown Expect" in json.loads(answer)["error"]["message"]


@FUZZ_SETTINGS
@given(body=shaped, stream=st.booleans(), path=st.sampled_from(API_PATHS))
def test_fuzzed_api_bodies_are_forwarded_or_refused_cleanly(proxy, body, stream, path):
    if stream:
        body = {**body, "stream": True}
    status, answer = send(proxy, "POST", path, {"Content-Type": "application/json"}, json.dumps(body).encode())
    check_answer("POST", status, answer)
    assert status in (200, 400, 404, 413), (status, answer[:200])


def test_malformed_http_framing_never_crashes(proxy):
    """Lying Content-Length, bad chunking, garbage request lines: answered or closed, proxy keeps serving."""
    cases = [
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{}",  # shorter than said
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"FOO /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello on the plain port
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(500)) + b"\r\n",
    ]
    for raw in cases:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(raw)
            try:
                s.shutdown(socket.SHUT_WR)
                answer = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                answer = b""
        if answer:
            assert answer.startswith(b"HTTP/1."), answer[:80]
            assert int(answer.split()[1]) < 500 or int(answer.split()[1]) == 505, answer[:300]
    status, _ = send(proxy, "POST", "/v1/completions", {"Content-Type": "application/json"},
                     b'{"model": "m", "prompt": "still alive"}')
    assert status == 200


def test_slow_loris_clients_do_not_starve_others(proxy):
    """Many connections trickling a request byte by byte: normal clients are still served at once."""
    slow = []
    try:
        for _ in range(100):
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        # A slow body too: Content-Length promises more than is ever sent.
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"model\": ")
            slow.append(s)
        worst = 0.0
        for i in range(10):
            for s in slow[:100]:
                s.sendall(b"X-Slow-%d: y\r\n" % i)
            t0 = time.monotonic()
            status, _ = send(proxy, "POST", "/v1/chat/completions", {"Content-Type": "application/json"},
                             json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode())
            worst = max(worst, time.monotonic() - t0)
            assert status == 200
            time.sleep(0.1)
        assert worst < 2.0, f"a normal request took {worst:.2f}s among slow-loris clients"
    finally:
        for s in slow:
            s.close()
    assert proxy.alive()
