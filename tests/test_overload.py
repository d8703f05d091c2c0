"""Overload without stalling (issue 14 item 1), with real processes and the DEFAULT config (policy capacity):
/health probes stay fast while many connections load the proxy, the connection cap answers at once, and
running out of file descriptors is the proxy's 503, never a backend marked down. Kept short (a few seconds
each); bench/overload.py is the full-size measurement (3,000+ connections)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import socket
import threading
import time
from collections import Counter

from faults import FaultBackend, Proxy, fault_backends

from capbalancer.config import Timeouts
from capbalancer.server.relay import classify_upstream_error
from capbalancer.server.upstream_http import ConnectError

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).encode()
STREAM_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                          "stream": True}).encode()


def request_bytes(body: bytes = BODY, keep_alive: bool = True) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (len(body), b"" if keep_alive else b"Connection: close\r\n") + body)


def probe(port: int, path: str = "/health", timeout_s: float = 5.0) -> tuple[int, float]:
    """One probe on a fresh connection, as a kubelet sends it: (status, seconds); status 0 on timeout."""
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode())
            data = s.recv(4096)
        return int(data.split(b" ", 2)[1]), time.monotonic() - started
    except (OSError, IndexError, ValueError):
        return 0, time.monotonic() - started


class Prober(threading.Thread):
    """Probes /health every `every_s` on fresh connections from a thread of its own (not the load's loop)."""

    def __init__(self, port: int, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.port, self.every_s = port, every_s
        self.results: list[tuple[int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.results.append(probe(self.port))
            time.sleep(self.every_s)


async def _client(port: int, until: float, statuses: Counter) -> None:
    """A keep-alive client sending requests back to back; on 429/503 it waits as Retry-After says."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        statuses["connect_failed"] += 1
        return
    try:
        while time.monotonic() < until:
            writer.write(request_bytes())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            status = int(head.split(b" ", 2)[1])
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            statuses[status] += 1
            if status in (429, 503):
                await asyncio.sleep(1.0)
            if b"connection: close" in head.lower():
                return
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        statuses[type(exc).__name__] += 1
    finally:
        writer.close()


async def _load(port: int, clients: int, duration_s: float) -> Counter:
    statuses: Counter = Counter()
    until = time.monotonic() + duration_s
    await asyncio.gather(*(_client(port, until, statuses) for _ in range(clients)))
    return statuses


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def test_health_stays_fast_under_many_connections():
    with fault_backends(2, first_byte_delay_s=0.3) as backends:
        config = {"models": {"m": {"backends": [{"url": b.url, "name": b.name} for b in backends]}}}
        with Proxy(config=config) as proxy:
            prober = Prober(proxy.port)
            prober.start()
            statuses = asyncio.run(_load(proxy.port, clients=1000, duration_s=4.0))
            prober.stop.set()
            prober.join()
            assert proxy.alive()
    latencies = [t for status, t in prober.results if status == 200]
    assert len(prober.results) >= 20
    assert len(latencies) == len(prober.results), Counter(s for s, _ in prober.results)  # every probe: 200
    # The target is 100 ms on a dedicated box (bench/overload.py measures it); this shared 2-core test
    # machine runs other suites beside us, so the test asserts the failure it guards against: seconds.
    assert p99(latencies) < 1.0, f"/health p99 {p99(latencies) * 1000:.0f} ms"
    # It keeps serving while it sheds: how many depends on the backends' seats and on how fast this shared
    # machine turns them over (549-1,400 seen: a fresh clone's suite beside other sessions' benches); the
    # throughput figure is bench/overload.py's. A proxy stalled by the load serves a handful.
    served = statuses[200]
    assert served > 300, statuses
    assert set(statuses) <= {200, 429, 503}, statuses  # every request answered: no timeouts, no resets


def test_connection_cap_answers_at_once_and_probes_still_pass():
    with FaultBackend("b0", api="hold", chunks=3, hold_s=30) as b:
        config = {"models": {"m": {"backends": [{"url": b.url, "name": "b0"}]}}, "server": {"max_connections": 40}}
        with Proxy(config=config) as proxy:
            held = []
            try:
                for _ in range(40):  # 40 streams held open: the cap is reached
                    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
                    s.sendall(request_bytes(STREAM_BODY))
                    held.append(s)
                for s in held:
                    assert s.recv(4096).startswith(b"HTTP/1.1 200")
                started = time.monotonic()
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
                    s.sendall(request_bytes(keep_alive=False))
                    answer = s.recv(4096)
                took = time.monotonic() - started
                assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
                assert b"Retry-After: 1" in answer and b"proxy_overloaded" in answer
                assert took < 0.5, took
                for path in ("/health", "/ready"):  # probes are answered past the cap
                    assert probe(proxy.port, path)[0] == 200
            finally:
                b.release()
                for s in held:
                    s.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and 'inflight_requests{backend="b0"} 0.0' not in proxy.metrics_text():
                time.sleep(0.1)
            status, _, body = proxy.request("POST", "/v1/chat/completions", json.loads(BODY), timeout_s=30)
            assert status == 200, (status, body[:300], proxy.log()[-3000:])


def test_fd_exhaustion_is_the_proxys_503_and_never_marks_a_backend_down():
    with FaultBackend("b0", api="hold", chunks=3, hold_s=30) as b:
        config = {"models": {"m": {"backends": [{"url": b.url, "name": "b0"}]}},
                  "server": {"max_connections": 5000}, "health": {"interval_s": 0.2}}
        with Proxy(config=config) as proxy:
            resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (400, 400))  # fd pressure, from outside
            socks, answers = [], Counter()
            try:
                for _ in range(600):
                    try:
                        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
                    except OSError:
                        answers["connect_failed"] += 1
                        continue
                    s.sendall(request_bytes(STREAM_BODY))
                    socks.append(s)
                for s in socks:
                    try:
                        head = s.recv(4096)
                    except OSError:
                        head = b""
                    status = head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/") else "none"
                    answers[status] += 1
                    if status != "200":
                        answers[b"proxy_overloaded" in head] += 1
                        assert status == "503" and b"Retry-After" in head, head[:300]
                time.sleep(1.0)  # several health polls under fd pressure
                assert answers["503"] > 0 and answers["200"] > 0, answers
                assert answers["none"] == 0 and answers["connect_failed"] == 0, answers
                status, _ = probe(proxy.port, "/ready")  # probes still answered, backend still routable
            finally:
                b.release()
                for s in socks:
                    s.close()
            assert status == 200, answers
            time.sleep(0.5)
            assert proxy.request("POST", "/v1/chat/completions", json.loads(BODY))[0] == 200
            log = proxy.log()
            assert "backend unreachable" not in log and "marked down" not in log.lower(), log[-2000:]
            assert "b0: health failed" not in log


def test_out_of_descriptors_on_connect_is_a_503_that_blames_no_backend():
    """What the relay makes of EMFILE/ENFILE on an upstream connect (the live path above avoids reaching it)."""
    for code in (errno.EMFILE, errno.ENFILE):
        err = classify_upstream_error(ConnectError(OSError(code, os.strerror(code))), Timeouts())
        assert (err.status, err.code, err.backend_down, err.retryable) == (503, "proxy_overloaded", False, False)
        assert err.retry_after_s is not None
    refused = classify_upstream_error(ConnectError(ConnectionRefusedError(errno.ECONNREFUSED, "refused")), Timeouts())
    assert refused.backend_down and refused.code == "backend_unreachable"


def half_closed_exchange(port: int, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request_bytes(body))
        s.shutdown(socket.SHUT_WR)  # sent everything; still reading
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_half_closed_client_gets_its_answer_and_a_client_that_left_leaves_the_queue():
    with FaultBackend("b0", chunks=4, first_byte_delay_s=0.5) as b:
        config = {"models": {"m": {"backends": [{"url": b.url, "name": "b0"}]}}}
        with Proxy(config=config) as proxy:
            for body in (BODY, STREAM_BODY):
                answer = half_closed_exchange(proxy.port, body)
                final = answer.split(b"HTTP/1.1 100 Continue\r\n\r\n")[-1]  # interim answers may come first
                assert final.startswith(b"HTTP/1.1 200"), answer[:300]
                assert b"t3" in final
            served = b.api_requests()
            assert served == 2
            b.set(api="hold", hold_s=30)
            # A client that closes for good while its request is on the engine: the engine sees it leave.
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            s.sendall(request_bytes(STREAM_BODY))
            time.sleep(0.2)
            s.close()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and b.stats()["disconnects"] == 0:
                time.sleep(0.05)
            assert b.stats()["disconnects"] == 1
            b.release()


def test_a_refusal_at_the_front_door_has_its_access_log_line():
    """The front door answers some requests before the event loop sees them (connection cap, a full hold queue, a
    request that cannot start in time); each still gets its access-log line (method, path, status)."""
    with FaultBackend("b0", api="hold", chunks=3, hold_s=30) as b:
        config = {"models": {"m": {"backends": [{"url": b.url, "name": "b0"}]}}, "server": {"max_connections": 2}}
        with Proxy(config=config) as proxy:
            held = []
            try:
                for _ in range(2):
                    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
                    s.sendall(request_bytes(STREAM_BODY))
                    held.append(s)
                for s in held:
                    assert s.recv(4096).startswith(b"HTTP/1.1 200")
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
                    s.sendall(request_bytes(keep_alive=False))
                    assert s.recv(4096).startswith(b"HTTP/1.1 503")
                deadline = time.monotonic() + 10  # written by the log's own thread, a moment later
                refused: list[dict] = []
                while not refused and time.monotonic() < deadline:
                    lines = [json.loads(ln) for ln in proxy.log().splitlines() if ln.startswith("{")]
                    refused = [ln for ln in lines if ln["status"] == 503]
                    time.sleep(0.05)
                assert refused and refused[0]["method"] == "POST" and refused[0]["path"] == "/v1/chat/completions", (
                    proxy.log()[-2000:])
            finally:
                b.release()
                for s in held:
                    s.close()
