"""vLLM's render routes on the simulated engine (sim/http/render.py), over real sockets: what vllm-router's
cache_aware asks every worker for each request. The ids are those /tokenize gives and the prefix cache keys on."""

from pathlib import Path

from support import capbalancer, free_port, running
from support import post_json as post

FAST = str(Path(__file__).parent / "data" / "profiles" / "fast-13b.yaml")


def test_render_gives_the_token_ids_the_engine_would_run():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(capbalancer("sim", "--engine", "vllm", "--profile", FAST, "--port", str(port), "--model", "m"),
                 ready_url=f"{base}/health"):
        prompt = "You are a helpful assistant. " * 20
        status, rendered = post(f"{base}/v1/completions/render", {"model": "m", "prompt": prompt, "max_tokens": 7})
        assert status == 200 and isinstance(rendered, list) and len(rendered) == 1
        _, tok = post(f"{base}/tokenize", {"model": "m", "prompt": prompt})
        assert rendered[0]["token_ids"] == tok["tokens"] and len(tok["tokens"]) == tok["count"] > 100
        assert rendered[0]["sampling_params"]["max_tokens"] == 7 and rendered[0]["model"] == "m"
        # two prompts in one request: one rendered request each
        status, two = post(f"{base}/v1/completions/render", {"model": "m", "prompt": ["a b c d", [5, 6, 7]]})
        assert status == 200 and [r["token_ids"] for r in two][1] == [5, 6, 7] and len(two) == 2
        messages = [{"role": "system", "content": prompt}, {"role": "user", "content": "hi"}]
        status, chat = post(f"{base}/v1/chat/completions/render", {"model": "m", "messages": messages})
        _, chat_tok = post(f"{base}/tokenize", {"model": "m", "messages": messages})
        assert status == 200 and chat["token_ids"] == chat_tok["tokens"]
        assert post(f"{base}/v1/completions/render", {"model": "other", "prompt": "x"})[0] == 404
        assert post(f"{base}/v1/chat/completions/render", {"model": "m", "messages": []})[0] == 400
