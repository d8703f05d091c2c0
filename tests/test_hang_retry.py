"""A hung request is cancelled upstream and retried on another backend (issue 14 §3): with the DEFAULT policy, a
stream with no first token when the first-token timer runs out, and nothing sent to its client yet, is given up on
that backend (the engine sees the client leave) and served by another, within `retries.max_attempts`."""

from __future__ import annotations

import http.client
import json
import threading

from faults import FaultBackend, Proxy

BODY = json.dumps({"model": "m", "stream": True, "max_tokens": 4,
                   "messages": [{"role": "user", "content": "hello"}]})


def ask(port: int, out: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body=BODY, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        out.append((resp.status, resp.getheader("x-capbalancer-backend"), data))
    finally:
        conn.close()


def run_four(port: int) -> list:
    out: list = []
    threads = [threading.Thread(target=ask, args=(port, out)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def config(hung: FaultBackend, good: FaultBackend, **top) -> dict:
    return {"models": {"m": {"backends": [{"name": "hung", "url": hung.url, "engine": "vllm"},
                                          {"name": "good", "url": good.url, "engine": "vllm"}]}},
            # A short first-token timer keeps the test short; the relay's own first-byte timeout is far longer.
            "outlier": {"first_token_timeout_min_s": 0.5}, "timeouts": {"first_byte_s": 20.0}, **top}


def test_a_hung_request_is_cancelled_and_served_elsewhere():
    with FaultBackend("hung", api="hang") as hung, FaultBackend("good") as good, \
            Proxy(config=config(hung, good)) as proxy:
        out = run_four(proxy.port)
        assert len(out) == 4
        assert all(status == 200 and backend == "good" and b"[DONE]" in data for status, backend, data in out), out
        stats = hung.stats()
        tried = int(stats["counts"].get("api", 0))
        assert tried >= 1, stats  # concurrent requests spread over both idle backends: some went to the hung one
        # ... and each was cancelled there (the proxy closed its upstream request), none left hanging.
        assert stats["disconnects"] == tried and stats["inflight"] == 0, stats
        assert "hung answered 504 before any byte; retrying elsewhere" in proxy.log()


def test_without_the_retry_the_hung_request_waits_for_the_first_byte_timeout():
    with FaultBackend("hung", api="hang") as hung, FaultBackend("good") as good, \
            Proxy(config=config(hung, good, retries={"first_token_timeout": False},
                                timeouts={"first_byte_s": 2.0})) as proxy:
        out = run_four(proxy.port)
        assert any(status == 504 for status, _, _ in out), out  # the option is what made the difference


def test_with_nowhere_else_to_go_a_slow_answer_is_waited_for_not_cancelled():
    """Found by hand (a TGI simulator alone in its pool, non-streamed): the first-token timer cancelled a slow but
    live answer and sent 504 though no other backend could take the retry. With one backend, or the retry budget
    spent, the proxy keeps waiting; the first-byte timeout still bounds a hung engine."""
    with FaultBackend("slow", first_byte_delay_s=2.0) as slow, \
            Proxy(config={"models": {"m": {"backends": [{"name": "slow", "url": slow.url, "engine": "vllm"}]}},
                          "outlier": {"first_token_timeout_min_s": 0.5}, "timeouts": {"first_byte_s": 20.0}}) as proxy:
        out = run_four(proxy.port)
        assert len(out) == 4 and all(status == 200 and b"[DONE]" in data for status, _, data in out), out
        assert slow.stats()["disconnects"] == 0
        assert "retrying elsewhere" not in proxy.log()
