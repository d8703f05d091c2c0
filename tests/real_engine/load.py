"""Small helpers the real-engine tests share: scrape a few vLLM series, and drive concurrent load with the
official openai client."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import dataclass

import openai

from capbalancer.fleet import promtext
from tests.real_engine.server import SERVED_MODEL

# A prompt of about 150 tokens for the tiny model's tokenizer (trained on Python's own source).
PROMPT_150 = " ".join(["word"] * 150)


def scrape(url: str) -> dict[str, float]:
    """Unlabelled view of a vLLM /metrics page: series name (labels dropped) -> value, first series wins.
    Enough for the single-engine, single-model servers these tests run; the product's adapter is tested
    separately against the same pages."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        values.setdefault(name_labels.split("{", 1)[0], float(value))
    return values


def cache_config(url: str) -> dict[str, str]:
    """Labels of vllm:cache_config_info (num_gpu_blocks, block_size, kv_cache_size_tokens, ...)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = promtext.parse(text, ["vllm:cache_config_info"]).get("vllm:cache_config_info")
    if not samples:
        raise AssertionError("no vllm:cache_config_info on " + url)
    return dict(samples[0].labels)


@dataclass
class Outcome:
    ok: bool
    ttft_s: float | None
    latency_s: float
    completion_tokens: int
    error: str = ""


async def one_streamed(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> Outcome:
    """One streamed completion with usage; ignore_eos so a random-weight model still emits max_tokens."""
    started = time.monotonic()
    ttft = None
    tokens = 0
    try:
        stream = await client.completions.create(
            model=SERVED_MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and ttft is None:
                ttft = time.monotonic() - started
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.APIError as exc:
        return Outcome(False, ttft, time.monotonic() - started, tokens, str(exc))
    return Outcome(tokens == max_tokens, ttft, time.monotonic() - started, tokens)


async def burst(base_url: str, n: int, prompt: str, max_tokens: int, timeout_s: float = 300) -> list[Outcome]:
    """n concurrent streamed completions against base_url (…/v1)."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", timeout=timeout_s,
                                  max_retries=0) as client:
        return list(await asyncio.gather(*(one_streamed(client, prompt, max_tokens) for _ in range(n))))
