"""Nothing lost (issue 7 §2): a few thousand requests through the proxy while backends are SIGKILLed and
restarted under them. Every request must end in exactly one of: a complete response (the full text, and
for streams the final [DONE]), or an explicit error that names its reason (an HTTP error with an
OpenAI-shaped body, or an SSE error event). A hang, a silent truncation or a bare connection error is a
lost request and fails the test. The counts are printed (`pytest -s`) and asserted.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter

import openai
from faults import Proxy, fault_backends

REQUESTS = 2000
CONCURRENCY = 32
EXPECTED_TEXT = "t0 t1 t2 t3 "
MSG = [{"role": "user", "content": "chaos"}]


async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
    """(category, reason). Category: complete | error:<status or stream> | lost:<what>."""
    stream = i % 2 == 0
    try:
        if not stream:
            r = await c.chat.completions.create(model="m", messages=MSG, max_tokens=4)
            text = r.choices[0].message.content
            return ("complete", "") if text == EXPECTED_TEXT else ("lost:wrong body", repr(text))
        text = []
        s = await c.chat.completions.create(model="m", messages=MSG, max_tokens=4, stream=True)
        try:
            async for chunk in s:
                if chunk.choices and chunk.choices[0].delta.content:
                    text.append(chunk.choices[0].delta.content)
        except openai.APIStatusError:
            raise
        except openai.APIError as exc:  # the SSE error event the proxy sends when a stream breaks
            return ("error:stream", exc.message) if exc.message else ("lost:empty stream error", "")
        joined = "".join(text)
        return ("complete", "") if joined == EXPECTED_TEXT else ("lost:truncated stream", joined)
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        shaped = {"message", "type", "code"} <= set(body) and bool(body.get("message"))
        if not shaped:
            return f"lost:unshaped {exc.status_code}", str(exc.body)[:200]
        return f"error:{exc.status_code}", str(body["message"])
    except openai.APITimeoutError:
        return "lost:client timeout", ""
    except openai.APIConnectionError as exc:
        return "lost:connection", repr(exc.__cause__)


def chaos(backends, stop: threading.Event, log: list[str], seed: int = 7) -> None:
    """Kill a random backend with SIGKILL, let it stay dead a moment, restart it; repeat until told."""
    rng = random.Random(seed)
    round_no = 0
    while not stop.is_set():
        round_no += 1
        # Mostly one engine at a time; every fourth round the whole fleet (clients then get 503s).
        victims = list(backends) if round_no % 4 == 0 else [rng.choice(backends)]
        for victim in victims:
            victim.kill()
            log.append(f"kill {victim.name}")
        stop.wait(rng.uniform(0.2, 0.8))
        for victim in victims:
            victim.start()
            log.append(f"start {victim.name}")
        stop.wait(rng.uniform(0.2, 0.6))


async def test_chaos_every_request_complete_or_explicit_error():
    with fault_backends(3, chunks=4, chunk_delay_s=0.01) as backends:
        cfg = {"health": {"interval_s": 0.5, "timeout_s": 1.0},
               "timeouts": {"connect_s": 1.0, "first_byte_s": 5.0, "stream_idle_s": 5.0, "total_s": 20.0},
               "retries": {"max_attempts": 3, "max_total_s": 5.0}}
        with Proxy(backends, admin_token="adm", policy="least_requests", overrides=cfg) as proxy:
            c = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-chaos", max_retries=0, timeout=30.0)
            stop = threading.Event()
            events: list[str] = []
            monkey = threading.Thread(target=chaos, args=(backends, stop, events), daemon=True)
            sem = asyncio.Semaphore(CONCURRENCY)

            async def bounded(i: int) -> tuple[str, str]:
                async with sem:
                    return await one(c, i)

            t0 = time.monotonic()
            monkey.start()
            try:
                results = await asyncio.gather(*(bounded(i) for i in range(REQUESTS)))
            finally:
                stop.set()
                await asyncio.to_thread(monkey.join, 30)
            elapsed = time.monotonic() - t0
            counts = Counter(cat for cat, _ in results)
            reasons = Counter(f"{cat}: {reason[:70]}" for cat, reason in results if cat != "complete")
            print(f"\nchaos: {REQUESTS} requests in {elapsed:.1f}s, {sum(e.startswith('kill') for e in events)} kills")
            print("outcomes:", dict(counts))
            for reason, n in reasons.most_common():
                print(f"  {n:5d}  {reason}")
            lost = {k: v for k, v in counts.items() if k.startswith("lost")}
            assert not lost, (lost, [r for r in results if r[0].startswith("lost")][:5])
            assert sum(counts.values()) == REQUESTS
            assert sum(e.startswith("kill") for e in events) >= 3  # the chaos really happened
            assert counts["complete"] >= REQUESTS // 2
            # Every backend back up: once the restarted engines are polled, the proxy's accounting is clean.
            for b in backends:
                if not b.alive():
                    b.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                status, state = proxy.admin("GET", "backends")
                if all(s["inflight"] == 0 and s["health"] == "up" for s in state["backends"].values()):
                    break
                await asyncio.sleep(0.1)
            assert all(s["inflight"] == 0 for s in state["backends"].values()), state
            r = await c.chat.completions.create(model="m", messages=MSG)
            assert r.choices[0].message.content == EXPECTED_TEXT
            await c.close()
