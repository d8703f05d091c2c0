"""Record a real vLLM's KV-cache events (precise prefix mode's input) into tests/data/real/ so the default suite
can replay them to the proxy's subscriber without running vLLM.

    .venv/bin/python -m tests.real_engine.capture_kv_events     # starts its own server (about a minute)

The server (vLLM CPU build, tiny model, 16 KV blocks of 128 tokens = 2,048 tokens) publishes on an ipc://
socket it binds (vLLM binds wildcard and ipc endpoints and *connects* to any other, so `tcp://127.0.0.1:N`
would make it dial out). Steps, each a request and then the frames it caused:

1. prompt A (~740 tokens: 5 full blocks), 2. A extended by a few words (A's blocks hit; its last block is not
full, so nothing new is stored),
3-7. five distinct prompts that overflow the 16-block cache (the engine evicts: BlockRemoved), 8. POST
/reset_prefix_cache, then A again (AllBlocksCleared, then A's blocks stored anew), 9. A with a `cache_salt`
(its blocks stored again under salted hashes; the salt is in the head block's extra_keys). Each prompt's token
ids are the engine's own (POST /tokenize).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import zmq

from tests.real_engine.install import ensure_installed
from tests.real_engine.make_model import ensure_model
from tests.real_engine.server import BLOCK_SIZE_TOKENS, SERVED_MODEL, ServerSpec, vllm_server
from tests.support import free_port

DATA = Path(__file__).resolve().parent.parent / "data" / "real"
OUT = DATA / "vllm-cpu-kv-events.json"
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def prompt(seed: int, words: int = 120) -> str:
    return " ".join(f"{WORDS[(i * 7 + seed) % len(WORDS)]}{seed}x{i}" for i in range(words))


def kv_events_args(endpoint: str) -> tuple[str, ...]:
    cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint, "topic": "kv"}
    return ("--kv-events-config", json.dumps(cfg))


def post_json(url: str, body: dict | None) -> dict:
    """POST a JSON body (an empty one for None); the JSON answer ({} for an empty one)."""
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip() else {}


class Recorder:
    """A SUB socket read by a thread; `take()` returns the frames since the last call once the engine is quiet."""

    def __init__(self, endpoint: str) -> None:
        self._sock = zmq.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._frames: list[list[bytes]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(50):
                frames = self._sock.recv_multipart()
                with self._lock:
                    self._frames.append(frames)

    def take(self, quiet_s: float = 0.5) -> list[list[bytes]]:
        last, since = -1, time.monotonic()
        while time.monotonic() - since < quiet_s:  # until no frame came for quiet_s
            time.sleep(0.05)
            with self._lock:
                if len(self._frames) != last:
                    last, since = len(self._frames), time.monotonic()
        with self._lock:
            out, self._frames = self._frames, []
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)


def capture(out: Path = OUT) -> dict:
    py = ensure_installed()
    model = ensure_model(py)
    scratch = Path(tempfile.mkdtemp(prefix="cb-kv-"))
    endpoint = f"ipc://{scratch}/kv-events.sock"
    spec = ServerSpec("kv-events", cpu=0, num_gpu_blocks=16, extra_args=kv_events_args(endpoint))
    steps: list[dict] = []
    with vllm_server(py, model, free_port(), spec) as srv:
        rec = Recorder(endpoint)
        try:
            time.sleep(1.0)  # the subscription reaches the publisher (ZMQ's slow joiner)
            base = prompt(0)
            texts = [base, base + " and then a few more words at the end", *(prompt(s) for s in range(1, 6))]
            for text in texts:
                ids = post_json(srv.url + "/tokenize", {"model": SERVED_MODEL, "prompt": text})["tokens"]
                post_json(srv.url + "/v1/completions", {"model": SERVED_MODEL, "prompt": text, "max_tokens": 4,
                                                    "temperature": 0, "ignore_eos": True})
                steps.append({"action": "completion", "prompt": text, "token_ids": ids,
                              "frames": [[f.hex() for f in fr] for fr in rec.take()]})
            # The engine publishes a step's events at the end of its next step: the clear goes out with the
            # blocks of the request that follows it.
            post_json(srv.url + "/reset_prefix_cache", None)
            ids = post_json(srv.url + "/tokenize", {"model": SERVED_MODEL, "prompt": base})["tokens"]
            post_json(srv.url + "/v1/completions", {"model": SERVED_MODEL, "prompt": base, "max_tokens": 4,
                                                "temperature": 0, "ignore_eos": True})
            steps.append({"action": "reset_prefix_cache, then completion", "prompt": base, "token_ids": ids,
                          "frames": [[f.hex() for f in fr] for fr in rec.take()]})
            # The same prompt under a tenant's cache_salt: the engine stores its blocks again, under other hashes.
            post_json(srv.url + "/v1/completions", {"model": SERVED_MODEL, "prompt": base, "max_tokens": 4,
                                                "temperature": 0, "ignore_eos": True, "cache_salt": "tenant-b"})
            steps.append({"action": "completion with cache_salt", "prompt": base, "token_ids": ids,
                          "cache_salt": "tenant-b", "frames": [[f.hex() for f in fr] for fr in rec.take()]})
        finally:
            rec.close()
        version = json.loads(urllib.request.urlopen(srv.url + "/version", timeout=10).read())["version"]
    data = {"vllm_version": version, "block_size": BLOCK_SIZE_TOKENS, "num_gpu_blocks": 16, "topic": "kv",
            "steps": steps}
    out.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main() -> None:
    data = capture()
    for step in data["steps"]:
        print(step["action"], len(step.get("token_ids", ())), "tokens,", len(step["frames"]), "messages")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
