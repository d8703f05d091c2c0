"""A model of one LLM engine instance: vLLM v1-style continuous batching on a clock it is given.

Pure and synchronous (no asyncio, no clock reads): the HTTP front drives it on scaled real time, the
discrete-event runner on a virtual clock. What it models, after vLLM's `v1/core/sched/scheduler.py`:

- a step takes the running decodes first (one token each), then the chunks of running prefills, then new
  requests from the FCFS waiting queue, within `max_num_batched_tokens` and `max_num_seqs`;
- a paged KV cache of `num_gpu_blocks` blocks of `block_size` tokens; a sequence takes a new block when
  its next token crosses a block boundary; when a decode cannot get one, the newest running request is
  preempted by recompute (its blocks freed, its progress reset, back at the head of the waiting queue);
- step time from the profile's linear model (prefill tokens, decode sequences, context tokens);
- automatic prefix caching (on by default, as in vLLM; sim/prefix_cache.py): a request that carries token ids
  starts with the longest cached run of its prompt's blocks, shared with the running requests that use them,
  and prefill is charged only for the tokens not cached. SGLang (its radix cache, `--page-size` 1 by default)
  and TGI (flashinfer attention, its default, with `BLOCK_SIZE = 1` and prefix caching on) keep KV a token
  at a time, so they match any shared prefix to the token where vLLM matches whole 16-token blocks:
  `EngineConfig.from_profile(..., engine=...)` gives them one-token blocks of the same total capacity.

Speed: between composition changes (an arrival, a finish, the cache running out) a batch of pure decodes
repeats identical steps, so the engine plans a run of K such steps at once: decode progress is kept
implicitly as `epoch - offset`, block demand per step comes from a per-phase count, and the run's
duration is a closed-form arithmetic series. Per-token work happens only when a caller asks for
per-token events (the HTTP front, where real time bounds it anyway).

Step semantics: a step is planned (composed) at its start time and applied at its end; requests added
while it runs join at the next step, as on a real engine.

Engines sharing one GPU (`share_gpu`, fleet `gpu_group`): each step also waits for the busy siblings'
current steps (capbalancer/sim/gpu_share.py has the model); an engine on a GPU of its own is untouched.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from capbalancer.fleet.snapshot import EngineSnapshot
from capbalancer.profiling.schema import Profile, StepTimeModel
from capbalancer.sim.gpu_share import GpuMember, SharedGpu
from capbalancer.sim.prefix_cache import CacheHit, PrefixCache, block_hashes


class RequestTooLong(ValueError):
    """The request does not fit max_model_len: the HTTP layer answers vLLM's 400 with this message
    (vLLM 0.32's wording: tests/data/real/vllm-cpu-error-too-long.json and serving_engine's input checks)."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        self.param: str | None = "max_tokens"
        if max_tokens > max_model_len:
            message = (f"max_tokens={max_tokens} cannot be greater than max_model_len={max_model_len}. "
                       f"Please request fewer output tokens. (parameter=max_tokens, value={max_tokens})")
        elif prompt_tokens >= max_model_len:
            self.param = None
            message = (f"This model's maximum context length is {max_model_len} tokens. However, your request "
                       f"has {prompt_tokens} input tokens. Please reduce the length of the input messages.")
        else:
            message = (f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
                       f"context length is {max_model_len} tokens and your request has {prompt_tokens} input "
                       f"tokens ({max_tokens} > {max_model_len} - {prompt_tokens}).")
        super().__init__(message)


# Engines whose KV pages hold one token, so their prefix cache matches to the token: SGLang's radix cache
# (server_args.page_size, default 1) and TGI with its default flashinfer attention (models/globals.py:
# BLOCK_SIZE = 1; the launcher turns PREFIX_CACHING on unless the model or attention rules it out).
TOKEN_PAGED_ENGINES = frozenset({"sglang", "tgi"})


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The engine's own limits (vLLM's flags), taken from a profile unless overridden."""

    block_size: int
    num_gpu_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    step: StepTimeModel
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True  # vLLM's default; --no-enable-prefix-caching turns it off

    @classmethod
    def from_profile(cls, profile: Profile, engine: str = "vllm", **overrides: int | bool) -> EngineConfig:
        """The engine `engine` ("vllm", "sglang", "tgi", "openai") would run with on `profile`'s GPU: SGLang and
        TGI page their KV a token at a time (TOKEN_PAGED_ENGINES), the same capacity in one-token blocks."""
        block_size, num_gpu_blocks = profile.block_size, profile.num_gpu_blocks
        if engine in TOKEN_PAGED_ENGINES:
            block_size, num_gpu_blocks = 1, profile.num_gpu_blocks * profile.block_size
        cfg = dict(block_size=block_size, num_gpu_blocks=num_gpu_blocks,
                   max_num_seqs=profile.max_num_seqs, max_num_batched_tokens=profile.max_num_batched_tokens,
                   max_model_len=profile.max_model_len, step=profile.step,
                   gpu_memory_utilization=profile.gpu_memory_utilization)
        cfg.update(overrides)
        return cls(**cfg)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size


@dataclass(slots=True)
class SimRequest:
    request_id: str
    prompt_tokens: int
    output_tokens_target: int  # tokens it generates before stopping (EOS or max_tokens)
    max_tokens: int
    arrival_s: float
    # Progress. While the request is in the decode set, `generated` is stale: the truth is
    # engine.epoch - decode_offset (see EngineModel.generated_of).
    generated: int = 0
    computed: int = 0  # tokens whose KV is in the cache (prefill progress); stale in the decode set
    decoding: bool = False
    decode_offset: int = 0
    decode_generation: int = 0  # bumped on leaving the decode set: invalidates old finish-heap entries
    aborted: bool = False
    preemptions: int = 0
    prompt_counted: bool = False
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    # Prefix caching: the prompt's token ids (None: the prompt is not cacheable, as for a length-only request),
    # the ids the engine generates (their full blocks are cached at the end), and the chained block hashes.
    token_ids: Sequence[int] | None = None
    output_ids: Sequence[int] | None = None
    block_hashes: tuple[int, ...] = ()
    cache_refs: list[int] = field(default_factory=list)  # cached blocks it uses (each counted once, shared)
    registered_blocks: int = 0  # leading blocks already looked at for registration in the cache
    cached_tokens: int = 0  # prompt tokens found in the cache at its (last) admission


@dataclass(frozen=True, slots=True)
class FirstToken:
    request_id: str
    time_s: float
    scheduled_s: float = 0.0  # when it was first scheduled (queue time = scheduled_s - arrival)


@dataclass(frozen=True, slots=True)
class Token:
    """One more output token (only with per-token events); `generated` counts all so far."""

    request_id: str
    time_s: float
    generated: int


@dataclass(frozen=True, slots=True)
class Finished:
    request_id: str
    time_s: float
    output_tokens: int
    prompt_tokens: int
    finish_reason: str  # "length" (hit max_tokens) | "stop" (EOS)


EngineEvent = FirstToken | Token | Finished


@dataclass(slots=True)
class _Plan:
    """The step (or run of identical decode steps) in flight: composed at start_s, applied at end_s."""

    start_s: float
    steps: int
    end_s: float
    decode_seqs: int
    chunks: list[tuple[SimRequest, int]] = field(default_factory=list)  # prefill (request, tokens)
    blocks: int = 0  # blocks allocated by this plan (already taken from the free pool)
    # For a multi-step decode run: duration = steps*first_step_s + ctx_growth_s*steps*(steps-1)/2
    first_step_s: float = 0.0
    ctx_growth_s: float = 0.0
    epoch_at_start: int = 0
    # The first step's own (solo) time: first_step_s less the GPU siblings' share (equal without siblings).
    own_step_s: float = 0.0
    # Cached blocks evicted to reserve this run's blocks, in eviction order: a cut gives the unused ones back.
    evicted: list[int] = field(default_factory=list)


_NO_HIT = CacheHit(0, 0)


class EngineModel:
    def __init__(self, config: EngineConfig, *, per_token_events: bool = False, max_run_steps: int = 1 << 30):
        if config.max_num_batched_tokens < config.max_num_seqs:
            # vLLM refuses this configuration too: every running decode must fit in one step's budget.
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        self.config = config
        self.per_token_events = per_token_events
        self.max_run_steps = max_run_steps
        bs = config.block_size
        self.block_size = bs
        self.total_blocks = config.num_gpu_blocks
        self.free_blocks = config.num_gpu_blocks
        # A request longer than the cache could never finish; vLLM refuses such a max_model_len at start.
        self.max_model_len = min(config.max_model_len, config.kv_capacity_tokens)
        self.clock_s = 0.0  # the last step boundary processed
        self.epoch = 0  # decode steps taken: a decoding request has generated epoch - decode_offset tokens
        self.requests: dict[str, SimRequest] = {}
        self.running: dict[str, SimRequest] = {}  # admission order: the last is the newest (preempted first)
        self.prefilling: list[SimRequest] = []  # running requests still computing their prompt, in order
        self.waiting: deque[SimRequest] = deque()
        # The decode set, aggregated: count, per-phase counts (phase = (num_tokens - epoch) mod block_size,
        # which decides at which epochs the request takes a new block), sum of (prompt - offset).
        self.decode_count = 0
        self._phase_counts = [0] * bs
        self._decode_ctx_base = 0
        self._finish_heap: list[tuple[int, int, int, SimRequest]] = []  # (finish epoch, seq, generation, req)
        self._heap_seq = 0
        self._plan: _Plan | None = None
        self._aborts_pending = 0  # running requests flagged to leave at the end of the step in flight
        # Counters (the /metrics and snapshot figures).
        self.preemptions_total = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_finished_total = 0
        self.busy_seconds = 0.0
        self.steps_total = 0
        self.prompt_tokens_cached_total = 0  # of prompt_tokens_total, found in the prefix cache
        self._gpu: GpuMember | None = None  # set by share_gpu: this engine's place on a shared GPU
        self.prefix_cache = PrefixCache(bs) if config.enable_prefix_caching else None

    def share_gpu(self, gpu: SharedGpu, on_change: Callable[[float], None] | None = None,
                  interference: float = 1.0) -> None:
        """Run on `gpu` with the other engines that joined it: each step of this engine then also waits for
        the busy siblings' steps. `on_change(now)` tells the driver that a sibling moved this engine's next
        event (`next_event_s`) at model time `now`. Join before the first request."""
        if self._gpu is not None:
            raise ValueError("this engine already shares a GPU")
        self._gpu = gpu.join(self, on_change, interference)

    def sibling_changed(self, now: float) -> None:
        """A sibling on this engine's GPU changed its step time at `now`: a plan not started yet takes the
        new figure; a run under way is cut after the step in flight, and the rest is recomposed with it."""
        plan = self._plan
        if plan is None or self._gpu is None:
            return
        if plan.start_s >= now:
            plan.first_step_s = plan.own_step_s + self._gpu.extra_step_seconds()
            plan.end_s = plan.start_s + self._run_seconds(plan.first_step_s, plan.ctx_growth_s, plan.steps)
        else:
            # A step of the run that starts exactly now is not under way: it takes the new figure too.
            self._cut_run(now, keep_step_starting_now=False)

    # ------------------------------------------------------------------------------------ inputs
    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.max_model_len or prompt_tokens < 1 or max_tokens < 1:
            raise RequestTooLong(prompt_tokens, max_tokens, self.max_model_len)

    def add_request(self, req: SimRequest, now: float) -> list[EngineEvent]:
        """Queue a request that arrives at `now`; returns the events of the steps that ended before it."""
        self.check_fits(req.prompt_tokens, req.max_tokens)
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        req.output_tokens_target = max(1, min(req.output_tokens_target, req.max_tokens))
        if self.prefix_cache is not None and req.token_ids is not None and not req.block_hashes:
            req.block_hashes = block_hashes(req.token_ids, self.block_size)
        events = self.advance_to(now)
        req.arrival_s = now
        self.requests[req.request_id] = req
        self.waiting.append(req)
        self._cut_run(now)
        return events

    def abort(self, request_id: str, now: float) -> list[EngineEvent]:
        """The client went away: the request leaves at the end of the step in flight (or at once if queued)."""
        events = self.advance_to(now)
        req = self.requests.get(request_id)
        if req is None:
            return events
        if request_id not in self.running:
            self.waiting.remove(req)
            del self.requests[request_id]
            if self._gpu is not None and self.is_idle():
                self._gpu.publish(None, 0.0, now)
            return events
        if not req.aborted:
            req.aborted = True
            self._aborts_pending += 1
        self._cut_run(now)
        return events

    # ------------------------------------------------------------------------------------ time
    def advance_to(self, now: float) -> list[EngineEvent]:
        """Apply every step that ends at or before `now`; plan the one in flight at `now`."""
        events: list[EngineEvent] = []
        while True:
            plan = self._plan
            if plan is None:
                if self.clock_s >= now and (self.running or self.waiting):
                    # A step starting exactly now is not composed yet: arrivals at `now` can still join it.
                    return events
                plan = self._compose(now)
                if plan is None:
                    self.clock_s = max(self.clock_s, now)
                    if self._gpu is not None:
                        self._gpu.publish(None, 0.0, self.clock_s)
                    return events
            if plan.end_s > now:
                return events
            self._apply(plan, events)

    def _ensure_plan(self) -> _Plan | None:
        if self._plan is None and (self.running or self.waiting):
            self._compose(self.clock_s)
        return self._plan

    def next_event_s(self) -> float | None:
        """When the step (or run) in flight ends; None when the engine is idle."""
        plan = self._ensure_plan()
        return None if plan is None else plan.end_s

    def planned_step(self) -> tuple[int, int, int] | None:
        """(prefill tokens, decode sequences, steps) of the step or run in flight; None when idle."""
        plan = self._ensure_plan()
        if plan is None:
            return None
        return sum(c for _, c in plan.chunks), plan.decode_seqs, plan.steps

    def is_idle(self) -> bool:
        return self._plan is None and not self.running and not self.waiting

    # ------------------------------------------------------------------------------------ views
    def generated_of(self, req: SimRequest) -> int:
        return self.epoch - req.decode_offset if req.decoding else req.generated

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self.free_blocks

    def kv_usage_fraction(self) -> float:
        return self.used_blocks / self.total_blocks if self.total_blocks else 0.0

    def snapshot(self, now: float, engine: str = "vllm") -> EngineSnapshot:
        """What an adapter reads from this engine's /metrics, per flavour: TGI exposes no KV usage, no
        preemptions and no token counters, only its queue, batch size and the batch's token budget, which
        the live adapter turns into KV usage (budget over capacity, capped at 1) the same way."""
        if engine == "tgi":
            capacity = self.config.kv_capacity_tokens
            batch_tokens = sum(r.prompt_tokens + r.max_tokens for r in self.running.values())
            return EngineSnapshot(
                taken_at_s=now, engine=engine, running=len(self.running), waiting=len(self.waiting),
                kv_usage_fraction=min(1.0, batch_tokens / capacity) if capacity else None,
                kv_capacity_tokens=capacity, batch_tokens=batch_tokens)
        if engine == "openai":
            return EngineSnapshot(taken_at_s=now, engine=engine)
        return EngineSnapshot(
            taken_at_s=now, engine=engine, running=len(self.running), waiting=len(self.waiting),
            kv_usage_fraction=self.kv_usage_fraction(), kv_capacity_tokens=self.config.kv_capacity_tokens,
            preemptions_total=self.preemptions_total, prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total, **self._prefix_counters())

    def _prefix_counters(self) -> dict[str, int]:
        cache = self.prefix_cache
        if cache is None:
            return {"prefix_cache_queries_tokens_total": 0, "prefix_cache_hits_tokens_total": 0}
        return {"prefix_cache_queries_tokens_total": cache.queries_tokens_total,
                "prefix_cache_hits_tokens_total": cache.hits_tokens_total}

    def held_blocks_of(self, req: SimRequest) -> int:
        """Private blocks a running request holds at a step boundary (for the conservation check): the cached
        blocks it uses are counted once, in the prefix cache."""
        if req.decoding:
            computed = req.prompt_tokens + self.generated_of(req) - 1
        else:
            computed = req.computed
        return -(-computed // self.block_size) - len(req.cache_refs)

    def check_invariants(self) -> None:
        """KV blocks are conserved and the aggregates match the requests (tests call this each step)."""
        assert 0 <= self.free_blocks <= self.total_blocks, (self.free_blocks, self.total_blocks)
        plan_blocks = self._plan.blocks if self._plan is not None else 0
        held = sum(self.held_blocks_of(r) for r in self.running.values())
        shared = 0
        if self.prefix_cache is not None:
            shared = self.prefix_cache.blocks_in_use
            assert len(self.prefix_cache.lru) <= self.free_blocks, (len(self.prefix_cache.lru), self.free_blocks)
            uses: dict[int, int] = {}
            for r in self.running.values():
                for h in r.cache_refs:
                    uses[h] = uses.get(h, 0) + 1
            assert all(self.prefix_cache.refs.get(h) == n for h, n in uses.items()), "cache reference counts"
            assert len(uses) == shared, (len(uses), shared)
        assert held + shared + plan_blocks + self.free_blocks == self.total_blocks, (
            held, shared, plan_blocks, self.free_blocks)
        decoders = [r for r in self.running.values() if r.decoding]
        assert len(decoders) == self.decode_count
        assert len(self.running) <= self.config.max_num_seqs

    # ------------------------------------------------------------------------------------ internals
    def _cut_run(self, now: float, keep_step_starting_now: bool = True) -> None:
        """A multi-step run in flight is cut to the step running at `now`: composition may change after it.
        A step that starts exactly at `now` stays in the run unless `keep_step_starting_now` is False."""
        plan = self._plan
        if plan is None or plan.steps <= 1:
            return
        done = self._steps_within(plan.first_step_s, plan.ctx_growth_s, now - plan.start_s, plan.steps)
        keep = min(plan.steps, done + 1)
        if (not keep_step_starting_now and 0 < done < plan.steps
                and plan.start_s + self._run_seconds(plan.first_step_s, plan.ctx_growth_s, done) == now):
            keep = done
        if keep == plan.steps:
            return
        plan.blocks = self._blocks_over(plan.epoch_at_start, keep) if plan.decode_seqs else 0
        # Blocks of the dropped steps go back to the pool: they were never used, so what they cached is still there
        # (vLLM takes a decode's block at the step that needs it; the run reserved them all at its start).
        returned = self._blocks_over(plan.epoch_at_start, plan.steps) - plan.blocks
        self.free_blocks += returned
        if plan.evicted and returned > 0 and self.prefix_cache is not None:
            back = plan.evicted[-returned:]
            del plan.evicted[-returned:]
            self.prefix_cache.restore(back)
        plan.steps = keep
        plan.end_s = plan.start_s + self._run_seconds(plan.first_step_s, plan.ctx_growth_s, keep)

    @staticmethod
    def _run_seconds(first_step_s: float, ctx_growth_s: float, steps: int) -> float:
        return steps * first_step_s + ctx_growth_s * steps * (steps - 1) / 2

    def _steps_within(self, first_step_s: float, ctx_growth_s: float, span_s: float, limit: int) -> int:
        """How many steps of a run end within span_s (at most limit)."""
        if span_s < first_step_s:
            return 0
        if ctx_growth_s <= 0:
            k = int(span_s / first_step_s)
        else:
            a = ctx_growth_s / 2
            b = first_step_s - ctx_growth_s / 2
            k = int((-b + math.sqrt(b * b + 4 * a * span_s)) / (2 * a))
        k = max(0, min(limit, k))
        # Float safety: make the answer exact against the closed form.
        while k > 0 and self._run_seconds(first_step_s, ctx_growth_s, k) > span_s:
            k -= 1
        while k < limit and self._run_seconds(first_step_s, ctx_growth_s, k + 1) <= span_s:
            k += 1
        return k

    def _blocks_over(self, epoch: int, steps: int) -> int:
        """Blocks the decode set takes over `steps` steps starting at `epoch`."""
        bs = self.block_size
        full, rest = divmod(steps, bs)
        total = full * self.decode_count
        counts = self._phase_counts
        for j in range(rest):
            total += counts[(1 - (epoch + j)) % bs]
        return total

    def _max_steps_for_blocks(self, epoch: int, free: int, limit: int) -> int:
        """The most steps (<= limit) whose block demand fits in `free` blocks."""
        n = self.decode_count
        bs = self.block_size
        counts = self._phase_counts
        if n == 0:
            return limit
        full = free // n
        if full * bs >= limit:
            return limit
        steps = full * bs
        left = free - full * n
        for _j in range(bs):
            need = counts[(1 - (epoch + steps)) % bs]
            if need > left or steps >= limit:
                break
            left -= need
            steps += 1
        return min(steps, limit)

    def _waiting_blocked(self, budget_left: int) -> bool:
        """True when the head of the queue cannot be admitted until something finishes."""
        if not self.waiting:
            return True
        if len(self.running) >= self.config.max_num_seqs or budget_left <= 0:
            return True
        head = self.waiting[0]
        if head.arrival_s > self.clock_s:
            return False
        hit, _chunk, need = self._admission(head, budget_left)
        return need + hit.idle_blocks > self.free_blocks

    def _admission(self, head: SimRequest, budget: int) -> tuple[CacheHit, int, int]:
        """(prefix-cache hit, tokens to compute in this step, new blocks) of admitting `head` within `budget`."""
        total = head.prompt_tokens + head.generated
        cache = self.prefix_cache
        bs = self.block_size
        if cache is not None and head.block_hashes:
            # vLLM recomputes at least the last token (it needs its logits): a hit stops one token short.
            hit = cache.lookup(head.block_hashes, (total - 1) // bs)
        else:
            hit = _NO_HIT
        start = hit.blocks * bs
        chunk = min(total - start, budget)
        return hit, chunk, -(-(start + chunk) // bs) - hit.blocks

    def _take_blocks(self, n: int, evicted: list[int] | None = None) -> None:
        """n free blocks go to running requests; cached free blocks past what is left are evicted."""
        self.free_blocks -= n
        if self.prefix_cache is not None:
            self.prefix_cache.evict_to(self.free_blocks, evicted)

    def _compose(self, now: float) -> _Plan | None:
        """Plan the step starting at clock_s (or, when the engine was idle, at the first arrival)."""
        if not self.running:
            if not self.waiting:
                return None
            head_arrival = self.waiting[0].arrival_s
            if head_arrival > now:
                return None
            self.clock_s = max(self.clock_s, head_arrival)
        cfg = self.config
        start = self.clock_s
        n = self.decode_count
        budget = cfg.max_num_batched_tokens
        if not self.prefilling and n > 0 and self._waiting_blocked(budget - n):
            limit = self.max_run_steps if not self.per_token_events else 1
            limit = min(limit, self._steps_to_next_finish())
            steps = self._max_steps_for_blocks(self.epoch, self.free_blocks, limit)
            if steps >= 1:
                ctx = self._decode_ctx_base + n * self.epoch
                own = first = cfg.step.step_seconds(0, n, ctx)
                if self._gpu is not None:
                    self._gpu.publish((0, n), own, start)
                    first = own + self._gpu.extra_step_seconds()
                growth = cfg.step.context_seconds_per_token * n
                blocks = self._blocks_over(self.epoch, steps)
                evicted: list[int] = []
                self._take_blocks(blocks, evicted)
                plan = _Plan(start_s=start, steps=steps, decode_seqs=n, blocks=blocks, first_step_s=first,
                             ctx_growth_s=growth, epoch_at_start=self.epoch, own_step_s=own,
                             end_s=start + self._run_seconds(first, growth, steps), evicted=evicted)
                self._plan = plan
                return plan
        return self._compose_general(start)

    def _steps_to_next_finish(self) -> int:
        heap = self._finish_heap
        while heap:
            finish_epoch, _, gen, req = heap[0]
            if req.decoding and gen == req.decode_generation and not req.aborted:
                return max(1, finish_epoch - self.epoch)
            heapq.heappop(heap)
        return 1 << 30

    def _compose_general(self, start: float) -> _Plan:
        cfg = self.config
        bs = self.block_size
        budget = cfg.max_num_batched_tokens
        preempted = False
        # 1. Decodes: each takes one token; those crossing a block boundary need a block. Short of blocks,
        # preempt the newest running request until the rest fit (vLLM v1: self.running.pop()).
        need_phase = (1 - self.epoch) % bs
        while self._phase_counts[need_phase] > self.free_blocks:
            self._preempt(self._newest_running())
            preempted = True
        decode_blocks = self._phase_counts[need_phase]
        self._take_blocks(decode_blocks)
        n = self.decode_count
        budget -= n
        blocks = decode_blocks
        chunks: list[tuple[SimRequest, int]] = []
        # 2. Running prefills, in admission order, within the remaining token budget.
        scheduled: set[str] = set()
        i = 0
        while i < len(self.prefilling) and budget > 0:
            req = self.prefilling[i]
            total = req.prompt_tokens + req.generated
            chunk = min(total - req.computed, budget)
            have = -(-req.computed // bs)
            extra = -(-(req.computed + chunk) // bs) - have
            while extra > self.free_blocks:
                victim = self._newest_running()
                if victim is req or victim.decoding or victim.request_id in scheduled:
                    break
                self._preempt(victim)
                preempted = True
            if extra > self.free_blocks:
                # Take what fits; a prefill that fits nothing waits for blocks to free up.
                chunk = min(chunk, (have + self.free_blocks) * bs - req.computed)
                extra = -(-(req.computed + chunk) // bs) - have if chunk > 0 else 0
            if chunk > 0:
                self._take_blocks(extra)
                blocks += extra
                budget -= chunk
                chunks.append((req, chunk))
                scheduled.add(req.request_id)
            i += 1
        # 3. New requests from the head of the queue (not in a step that had to preempt).
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
                head = self.waiting[0]
                if head.arrival_s > start:
                    break
                hit, chunk, need = self._admission(head, budget)
                if need + hit.idle_blocks > self.free_blocks:
                    break
                self.waiting.popleft()
                head.computed = hit.blocks * bs
                head.cached_tokens = head.computed
                cache = self.prefix_cache
                if cache is not None:
                    cache.record(head.prompt_tokens + head.generated, head.computed)
                    if hit.blocks:
                        head.cache_refs = list(head.block_hashes[:hit.blocks])
                        cache.acquire(head.cache_refs)
                        self.free_blocks -= hit.idle_blocks  # cached free blocks back in use
                    head.registered_blocks = hit.blocks
                if head.first_scheduled_s is None:
                    head.first_scheduled_s = start
                self.running[head.request_id] = head
                self.prefilling.append(head)
                self._take_blocks(need)
                blocks += need
                budget -= chunk
                chunks.append((head, chunk))
        n = self.decode_count
        prefill_tokens = sum(c for _, c in chunks)
        ctx = self._decode_ctx_base + n * self.epoch
        dt = cfg.step.step_seconds(prefill_tokens, n, ctx)
        if n == 0 and not chunks:
            # Nothing could be scheduled (every request waits for blocks that nothing will free): should not
            # happen with max_model_len <= cache size; take an idle step rather than spin.
            dt = max(dt, cfg.step.fixed_seconds, 1e-6)
        own = dt
        if self._gpu is not None:
            self._gpu.publish((prefill_tokens, n), own, start)
            dt = own + self._gpu.extra_step_seconds()
        plan = _Plan(start_s=start, steps=1, end_s=start + dt, decode_seqs=n, chunks=chunks, blocks=blocks,
                     first_step_s=dt, epoch_at_start=self.epoch, own_step_s=own)
        self._plan = plan
        return plan

    def _newest_running(self) -> SimRequest:
        return self.running[next(reversed(self.running))]

    def _preempt(self, req: SimRequest) -> None:
        """Recompute preemption: free everything, keep the output so far, back to the head of the queue."""
        self._release(req)
        req.computed = 0
        req.preemptions += 1
        self.preemptions_total += 1
        self.waiting.appendleft(req)

    def _release(self, req: SimRequest) -> None:
        """Take a running request out of the batch and free its blocks."""
        if req.decoding:
            generated = self.epoch - req.decode_offset
            computed = req.prompt_tokens + generated - 1
            self._leave_decode(req, generated)
        else:
            computed = req.computed
            self.prefilling.remove(req)
        self._free_request_blocks(req, computed)
        del self.running[req.request_id]

    def _free_request_blocks(self, req: SimRequest, computed: int) -> None:
        """A request leaves the batch with `computed` tokens of KV: its full blocks stay cached (prompt and
        generated tokens alike, as vLLM hashes every full block), the rest are plain free blocks."""
        logical = -(-computed // self.block_size)
        cache = self.prefix_cache
        if cache is None:
            self.free_blocks += logical
            return
        self._register_blocks(req, computed // self.block_size, with_output=True)
        refs = req.cache_refs
        self.free_blocks += logical - len(refs) + cache.release(refs)
        req.cache_refs = []
        req.registered_blocks = 0

    def _register_blocks(self, req: SimRequest, full_blocks: int, with_output: bool = False) -> None:
        """The request's first `full_blocks` blocks are computed: each gets its hash in the cache (a block
        another request registered first stays a private copy)."""
        cache = self.prefix_cache
        start = req.registered_blocks
        if cache is None or full_blocks <= start:
            return
        hashes = req.block_hashes
        if full_blocks > len(hashes) and with_output and req.token_ids is not None and req.output_ids is not None:
            # Blocks past the prompt hold generated tokens: hash the prompt and the output together.
            bs = self.block_size
            ids = list(req.token_ids[:req.prompt_tokens]) + list(req.output_ids[:full_blocks * bs - req.prompt_tokens])
            hashes = block_hashes(ids, bs)
        upto = min(full_blocks, len(hashes))
        refs = req.cache_refs
        for j in range(start, upto):
            if cache.register(hashes[j]):
                refs.append(hashes[j])
        req.registered_blocks = max(start, upto)

    def _join_decode(self, req: SimRequest) -> None:
        req.decoding = True
        req.decode_offset = self.epoch - req.generated
        phase = (req.prompt_tokens - req.decode_offset) % self.block_size
        self._phase_counts[phase] += 1
        self._decode_ctx_base += req.prompt_tokens - req.decode_offset
        self.decode_count += 1
        self._heap_seq += 1
        heapq.heappush(self._finish_heap, (req.decode_offset + req.output_tokens_target, self._heap_seq,
                                           req.decode_generation, req))

    def _leave_decode(self, req: SimRequest, generated: int) -> None:
        phase = (req.prompt_tokens - req.decode_offset) % self.block_size
        self._phase_counts[phase] -= 1
        self._decode_ctx_base -= req.prompt_tokens - req.decode_offset
        self.decode_count -= 1
        req.decoding = False
        req.generated = generated
        req.decode_generation += 1

    def _drop(self, req: SimRequest) -> None:
        if req.request_id in self.running:
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.requests.pop(req.request_id, None)

    def _finish(self, req: SimRequest, now: float, events: list[EngineEvent]) -> None:
        generated = self.generated_of(req)
        self._release(req)
        req.finish_s = now
        del self.requests[req.request_id]
        self.requests_finished_total += 1
        reason = "length" if generated >= req.max_tokens else "stop"
        events.append(Finished(req.request_id, now, generated, req.prompt_tokens, reason))

    def _apply(self, plan: _Plan, events: list[EngineEvent]) -> None:
        end = plan.end_s
        self._plan = None
        self.clock_s = end
        self.busy_seconds += end - plan.start_s
        self.steps_total += plan.steps
        n = plan.decode_seqs
        if n:
            self.epoch += plan.steps
            self.generation_tokens_total += n * plan.steps
            if self.per_token_events:
                for req in self.running.values():
                    if req.decoding and not req.aborted:
                        events.append(Token(req.request_id, end, self.epoch - req.decode_offset))
        # Prefill chunks: a request whose whole context is computed samples a token.
        for req, chunk in plan.chunks:
            if req.request_id not in self.running:  # preempted or dropped since
                continue
            req.computed += chunk
            if req.block_hashes:
                self._register_blocks(req, req.computed // self.block_size)
            if req.computed < req.prompt_tokens + req.generated:
                continue
            self.prefilling.remove(req)
            if not req.prompt_counted:
                req.prompt_counted = True
                self.prompt_tokens_total += req.prompt_tokens
                self.prompt_tokens_cached_total += min(req.cached_tokens, req.prompt_tokens)
            req.generated += 1
            self.generation_tokens_total += 1
            if req.first_token_s is None:
                req.first_token_s = end
                if not req.aborted:
                    events.append(FirstToken(req.request_id, end, req.first_scheduled_s or req.arrival_s))
            if self.per_token_events and not req.aborted:
                events.append(Token(req.request_id, end, req.generated))
            if req.generated >= req.output_tokens_target:
                # Done at its first token: release as a prefill-complete request.
                req.computed = req.prompt_tokens + req.generated - 1
                self._finish_prefilled(req, end, events)
            else:
                self._join_decode(req)
        # Decodes that reached their target.
        heap = self._finish_heap
        while heap and heap[0][0] <= self.epoch:
            _, _, gen, req = heapq.heappop(heap)
            if req.decoding and gen == req.decode_generation and req.request_id in self.running:
                if not req.aborted:
                    self._finish(req, end, events)
        # Aborted requests leave at the end of the step they were in.
        if self._aborts_pending:
            for req in [r for r in self.running.values() if r.aborted]:
                self._drop(req)
            self._aborts_pending = 0

    def _finish_prefilled(self, req: SimRequest, now: float, events: list[EngineEvent]) -> None:
        # Not in the decode set and no longer in `prefilling`: free its blocks directly.
        self._free_request_blocks(req, req.computed)
        del self.running[req.request_id]
        req.finish_s = now
        if not req.aborted:
            reason = "length" if req.generated >= req.max_tokens else "stop"
            events.append(Finished(req.request_id, now, req.generated, req.prompt_tokens, reason))
            self.requests_finished_total += 1
        del self.requests[req.request_id]


def output_length(max_tokens: int, ignore_eos: bool, seed: int, mean_tokens: float = 200.0,
                  sigma: float = 0.8) -> int:
    """How many tokens a request generates: max_tokens, or (EOS allowed) a seeded lognormal draw below it.

    The same seed always gives the same length, so a request that fixes `seed` is reproducible.
    """
    if ignore_eos or max_tokens <= 1:
        return max(1, max_tokens)
    # A cheap, portable seeded draw: a 64-bit mix of the seed to two uniforms, then Box-Muller.
    u1 = ((_mix64(seed) >> 11) + 1) / float(1 << 53)
    u2 = (_mix64(seed ^ 0x9E3779B97F4A7C15) >> 11) / float(1 << 53)
    z = math.sqrt(-2.0 * math.log(u1)) * math.cos(2 * math.pi * u2)
    mu = math.log(mean_tokens) - sigma * sigma / 2
    return max(1, min(max_tokens, int(round(math.exp(mu + sigma * z)))))


def _mix64(x: int) -> int:
    # splitmix64 finaliser: a good, fast integer hash
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)
