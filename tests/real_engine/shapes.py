"""Diff the API shapes of two OpenAI-compatible vLLM servers (the simulator's vLLM flavour against a real
vLLM): routes, /metrics families (name, type, label keys) and the JSON keys of responses, stream chunks and
errors. Works on captured pages (tests/data/real/) as well as on live servers.

Every difference is a string like "completion: key choices[].token_ids missing in sim", so a test can
assert that none appears outside a documented list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from capbalancer.fleet import promtext

# Routes the proxy, the fleet monitor and the load tester rely on: both must serve them.
CORE_ROUTES = frozenset({
    "GET /health", "GET /version", "GET /load", "GET /metrics", "GET /v1/models",
    "POST /v1/completions", "POST /v1/chat/completions",
})
# cache_config_info is an info-gauge whose label set grows with every vLLM release; what consumers read
# from it must be in both, and the sim must invent no label the real one lacks.
INFO_FAMILY = "vllm:cache_config_info"
INFO_KEYS_READ = frozenset({"block_size", "num_gpu_blocks", "kv_cache_size_tokens", "gpu_memory_utilization",
                            "engine"})


@dataclass(frozen=True)
class Family:
    type: str
    # sample name -> label-key sets seen on it (histogram `le` included)
    samples: dict[str, frozenset[frozenset[str]]]


def parse_families(text: str) -> dict[str, Family]:
    """Prometheus text -> family name -> type and label keys per sample name. `_created` samples (a
    prometheus_client artefact no consumer reads) are left out."""
    types: dict[str, str] = {}
    samples: dict[str, dict[str, set[frozenset[str]]]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind.strip()
            samples.setdefault(name, {})
    for name, found in promtext.parse_all(text).items():
        if name.endswith("_created"):
            continue
        per = samples.setdefault(_family_of(name, types), {}).setdefault(name, set())
        per.update(frozenset(sample.labels) for sample in found)
    return {f: Family(types.get(f, "untyped"), {s: frozenset(k) for s, k in per.items()})
            for f, per in samples.items()}


def _family_of(sample: str, types: dict[str, str]) -> str:
    if sample in types:
        return sample
    for suffix in ("_bucket", "_count", "_sum", "_total", "_info"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in types:
            return sample[: -len(suffix)]
    return sample


def diff_metrics(real_text: str, sim_text: str) -> list[str]:
    """Families the sim exposes must exist on the real server with the same type and label keys."""
    real, sim = parse_families(real_text), parse_families(sim_text)
    problems: list[str] = []
    for name, fam in sorted(sim.items()):
        if name not in real:
            problems.append(f"metrics: family {name} exists only in sim")
            continue
        if fam.type != real[name].type:
            problems.append(f"metrics: {name} is a {fam.type} in sim, a {real[name].type} in real")
        for sample, keysets in sorted(fam.samples.items()):
            real_keysets = real[name].samples.get(sample)
            if real_keysets is None:
                problems.append(f"metrics: sample {sample} exists only in sim")
            elif name == INFO_FAMILY:
                sim_keys, real_keys = set().union(*keysets), set().union(*real_keysets)
                for key in sorted(sim_keys - real_keys):
                    problems.append(f"metrics: {name} label {key} exists only in sim")
                for key in sorted(INFO_KEYS_READ - sim_keys):
                    problems.append(f"metrics: {name} label {key} missing in sim")
            elif keysets != real_keysets:
                problems.append(f"metrics: {sample} label keys {_fmt(keysets)} in sim, {_fmt(real_keysets)} in real")
    return problems


def _fmt(keysets: Iterable[frozenset[str]]) -> str:
    return "|".join(sorted(",".join(sorted(k)) for k in keysets))


def key_paths(value: object, prefix: str = "") -> set[str]:
    """All key paths of a JSON value; list items are merged under `[]`."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, sub in value.items():
            path = f"{prefix}.{key}" if prefix else key
            paths.add(path)
            paths |= key_paths(sub, path)
    elif isinstance(value, list):
        for item in value:
            paths |= key_paths(item, prefix + "[]")
    return paths


def diff_keys(what: str, real: object, sim: object) -> list[str]:
    r, s = key_paths(real), key_paths(sim)
    return ([f"{what}: key {p} missing in sim" for p in sorted(r - s)]
            + [f"{what}: key {p} exists only in sim" for p in sorted(s - r)])


def sse_events(body: bytes) -> list[object]:
    """The JSON events of an SSE body, `[DONE]` as the string "[DONE]"."""
    events: list[object] = []
    for line in body.decode().splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream_parts(events: list[object]) -> dict[str, object]:
    """The kinds of chunk a client sees: the first, a middle content chunk, the one with finish_reason,
    the final usage chunk. Compared by kind, since chunk counts differ (real vLLM sends a role chunk)."""
    chunks = [e for e in events if isinstance(e, dict)]
    with_choices = [c for c in chunks if c.get("choices")]
    parts: dict[str, object] = {"first": chunks[0]}
    middle = [c for c in with_choices[1:] if c["choices"][0].get("finish_reason") is None]
    if middle:
        parts["content"] = middle[0]
    finished = [c for c in with_choices if c["choices"][0].get("finish_reason") is not None]
    if finished:
        parts["finish"] = finished[-1]
    usage = [c for c in chunks if not c.get("choices") and c.get("usage")]
    if usage:
        parts["usage"] = usage[-1]
    return parts


def diff_stream(what: str, real_body: bytes, sim_body: bytes) -> list[str]:
    real_events, sim_events = sse_events(real_body), sse_events(sim_body)
    problems: list[str] = []
    for name, events in (("real", real_events), ("sim", sim_events)):
        if not events or events[-1] != "[DONE]":
            problems.append(f"{what}: {name} stream does not end with data: [DONE]")
    real_parts, sim_parts = stream_parts(real_events), stream_parts(sim_events)
    for kind in sorted(set(real_parts) | set(sim_parts)):
        if kind not in sim_parts:
            problems.append(f"{what}: no {kind} chunk in sim")
        elif kind not in real_parts:
            problems.append(f"{what}: {kind} chunk exists only in sim")
        else:
            problems += diff_keys(f"{what} {kind} chunk", real_parts[kind], sim_parts[kind])
    return problems


def diff_error(what: str, real: tuple[int, dict], sim: tuple[int, dict]) -> list[str]:
    problems = diff_keys(what, real[1], sim[1])
    if real[0] != sim[0]:
        problems.append(f"{what}: status {sim[0]} in sim, {real[0]} in real")
    for key in ("type", "code", "param"):
        rv, sv = real[1].get("error", {}).get(key), sim[1].get("error", {}).get(key)
        if rv != sv:
            problems.append(f"{what}: error.{key} {sv!r} in sim, {rv!r} in real")
    return problems


@dataclass
class Transcript:
    """What capture.py writes for one server: the pages compared by diff_transcripts."""

    routes: set[str]
    metrics: str
    models: dict
    completion: dict
    chat: dict
    completion_stream: bytes
    chat_stream: bytes
    error_unknown_model: tuple[int, dict]
    error_too_long: tuple[int, dict]

    @classmethod
    def load(cls, folder: Path, prefix: str = "vllm-cpu-") -> Transcript:
        def read(name: str) -> bytes:
            return (folder / f"{prefix}{name}").read_bytes()

        def error(name: str) -> tuple[int, dict]:
            meta = json.loads((folder / f"{prefix}{name}.meta.json").read_text())
            return meta["status"], json.loads(read(name))

        return cls(routes=set(read("routes.txt").decode().split("\n")) - {""}, metrics=read("metrics.txt").decode(),
                   models=json.loads(read("models.json")), completion=json.loads(read("completion.json")),
                   chat=json.loads(read("chat.json")), completion_stream=read("completion-stream.sse"),
                   chat_stream=read("chat-stream.sse"),
                   error_unknown_model=error("error-unknown-model.json"),
                   error_too_long=error("error-too-long.json"))


def diff_transcripts(real: Transcript, sim: Transcript) -> list[str]:
    problems = [f"routes: {r} missing in sim" for r in sorted(CORE_ROUTES - sim.routes)]
    problems += [f"routes: {r} missing in real" for r in sorted(CORE_ROUTES - real.routes)]
    problems += [f"routes: {r} exists only in sim" for r in sorted(sim.routes - real.routes)]
    problems += diff_metrics(real.metrics, sim.metrics)
    problems += diff_keys("models", real.models, sim.models)
    problems += diff_keys("completion", real.completion, sim.completion)
    problems += diff_keys("chat", real.chat, sim.chat)
    problems += diff_stream("completion stream", real.completion_stream, sim.completion_stream)
    problems += diff_stream("chat stream", real.chat_stream, sim.chat_stream)
    problems += diff_error("error unknown model", real.error_unknown_model, sim.error_unknown_model)
    problems += diff_error("error max_tokens too long", real.error_too_long, sim.error_too_long)
    return problems



if __name__ == "__main__":
    import argparse
    import tempfile

    from tests.real_engine.capture import capture
    from tests.real_engine.sim_server import sim_server

    parser = argparse.ArgumentParser(description="print the sim-vs-real API shape diff (captured real data)")
    parser.add_argument("--real", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "real")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, sim_server() as url:
        capture(url, Path(tmp), "sim-")
        problems = diff_transcripts(Transcript.load(args.real), Transcript.load(Path(tmp), "sim-"))
    print("\n".join(problems) or "no differences")
