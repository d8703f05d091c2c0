"""Engines that fail while /health says 200 (issue 14 §3, §9), under the default `capacity` policy: a hung
engine (accepts, never answers), a 5xx-only engine, an engine frozen mid-stream with SIGSTOP, and a prompt no
backend can ever serve arriving under load. Real processes on 127.0.0.1: a `capbalancer sim` cluster of two
healthy vLLM-like instances, one tests/faults.py server misbehaving beside them, and `capbalancer serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import openai
import yaml
from faults import ADMIN_TOKEN_ENV, FaultBackend, Proxy
from support import capbalancer, free_port, running

FAST = str(Path(__file__).parent / "data" / "profiles" / "fast-13b.yaml")
MSG = [{"role": "user", "content": "hello there"}]


@contextlib.contextmanager
def sim_pair(tmp_path: Path):
    """Two healthy simulated vLLM instances in one process (max_model_len 4096)."""
    ports = [free_port(), free_port()]
    fleet = {"model": "m", "instances": [
        {"name": f"s{i}", "engine": "vllm", "profile": FAST, "host": "127.0.0.1", "port": p}
        for i, p in enumerate(ports)]}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    with running(capbalancer("sim", "--cluster", str(path)), ready_url=f"http://127.0.0.1:{ports[1]}/health"):
        yield [f"http://127.0.0.1:{p}" for p in ports]


def config(sims: list[str], bad: FaultBackend | None, **top: Any) -> dict[str, Any]:
    rows = [{"name": f"s{i}", "url": u, "engine": "vllm", "profile": FAST} for i, u in enumerate(sims)]
    if bad is not None:
        # The same profile as the healthy ones: it claims to be the same engine on the same GPU.
        rows.append({"name": "bad", "url": bad.url, "engine": "vllm", "profile": FAST})
    # No policy named: the default (capacity) is what is tested.
    return {"models": {"m": {"backends": rows}}, "health": {"interval_s": 0.5, "timeout_s": 1.0},
            "admin": {"token_env": ADMIN_TOKEN_ENV}, **top}


async def load(proxy: Proxy, seconds: float, workers: int, client_timeout_s: float,
               stream: bool = True, max_tokens: int = 4) -> list[tuple[float, str, str]]:
    """Closed-loop chat requests for `seconds`: (start time, outcome, backend) each."""
    c = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=client_timeout_s)
    out: list[tuple[float, str, str]] = []
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            try:
                raw = await c.chat.completions.with_raw_response.create(model="m", messages=MSG,
                                                                         max_tokens=max_tokens, stream=stream)
                backend = raw.headers.get("x-capbalancer-backend", "?")
                if stream:
                    async for _ in raw.parse():
                        pass
                out.append((t0, "ok", backend))
            except openai.APIStatusError as exc:
                out.append((t0, f"http_{exc.status_code}", exc.response.headers.get("x-capbalancer-backend", "?")))
            except (openai.APITimeoutError, openai.APIConnectionError):
                out.append((t0, "timeout", "?"))

    await asyncio.gather(*(worker() for _ in range(workers)))
    await c.close()
    return out


def share_after(bad: FaultBackend, proxy: Proxy, t_from: float, seconds: float, workers: int,
                client_timeout_s: float, stream: bool = True, max_tokens: int = 4) -> tuple[float, int, list]:
    """Run the load; the bad backend's share of the requests that started `t_from` s or more after the start."""
    counts: dict[str, int] = {}
    start = time.monotonic()

    async def run() -> list:
        async def sample() -> None:
            await asyncio.sleep(t_from)
            counts["at"] = await asyncio.to_thread(bad.api_requests)

        task = asyncio.ensure_future(sample())
        results = await load(proxy, seconds, workers, client_timeout_s, stream, max_tokens)
        await task
        return results

    results = asyncio.run(run())
    late = [r for r in results if r[0] - start >= t_from]
    to_bad = bad.api_requests() - counts["at"]
    return to_bad / max(1, len(late)), len(late), results


def test_hung_engine_gets_under_5pct_after_10s_with_default_settings(tmp_path: Path) -> None:
    """The real defaults (first-token timer 5 s, 5 failures, 30 s ejection): a hung engine is ejected within
    about the first timer, and gets < 5% of what starts after 10 s."""
    with sim_pair(tmp_path) as sims, FaultBackend("bad", api="hang") as bad:
        with Proxy(config=config(sims, bad), admin_token="adm") as proxy:
            share, late, results = share_after(bad, proxy, 10.0, 13.0, workers=12, client_timeout_s=8.0)
            assert late >= 30, results[-10:]
            assert share < 0.05, (share, late)
            assert bad.api_requests() >= 2  # it did get some at first: the test is not vacuous
            ok_late = [r for r in results if r[1] == "ok"]
            assert len(ok_late) >= 50
            # The first-token timer made it look slow although nothing ever completed there.
            row = proxy.admin("GET", "backends")[1]["backends"]["bad"]
            assert row["completed"] == 0 and row["ttft_seconds"]["observed"] >= 4.5, row


def test_5xx_only_engine_is_ejected_and_reejected_on_probation(tmp_path: Path) -> None:
    fast = {"outlier": {"base_ejection_s": 3.0, "max_ejection_s": 12.0}}
    with sim_pair(tmp_path) as sims, FaultBackend("bad", api="status", status=500) as bad:
        with Proxy(config=config(sims, bad, **fast), admin_token="adm") as proxy:
            # Long enough answers that the healthy ones are busy: the idle-looking 5xx engine is attractive.
            share, late, results = share_after(bad, proxy, 2.0, 8.0, workers=24, client_timeout_s=10.0,
                                               max_tokens=64)
            assert late >= 40
            # Ejected after 5, re-admitted after 3 s for one trial, out again for 6 s: a few in all.
            assert share < 0.05, (share, late)
            assert bad.api_requests() >= 5
            # Every client request succeeded: a 500 before any byte is retried on a healthy backend.
            assert all(r[1] == "ok" for r in results), [r for r in results if r[1] != "ok"][:5]
            row = proxy.admin("GET", "backends")[1]["backends"]["bad"]
            assert row["outlier"]["ejected_total"] >= 1, row


def test_hung_engine_short_timers_non_streaming(tmp_path: Path) -> None:
    fast = {"outlier": {"first_token_timeout_min_s": 1.0}}
    with sim_pair(tmp_path) as sims, FaultBackend("bad", api="hang") as bad:
        with Proxy(config=config(sims, bad, **fast)) as proxy:
            share, late, _ = share_after(bad, proxy, 3.0, 6.0, workers=8, client_timeout_s=4.0, stream=False)
            assert late >= 30
            assert share < 0.05, (share, late)


def test_sigstop_mid_stream_breaks_the_stream_cleanly_and_others_carry_on(tmp_path: Path) -> None:
    """An engine frozen by SIGSTOP mid-stream: its open streams end with an SSE error event after the idle
    timeout (not never), new requests go to the others, and it serves again after SIGCONT."""
    top = {"timeouts": {"stream_idle_s": 2.0},
           "outlier": {"first_token_timeout_min_s": 1.0, "base_ejection_s": 1.0, "max_ejection_s": 2.0}}
    with sim_pair(tmp_path) as sims, FaultBackend("bad", chunks=40, chunk_delay_s=0.1) as bad:
        with Proxy(config=config(sims, bad, **top)) as proxy:
            async def scenario() -> dict[str, Any]:
                c = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=20.0)
                got: dict[str, Any] = {"bad_streams": [], "after": []}

                async def one_stream() -> None:
                    raw = await c.chat.completions.with_raw_response.create(model="m", messages=MSG,
                                                                             max_tokens=40, stream=True)
                    backend = raw.headers.get("x-capbalancer-backend")
                    t0, chunks = time.monotonic(), 0
                    try:
                        async for _ in raw.parse():
                            chunks += 1
                        outcome = "complete"
                    except openai.APIError as exc:
                        outcome = f"error: {exc}"
                    if backend == "bad":
                        got["bad_streams"].append((outcome, chunks, time.monotonic() - t0))

                streams = [asyncio.ensure_future(one_stream()) for _ in range(9)]
                await asyncio.sleep(1.0)  # streams under way
                os.kill(bad.proc.pid, signal.SIGSTOP)
                try:
                    stopped_at = time.monotonic()
                    await asyncio.gather(*streams)
                    got["streams_done_s"] = time.monotonic() - stopped_at
                    got["after"] = await load(proxy, 4.0, workers=4, client_timeout_s=6.0)
                finally:
                    os.kill(bad.proc.pid, signal.SIGCONT)
                await c.close()
                return got

            got = asyncio.run(scenario())
            assert got["bad_streams"], "no stream reached the frozen engine: nothing was tested"
            for outcome, chunks, _ in got["bad_streams"]:
                assert outcome.startswith("error") and "stream" in outcome, outcome
                assert chunks < 40
            assert got["streams_done_s"] < 8.0  # idle timeout 2 s, not the 60 s default nor never
            after = got["after"]
            ok = [r for r in after if r[1] == "ok"]
            assert len(ok) >= 0.9 * len(after) and len(after) >= 20, after[:10]
            assert sum(1 for r in after if r[2] == "bad") <= 0.05 * len(after) + 1


def test_oversized_prompt_under_load_is_400_at_once_and_delays_nobody(tmp_path: Path) -> None:
    with sim_pair(tmp_path) as sims:
        with Proxy(config=config(sims, None)) as proxy:
            too_long = {"model": "m", "messages": [{"role": "user", "content": "word " * 30000}], "max_tokens": 16}

            async def scenario() -> tuple[list[float], list]:
                latencies: list[float] = []

                async def oversized() -> None:
                    for _ in range(10):
                        t0 = time.monotonic()
                        status, _, body = await asyncio.to_thread(proxy.request, "POST", "/v1/chat/completions",
                                                                  too_long)
                        latencies.append(time.monotonic() - t0)
                        assert status == 400, body[:300]
                        err = json.loads(body)["error"]
                        assert err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error"
                        await asyncio.sleep(0.2)

                results, _ = await asyncio.gather(load(proxy, 3.0, workers=16, client_timeout_s=10.0), oversized())
                return latencies, results

            latencies, results = asyncio.run(scenario())
            assert all(r[1] == "ok" for r in results)
            latencies.sort()
            # Refused at admission, never held: fast even under load (the median; the box is shared).
            assert latencies[len(latencies) // 2] < 0.25, latencies
