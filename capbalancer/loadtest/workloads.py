"""What a load test sends: a sequence of requests, each a prompt with a known length and an output budget.

Three sources, one shape (`RequestSpec`):

- synthetic: prompt and output lengths drawn from a distribution (`600`, `uniform:A:B`,
  `lognormal:mean=M:sigma=S[:max=X]`), prompts made of random three-letter English words. Each such word
  plus its space is one token under the common BPE tokenizers and four characters, so both a tokenizer
  and the proxy's characters/4 estimate see about the requested length, and random words defeat prefix
  caching;
- a dataset file: ShareGPT-style JSON/JSONL (`{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}]}`; the first human turn is the prompt, the first reply's length the
  output budget) or simple JSONL (`{"prompt": ..., "output_len": ...}`);
- a trace to replay: JSONL or CSV with a timestamp per request (`timestamp` in seconds or
  `timestamp_ms`; BurstGPT's and Azure's CSV column names are understood) and either a prompt or a prompt
  length, plus an output length. Arrival times come from the trace instead of `--request-rate`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Three-letter words: " the" is one BPE token and four characters.
_WORDS = (
    "the and for are but not you all any can had her was one our out day get has him his how man new now "
    "old see two way who boy did its let put say she too use act add age ago air arm art ask bad bag bed "
    "big bit box bus buy car cat cup cut dog dry ear eat egg end eye far few fit fly fun gas god gun guy "
    "hat hit hot ice job key kid lay leg lie lot low map may mix net nor oil own pay per pop red row run "
    "sea set sit six sky son sun tax tea ten tie top toy try war wet win yes yet"
).split()

CHARS_PER_SYNTHETIC_TOKEN = 4


class WorkloadError(ValueError):
    """A workload that cannot be used; the message names the file, line or spec."""


@dataclass(frozen=True, slots=True)
class RequestSpec:
    prompt: str
    prompt_len: int  # tokens, as requested (synthetic) or estimated at 4 characters per token (files)
    output_len: int  # max_tokens sent with the request
    arrival_s: float | None = None  # trace replay: seconds after the trace's first request
    session_id: str | None = None  # sent as x-session-id and the OpenAI `user` field (loadtest/sessions.py)
    messages: tuple[dict[str, str], ...] | None = None  # the chat API's messages; `prompt` renders them as text


# ---------------------------------------------------------------- length distributions


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A distribution of token counts: fixed, uniform on [low, high], or lognormal with a given mean."""

    kind: str  # "fixed" | "uniform" | "lognormal"
    low: int = 1
    high: int = 1
    mean: float = 1.0
    sigma: float = 0.0  # of the underlying normal, for lognormal

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.low
        if self.kind == "uniform":
            return rng.randint(self.low, self.high)
        # Parameterised by the mean of the lengths (what people quote), not of their logarithms.
        mu = math.log(self.mean) - self.sigma**2 / 2
        return max(self.low, min(self.high, int(round(rng.lognormvariate(mu, self.sigma)))))

    def describe(self) -> str:
        if self.kind == "fixed":
            return str(self.low)
        if self.kind == "uniform":
            return f"uniform:{self.low}:{self.high}"
        return f"lognormal:mean={self.mean:g}:sigma={self.sigma:g}:max={self.high}"


def parse_length(spec: str | int) -> LengthDist:
    """`200`, `uniform:100:300`, or `lognormal:mean=600:sigma=0.8[:max=3072][:min=1]`."""
    text = str(spec).strip()
    try:
        if text.isdigit():
            n = int(text)
            if n < 1:
                raise ValueError
            return LengthDist("fixed", low=n, high=n, mean=n)
        kind, _, rest = text.partition(":")
        if kind == "uniform":
            low_s, high_s = rest.split(":")
            low, high = int(low_s), int(high_s)
            if not 1 <= low <= high:
                raise ValueError
            return LengthDist("uniform", low=low, high=high, mean=(low + high) / 2)
        if kind == "lognormal":
            params = dict(part.split("=", 1) for part in rest.split(":") if part)
            unknown = set(params) - {"mean", "sigma", "max", "min"}
            if unknown or "mean" not in params:
                raise ValueError
            mean = float(params["mean"])
            sigma = float(params.get("sigma", "0.8"))
            high = int(params.get("max", str(int(mean * 8))))
            low = int(params.get("min", "1"))
            if mean <= 0 or sigma < 0 or not 1 <= low <= high:
                raise ValueError
            return LengthDist("lognormal", low=low, high=high, mean=mean, sigma=sigma)
    except ValueError:
        pass
    raise WorkloadError(
        f"length {text!r}: expected N, uniform:A:B (1 <= A <= B) or lognormal:mean=M:sigma=S[:max=X][:min=Y]")


# ShareGPT-like spreads: long-tailed prompts around 600 tokens and replies around 200.
DEFAULT_PROMPT_LEN = "lognormal:mean=600:sigma=0.8:max=3072"
DEFAULT_OUTPUT_LEN = "lognormal:mean=200:sigma=0.8:max=1024"


def synthetic_prompt(tokens: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, tokens)))


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_SYNTHETIC_TOKEN))


# ---------------------------------------------------------------- workloads


class Workload:
    """An endless, seeded sequence of requests; the runner takes as many as it needs, in order."""

    name: str = "workload"
    is_trace: bool = False
    is_sessions: bool = False  # turns of a session wait for the previous answer (loadtest/sessions.py)

    def __iter__(self) -> Iterator[RequestSpec]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name}


class SyntheticWorkload(Workload):
    name = "synthetic"

    def __init__(self, prompt_len: LengthDist, output_len: LengthDist, seed: int = 0) -> None:
        self.prompt_len = prompt_len
        self.output_len = output_len
        self.seed = seed

    def __iter__(self) -> Iterator[RequestSpec]:
        rng = random.Random(self.seed)
        while True:
            p = self.prompt_len.sample(rng)
            o = self.output_len.sample(rng)
            yield RequestSpec(prompt=synthetic_prompt(p, rng), prompt_len=p, output_len=o)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "prompt_len": self.prompt_len.describe(),
                "output_len": self.output_len.describe(), "seed": self.seed}


class ListWorkload(Workload):
    """Requests loaded from a file. A dataset is shuffled (seeded) and cycled; a trace is replayed in order."""

    def __init__(self, requests: Sequence[RequestSpec], source: str, kind: str, seed: int = 0,
                 output_len_override: LengthDist | None = None) -> None:
        if not requests:
            raise WorkloadError(f"{source}: no usable requests")
        self.requests = list(requests)
        self.source = source
        self.name = kind
        self.is_trace = kind == "trace"
        self.seed = seed
        self.output_len_override = output_len_override

    def __iter__(self) -> Iterator[RequestSpec]:
        rng = random.Random(self.seed)
        order = list(range(len(self.requests)))
        if not self.is_trace:
            rng.shuffle(order)
        offset_s = 0.0
        span_s = 0.0
        if self.is_trace:
            span_s = max((r.arrival_s or 0.0) for r in self.requests)
        while True:
            for i in order:
                spec = self.requests[i]
                if self.output_len_override is not None:
                    spec = RequestSpec(spec.prompt, spec.prompt_len, self.output_len_override.sample(rng),
                                       spec.arrival_s)
                if self.is_trace:
                    # Replaying past the end of a trace starts it again just after its last arrival.
                    spec = RequestSpec(spec.prompt, spec.prompt_len, spec.output_len,
                                       (spec.arrival_s or 0.0) + offset_s)
                yield spec
            offset_s += span_s + 1e-3

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "source": self.source, "requests": len(self.requests), "seed": self.seed}


# ---------------------------------------------------------------- file parsers


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """(location, record) pairs from a JSON array, a JSONL file or a CSV file with a header row."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot read: {exc.strerror}") from None
    stripped = text.lstrip()
    if path.suffix.lower() == ".csv":
        rows = csv.DictReader(io.StringIO(text))
        return [(f"{path}:{i + 2}", {k.strip(): v for k, v in row.items() if k is not None})
                for i, row in enumerate(rows)]
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{path}: not valid JSON: {exc}") from None
        return [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
    return out


def _turns(record: dict[str, Any]) -> list[tuple[str, str]] | None:
    turns = record.get("conversations", record.get("conversation", record.get("messages")))
    if not isinstance(turns, list):
        return None
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            continue
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if isinstance(role, str) and isinstance(value, str):
            out.append((role.lower(), value))
    return out


_HUMAN = {"human", "user"}
_ASSISTANT = {"gpt", "assistant", "chatgpt", "bard", "model"}


def _int_field(record: dict[str, Any], names: Sequence[str], where: str) -> int | None:
    for name in names:
        if name in record and record[name] not in (None, ""):
            try:
                value = int(float(record[name]))
            except (TypeError, ValueError):
                raise WorkloadError(f"{where}.{name}: must be a number, got {record[name]!r}") from None
            if value < 0:
                raise WorkloadError(f"{where}.{name}: must be >= 0, got {value}")
            return value
    return None


_PROMPT_LEN_KEYS = ("prompt_len", "input_len", "prompt_tokens", "input_length", "Request tokens", "ContextTokens")
_OUTPUT_LEN_KEYS = ("output_len", "max_tokens", "output_tokens", "output_length", "Response tokens",
                    "GeneratedTokens")


def _spec_from_record(record: Any, where: str, default_output_len: int, rng: random.Random,
                      arrival_s: float | None = None) -> RequestSpec | None:
    if not isinstance(record, dict):
        raise WorkloadError(f"{where}: expected an object")
    turns = _turns(record)
    if turns is not None:
        # ShareGPT: the first human turn, and the length of the reply that followed it.
        for i, (role, value) in enumerate(turns):
            if role in _HUMAN and value.strip():
                reply = next((v for r, v in turns[i + 1:] if r in _ASSISTANT), None)
                output_len = _int_field(record, _OUTPUT_LEN_KEYS, where)
                if output_len is None:
                    output_len = estimate_tokens(reply) if reply else default_output_len
                return RequestSpec(value, estimate_tokens(value), max(1, output_len), arrival_s)
        return None  # a conversation without a human turn: skipped, as vllm bench does
    prompt = record.get("prompt", record.get("text"))
    output_len = _int_field(record, _OUTPUT_LEN_KEYS, where)
    if output_len is None:
        output_len = default_output_len
    if isinstance(prompt, str) and prompt:
        return RequestSpec(prompt, estimate_tokens(prompt), max(1, output_len), arrival_s)
    prompt_len = _int_field(record, _PROMPT_LEN_KEYS, where)
    if prompt_len is not None:
        prompt_len = max(1, prompt_len)
        return RequestSpec(synthetic_prompt(prompt_len, rng), prompt_len, max(1, output_len), arrival_s)
    raise WorkloadError(f"{where}: needs 'prompt', a prompt length ({', '.join(_PROMPT_LEN_KEYS[:2])}) "
                        "or ShareGPT 'conversations'")


def load_dataset(path: str | Path, default_output_len: int = 200, seed: int = 0,
                 output_len_override: LengthDist | None = None) -> ListWorkload:
    path = Path(path)
    rng = random.Random(seed)
    specs = []
    for where, record in _read_records(path):
        spec = _spec_from_record(record, where, default_output_len, rng)
        if spec is not None:
            specs.append(spec)
    return ListWorkload(specs, str(path), "dataset", seed, output_len_override)


def _timestamp_s(record: dict[str, Any], where: str) -> float:
    for name, scale in (("timestamp", 1.0), ("Timestamp", 1.0), ("time", 1.0), ("timestamp_ms", 1e-3),
                        ("arrival_ms", 1e-3)):
        if name in record and record[name] not in (None, ""):
            try:
                return float(record[name]) * scale
            except (TypeError, ValueError):
                pass
            try:
                # Azure's traces write ISO datetimes.
                from datetime import datetime
                return datetime.fromisoformat(str(record[name]).strip()).timestamp() * scale
            except ValueError:
                raise WorkloadError(f"{where}.{name}: not a time: {record[name]!r}") from None
    for name in ("TIMESTAMP",):
        if name in record:
            from datetime import datetime
            try:
                return datetime.fromisoformat(str(record[name]).strip()[:26]).timestamp()
            except ValueError:
                raise WorkloadError(f"{where}.{name}: not a time: {record[name]!r}") from None
    raise WorkloadError(f"{where}: a trace record needs 'timestamp' (seconds) or 'timestamp_ms'")


def load_trace(path: str | Path, default_output_len: int = 200, seed: int = 0) -> ListWorkload:
    path = Path(path)
    rng = random.Random(seed)
    timed = []
    for where, record in _read_records(path):
        if not isinstance(record, dict):
            raise WorkloadError(f"{where}: expected an object")
        ts = _timestamp_s(record, where)
        spec = _spec_from_record(record, where, default_output_len, rng)
        if spec is not None:
            timed.append((ts, spec))
    if not timed:
        raise WorkloadError(f"{path}: no usable requests")
    timed.sort(key=lambda pair: pair[0])
    t0 = timed[0][0]
    specs = [RequestSpec(s.prompt, s.prompt_len, s.output_len, ts - t0) for ts, s in timed]
    return ListWorkload(specs, str(path), "trace", seed)
