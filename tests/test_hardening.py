"""Gaps found by the reliability tests, closed: compressed request bodies, secrets in YAML errors, a
backend that dies mid-stream marked down at once, slow request bodies. Real proxy and backend processes."""

from __future__ import annotations

import gzip
import json
import socket
import time

from faults import FaultBackend, Proxy, fault_backends, proxy_config

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_compressed_request_bodies_are_refused_before_they_are_read():
    with FaultBackend("b0") as b, Proxy([b]) as proxy:
        bomb = gzip.compress(b'{"model": "m", "prompt": "' + b"a" * (50 * 1024 * 1024) + b'"}')
        # (`br`, and deflate bodies that do not inflate, never reach us: aiohttp's parser answers them
        # with its own plain-text 400 first.)
        for encoding, body in (("gzip", bomb), ("gzip", b"not gzip at all")):
            status, _, raw = proxy.request("POST", "/v1/completions", body, {"Content-Encoding": encoding})
            error = json.loads(raw)["error"]
            assert status == 415 and error["code"] == "unsupported_content_encoding", raw
            assert encoding in error["message"]
        assert b.stats()["counts"].get("api", 0) == 0  # none reached the engine
        assert proxy.request("POST", "/v1/chat/completions", CHAT)[0] == 200
        assert proxy.alive()


def test_a_yaml_error_on_reload_does_not_quote_the_secret_it_sits_beside():
    secret = "sk-never-print-me-91d2"
    with FaultBackend("b0") as b, Proxy([b], admin_token="adm-tok-3") as proxy:
        # A syntax error on the very line that holds the key: PyYAML's message would quote it.
        proxy.write_config("models:\n  m:\n    backends:\n      - {url: 'http://127.0.0.1:1', api_key: '"
                           + secret + "' : : }\n")
        status, answer = proxy.admin("POST", "reload")
        assert status == 400
        text = json.dumps(answer)
        assert "line 4" in text and secret not in text
        time.sleep(0.2)
        log = proxy.log()
        assert "reload refused" in log and secret not in log
        assert proxy.request("POST", "/v1/chat/completions", CHAT)[0] == 200  # the old config still serves


def test_a_backend_that_dies_mid_stream_is_marked_down_at_once():
    with fault_backends(2) as (b0, b1):
        # Polls every 30 s: only the relay's own report can mark the backend down this fast.
        cfg = proxy_config([b0, b1], admin_token=True, overrides={"health": {"interval_s": 30.0}})
        with Proxy(config=cfg, admin_token="adm-tok-4") as proxy:
            b0.set(api="die", after_chunks=2)
            b1.set(api="die", after_chunks=2)
            status, _, raw = proxy.request("POST", "/v1/chat/completions", {**CHAT, "stream": True})
            assert status == 200 and b'"error"' in raw  # the stream ended with an SSE error event
            _, state = proxy.admin("GET", "backends")
            healths = {name: b["health"] for name, b in state["backends"].items()}
            assert "down" in healths.values(), healths
            assert all(b["inflight"] == 0 for b in state["backends"].values())  # accounting released


def test_a_body_sent_too_slowly_gets_408():
    with FaultBackend("b0") as b:
        cfg = proxy_config([b], overrides={"server": {"body_read_timeout_s": 1.0}})
        with Proxy(config=cfg) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"model\": ")
                started = time.monotonic()
                answer = s.recv(65536)
                waited = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert 0.8 <= waited <= 8.0
            assert b'"body_timeout"' in answer
            assert proxy.request("POST", "/v1/chat/completions", CHAT)[0] == 200


def test_a_client_trickling_its_headers_is_cut_off_at_the_idle_timeout():
    """Slow-loris: a header line every 0.2 s keeps the connection busy but never completes the request. The proxy
    closes it at `server.idle_timeout_s`, counted from the connection's start, while serving others meanwhile;
    an idle keep-alive connection is closed the same way after its last response."""
    with FaultBackend("b0") as b:
        cfg = proxy_config([b], overrides={"server": {"idle_timeout_s": 1.5}})
        with Proxy(config=cfg) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                started = time.monotonic()
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                closed_after = None
                for i in range(50):  # 10 s at most
                    time.sleep(0.2)
                    try:
                        s.sendall(b"X-Slow-%d: y\r\n" % i)
                        s.setblocking(False)
                        try:
                            if s.recv(1) == b"":
                                closed_after = time.monotonic() - started
                                break
                        except BlockingIOError:
                            pass
                        finally:
                            s.setblocking(True)
                    except (BrokenPipeError, ConnectionResetError):
                        closed_after = time.monotonic() - started
                        break
                    if i == 2:
                        assert proxy.request("POST", "/v1/chat/completions", CHAT)[0] == 200
            assert closed_after is not None and 1.2 <= closed_after <= 4.0, closed_after
            # keep-alive: one request, then silence
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                body = json.dumps(CHAT).encode()
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                answered = time.monotonic()
                data = b""
                while True:  # read until the server closes; the response itself does not close it
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                idle = time.monotonic() - answered
            assert data.startswith(b"HTTP/1.1 200"), data[:100]
            assert 1.2 <= idle <= 5.0, idle


def test_malformed_http_gets_an_openai_shaped_400_and_one_warning_line():
    """What aiohttp's parser rejects (a broken request line, an oversized header) is answered like every other
    4xx: JSON in the OpenAI error shape, and one WARNING log line, no traceback; the proxy serves on."""
    bad = [b"GARBAGE\r\n\r\n",
           b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
           b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"]
    with FaultBackend("b0") as b, Proxy(config=proxy_config([b])) as proxy:
        for raw in bad:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                s.sendall(raw)
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == b"400", answer[:200]
            assert b"application/json" in head.lower(), head
            error = json.loads(body)["error"]
            assert error["code"] == "bad_http" and error["message"].startswith("malformed HTTP request"), error
            assert error["type"] == "invalid_request_error"
        assert proxy.request("POST", "/v1/chat/completions", CHAT)[0] == 200
        log = proxy.log()
        assert log.count("malformed HTTP from") == len(bad), log[-2000:]
        assert "Traceback" not in log, log[-2000:]
