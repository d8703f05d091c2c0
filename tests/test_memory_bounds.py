"""Bounded memory whatever a backend sends (issue 14 item 2): a real hostile backend process
(tests/evil_backend.py) in front of a real proxy with the DEFAULT config (policy capacity, default limits);
the proxy's RSS is read from /proc while it is being fed."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from faults import ADMIN_TOKEN_ENV, Proxy, proc_rss_kb
from support import PYTHON, REPO, free_port, running

RSS_LIMIT_KB = 500 * 1024  # the target: < 500 MB against an endless-body engine
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def evil():
    port = free_port()
    with running([PYTHON, str(REPO / "tests" / "evil_backend.py"), "--port", str(port)],
                 ready_url=f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def proxy(evil):
    config = {"models": {"m": {"backends": [{"url": evil, "name": "evil", "engine": "openai"}]}},
              "health": {"interval_s": 0.5}}
    config["admin"] = {"token_env": ADMIN_TOKEN_ENV}
    with Proxy(config=config, admin_token="adm-mem-1") as p:
        yield p


class RssWatch:
    """Samples a process's RSS every 20 ms in a thread; `peak_kb` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = proc_rss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, proc_rss_kb(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("evil_kind", ["endless-body", "endless-length", "huge-error", "endless-header",
                                       "many-headers"])
def test_endless_answers_get_a_clear_502_and_memory_stays_bounded(proxy, evil_kind):
    with RssWatch(proxy.pid) as watch:
        started = time.monotonic()
        status, headers, body = proxy.request("POST", "/v1/chat/completions", CHAT, {"x-evil": evil_kind},
                                              timeout_s=30)
        took = time.monotonic() - started
    assert status == 502, (status, body[:300])
    err = json.loads(body)["error"]
    assert err["code"] == "backend_response_too_large", err
    assert watch.peak_kb < RSS_LIMIT_KB, f"peak RSS {watch.peak_kb // 1024} MB"
    assert took < 20
    # The engine answered (badly): it is not marked down, and a normal request right after is served.
    status, _, _ = proxy.request("GET", "/ready")
    assert status == 200
    assert proxy.request("POST", "/v1/chat/completions", CHAT, {"x-evil": "ok"})[0] == 200


def test_endless_stream_to_a_client_that_does_not_read_is_held_back_not_buffered(proxy):
    """Backpressure end to end: the proxy reads the engine only as fast as the client reads the proxy."""
    body = json.dumps({**CHAT, "stream": True}).encode()
    with RssWatch(proxy.pid) as watch, socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"x-evil: endless-stream\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(3.0)  # read nothing more: an unbounded relay would buffer the engine's output meanwhile
        peak_while_stalled = watch.peak_kb
        got = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # then read a while: the stream is still alive
            got += len(s.recv(1 << 20))
    assert peak_while_stalled < 200 * 1024, f"peak RSS {peak_while_stalled // 1024} MB while the client stalled"
    assert watch.peak_kb < RSS_LIMIT_KB
    assert got > 100_000
    assert proxy.request("POST", "/v1/chat/completions", CHAT, {"x-evil": "ok"})[0] == 200


def test_admin_body_is_bounded(proxy):
    huge = b'{"url": "http://127.0.0.1:1", "name": "' + b"n" * (2 * 1024 * 1024) + b'"}'
    status, body = proxy.admin("POST", "backends", huge)
    assert status == 413, body
    assert body["error"]["code"] == "body_too_large"
    assert proxy.alive()
