"""Faults survived (issue 7 §1): each fault injected into a real backend process under load, through a real
proxy process, observed with the official `openai` client and raw HTTP.

Backends are tests/faults.py servers; the proxy is `capbalancer serve --config` (tests/faults.py:Proxy).
Timing bounds are generous: the suite shares 2 cores with other work.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import openai
import pytest
from faults import FaultBackend, Proxy, blackhole_port, fault_backends, proxy_config

POLL_S = 0.5
FAST_HEALTH = {"health": {"interval_s": POLL_S, "timeout_s": 1.0}}
MSG = [{"role": "user", "content": "hello"}]


def client(proxy: Proxy, timeout_s: float = 30.0) -> openai.AsyncOpenAI:
    # max_retries=0: the client must see exactly what the proxy answered, not its own retries.
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0, timeout=timeout_s)


async def stream_chat(c: openai.AsyncOpenAI, errors_at: list[float] | None = None) -> tuple[str, str, str]:
    """One streaming chat: (outcome, backend, detail). outcome: complete | error (time noted in errors_at)."""
    raw = await c.chat.completions.with_raw_response.create(model="m", messages=MSG, stream=True, max_tokens=8)
    backend = raw.headers.get("x-capbalancer-backend", "?")
    text = []
    try:
        async for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
    except openai.APIError as exc:
        if errors_at is not None:
            errors_at.append(time.monotonic())
        return "error", backend, str(exc)
    return "complete", backend, "".join(text)


def backend_state(proxy: Proxy, name: str) -> dict:
    status, body = proxy.admin("GET", "backends")
    assert status == 200, body
    return body["backends"][name]


def inflight_gauge(proxy: Proxy, name: str) -> float:
    m = re.search(rf'capbalancer_backend_inflight_requests\{{backend="{re.escape(name)}"\}} ([0-9.e+-]+)',
                  proxy.metrics_text())
    return float(m.group(1)) if m else 0.0


def wait_for(cond, timeout_s: float, step_s: float = 0.05) -> float:
    """Poll cond() until true; returns the seconds it took, or fails."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if cond():
            return time.monotonic() - t0
        time.sleep(step_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


# --- an engine killed mid-stream ---------------------------------------------------------------------

async def test_engine_killed_mid_stream_under_load():
    with fault_backends(3, chunks=6, chunk_delay_s=0.15) as (b0, b1, b2):
        with Proxy([b0, b1, b2], admin_token="adm", overrides=FAST_HEALTH) as proxy:
            b0.set(api="die", after_chunks=2)
            c = client(proxy)
            errors_at: list[float] = []
            results = await asyncio.gather(*(stream_chat(c, errors_at) for _ in range(12)))
            on_b0 = [r for r in results if r[1] == "b0"]
            others = [r for r in results if r[1] != "b0"]
            # Round robin put a third of the load on the victim (a request that reached it only after its
            # death was refused, retried elsewhere before any byte, and counts with the others).
            assert 1 <= len(on_b0) <= 4 and len(on_b0) + len(others) == 12, results
            # Every stream on the killed engine ended with an SSE error event naming the reason...
            assert all(r[0] == "error" and "connection lost mid-stream" in r[2] for r in on_b0), on_b0
            # ...and the others were not disturbed.
            assert all(r[0] == "complete" and r[2] == "t0 t1 t2 t3 t4 t5 " for r in others), others
            assert b0.wait_exit() == 17
            # Never retried after the first byte: the survivors saw only their own share.
            assert b1.api_requests() + b2.api_requests() == len(others)
            # Accounting released: nothing in flight is left on the dead backend.
            assert backend_state(proxy, "b0")["inflight"] == 0
            assert inflight_gauge(proxy, "b0") == 0
            # Marked down by the health polls: failure_threshold (default 3) consecutive failed polls after
            # its death (the clients saw the break), plus scheduling slack on 2 shared cores.
            wait_for(lambda: backend_state(proxy, "b0")["health"] == "down", 5.0, 0.02)
            down_after_s = time.monotonic() - min(errors_at)
            print(f"b0 marked down {down_after_s:.2f}s after its death (poll interval {POLL_S}s)")
            assert down_after_s <= 3 * POLL_S + 1.0, f"marked down {down_after_s:.2f}s after death"
            # Traffic moves to the others.
            after = await asyncio.gather(*(stream_chat(c) for _ in range(8)))
            assert all(r[0] == "complete" for r in after), after
            assert {r[1] for r in after} == {"b1", "b2"}
            await c.close()


async def test_engine_killed_non_streaming_gets_502_json_or_retry():
    with fault_backends(2, api="die", after_chunks=1) as (b0, b1):
        # One attempt only: the half-sent body must become a clean 502 JSON, not a truncated 200.
        cfg = {**FAST_HEALTH, "retries": {"max_attempts": 1}}
        with Proxy([b0], admin_token="adm", overrides=cfg) as proxy:
            status, headers, body = proxy.request("POST", "/v1/chat/completions", {"model": "m", "messages": MSG})
            assert status == 502, body
            err = json.loads(body)["error"]
            assert set(err) >= {"message", "type", "param", "code"} and "b0" in err["message"]
            assert backend_state(proxy, "b0")["inflight"] == 0
        # Died before any byte reached the client: retried on the other backend, the client sees a 200.
        b1.set(api="ok")
        b0.start(api="die", after_chunks=0)
        with Proxy([b0, b1], overrides=FAST_HEALTH) as proxy:
            status, headers, body = proxy.request("POST", "/v1/chat/completions", {"model": "m", "messages": MSG})
            assert status == 200 and headers["x-capbalancer-backend"] == "b1", body
            assert json.loads(body)["choices"][0]["message"]["content"] == "t0 t1 t2 t3 t4 "


# --- hangs and stalls: the configured timeouts fire with a clear error --------------------------------

async def test_accepts_but_never_answers_hits_first_byte_timeout():
    with blackhole_port() as dead_url, FaultBackend("hang", api="hang") as hang:
        cfg = proxy_config([dead_url, hang], overrides={
            **FAST_HEALTH, "timeouts": {"first_byte_s": 1.0, "connect_s": 1.0}, "retries": {"max_attempts": 1}})
        with Proxy(config=cfg) as proxy:
            c = client(proxy)
            for _ in range(2):  # round robin: one on the kernel-only listener, one on the hanging server
                t0 = time.monotonic()
                with pytest.raises(openai.APIStatusError) as info:
                    await c.chat.completions.create(model="m", messages=MSG, stream=True)
                took = time.monotonic() - t0
                assert info.value.status_code == 504
                assert "first-byte timeout (1s)" in info.value.message
                assert 0.9 <= took <= 4.0, took
            await c.close()


async def test_stall_mid_stream_hits_idle_timeout_and_total_timeout():
    with FaultBackend("st", api="stall", after_chunks=2, chunks=6) as b:
        cfg = {**FAST_HEALTH, "timeouts": {"stream_idle_s": 1.0, "total_s": 30.0}}
        with Proxy([b], admin_token="adm", overrides=cfg) as proxy:
            c = client(proxy)
            t0 = time.monotonic()
            outcome, backend, detail = await stream_chat(c)
            took = time.monotonic() - t0
            assert outcome == "error" and "stream idle timeout (1s)" in detail, detail
            assert 0.9 <= took <= 5.0, took
            assert backend_state(proxy, "st")["inflight"] == 0
            # The proxy closed its upstream side: the stalled engine saw the disconnect.
            wait_for(lambda: b.stats()["disconnects"] >= 1, 5.0)
            # A slow but steady stream ends at the total timeout, however small its gaps.
            b.set(api="ok", chunks=40, chunk_delay_s=0.1)
            proxy.write_config(proxy_config([b], admin_token=True, overrides={
                **FAST_HEALTH, "timeouts": {"stream_idle_s": 1.0, "total_s": 1.5}}))
            status, body = proxy.admin("POST", "reload")
            assert status == 200, body
            t0 = time.monotonic()
            outcome, backend, detail = await stream_chat(c)
            assert outcome == "error" and "total timeout (1.5s)" in detail, detail
            assert time.monotonic() - t0 <= 6.0
            await c.close()


# --- 5xx / 429 / 503 before the first byte: retried elsewhere, bounded --------------------------------

async def test_error_before_first_byte_retried_on_another_backend():
    with fault_backends(2) as (bad, good):
        # Outlier ejection off: this test is about retries (ejection would keep the bad one out after 5).
        with Proxy([bad, good], overrides={**FAST_HEALTH, "outlier": {"consecutive_failures": 0}}) as proxy:
            c = client(proxy)
            for status in (500, 503, 429):
                bad.set(api="status", status=status, retry_after="1")
                bad.reset()
                good.reset()
                for stream in (False, True):
                    for _ in range(3):
                        if stream:
                            outcome, backend, text = await stream_chat(c)
                            assert (outcome, backend) == ("complete", "b1"), (status, text)
                        else:
                            raw = await c.chat.completions.with_raw_response.create(model="m", messages=MSG)
                            assert raw.headers["x-capbalancer-backend"] == "b1", status
                # Each failing answer was tried once, then moved: bounded, nothing hammered.
                assert 1 <= bad.api_requests() <= 6 and good.api_requests() == 6, status
                assert f'reason="{status}"' in proxy.metrics_text()
            await c.close()


async def test_retries_are_bounded_in_attempts_and_time_and_skip_client_errors():
    with fault_backends(3, api="status", status=503) as bs:
        with Proxy(bs, overrides={**FAST_HEALTH, "retries": {"max_attempts": 2, "max_total_s": 10}}) as proxy:
            status, _, body = proxy.request("POST", "/v1/chat/completions", {"model": "m", "messages": MSG})
            assert status == 503 and json.loads(body)["error"]["message"] == "fault: status 503"
            assert sum(b.api_requests() for b in bs) == 2  # max_attempts, not every backend
            for b in bs:
                b.reset()
            # Out of time: an answer that took longer than max_total_s is not retried.
            bs[0].set(first_byte_delay_s=1.2)
            bs[1].set(first_byte_delay_s=1.2)
            bs[2].set(first_byte_delay_s=1.2)
            proxy.write_config(proxy_config(bs, overrides={**FAST_HEALTH,
                                                           "retries": {"max_attempts": 3, "max_total_s": 1.0}}))
            proxy.signal(signal.SIGHUP)
            wait_for(lambda: "config reloaded" in proxy.log(), 5.0)
            status, _, body = proxy.request("POST", "/v1/chat/completions", {"model": "m", "messages": MSG})
            assert status == 503
            assert sum(b.api_requests() for b in bs) == 1
            # A client error (4xx other than 429) is the client's: never retried, passed through unchanged.
            for b in bs:
                b.set(api="status", status=400, first_byte_delay_s=0.0)
                b.reset()
            status, _, body = proxy.request("POST", "/v1/chat/completions", {"model": "m", "messages": MSG})
            assert status == 400 and json.loads(body)["error"]["message"] == "fault: status 400"
            assert sum(b.api_requests() for b in bs) == 1


# --- /metrics unreachable, slow, empty or garbage -------------------------------------------------------

async def test_broken_metrics_still_routed_stale_never_empty():
    faults = ["refuse", "slow", "empty", "garbage"]
    with fault_backends(4, api="hold", hold_s=30.0, chunks=3, metrics_delay_s=30.0) as bs:
        for b, fault in zip(bs, faults, strict=True):
            b.set(metrics=fault)
        with Proxy(bs, admin_token="adm", policy="least_requests", overrides=FAST_HEALTH) as proxy:
            time.sleep(4 * POLL_S)  # several polls of each broken /metrics
            c = client(proxy)
            tasks = [asyncio.create_task(stream_chat(c)) for _ in range(8)]
            await asyncio.to_thread(wait_for, lambda: sum(b.stats()["inflight"] for b in bs) == 8, 15.0)
            for b, fault in zip(bs, faults, strict=True):
                st = backend_state(proxy, b.name)
                assert st["health"] == "up", (fault, st)  # /health is fine: still routed
                assert st["snapshot_stale"] is True and st["snapshot"] is None, (fault, st)  # never "empty"
                # The proxy's own accounting stands in: 2 streams each, as least_requests spread them.
                assert st["inflight"] == 2 and st["requests_estimate"] == 2, (fault, st)
                assert b.stats()["counts"].get("/metrics", 0) >= 1  # it was polled, and refused/failed
            for b in bs:
                b.release()
            results = await asyncio.gather(*tasks)
            assert [r[0] for r in results] == ["complete"] * 8
            await c.close()


# --- every backend down, then one back -----------------------------------------------------------------

async def test_all_down_503_retry_after_at_once_then_recovery_within_two_polls():
    with fault_backends(2) as (b0, b1):
        with Proxy([b0, b1], admin_token="adm", overrides=FAST_HEALTH) as proxy:
            b0.kill()
            b1.kill()
            wait_for(lambda: all(backend_state(proxy, n)["health"] == "down" for n in ("b0", "b1")), 10.0)
            c = client(proxy)
            for stream in (False, True):
                t0 = time.monotonic()
                with pytest.raises(openai.APIStatusError) as info:
                    await c.chat.completions.create(model="m", messages=MSG, stream=stream)
                assert time.monotonic() - t0 < 1.0  # at once, not a hang
                assert info.value.status_code == 503
                assert int(info.value.response.headers["Retry-After"]) >= 1
                assert info.value.body["code"] == "unavailable" or "no healthy backend" in info.value.message
            assert proxy.request("GET", "/ready")[0] == 503
            b1.start()
            t_back = time.monotonic()

            def served() -> bool:
                return proxy.request("POST", "/v1/chat/completions", {"model": "m", "messages": MSG})[0] == 200

            await asyncio.to_thread(wait_for, served, 10.0, 0.05)
            recovered_s = time.monotonic() - t_back
            assert recovered_s <= 2 * POLL_S + 1.0, f"recovered after {recovered_s:.2f}s"
            await c.close()


# --- config reload: SIGHUP and POST /admin/reload ---------------------------------------------------------

async def test_reload_keeps_in_flight_and_refuses_invalid_config():
    with fault_backends(3, api="hold", hold_s=30.0, chunks=3) as (b0, b1, b2):
        with Proxy([b0, b1], admin_token="adm", overrides=FAST_HEALTH) as proxy:
            c = client(proxy)
            held = [asyncio.create_task(stream_chat(c)) for _ in range(6)]
            await asyncio.to_thread(wait_for, lambda: b0.stats()["inflight"] + b1.stats()["inflight"] == 6, 15.0)
            # Valid change by SIGHUP: b1 leaves, b2 joins, while 6 streams are open on b0 and b1.
            proxy.write_config(proxy_config([b0, b2], admin_token=True, overrides=FAST_HEALTH))
            proxy.signal(signal.SIGHUP)
            await asyncio.to_thread(wait_for, lambda: "backend b1 removed" in proxy.log(), 5.0)
            for b in (b0, b1):
                b.release()
            results = await asyncio.gather(*held)
            assert [r[0] for r in results] == ["complete"] * 6, results  # nothing dropped
            for b in (b0, b1, b2):
                b.set(api="ok")
            after = await asyncio.gather(*(stream_chat(c) for _ in range(4)))
            assert {r[1] for r in after} == {"b0", "b2"}
            # Invalid file by the admin API: refused with the key path, old config kept.
            bad = proxy_config([b0, b2], admin_token=True, overrides=FAST_HEALTH)
            bad["models"]["m"]["backends"][1]["url"] = "not-a-url"
            proxy.write_config(bad)
            status, body = proxy.admin("POST", "reload")
            assert status == 400 and "models.m.backends[1].url" in body["error"]["message"], body
            # ...and by SIGHUP: logged, proxy alive, same backends.
            proxy.write_config("models: [this is: not valid")
            proxy.signal(signal.SIGHUP)
            await asyncio.to_thread(wait_for, lambda: proxy.log().count("reload refused") >= 2, 5.0)
            assert "not valid YAML" in proxy.log()
            assert proxy.alive()
            again = await asyncio.gather(*(stream_chat(c) for _ in range(4)))
            assert [r[0] for r in again] == ["complete"] * 4 and {r[1] for r in again} == {"b0", "b2"}
            await c.close()


def test_tgi_stream_killed_mid_way_ends_with_error_event():
    with FaultBackend("t0", api="die", after_chunks=2, chunks=6, chunk_delay_s=0.05) as b:
        with Proxy([b], overrides=FAST_HEALTH) as proxy:
            status, headers, body = proxy.request("POST", "/generate_stream",
                                                  {"inputs": "hi", "parameters": {"max_new_tokens": 6}})
            assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
            events = [e for e in body.split(b"\n\n") if e.strip()]
            assert len(events) == 3, events  # two tokens, then the error: nothing after, nothing lost
            assert all(b'"token"' in e for e in events[:2])
            err = json.loads(events[2].split(b":", 1)[1])["error"]
            assert "connection lost mid-stream" in err["message"] and err["code"] == "backend_disconnected"
