"""Workload sources: synthetic length distributions, ShareGPT and prompt JSONL datasets, traces."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from capbalancer.loadtest.workloads import (
    DEFAULT_OUTPUT_LEN,
    DEFAULT_PROMPT_LEN,
    SyntheticWorkload,
    WorkloadError,
    estimate_tokens,
    load_dataset,
    load_trace,
    parse_length,
    synthetic_prompt,
)

DATA = Path(__file__).parent / "data" / "workloads"


def test_length_specs():
    assert parse_length("200").sample(random.Random(0)) == 200
    u = parse_length("uniform:10:20")
    draws = [u.sample(random.Random(i)) for i in range(200)]
    assert min(draws) >= 10 and max(draws) <= 20 and len(set(draws)) > 5
    ln = parse_length("lognormal:mean=600:sigma=0.8:max=100000")
    rng = random.Random(1)
    values = np.array([ln.sample(rng) for _ in range(20_000)])
    assert values.mean() == pytest.approx(600, rel=0.04)  # the mean is the lengths' mean, not exp(mu)
    assert np.median(values) == pytest.approx(600 * np.exp(-0.8**2 / 2), rel=0.05)
    capped = parse_length("lognormal:mean=600:sigma=2:max=1000")
    assert max(capped.sample(rng) for _ in range(2000)) <= 1000
    for bad in ("0", "uniform:5:2", "uniform:3", "lognormal:sigma=1", "normal:3:4", "lognormal:mean=5:x=1"):
        with pytest.raises(WorkloadError):
            parse_length(bad)


def test_synthetic_prompts_have_the_requested_token_count():
    rng = random.Random(0)
    prompt = synthetic_prompt(500, rng)
    assert len(prompt.split()) == 500          # one word per token under BPE tokenizers
    assert estimate_tokens(prompt) == pytest.approx(500, abs=1)  # and 4 characters per token


def test_synthetic_workload_is_seeded_and_sharegpt_like_by_default():
    w = SyntheticWorkload(parse_length(DEFAULT_PROMPT_LEN), parse_length(DEFAULT_OUTPUT_LEN), seed=5)
    a = list(itertools.islice(w, 300))
    b = list(itertools.islice(w, 300))
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert np.mean([r.prompt_len for r in a]) == pytest.approx(600, rel=0.15)
    assert np.mean([r.output_len for r in a]) == pytest.approx(200, rel=0.15)
    assert all(len(r.prompt.split()) == r.prompt_len for r in a)
    c = list(itertools.islice(SyntheticWorkload(parse_length("8"), parse_length("4"), seed=6), 3))
    assert c[0].prompt != a[0].prompt and {r.output_len for r in c} == {4}


def test_sharegpt_json_takes_first_human_turn_and_reply_length():
    w = load_dataset(DATA / "sharegpt_sample.json", seed=0)
    assert len(w.requests) == 2  # the conversation without a human turn is skipped
    by_prompt = {r.prompt: r for r in w.requests}
    first = by_prompt["What is the capital of France? Please answer briefly."]
    reply = "The capital of France is Paris, a city on the Seine known for its museums and cafes."
    assert first.output_len == round(len(reply) / 4)
    assert "Write a haiku about load balancers." in by_prompt
    # cycled and shuffled (seeded) when more requests are asked for than the file has
    drawn = list(itertools.islice(w, 6))
    assert sorted(r.prompt for r in drawn[:2]) == sorted(by_prompt)
    assert [r.prompt for r in drawn] == [r.prompt for r in itertools.islice(w, 6)]


def test_sharegpt_jsonl_and_simple_prompts(tmp_path: Path):
    lines = tmp_path / "sg.jsonl"
    lines.write_text('{"conversations": [{"from": "human", "value": "hi there"}, '
                     '{"from": "gpt", "value": "hello to you, friend"}]}\n')
    (r,) = load_dataset(lines).requests
    assert r.prompt == "hi there" and r.output_len == 5
    w = load_dataset(DATA / "prompts.jsonl", default_output_len=33)
    lens = {r.prompt: r.output_len for r in w.requests}
    assert lens == {"Summarize the plot of Hamlet in two sentences.": 64, "List three prime numbers.": 16,
                    "Say hello.": 33}
    overridden = load_dataset(DATA / "prompts.jsonl", output_len_override=parse_length("7"))
    assert {r.output_len for r in itertools.islice(overridden, 6)} == {7}


def test_trace_replays_in_time_order_from_zero():
    w = load_trace(DATA / "trace.jsonl")
    assert w.is_trace
    assert [r.arrival_s for r in w.requests] == [0.0, 0.5, 1.25]
    assert [r.output_len for r in w.requests] == [20, 50, 80]
    assert w.requests[0].prompt_len == 120 and len(w.requests[0].prompt.split()) == 120
    assert w.requests[2].prompt == "Explain paged attention."
    # replaying past the end starts the trace again after its last arrival
    times = [r.arrival_s for r in itertools.islice(w, 5)]
    assert times[3] > times[2] and times[4] - times[3] == pytest.approx(0.5)


def test_burstgpt_csv_trace():
    w = load_trace(DATA / "burstgpt_sample.csv")
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in w.requests] == [(0.0, 472, 18), (1.5, 1087, 98)]


def test_bad_files_name_the_line(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json}\n')
    with pytest.raises(WorkloadError, match="bad.jsonl:2"):
        load_dataset(bad)
    nots = tmp_path / "trace.jsonl"
    nots.write_text('{"prompt": "no time"}\n')
    with pytest.raises(WorkloadError, match="timestamp"):
        load_trace(nots)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(WorkloadError, match="no usable"):
        load_dataset(empty)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"something": 1}\n')
    with pytest.raises(WorkloadError, match="wrong.jsonl:1"):
        load_dataset(wrong)
