"""Session workloads in the discrete-event runner: multi-turn chat, shared system prompts, agentic loops.

A session is a closed loop: its next turn arrives a think time after the previous answer ended (or failed).
Every request carries what the live path has: the engine gets the prompt's token ids (so its prefix cache,
sim/prefix_cache.py, hits exactly where a real engine's would) and the ids of what it generates; the scheduler's
Demand gets the prompt's block hashes and the session id, built as the proxy builds them (sched/prefix_hash.py:
over token ids when the DES knows them as a tokenizer would, else over the text in 64-character blocks).

`shape=multi-turn|shared-prompt|agentic` in a DES workload spec builds the sessions `capbalancer loadtest
--workload` sends (capbalancer/loadtest/sessions.py, the same text, tokenized by the simulator's tokenizer),
started as a Poisson stream at `rate / mean turns per session`; options after the shape as in loadtest
(`shape=multi-turn:turns=2-4:think=1`). `n` counts requests (sessions are drawn until their turns reach n).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from capbalancer.loadtest.sessions import SessionWorkload, parse_workload_spec
from capbalancer.loadtest.workloads import LengthDist
from capbalancer.sched.prefix_hash import PrefixKey, text_block_hashes, token_block_hashes
from capbalancer.sched.prefix_index import prefix_salt
from capbalancer.sched.types import Demand, Hold, Route
from capbalancer.sim import des, tokenizer
from capbalancer.sim.des import DesInstance, DesOptions
from capbalancer.sim.engine import Finished, SimRequest
from capbalancer.sim.workload import DesRequest

_WORD_IDS = tuple(tokenizer.encode(w)[0] for w in tokenizer.WORDS)


@dataclass(slots=True)
class SessionTurn:
    prompt_ids: list[int]
    output_ids: list[int]  # what the engine generates (cached after the turn)
    think_s: float  # after this turn ends, before the session's next one
    text: str | None = None  # the prompt as text, when the proxy would see text (no tokenizer)
    max_tokens: int | None = None  # None: exactly the output's length

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass(slots=True)
class DesSession:
    start_s: float
    session_id: str | None
    turns: list[SessionTurn] = field(default_factory=list)


def sim_output_ids(n: int) -> list[int]:
    """The ids of what a simulated engine generates: one word a token (sim/tokenizer.WORDS)."""
    return [_WORD_IDS[i % len(_WORD_IDS)] for i in range(n)]


def sessions_from_shape(shape: str, n_requests: int, rate_per_s: float, seed: int, output: LengthDist,
                        max_model_len: int) -> list[DesSession]:
    """The loadtest's sessions of `shape` (its options after ':'), tokenized by the simulator's tokenizer; turns
    that would not fit max_model_len end their session."""
    kind, options = parse_workload_spec(shape)
    wl = SessionWorkload(kind, options, output, seed=seed)
    rng = random.Random(f"session-starts-{seed}")
    start_rate = rate_per_s / wl.mean_turns
    t = 0.0
    out: list[DesSession] = []
    total = 0
    for spec in wl.sessions():
        if total >= n_requests:
            break
        t += rng.expovariate(start_rate) if start_rate != float("inf") else 0.0
        sess = DesSession(t, spec.session_id)
        for k, turn in enumerate(spec.turns):
            ids = tokenizer.encode(turn.prompt)
            answer = max(1, turn.output_len)
            if len(ids) + answer > max_model_len or total >= n_requests:
                break
            think_next = spec.think_times_s[k + 1] if k + 1 < len(spec.think_times_s) else 0.0
            sess.turns.append(SessionTurn(ids, sim_output_ids(answer), think_next, text=turn.prompt))
            total += 1
        if sess.turns:
            out.append(sess)
    return out


class SessionRun(des._Run):
    """The DES runner with a closed loop per session and prompts the engines can cache."""

    def __init__(self, instances: list[DesInstance], sessions: list[DesSession], pool: str, policy: str,
                 opts: DesOptions, key_of: Callable[[SessionTurn, str], PrefixKey] | None = None) -> None:
        self.sessions = sessions
        self.turn_of: list[tuple[int, int]] = []
        self.first_index: dict[int, int] = {}
        requests: list[DesRequest] = []
        for si, s in enumerate(sessions):
            self.first_index[si] = len(requests)
            for ti, t in enumerate(s.turns):
                out = len(t.output_ids)
                requests.append(DesRequest(len(requests), s.start_s, t.prompt_tokens, out, t.max_tokens or out))
                self.turn_of.append((si, ti))
        super().__init__(instances, requests, des.DesWorkload(model=pool), policy, opts)
        self.salt = prefix_salt(self.model)
        self.key_of = key_of or proxy_key

    def turn(self, i: int) -> SessionTurn:
        si, ti = self.turn_of[i]
        return self.sessions[si].turns[ti]

    def arrive(self, i: int, now: float) -> None:
        r = self.requests[i]
        self.arrival_s[i] = now
        self.records[i].start_s = now
        si, _ = self.turn_of[i]
        demand = Demand(request_id=str(i), pool=self.model, prompt_tokens=r.prompt_tokens, max_tokens=r.max_tokens,
                        arrival_s=now, stream=True, prefix=self.key_of(self.turn(i), self.salt),
                        session_id=self.sessions[si].session_id)
        decision = self.sched.submit(demand, now)
        if isinstance(decision, Route):
            self.start_on(i, self.index_of[decision.backend_id], now)
        elif isinstance(decision, Hold):
            self.ensure_tick()
        else:
            self.fail(i, decision.status, decision.reason, now)

    def start_on(self, i: int, k: int, now: float) -> None:
        r = self.requests[i]
        t = self.turn(i)
        self.routed_to[i] = k
        self.records[i].backend = self.instances[k].name
        eng = self.engines[k]
        req = SimRequest(str(i), r.prompt_tokens, r.output_tokens, r.max_tokens, now, token_ids=t.prompt_ids,
                         output_ids=t.output_ids)
        self.handle_engine_events(k, eng.add_request(req, now))
        self.reschedule(k)

    def handle_engine_events(self, k: int, events: list) -> None:
        super().handle_engine_events(k, events)
        for ev in events:
            if isinstance(ev, Finished):
                self.next_turn(int(ev.request_id), ev.time_s)

    def fail(self, i: int, status: int, reason: str, now: float, retry_after_s: float = 0.0) -> None:
        # A refused turn ends where it was refused: the session's next turn follows after its think time (the
        # base class's closed-loop backoff is for the plain runner's client slots, which sessions do not use).
        super().fail(i, status, reason, now, retry_after_s)
        self.next_turn(i, now)

    def next_turn(self, i: int, now: float) -> None:
        si, ti = self.turn_of[i]
        s = self.sessions[si]
        if ti + 1 < len(s.turns):
            self.push(now + s.turns[ti].think_s, des._ARRIVAL, i + 1)

    def done(self, now: float, backoff_s: float = 0.0) -> None:
        self.resolved += 1
        self.last_done_s = max(self.last_done_s, now)

    def hit_rate(self) -> float:
        """Prompt tokens the engines found cached over those they looked up (their own counters)."""
        caches = [e.prefix_cache for e in self.engines if e.prefix_cache is not None]
        queries = sum(c.queries_tokens_total for c in caches)
        return sum(c.hits_tokens_total for c in caches) / queries if queries else 0.0

    def run(self) -> float:
        for si, s in enumerate(self.sessions):
            self.push(s.start_s, des._ARRIVAL, self.first_index[si])
        self.push(0.0, des._POLL)
        heap = self.heap
        n = len(self.requests)
        now = 0.0
        while heap and self.resolved < n:
            now, kind, _, a, b = heapq.heappop(heap)
            self.events += 1
            if now > self.opts.max_sim_seconds:
                break
            if kind == des._ENGINE:
                self.on_engine_event(a, b, now)
            elif kind == des._ARRIVAL:
                self.arrive(a, now)
            elif kind == des._TICK:
                self.on_tick(now)
            else:
                self.on_poll(now)
            self.reschedule_moved()
        return now


def proxy_key(turn: SessionTurn, salt: str) -> PrefixKey:
    """The key the proxy computes: over the prompt text in 64-character blocks (no tokenizer configured)."""
    if turn.text is not None:
        return text_block_hashes(turn.text, salt=salt)
    return token_block_hashes(turn.prompt_ids, salt=salt)


def token_key(turn: SessionTurn, salt: str) -> PrefixKey:
    """The key of a proxy with the model's tokenizer: 16-token blocks over the token ids."""
    return token_block_hashes(turn.prompt_ids, salt=salt)
