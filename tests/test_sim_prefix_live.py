"""The simulated vLLM's prefix cache over real sockets, with the openai SDK: a repeated prompt raises
vllm:prefix_cache_hits_total and comes back faster; /tokenize gives the ids the cache keys on; with
--no-enable-prefix-caching nothing is cached. Each sim is a real subprocess, stopped at the end of its test."""

import time
import urllib.request
from pathlib import Path

import openai
import orjson
from support import capbalancer, free_port, running

from capbalancer.fleet.adapters import snapshot_from_metrics

FAST = str(Path(__file__).parent / "data" / "profiles" / "fast-13b.yaml")
LABELS = '{engine="0",model_name="m"}'
PROMPT = "lorem ipsum dolor sit amet " * 160  # 4320 bytes: 1080 tokens, 67 full blocks of 16


def metrics_text(base: str) -> str:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
        return resp.read().decode()


def value(text: str, sample: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(sample + " "))
    return float(line.rsplit(" ", 1)[1])


def ttft(client: openai.OpenAI, prompt: str) -> float:
    started = time.monotonic()
    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=2, stream=True,
                                           extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].text:
            return time.monotonic() - started
    raise AssertionError("no token came back")


def test_a_repeated_prompt_hits_the_cache_counts_it_and_gets_its_first_token_sooner():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # time scale 20: the 1080-token prefill takes ~0.5 s of real time, well above the HTTP noise
    with running(capbalancer("sim", "--engine", "vllm", "--profile", FAST, "--port", str(port), "--model", "m",
                             "--time-scale", "20"), ready_url=f"{base}/health"):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
        cold = ttft(client, PROMPT)
        text = metrics_text(base)
        assert value(text, f"vllm:prefix_cache_queries_total{LABELS}") == 1080
        assert value(text, f"vllm:prefix_cache_hits_total{LABELS}") == 0
        warm = ttft(client, PROMPT)
        text = metrics_text(base)
        assert value(text, f"vllm:prefix_cache_queries_total{LABELS}") == 2160
        # every full block but the one holding the last token: 67 blocks
        assert value(text, f"vllm:prefix_cache_hits_total{LABELS}") == 67 * 16
        assert value(text, 'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"}'
                     ) == 67 * 16
        assert 'enable_prefix_caching="True"' in text
        assert warm < cold / 2, (warm, cold)
        # the proxy's adapter reads the counter the prefix index learns from
        snap = snapshot_from_metrics("vllm", text, 0.0)
        assert snap.prefix_cache_hits_tokens_total == 67 * 16 and snap.prefix_cache_queries_tokens_total == 2160

        req = urllib.request.Request(f"{base}/tokenize", data=orjson.dumps({"model": "m", "prompt": PROMPT}),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            tokens = orjson.loads(resp.read())
        assert tokens["count"] == 1080 and len(tokens["tokens"]) == 1080
        req = urllib.request.Request(f"{base}/detokenize", data=orjson.dumps({"model": "m", "tokens": tokens["tokens"]}),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert orjson.loads(resp.read())["prompt"] == PROMPT


def test_no_enable_prefix_caching_recomputes_every_prompt():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(capbalancer("sim", "--engine", "vllm", "--profile", FAST, "--port", str(port), "--model", "m",
                             "--no-enable-prefix-caching"), ready_url=f"{base}/health"):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
        for _ in range(2):
            client.completions.create(model="m", prompt=PROMPT, max_tokens=2)
        text = metrics_text(base)
        assert value(text, f"vllm:prefix_cache_hits_total{LABELS}") == 0
        assert value(text, f"vllm:prompt_tokens_total{LABELS}") == 2160
        assert 'enable_prefix_caching="False"' in text


def test_the_sglang_flavour_caches_to_the_token():
    # SGLang's radix cache pages KV a token at a time: a repeated 1080-token prompt hits all but its last token
    # (1079), where vLLM's 16-token blocks give 67 * 16 = 1072 (the test above).
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(capbalancer("sim", "--engine", "sglang", "--profile", FAST, "--port", str(port), "--model", "m"),
                 ready_url=f"{base}/health"):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
        for _ in range(2):
            client.completions.create(model="m", prompt=PROMPT, max_tokens=2)
        text = metrics_text(base)
        labels = '{engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"}'
        assert value(text, f"sglang:cached_tokens_total{labels}") == 1079
        assert value(text, f"sglang:prompt_tokens_total{labels}") == 2160
        snap = snapshot_from_metrics("sglang", text, 0.0)
        assert snap.prefix_cache_hits_tokens_total == 1079
