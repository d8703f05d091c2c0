"""Workloads that reuse prefixes: multi-turn chat, shared system prompts, agentic loops.

Real traffic resends what an engine may still hold in its prefix cache. Each workload here is a stream of
*sessions*; a session is a sequence of turns sent one after another (a turn waits for the previous answer, then a
think time). Every turn's prompt is the session's whole context so far plus something new, so consecutive turns
share a growing, byte-identical prefix, and a real engine with prefix caching (vLLM's default) gets real hits.

The text is made of whole three-letter words (one BPE token and four characters each, as the synthetic workload).
The previous answer in a turn's context is a deterministic stand-in of the answer's length, not the model's
reply: runs stay identical whatever the engine generated, and the engine's cache still covers every earlier prompt
(the cached part of a conversation is its earlier prompts; an engine caches its own generated tokens too, which
this under-counts by the answers' share).

Spec strings (`capbalancer loadtest --workload NAME[:key=value...]`):

- `multi-turn` - ShareGPT-like conversations: `turns=3-8`, `user=lognormal:mean=80:sigma=0.8:max=400` (tokens of a
  new user message), `answer` (tokens generated per turn, default --output-len), `system=40` (a per-session system
  prompt), `think=2` (mean seconds between an answer and the next turn, exponential), `max_context=3000`;
- `shared-prompt` - `tenants=8` tenants, each with a `system=1500`-token system prompt shared by all its users; each
  session is `turns=1-2` short questions (`user=lognormal:mean=60:...`);
- `agentic` - one long task context (`context=1500`), then `turns=10-20` short tool calls, each appending a tool
  result (`user=lognormal:mean=60`) and asking for a short step (`answer=lognormal:mean=40`); `think=0.2`;
- `none` - prefix-free (the plain synthetic workload).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from capbalancer.loadtest.workloads import (
    LengthDist,
    RequestSpec,
    Workload,
    WorkloadError,
    parse_length,
    synthetic_prompt,
)

SESSION_KINDS = ("multi-turn", "shared-prompt", "agentic")


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # system | user | assistant
    content: str
    tokens: int


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """One conversation: `turns[k]` is sent after the answer to `turns[k-1]` and a think time."""

    session_id: str
    turns: tuple[RequestSpec, ...]
    think_times_s: tuple[float, ...]  # before each turn; the first is 0


def render_completion_prompt(messages: tuple[Message, ...]) -> str:
    """A conversation as one completion prompt: each message on its own line, prefixed by its role. Appending a
    message only appends text, so earlier turns' prompts are byte-exact prefixes of later ones."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages)


@dataclass(frozen=True, slots=True)
class _Range:
    low: int
    high: int

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


def _parse_range(value: str, key: str) -> _Range:
    try:
        if "-" in value:
            a, b = value.split("-", 1)
            lo, hi = int(a), int(b)
        else:
            lo = hi = int(value)
    except ValueError:
        raise WorkloadError(f"{key}={value!r}: expected N or A-B") from None
    if lo < 1 or hi < lo:
        raise WorkloadError(f"{key}={value!r}: expected 1 <= A <= B")
    return _Range(lo, hi)


class SessionWorkload(Workload):
    """An endless, seeded stream of sessions (see the module docstring). Iterating it as a plain workload yields
    every turn's request in session order (what a replay without waiting for answers would send)."""

    is_sessions = True

    def __init__(self, kind: str, options: dict[str, str], answer_len: LengthDist, seed: int = 0) -> None:
        if kind not in SESSION_KINDS:
            raise WorkloadError(f"unknown workload {kind!r}: one of none, {', '.join(SESSION_KINDS)}")
        self.name = kind
        self.seed = seed
        self.options = dict(options)
        defaults: dict[str, dict[str, str]] = {
            "multi-turn": {"turns": "3-8", "user": "lognormal:mean=80:sigma=0.8:max=400", "system": "40",
                           "think": "2", "max_context": "3000"},
            "shared-prompt": {"tenants": "8", "system": "1500", "turns": "1-2",
                              "user": "lognormal:mean=60:sigma=0.6:max=300", "think": "2", "max_context": "3500"},
            "agentic": {"context": "1500", "turns": "10-20", "user": "lognormal:mean=60:sigma=0.6:max=300",
                        "answer": "lognormal:mean=40:sigma=0.5:max=200", "think": "0.2", "max_context": "3500"},
        }[kind]
        unknown = set(options) - set(defaults) - {"answer"}
        if unknown:
            raise WorkloadError(f"{kind}: unknown option(s) {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(sorted(set(defaults) | {'answer'}))}")
        opts = {**defaults, **options}
        try:
            self.turns = _parse_range(opts["turns"], "turns")
            self.user_len = parse_length(opts["user"])
            self.answer_len = parse_length(opts["answer"]) if "answer" in opts else answer_len
            self.think_mean_s = float(opts["think"])
            self.max_context_tokens = int(opts["max_context"])
            self.system_tokens = int(opts.get("system", "0"))
            self.tenants = int(opts.get("tenants", "1"))
            self.context_tokens = int(opts.get("context", "0"))
        except ValueError as exc:
            raise WorkloadError(f"{kind}: {exc}") from None
        if self.think_mean_s < 0 or self.max_context_tokens < 16 or self.tenants < 1:
            raise WorkloadError(f"{kind}: think >= 0, max_context >= 16 and tenants >= 1 required")
        # Sessions end early when the context would pass max_context, so the nominal range overstates the turns a
        # session really has; the open loop divides the request rate by this to get the session start rate.
        self.mean_turns = self._measured_mean_turns()

    def _measured_mean_turns(self, samples: int = 200) -> float:
        """The mean number of turns of `samples` sessions drawn from a generator of their own (the run's own
        stream is not advanced)."""
        rng = random.Random(f"mean-turns-{self.name}-{self.seed}")
        tenant_prompts = [""] * self.tenants
        total = sum(len(self._session(n, rng, tenant_prompts).turns) for n in range(samples))
        return max(1.0, total / samples)

    # -- the sessions
    def sessions(self) -> Iterator[SessionSpec]:
        rng = random.Random(f"sessions-{self.name}-{self.seed}")
        # Tenants' system prompts are fixed for the whole run (seeded apart from the sessions' draws).
        trng = random.Random(f"tenants-{self.seed}")
        tenant_prompts = [synthetic_prompt(self.system_tokens, trng) for _ in range(self.tenants)]
        n = 0
        while True:
            n += 1
            yield self._session(n, rng, tenant_prompts)

    def _session(self, n: int, rng: random.Random, tenant_prompts: list[str]) -> SessionSpec:
        messages: list[Message] = []
        if self.name == "shared-prompt":
            t = rng.randrange(self.tenants)
            messages.append(Message("system", tenant_prompts[t], self.system_tokens))
            session_id = f"t{t}-s{n}"
        elif self.name == "agentic":
            messages.append(Message("system", synthetic_prompt(self.context_tokens, rng), self.context_tokens))
            session_id = f"a{n}"
        else:
            messages.append(Message("system", synthetic_prompt(self.system_tokens, rng), self.system_tokens))
            session_id = f"c{n}"
        turns: list[RequestSpec] = []
        thinks: list[float] = []
        for k in range(self.turns.sample(rng)):
            user = self.user_len.sample(rng)
            answer = self.answer_len.sample(rng)
            role = "tool" if self.name == "agentic" and k > 0 else "user"
            messages.append(Message(role, synthetic_prompt(user, rng), user))
            prompt_tokens = sum(m.tokens for m in messages)
            if prompt_tokens + answer > self.max_context_tokens and turns:
                break
            msgs = tuple(messages)
            turns.append(RequestSpec(prompt=render_completion_prompt(msgs), prompt_len=prompt_tokens,
                                     output_len=answer, session_id=session_id,
                                     messages=tuple({"role": m.role if m.role != "tool" else "user",
                                                     "content": m.content} for m in msgs)))
            thinks.append(0.0 if k == 0 else rng.expovariate(1.0 / self.think_mean_s) if self.think_mean_s else 0.0)
            messages.append(Message("assistant", synthetic_prompt(answer, rng), answer))
        return SessionSpec(session_id=session_id, turns=tuple(turns), think_times_s=tuple(thinks))

    def __iter__(self) -> Iterator[RequestSpec]:
        for s in self.sessions():
            yield from s.turns

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "seed": self.seed, "options": self.options, "turns": f"{self.turns.low}-"
                f"{self.turns.high}", "user_len": self.user_len.describe(),
                "answer_len": self.answer_len.describe(), "think_mean_s": self.think_mean_s,
                "system_tokens": self.system_tokens, "tenants": self.tenants, "context_tokens": self.context_tokens,
                "max_context_tokens": self.max_context_tokens}


def parse_workload_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`multi-turn:turns=2-4:think=1` -> ("multi-turn", {"turns": "2-4", "think": "1"})."""
    name, *parts = spec.split(":")
    # lognormal values contain ':' themselves: a part without '=' continues the previous value.
    opts: dict[str, str] = {}
    last = None
    for part in parts:
        if "=" in part and part.split("=", 1)[0].isidentifier():
            key, value = part.split("=", 1)
            if key in ("mean", "sigma", "max") and last is not None:
                opts[last] += ":" + part
                continue
            opts[key] = value
            last = key
        elif last is not None:
            opts[last] += ":" + part
        else:
            raise WorkloadError(f"workload {spec!r}: expected NAME[:key=value...]")
    return name.strip(), opts
