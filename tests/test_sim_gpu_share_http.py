"""`capbalancer sim --cluster` with a gpu_group: a real process on real sockets, the official OpenAI client;
instances sharing a GPU slow each other while both are loaded, and only then."""

import asyncio
import time
from pathlib import Path

import openai
import yaml
from support import capbalancer, free_port, running

FAST = str(Path(__file__).parent / "data" / "profiles" / "fast-13b.yaml")  # 15 ms + 0.1 ms/seq decode steps
TIME_SCALE = 2.0  # 30 ms real steps: far above this machine's scheduling jitter
CONCURRENCY = 4
OUTPUT_TOKENS = 40


async def tpot_s(client: openai.AsyncOpenAI) -> float:
    """Mean time per output token of one streamed request, as a client sees it."""
    stream = await client.completions.create(model="m", prompt="hello " * 50, max_tokens=OUTPUT_TOKENS,
                                             stream=True, extra_body={"ignore_eos": True})
    times = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.monotonic())
    assert len(times) >= OUTPUT_TOKENS - 1
    return (times[-1] - times[0]) / (len(times) - 1)


async def load(urls: list[str]) -> dict[str, float]:
    """CONCURRENCY requests on each url at once; the mean TPOT per url."""
    clients = {u: openai.AsyncOpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0, timeout=60) for u in urls}
    try:
        results = await asyncio.gather(*(tpot_s(clients[u]) for u in urls for _ in range(CONCURRENCY)))
    finally:
        for c in clients.values():
            await c.close()
    return {u: sum(results[k * CONCURRENCY:(k + 1) * CONCURRENCY]) / CONCURRENCY for k, u in enumerate(urls)}


def test_instances_sharing_a_gpu_slow_each_other_only_while_both_are_loaded(tmp_path):
    ports = [free_port() for _ in range(3)]
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"model": "m", "instances": [
        {"name": "a", "port": ports[0], "profile": FAST, "time_scale": TIME_SCALE},
        {"name": "b", "port": ports[1], "profile": FAST, "time_scale": TIME_SCALE, "gpu_group": "gpu1"},
        {"name": "c", "port": ports[2], "profile": FAST, "time_scale": TIME_SCALE, "gpu_group": "gpu1"}]}))
    a, b, c = (f"http://127.0.0.1:{p}" for p in ports)
    with running(capbalancer("sim", "--cluster", str(fleet)), ready_url=f"{c}/health"):
        b_alone = asyncio.run(load([b]))[b]
        both = asyncio.run(load([b, c]))
        beside_a = asyncio.run(load([a, b]))
    step_s = 0.015 * TIME_SCALE
    assert 0.8 * step_s < b_alone < 1.3 * step_s  # c idle: b runs at its profile's speed
    # b and c both busy: each step of one waits for a step of the other, about twice the time per token
    assert 1.6 < both[b] / b_alone < 2.4
    assert 1.6 < both[c] / b_alone < 2.4
    # a is on a GPU of its own: loading it does not slow b, nor b it
    assert beside_a[b] < 1.3 * b_alone
    assert beside_a[a] < 1.3 * b_alone
