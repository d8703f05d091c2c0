"""Workloads for the discrete-event runner: a one-line spec or a YAML file, expanded into seeded requests.

    rate=20,n=1000,prompt=lognormal:mean=600:sigma=0.8,output=lognormal:mean=200:sigma=0.7,seed=1

Keys (the YAML form is a mapping with the same keys):
  n            requests to send (default 1000)
  rate         mean arrivals per second, `inf` = all at t=0 (default inf); gamma gaps with `burstiness`
               (1 = Poisson), the convention of `vllm bench serve` and of `capbalancer loadtest`
  concurrency  closed loop instead: keep this many requests outstanding (rate is then ignored)
  prompt       prompt length in tokens: N, uniform:A:B or lognormal:mean=M:sigma=S[:max=X][:min=Y]
  output       output length in tokens, same forms (ShareGPT-like spreads by default)
  max_tokens   what each request asks for: `exact` (= its output length, ignore_eos, as benchmark
               clients send) or a number N (the engine stops at the drawn output length, like an EOS,
               and the scheduler only knows the bound N)
  seed         seeds lengths and arrivals (default 0)
  model        the model pool requests go to (default: the fleet's first model)
  shape        sessions that reuse prefixes instead of independent requests: multi-turn, shared-prompt or
               agentic, with loadtest's options after ':' (`shape=multi-turn:turns=2-4`); prompts are
               the loadtest's text, tokenized by the simulator's tokenizer; `rate` is requests per second
               (sessions start at rate / mean turns), `output` the answer length, `n` the requests
               (capbalancer/sim/des_sessions.py)

Lengths are clipped so that prompt + output fits the smallest max_model_len of the fleet.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from capbalancer.loadtest.arrivals import arrival_times_s
from capbalancer.loadtest.workloads import DEFAULT_OUTPUT_LEN, DEFAULT_PROMPT_LEN, LengthDist, parse_length


class WorkloadSpecError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class DesWorkload:
    n: int = 1000
    rate_per_s: float = math.inf
    concurrency: int | None = None
    prompt: LengthDist = parse_length(DEFAULT_PROMPT_LEN)
    output: LengthDist = parse_length(DEFAULT_OUTPUT_LEN)
    max_tokens: int | None = None  # None: exact (= output length)
    burstiness: float = 1.0
    seed: int = 0
    model: str | None = None
    shape: str | None = None  # a session workload (sim/des_sessions.py); None: independent requests

    def describe(self) -> dict[str, Any]:
        return {"n": self.n, "rate": self.rate_per_s if math.isfinite(self.rate_per_s) else "inf",
                "concurrency": self.concurrency, "prompt": self.prompt.describe(),
                "output": self.output.describe(), "max_tokens": self.max_tokens or "exact",
                "burstiness": self.burstiness, "seed": self.seed, "model": self.model,
                **({"shape": self.shape} if self.shape else {})}


@dataclass(frozen=True, slots=True)
class DesRequest:
    index: int
    arrival_s: float  # open loop only; closed loop ignores it
    prompt_tokens: int
    output_tokens: int  # what the engine will generate
    max_tokens: int  # what the request asks for (the scheduler's bound)


_KEYS = {"n", "rate", "concurrency", "prompt", "output", "max_tokens", "burstiness", "seed", "model", "shape"}


def parse_workload(spec: str | dict[str, Any], seed: int | None = None) -> DesWorkload:
    """A `k=v,...` string, a path to a YAML file of the same keys, or such a mapping."""
    where = "workload"
    if isinstance(spec, dict):
        data = dict(spec)
    else:
        text = spec.strip()
        path = Path(text)
        if text.endswith((".yaml", ".yml")) or (path.suffix and path.is_file()):
            where = text
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except OSError as exc:
                raise WorkloadSpecError(f"{text}: cannot read: {exc.strerror}") from None
            if not isinstance(data, dict):
                raise WorkloadSpecError(f"{text}: a workload file is a mapping of {', '.join(sorted(_KEYS))}")
        else:
            data = {}
            for part in text.split(","):
                part = part.strip()
                if not part:
                    continue
                key, sep, value = part.partition("=")
                if not sep:
                    raise WorkloadSpecError(f"workload {part!r}: expected key=value")
                data[key.strip()] = value.strip()
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise WorkloadSpecError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
    try:
        wl = DesWorkload(
            n=int(data.get("n", 1000)),
            rate_per_s=float(data.get("rate", "inf")),
            concurrency=int(data["concurrency"]) if data.get("concurrency") not in (None, "") else None,
            prompt=parse_length(data.get("prompt", DEFAULT_PROMPT_LEN)),
            output=parse_length(data.get("output", DEFAULT_OUTPUT_LEN)),
            max_tokens=None if str(data.get("max_tokens", "exact")) == "exact" else int(data["max_tokens"]),
            burstiness=float(data.get("burstiness", 1.0)),
            seed=int(data.get("seed", 0)),
            model=str(data["model"]) if data.get("model") else None,
            shape=str(data["shape"]) if data.get("shape") not in (None, "", "none") else None,
        )
    except (TypeError, ValueError) as exc:
        raise WorkloadSpecError(f"{where}: {exc}") from None
    if wl.n < 1:
        raise WorkloadSpecError(f"{where}: n must be >= 1")
    if not wl.rate_per_s > 0:
        raise WorkloadSpecError(f"{where}: rate must be > 0 or inf")
    if wl.concurrency is not None and wl.concurrency < 1:
        raise WorkloadSpecError(f"{where}: concurrency must be >= 1")
    if wl.max_tokens is not None and wl.max_tokens < 1:
        raise WorkloadSpecError(f"{where}: max_tokens must be >= 1 or exact")
    if wl.shape is not None:
        if wl.concurrency is not None:
            raise WorkloadSpecError(f"{where}: shape sessions pace themselves; give rate, not concurrency")
        _check_shape(wl.shape, where)
    if seed is not None:
        wl = replace(wl, seed=seed)
    return wl


def generate_requests(wl: DesWorkload, max_model_len: int) -> list[DesRequest]:
    """The workload's requests, seeded, with lengths clipped to fit max_model_len."""
    rng = random.Random(f"lengths-{wl.seed}")
    arrivals = arrival_times_s(wl.rate_per_s, wl.burstiness, wl.seed)
    out = []
    for i in range(wl.n):
        prompt = max(1, min(wl.prompt.sample(rng), max_model_len - 1))
        output = max(1, min(wl.output.sample(rng), max_model_len - prompt))
        max_tokens = output if wl.max_tokens is None else max(1, min(wl.max_tokens, max_model_len - prompt))
        # With a fixed max_tokens bound, the drawn length is where the engine stops (EOS): it can't exceed it.
        output = min(output, max_tokens)
        out.append(DesRequest(i, next(arrivals), prompt, output, max_tokens))
    return out


def _check_shape(shape: str, where: str) -> None:
    from capbalancer.loadtest.sessions import SESSION_KINDS, SessionWorkload, parse_workload_spec
    from capbalancer.loadtest.workloads import WorkloadError

    kind, options = parse_workload_spec(shape)
    if kind not in SESSION_KINDS:
        raise WorkloadSpecError(f"{where}: shape {kind!r}: one of {', '.join(SESSION_KINDS)}")
    try:
        SessionWorkload(kind, options, parse_length(DEFAULT_OUTPUT_LEN))
    except WorkloadError as exc:
        raise WorkloadSpecError(f"{where}: shape: {exc}") from None
