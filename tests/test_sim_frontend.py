"""The simulated API server's own time (`sim --frontend-ms/--frontend-us-per-token`, or the profile's
frontend_seconds): a real sim process, the openai SDK. Clients see it in their TTFT; the engine's TTFT histogram
(vllm:time_to_first_token_seconds) does not, as on a real vLLM whose API server tokenizes before the engine."""

import time
import urllib.request
from pathlib import Path

import openai
from support import capbalancer, free_port, running

FAST = str(Path(__file__).parent / "data" / "profiles" / "fast-13b.yaml")
LABELS = '{engine="0",model_name="m"}'


def engine_ttft_sum_s(base: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    line = next(x for x in text.splitlines() if x.startswith(f"vllm:time_to_first_token_seconds_sum{LABELS} "))
    return float(line.rsplit(" ", 1)[1])


def ttfts_s(client: openai.OpenAI, words: int, n: int = 3) -> list[float]:
    out = []
    for i in range(n):
        started = time.monotonic()
        for chunk in client.completions.create(model="m", prompt=f"p{i} " + "word " * words, max_tokens=2,
                                               stream=True, extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].text:
                out.append(time.monotonic() - started)
                break
    return out


def test_front_end_time_is_in_the_clients_ttft_and_not_in_the_engines():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # 150 ms a request + 100 µs a prompt token: 1,000 more prompt tokens add 100 ms
    with running(capbalancer("sim", "--engine", "vllm", "--profile", FAST, "--port", str(port), "--model", "m",
                             "--frontend-ms", "150", "--frontend-us-per-token", "100"), ready_url=f"{base}/health"):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
        short = ttfts_s(client, 20)
        long = ttfts_s(client, 1250)  # 5 bytes a word, 4 a token: ~1,560 tokens, ~156 ms of front end
        assert min(short) >= 0.150
        assert min(long) - min(short) >= 0.120, (short, long)
        # The engine's own TTFTs (arrival at the engine to first token) leave the front end out: the clients'
        # exceed them by at least 6 x 150 ms + 3 x ~156 ms.
        assert sum(short) + sum(long) - engine_ttft_sum_s(base) >= 0.9 * (6 * 0.150 + 3 * 0.156)


def test_profile_front_end_fields_load_save_and_validate(tmp_path):
    import pytest
    import yaml

    from capbalancer.profiling.schema import ProfileError, load_profile, save_profile

    prof = load_profile(FAST)
    assert prof.frontend_seconds == 0.0 and "frontend_seconds" not in prof.to_dict()  # unmeasured: not written
    data = {**prof.to_dict(), "frontend_seconds": 0.015, "frontend_seconds_per_prompt_token": 5e-6}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    loaded = load_profile(tmp_path / "p.yaml")
    assert (loaded.frontend_seconds, loaded.frontend_seconds_per_prompt_token) == (0.015, 5e-6)
    save_profile(loaded, tmp_path / "q.yaml")
    assert load_profile(tmp_path / "q.yaml").frontend_seconds == 0.015
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**data, "frontend_seconds": -1}))
    with pytest.raises(ProfileError, match="frontend_seconds"):
        load_profile(tmp_path / "bad.yaml")
