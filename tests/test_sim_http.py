"""`capbalancer sim` over real sockets, with real clients: the openai SDK for the vLLM and SGLang flavours,
aiohttp for TGI. Every instance is a real subprocess on 127.0.0.1, stopped at the end of its test."""

import asyncio
import dataclasses
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
import yaml
from support import capbalancer, free_port, running

from capbalancer.profiling.schema import load_profile

PROFILES = Path(__file__).parent / "data" / "profiles"
FAST = str(PROFILES / "fast-13b.yaml")
TINY_KV = str(PROFILES / "tiny-kv.yaml")


def metrics_of(base: str) -> dict[str, float]:
    """name{labels} -> value for every sample of /metrics."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def sim_args(engine, profile, port, *extra):
    return capbalancer("sim", "--engine", engine, "--profile", profile, "--port", str(port), "--model", "m", *extra)


def test_vllm_flavour_with_the_openai_sdk():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(sim_args("vllm", FAST, port), ready_url=f"{base}/health"):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["m"]
        done = client.completions.create(model="m", prompt="word " * 100, max_tokens=7, extra_body={"ignore_eos": True})
        assert done.choices[0].finish_reason == "length"
        assert done.usage.completion_tokens == 7 and done.usage.prompt_tokens == 125
        assert len(done.choices[0].text) == 7 * 4

        chunks = list(client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hello " * 20}], max_tokens=12, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["length"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
        assert len(text) == 12 * 4

        # Without ignore_eos the length is a seeded draw below max_tokens: the same seed, the same length.
        a = client.completions.create(model="m", prompt="x", max_tokens=400, seed=7)
        b = client.completions.create(model="m", prompt="x", max_tokens=400, seed=7)
        assert a.usage.completion_tokens == b.usage.completion_tokens <= 400

        with pytest.raises(openai.NotFoundError) as nf:
            client.completions.create(model="nope", prompt="x", max_tokens=5)
        assert nf.value.body == {"message": "The model `nope` does not exist. Valid aliases: m.", "type": "NotFoundError",
                                 "param": "model", "code": 404}
        with pytest.raises(openai.BadRequestError, match="cannot be greater than max_model_len=4096"):
            client.completions.create(model="m", prompt="x", max_tokens=5000)

        m = metrics_of(base)
        labels = '{engine="0",model_name="m"}'
        assert m[f"vllm:generation_tokens_total{labels}"] == 7 + 12 + 2 * a.usage.completion_tokens
        assert m[f"vllm:num_requests_running{labels}"] == 0
        assert m[f"vllm:kv_cache_usage_perc{labels}"] == 0
        assert m[f"vllm:time_to_first_token_seconds_count{labels}"] == 4
        assert m[f"vllm:e2e_request_latency_seconds_count{labels}"] == 4
        info = [k for k in m if k.startswith("vllm:cache_config_info{")]
        assert len(info) == 1 and 'num_gpu_blocks="3500"' in info[0] and 'block_size="16"' in info[0]
        for name in ("vllm:num_requests_waiting", "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
                     "vllm:inter_token_latency_seconds_sum", "vllm:request_queue_time_seconds_sum"):
            assert f"{name}{labels}" in m
        with urllib.request.urlopen(f"{base}/version") as resp:
            assert "version" in orjson.loads(resp.read())


async def _poll_metrics(base: str, stop: asyncio.Event, seen: dict[str, float]) -> None:
    labels = '{engine="0",model_name="m"}'
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.get(f"{base}/metrics") as resp:
                text = await resp.text()
            for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_waiting", "vllm:num_requests_running"):
                match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
                seen[name] = max(seen.get(name, 0.0), float(match.group(1)))
            await asyncio.sleep(0.05)


def test_kv_pressure_shows_in_metrics_and_every_request_finishes():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(sim_args("vllm", TINY_KV, port), ready_url=f"{base}/health"):
        async def main():
            client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
            stop = asyncio.Event()
            seen: dict[str, float] = {}
            poller = asyncio.create_task(_poll_metrics(base, stop, seen))
            # distinct first tokens: no prefix is shared, each request needs its own KV
            results = await asyncio.gather(*[
                client.completions.create(model="m", prompt=f"{i:04d}" + "abcd" * 299, max_tokens=100,
                                          extra_body={"ignore_eos": True}) for i in range(12)])
            stop.set()
            await poller
            return results, seen

        results, seen = asyncio.run(main())
        assert [r.usage.completion_tokens for r in results] == [100] * 12
        assert seen["vllm:kv_cache_usage_perc"] > 0.6  # 12 x 400 tokens do not fit in 2048
        assert seen["vllm:num_requests_waiting"] > 0
        m = metrics_of(base)
        assert m['vllm:num_preemptions_total{engine="0",model_name="m"}'] > 0
        assert m['vllm:kv_cache_usage_perc{engine="0",model_name="m"}'] == 0


def test_time_scale_stretches_latency_consistently():
    prof = load_profile(FAST)
    prefill_s = prof.step.step_seconds(2000, 0, 0)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(sim_args("vllm", FAST, port, "--time-scale", "4"), ready_url=f"{base}/health"):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        started = time.monotonic()
        stream = client.completions.create(model="m", prompt="abcd" * 2000, max_tokens=2, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        ttft = time.monotonic() - started
        list(stream)
        assert ttft >= 4 * prefill_s * 0.95
        assert ttft < 4 * prefill_s + 1.0  # generous: 2 shared cores
        m = metrics_of(base)
        reported = m['vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"}']
        assert reported == pytest.approx(4 * prefill_s, rel=0.25)  # the scaled time, as the client saw it


def test_tgi_flavour_frames_metrics_and_overload():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(sim_args("tgi", FAST, port, "--max-concurrent-requests", "2", "--time-scale", "3"),
                 ready_url=f"{base}/health"):
        async def main():
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{base}/info") as r:
                    info = await r.json()
                async with s.post(f"{base}/generate", json={"inputs": "hello " * 10,
                                                            "parameters": {"max_new_tokens": 5, "details": True,
                                                                           "ignore_eos": True}}) as r:
                    gen = await r.json()
                frames = []
                async with s.post(f"{base}/generate_stream", json={"inputs": "hi",
                                                                   "parameters": {"max_new_tokens": 4,
                                                                                  "ignore_eos": True}}) as r:
                    assert r.headers["Content-Type"].startswith("text/event-stream")
                    async for line in r.content:
                        if line.startswith(b"data:"):
                            frames.append(orjson.loads(line[5:]))

                async def long_one():
                    async with s.post(f"{base}/generate", json={"inputs": "x", "parameters": {
                            "max_new_tokens": 60, "ignore_eos": True}}) as r:
                        return r.status, await r.json()

                first = [asyncio.create_task(long_one()) for _ in range(2)]
                await asyncio.sleep(0.3)
                async with s.post(f"{base}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 5}}) as r:
                    overloaded = (r.status, await r.json())
                ok = await asyncio.gather(*first)
                async with s.post(f"{base}/generate", json={"inputs": "x" * 40000,
                                                            "parameters": {"max_new_tokens": 5}}) as r:
                    too_long = (r.status, await r.json())
                return info, gen, frames, overloaded, ok, too_long

        info, gen, frames, overloaded, ok, too_long = asyncio.run(main())
        assert info["router"] == "text-generation-router" and info["max_concurrent_requests"] == 2
        assert gen["details"]["generated_tokens"] == 5 and len(gen["generated_text"]) == 20
        assert [f["index"] for f in frames] == [1, 2, 3, 4]
        assert all(f["generated_text"] is None and f["details"] is None for f in frames[:-1])
        assert frames[-1]["details"]["generated_tokens"] == 4 and frames[-1]["details"]["finish_reason"] == "length"
        assert frames[-1]["generated_text"] == "".join(f["token"]["text"] for f in frames)
        assert overloaded == (429, {"error": "Model is overloaded", "error_type": "overloaded"})
        assert [status for status, _ in ok] == [200, 200]
        assert too_long[0] == 422 and too_long[1]["error_type"] == "validation"
        m = metrics_of(base)
        for name in ("tgi_queue_size", "tgi_batch_current_size", "tgi_batch_current_max_tokens",
                     "tgi_request_count", "tgi_request_success", "tgi_request_duration_count"):
            assert name in m
        assert m["tgi_batch_max_total_tokens"] == 56000
        assert m['tgi_request_failure{err="overloaded"}'] == 1
        assert m["tgi_request_success"] == 4


def test_sglang_flavour_metrics_and_load():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(sim_args("sglang", FAST, port), ready_url=f"{base}/health"):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)
        out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                             extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
        with urllib.request.urlopen(f"{base}/get_load") as resp:
            load = orjson.loads(resp.read())
        assert load[0]["num_reqs"] == 0
        m = metrics_of(base)
        labels = '{engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"}'
        for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
                     "sglang:num_used_tokens", "sglang:gen_throughput", "sglang:cache_hit_rate"):
            assert f"{name}{labels}" in m
        assert m[f"sglang:generation_tokens_total{labels}"] == 6
        assert m[f"sglang:max_total_num_tokens{labels}"] == 56000


def test_cluster_file_serves_every_instance_on_its_port(tmp_path):
    ports = [free_port() for _ in range(4)]
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"model": "m", "instances": [
        {"name": "fast", "engine": "vllm", "port": ports[0], "profile": FAST},
        {"name": "tgi", "engine": "tgi", "port": ports[1], "profile": FAST},
        {"name": "sgl", "engine": "sglang", "port": ports[2], "profile": FAST, "time_scale": 2.0},
        {"name": "plain", "engine": "openai", "port": ports[3], "profile": FAST}]}))
    with running(capbalancer("sim", "--cluster", str(fleet)), ready_url=f"http://127.0.0.1:{ports[3]}/health"):
        with pytest.raises(urllib.error.HTTPError) as no_metrics:  # a plain OpenAI server has none
            urllib.request.urlopen(f"http://127.0.0.1:{ports[3]}/metrics")
        assert no_metrics.value.code == 404
        for p in ports[:3]:
            with urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics") as resp:
                text = resp.read().decode()
            assert {ports[0]: "vllm:num_requests_running", ports[1]: "tgi_queue_size",
                    ports[2]: "sglang:num_running_reqs"}[p] in text
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports[0]}/v1", api_key="x", max_retries=0)
        assert client.completions.create(model="m", prompt="hi", max_tokens=3).usage.completion_tokens <= 3


async def test_embedded_cluster_starts_in_this_loop_and_stops():
    from capbalancer.sim.embedded import start_embedded_cluster

    fleet, stop = await start_embedded_cluster()
    try:
        assert len(fleet.instances) == 3
        assert len({i.profile for i in fleet.instances}) == 2  # one fast, two slow
        for inst in fleet.instances:
            client = openai.AsyncOpenAI(base_url=f"{inst.url}/v1", api_key="x", max_retries=0, timeout=30)
            out = await client.completions.create(model=inst.model, prompt="hello", max_tokens=3,
                                                  extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 3
    finally:
        await stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as s, s.get(f"{fleet.instances[0].url}/health"):
            pass


def test_client_disconnect_aborts_the_request_in_the_engine():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    labels = '{engine="0",model_name="m"}'
    with running(sim_args("vllm", FAST, port, "--time-scale", "2"), ready_url=f"{base}/health"):
        async def main():
            async with aiohttp.ClientSession() as s:
                # streaming: read a few events, then drop the connection
                resp = await s.post(f"{base}/v1/completions", json={
                    "model": "m", "prompt": "hi", "max_tokens": 3000, "stream": True, "ignore_eos": True})
                got = 0
                async for line in resp.content:
                    got += line.startswith(b"data:")
                    if got >= 3:
                        break
                resp.close()
                # non-streaming: give up waiting
                with pytest.raises(asyncio.TimeoutError):
                    async with s.post(f"{base}/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 3000,
                                                                      "ignore_eos": True},
                                      timeout=aiohttp.ClientTimeout(total=0.5)):
                        pass
            await asyncio.sleep(1.0)

        asyncio.run(main())
        m = metrics_of(base)
        assert m[f"vllm:num_requests_running{labels}"] == 0
        assert m['vllm:request_success_total{engine="0",finished_reason="abort",model_name="m"}'] == 2
        assert m[f"vllm:kv_cache_usage_perc{labels}"] == 0


def test_http_front_timing_matches_the_engine_model():
    """The same requests, one after another, on the HTTP front (real time, scaled) and in the DES."""
    from capbalancer.sim.des import run_des

    scale = 2.0
    prof = load_profile(str(PROFILES / "slow-13b.yaml"))
    des = run_des([("s", dataclasses.replace(prof, step=prof.step.scaled(scale)))],
                  "concurrency=1,n=3,prompt=400,output=15,seed=1", "round_robin")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(sim_args("vllm", str(PROFILES / "slow-13b.yaml"), port, "--time-scale", str(scale)),
                 ready_url=f"{base}/health"):
        sent = iter(range(100))

        async def one(s):
            started = time.monotonic()
            ttft = None
            # a distinct first token each time: no prefix-cache hit (the DES requests carry no token ids)
            prompt = f"{next(sent):04d}" + "abcd" * 399
            async with s.post(f"{base}/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 15,
                                                              "ignore_eos": True, "stream": True}) as r:
                async for line in r.content:
                    if ttft is None and line.startswith(b"data: {"):
                        ttft = time.monotonic() - started
            return ttft, time.monotonic() - started

        async def main():
            async with aiohttp.ClientSession() as s:
                await one(s)  # warm-up (connection, first-call costs); not compared
                await asyncio.sleep(0.2)
                return [await one(s) for _ in range(3)]

        live = asyncio.run(main())
    for (ttft, e2e), rec in zip(live, des.records, strict=True):
        # generous: two cores shared with other work delay the step loop's wake-ups
        assert ttft == pytest.approx(rec.ttft_s, rel=0.2, abs=0.25)
        assert e2e == pytest.approx(rec.e2el_s, rel=0.1, abs=0.35)
    assert des.records[0].ttft_s == pytest.approx(scale * prof.step.step_seconds(400, 0, 0))


def test_vllm_metrics_have_the_real_vllm_series_and_shape():
    """Every series we export that a real vLLM 0.32 also exports has its name, type and label names
    (compared against a capture from a real vLLM CPU server: tests/data/real/vllm-cpu-metrics-loaded.txt)."""
    real_text = (Path(__file__).parent / "data" / "real" / "vllm-cpu-metrics-loaded.txt").read_text()

    def shape(text):
        types, labels = {}, {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                types[name] = kind
            elif line and not line.startswith("#"):
                key = line.rpartition(" ")[0]
                name, _, rest = key.partition("{")
                labels.setdefault(name, set()).add(tuple(re.findall(r'(\w+)="', rest)))
        return types, labels

    real_types, real_labels = shape(real_text)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(sim_args("vllm", FAST, port), ready_url=f"{base}/health"):
        openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0).completions.create(
            model="m", prompt="hello", max_tokens=3)
        with urllib.request.urlopen(f"{base}/metrics") as resp:
            ours_types, ours_labels = shape(resp.read().decode())
    required = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                "vllm:cache_config_info", "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds", "vllm:request_success_total"}
    assert required <= set(ours_types)
    for name, kind in ours_types.items():
        assert real_types.get(name) == kind, name  # no invented names, same types
    for name, label_sets in ours_labels.items():
        if name == "vllm:cache_config_info":
            # the real one carries more config labels; ours must be among them
            (ours,), (real,) = label_sets, real_labels[name]
            assert set(ours) <= set(real)
            continue
        assert label_sets <= real_labels[name], name


REAL = Path(__file__).parent / "data" / "real"


def _shape(obj):
    """The structure of a JSON value: keys and value kinds, not values."""
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_shape(obj[0])] if obj else []
    return "null" if obj is None else type(obj).__name__


def _sse_events(raw: bytes) -> list:
    return [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]


def test_openai_bodies_are_shaped_like_a_real_vllm():
    """Same request as each capture from a real vLLM 0.32 (tests/data/real/*.meta.json): same JSON structure."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(capbalancer("sim", "--profile", FAST, "--port", str(port), "--model", "tiny-llama"),
                 ready_url=f"{base}/health"):
        async def call(capture: str):
            meta = orjson.loads((REAL / f"{capture}.meta.json").read_bytes())
            path = "/v1/chat/completions" if "messages" in meta["request"] else "/v1/completions"
            async with aiohttp.ClientSession() as s, s.post(base + path, json=meta["request"]) as r:
                return meta["status"], r.status, r.headers["Content-Type"], await r.read()

        async def main():
            return {c: await call(c) for c in ("vllm-cpu-completion.json", "vllm-cpu-chat.json",
                                               "vllm-cpu-completion-stream.sse", "vllm-cpu-chat-stream.sse",
                                               "vllm-cpu-error-too-long.json", "vllm-cpu-error-unknown-model.json")}

        got = asyncio.run(main())
        with urllib.request.urlopen(f"{base}/v1/models") as resp:
            models = orjson.loads(resp.read())
    for capture, (want_status, status, ctype, body) in got.items():
        assert status == want_status, capture
        real = (REAL / capture).read_bytes()
        if capture.endswith(".sse"):
            assert ctype.startswith("text/event-stream")
            ours, theirs = _sse_events(body), _sse_events(real)
            # role chunk (chat), one chunk per token (fewer if the loop fell behind), the usage chunk
            assert 3 <= len(ours) <= len(theirs), capture
            assert _shape(ours[0]) == _shape(theirs[0]) and _shape(ours[-1]) == _shape(theirs[-1]), capture
            assert _shape(ours[-2]) == _shape(theirs[-2]), capture  # the last token, with finish_reason
            assert {orjson.dumps(_shape(e)) for e in ours} == {orjson.dumps(_shape(e)) for e in theirs}, capture
            assert body.endswith(b"data: [DONE]\n\n")
        else:
            assert _shape(orjson.loads(body)) == _shape(orjson.loads(real)), capture
    too_long = orjson.loads(got["vllm-cpu-error-too-long.json"][3])["error"]
    assert too_long["message"].startswith("max_tokens=5000 cannot be greater than max_model_len=4096.")
    assert _shape(models) == _shape(orjson.loads((REAL / "vllm-cpu-models.json").read_bytes()))


def test_an_embeddings_list_is_limited_per_input_as_vllm_does():
    """vLLM runs each input of a list as its own prompt: 3,000 short inputs (9,000 tokens, past the 4,096 context)
    are served; one input past the context is the engine's 400. The simulator summed the inputs into one prompt
    and refused the first."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(sim_args("vllm", FAST, port), ready_url=f"{base}/health"):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        many = client.embeddings.create(model="m", input=["hello world"] * 3000)
        assert len(many.data) == 3000 and many.usage.prompt_tokens == 9000
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.embeddings.create(model="m", input=["short", "hello " * 5000])
