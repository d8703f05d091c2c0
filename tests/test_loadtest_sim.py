"""A load test against a real `capbalancer sim` process: the latencies it measures are the profile's."""

from __future__ import annotations

import asyncio

import pytest
from support import capbalancer, free_port, running

from capbalancer.loadtest.runner import LoadtestConfig, run_loadtest
from capbalancer.loadtest.workloads import SyntheticWorkload, parse_length
from capbalancer.profiling.library import resolve_profile

PROFILE = "l4/llama-3.1-8b-tp1"
PROMPT_TOKENS = 800
OUTPUT_TOKENS = 16


@pytest.mark.parametrize("engine,api,token_source", [
    ("vllm", "completions", "usage"), ("vllm", "chat", "usage"), ("tgi", "tgi", "details")])
def test_one_at_a_time_ttft_and_tpot_match_the_profile(engine: str, api: str, token_source: str):
    profile = resolve_profile(PROFILE)
    step = profile.step
    # Alone on the instance: the first token comes out of one prefill step, each later one out of a
    # one-sequence decode step over a context of about the prompt.
    expected_ttft_s = step.step_seconds(PROMPT_TOKENS, 0, 0)
    expected_tpot_s = step.decode_step_seconds(1, PROMPT_TOKENS + OUTPUT_TOKENS // 2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(capbalancer("sim", "--engine", engine, "--profile", PROFILE, "--port", str(port)),
                 ready_url=url + "/health"):
        result = asyncio.run(run_loadtest(LoadtestConfig(
            url=url, api=api, workload=SyntheticWorkload(parse_length(str(PROMPT_TOKENS)), parse_length(str(OUTPUT_TOKENS)),
                                                seed=0),
            max_concurrency=1, num_requests=4, ignore_eos=True, request_timeout_s=30)))
    s = result.summary
    assert s["completed"] == 4, result.errors
    # Token counts come from the usage chunk (stream_options.include_usage) or TGI's final details.
    assert all(r.output_tokens == OUTPUT_TOKENS and r.output_tokens_source == token_source
               for r in result.records)
    if api != "tgi":
        assert all(r.prompt_tokens == pytest.approx(PROMPT_TOKENS, rel=0.02) for r in result.records)
    # Measured can only be later than modelled (scheduling on shared cores), by a bounded amount.
    assert expected_ttft_s * 1e3 * 0.95 <= s["median_ttft_ms"] <= expected_ttft_s * 1e3 * 1.3 + 40
    assert expected_tpot_s * 1e3 * 0.95 <= s["median_tpot_ms"] <= expected_tpot_s * 1e3 * 1.25 + 10
    assert s["median_itl_ms"] == pytest.approx(s["median_tpot_ms"], rel=0.15)
