"""How much room a backend has left, and what a new request would see there.

Capacity is two-dimensional (DESIGN invariant 3):

* memory headroom: KV tokens the backend can still give out without preempting. The used figure comes
  from the last snapshot moved by our own accounting since; the growth still to come is what our
  in-flight requests are expected to generate. Requests finish at different times, so their final sizes
  are never all held at once: `kv_growth_reserve` (default 0.5, the mean of a uniform progress) says how
  much of the remaining growth to reserve.
* compute headroom: how many sequences the backend's batch can take before it stops gaining throughput
  (or breaks a TPOT objective). It comes from the profiled step time and the running batch, never from
  the engine's waiting queue, which stays at zero while an overloaded vLLM's batch keeps growing.

Predictions use the profile's step-time model corrected online by what was observed on that backend
(`ttft_correction`, `tpot_correction`), so a wrong or stale profile heals. A backend with no profile gets
a generic one that calibration scales to what it observes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from capbalancer.profiling.schema import Profile, StepTimeModel
from capbalancer.sched.backend import BackendState, InflightRequest
from capbalancer.sched.interference import MemberCapacity, is_net_negative
from capbalancer.sched.objectives import derived_tpot_objective_s
from capbalancer.sched.prefix_index import PrefixIndex
from capbalancer.sched.types import Demand, HealthSettings

# Used for a backend configured without a profile: a mid-size GPU serving a mid-size model. Only the
# ratios between backends matter to routing, and calibration replaces the scale within a few requests.
GENERIC_STEP = StepTimeModel(fixed_seconds=0.015, prefill_seconds_per_token=0.0002,
                             decode_seconds_per_seq=0.0002, context_seconds_per_token=2e-7)
GENERIC_MAX_NUM_SEQS = 256
GENERIC_MAX_BATCHED_TOKENS = 2048
CORRECTION_BOUNDS = (0.1, 20.0)
TTFT_MARGIN_FACTOR = 1.1  # a first token predicted at t is dispatched only if 1.1 t + 30 ms meets its deadline
TTFT_MARGIN_S = 0.03
MAX_PREFILL_SHARE = 0.9  # of the GPU's time: the decode step of a backend busy prefilling is at most 10x
MIN_CHURN_OUTPUT_TOKENS = 16.0  # a floor so a population of tiny outputs does not divide by ~0


@dataclass(frozen=True, slots=True)
class CapacitySettings:
    kv_growth_reserve: float = 0.5  # fraction of expected remaining output growth reserved in KV
    # Scale that fraction per backend by what its engine's preemptions say (sched/kv_reserve.py).
    adapt_kv_reserve: bool = True
    kv_high_watermark: float = 0.95  # admit while projected KV stays below this fraction of capacity
    # Batch cap where decode throughput reaches this fraction of its best (1.0 = off). Off by default:
    # with prefill churn the linear model puts the knee too early (measured: -13% throughput on a
    # memory-bound A100 at 0.98); a TPOT objective (`tpot_slo_s`) bounds the batch for latency instead.
    knee_throughput_fraction: float = 1.0
    tpot_slo_s: float | None = None  # admit only while predicted TPOT stays under this
    # Admit only while the predicted time to first token stays under this: without it the e2e score accepts a
    # long prefill queue on a fast-decoding backend (measured on 2x H200: 96 requests waiting inside vLLM).
    ttft_slo_s: float | None = None
    ttft_weight: float = 1.0  # weight of TTFT against the rest of e2e in the routing score
    calibrate: bool = True
    # Goodput by default (sched/admission.py): with no `ttft_slo_s`, a request's TTFT objective is
    # max(floor, factor x its predicted TTFT on the fastest idle backend), counted from its arrival; a request
    # that cannot start within it is refused (429) rather than served late. factor 0: no derived objective.
    ttft_objective_factor: float = 3.0
    ttft_objective_floor_s: float = 2.0
    # Under sustained overload the hold queue is kept just long enough that the backends run out of held work
    # at most this fraction of the time (sched/admission.py, standing_queue_limit); the rest is refused at
    # once instead of waiting up to its objective. 0: held as long as the objective allows, as before.
    overload_idle_fraction: float = 0.0001
    # With no `tpot_slo_s`, each backend admits only while its predicted TPOT stays under
    # max(floor, factor x its own one-sequence TPOT) (sched/objectives.py): a slow GPU's full batch no longer
    # serves every request too slowly to count. factor 0: fill every seat, as before.
    tpot_objective_factor: float = 1.5
    tpot_objective_floor_s: float = 0.1
    # Engines sharing a GPU: a backend whose steps cost its busy siblings more throughput than it adds at
    # saturation (with the interference learned, sched/interference.py) gets no new requests.
    judge_net_negative: bool = True
    # Admit only while predicted TPOT stays under (1 - margin) x `tpot_slo_s`: a batch admitted up to the SLO
    # itself keeps filling to it, so its requests' TPOTs scatter around the SLO and half of them miss it
    # (measured, bench/prefix.py at 3x load: 926 of 2,528 requests on the H100 missed by 0-5 ms).
    tpot_slo_margin: float = 0.1
    # Routing scores within this fraction of the best count as a tie, which the prefix holder (else the session's
    # last backend) wins: calibration moves predictions by more than that between requests.
    prefix_tie_fraction: float = 0.1


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a demand would see on one backend if sent there now."""

    backend_id: str
    seqs_after: int  # requests on the engine, this one included
    seats: int  # sequences the engine can run at once (seats, KV and the compute knee)
    kv_projected_tokens: int  # KV in use at the projected peak, this one included
    kv_capacity_tokens: int | None
    ttft_s: float
    tpot_s: float
    e2e_s: float
    fits_memory: bool
    fits_compute: bool
    # The batch at which the predicted TPOT reaches the TPOT objective (the user's or the derived one), which
    # stops admission before the seats run out; None: no objective.
    tpot_seats: int | None = None

    @property
    def admits(self) -> bool:
        return self.fits_memory and self.fits_compute

    @property
    def batch_cap(self) -> int:
        """The batch the backend takes before its seats or its TPOT objective stop admission."""
        t = self.tpot_seats
        return self.seats if t is None or t > self.seats else t


# (TTFT, TPOT, end-to-end) seconds that `CapacityModel.score` predicted, as `estimate` would give them (the
# end-to-end time without the routing score's recompute cost).
Latency = tuple[float, float, float]


class CapacityModel:
    def __init__(self, health: HealthSettings, settings: CapacitySettings | None = None) -> None:
        self.health = health
        self.settings = settings or CapacitySettings()
        self.prefix: PrefixIndex | None = None  # the scheduler's prefix index: cached tokens per backend
        # What the last `score` that returned a number predicted: the policy keeps the chosen backend's, so that
        # the dispatch does not evaluate the same backend with the same inputs a second time (the proxy's CPU).
        self.last_latency: Latency = (0.0, 0.0, 0.0)

    # --- profile with corrections ---------------------------------------------------------------
    @staticmethod
    def base_step(state: BackendState) -> StepTimeModel:
        profile = state.spec.profile
        return profile.step if profile is not None else GENERIC_STEP

    def tpot_factor(self, state: BackendState) -> float:
        c = state.tpot_correction
        return c.value if (self.settings.calibrate and c.value is not None and c.count >= 3) else 1.0

    def ttft_factor(self, state: BackendState) -> float:
        c = state.ttft_correction
        return c.value if (self.settings.calibrate and c.value is not None and c.count >= 3) else 1.0

    @staticmethod
    def _limits(profile: Profile | None) -> tuple[int, int]:
        if profile is None:
            return GENERIC_MAX_NUM_SEQS, GENERIC_MAX_BATCHED_TOKENS
        return profile.max_num_seqs, profile.max_num_batched_tokens

    # --- the estimate -----------------------------------------------------------------------------
    def cached_tokens(self, state: BackendState, demand: Demand) -> tuple[int, int]:
        """(cached, shared-KV) prompt tokens `state` probably holds for `demand` (sched/prefix_index.py)."""
        index = self.prefix
        if index is None or not (demand.prefix.hashes or demand.session_id is not None):
            return 0, 0
        return index.expected_cached_tokens(state.backend_id, demand.prefix.hashes, demand.prefix.block_tokens,
                                            demand.prompt_tokens, demand.session_id)

    def estimate(self, state: BackendState, demand: Demand, expected_output_tokens: int, now: float) -> Estimate:
        """Everything a demand would see on `state` now (for predictions, the admin view and tests)."""
        cached, shared = self.cached_tokens(state, demand)
        return self._evaluate(state, demand.prompt_tokens, expected_output_tokens, now, None, full=True,
                              cached_tokens=cached, shared_kv_tokens=shared)

    def score(self, state: BackendState, prompt_tokens: int, expected_output_tokens: int, now: float,
              deadline_s: float | None, cached_tokens: int = 0, shared_kv_tokens: int = 0,
              recompute_cost: bool = False) -> float | None:
        """The routing score (predicted end-to-end seconds) if `state` can take the demand in time, else
        None. The policy's hot path: the latency arithmetic runs only for backends with room."""
        return self._evaluate(state, prompt_tokens, expected_output_tokens, now, deadline_s, full=False,
                              cached_tokens=cached_tokens, shared_kv_tokens=shared_kv_tokens,
                              recompute_cost=recompute_cost)

    def _evaluate(self, state: BackendState, prompt_tokens: int, expected_output_tokens: int, now: float,
                  deadline_s: float | None, full: bool, cached_tokens: int = 0,
                  shared_kv_tokens: int = 0, recompute_cost: bool = False):  # -> Estimate | float | None
        s = self.settings
        profile = state.spec.profile
        step = profile.step if profile is not None else GENERIC_STEP
        if profile is not None:
            max_num_seqs, max_batched_tokens = profile.max_num_seqs, profile.max_num_batched_tokens
        else:
            max_num_seqs, max_batched_tokens = GENERIC_MAX_NUM_SEQS, GENERIC_MAX_BATCHED_TOKENS

        # Memory: what is in use, the growth our requests still have ahead (in part: they finish at
        # different times), and the newcomer.
        seqs_now, kv_used = state.load_view(now, self.health)
        seqs_after = seqs_now + 1
        own_growth = state.fleet_kv_growth_tokens
        reserve = state.kv_reserve.reserve(s.kv_growth_reserve) if s.adapt_kv_reserve else s.kv_growth_reserve
        # A prefix held by requests running there needs no new KV; one only cached (evictable) does.
        new_kv = prompt_tokens - shared_kv_tokens + reserve * expected_output_tokens
        if expected_output_tokens == 0 and new_kv > max_batched_tokens:
            # A pooling request (embeddings: it generates nothing) holds KV only while it prefills, and a batch of
            # inputs is prefilled as many requests, one step's token budget at a time: 100,000 inputs never hold
            # their 300k tokens at once (modelled whole, such a batch looked unservable beside any running request).
            new_kv = float(max_batched_tokens)
        kv_projected = int(kv_used + reserve * own_growth + new_kv)
        kv_capacity = state.kv_capacity_tokens()
        fits_memory = (kv_capacity is None or seqs_now == 0
                       or kv_projected <= kv_capacity * s.kv_high_watermark)
        if not fits_memory:
            state.kv_reserve.memory_bound = True  # the reserve binds here: it may learn to be smaller

        # Compute: seats are the engine's, fewer when KV cannot hold that many sequences of this size.
        mean_ctx = (kv_used + new_kv) / seqs_after
        seats = max_num_seqs
        if kv_capacity is not None and mean_ctx > 0:
            by_kv = int(kv_capacity * s.kv_high_watermark / mean_ctx)
            seats = min(seats, by_kv if by_kv > 1 else 1)
        # Churn: in steady state every finishing sequence is replaced by a new one whose prefill runs
        # inside the decode steps of all the others, so each decoding sequence also pays, per token,
        # its share of the prefills admitted while it decodes.
        churn_s_per_seq = self.churn_seconds_per_seq(state, step, prompt_tokens - cached_tokens,
                                                     expected_output_tokens)
        if s.knee_throughput_fraction < 1.0:
            seats = min(seats, self._knee_seqs(step, mean_ctx, seats, churn_s_per_seq))
        fits_compute = seqs_now == 0 or seqs_after <= seats
        if not full and not (fits_memory and fits_compute):
            return None

        tpot_k = self.tpot_factor(state)
        ttft_k = self.ttft_factor(state)
        batch = seqs_after if seqs_after < seats else seats
        # Engines sharing this one's GPU run their steps in between its own: each of its steps waits for theirs,
        # times the interference learned for it (1.0, sum-of-steps, until observed otherwise).
        shared_s = 0.0
        if state.gpu_siblings:
            shared_s = self.shared_gpu_step_seconds(state, now) * self.interference_factor(state)
            if self._net_negative(state, prompt_tokens - cached_tokens, expected_output_tokens, now):
                fits_compute = False
                if not full:
                    return None
        decode_s = step.decode_step_seconds(batch, int(mean_ctx * batch)) + shared_s
        tpot_s = (decode_s + churn_s_per_seq * batch) * tpot_k
        # A growing batch: prompts sent lately take a share f of the GPU beyond the steady churn, and every
        # decode step waits for them (sched/prefill_rate.py).
        prefill_share = state.recent_prefill.per_s(now) * step.prefill_seconds_per_token * ttft_k
        if prefill_share > 0:
            growing_s = decode_s * tpot_k / (1.0 - prefill_share if prefill_share < MAX_PREFILL_SHARE
                                             else 1.0 - MAX_PREFILL_SHARE)
            if growing_s > tpot_s:
                tpot_s = growing_s
        tpot_objective_s = None if s.tpot_slo_s is None else s.tpot_slo_s * (1.0 - s.tpot_slo_margin)
        if tpot_objective_s is None and s.tpot_objective_factor > 0:
            tpot_objective_s = derived_tpot_objective_s(step, int(mean_ctx), s.tpot_objective_factor,
                                                        s.tpot_objective_floor_s, tpot_k)
        if tpot_objective_s is not None and seqs_now > 0 and tpot_s > tpot_objective_s:
            fits_compute = False
            if not full:
                return None
        tpot_seats = None
        if full and tpot_objective_s is not None:
            # TPOT = (fixed + per_seq x batch + siblings) x correction: solved for the batch at the objective.
            per_seq_s = step.decode_seconds_per_seq + step.context_seconds_per_token * mean_ctx + churn_s_per_seq
            room_s = tpot_objective_s / tpot_k - step.fixed_seconds - shared_s
            tpot_seats = max(1, int(room_s / per_seq_s)) if per_seq_s > 0 and room_s > 0 else 1
        # Time to first token: the prefill backlog ahead of it in chunks of the step token budget, each
        # chunk riding on a decode step, plus the wait for a seat if the batch is full.
        running = seqs_now if seqs_now < seats else seats
        # Only the uncached part of the prompt is computed (prefix cache hit).
        backlog_tokens = (state.own_pending_prefill_tokens + state.remote_pending_prefill_tokens
                          + prompt_tokens - cached_tokens)
        chunk_tokens = max_batched_tokens - running
        chunks = math.ceil(backlog_tokens / (chunk_tokens if chunk_tokens > 1 else 1))
        prefill_s = (backlog_tokens * step.prefill_seconds_per_token
                     + chunks * (step.decode_step_seconds(running, int(mean_ctx * seqs_after)) + shared_s)) * ttft_k
        waiting_ahead = seqs_after - seats
        seat_wait_s = 0.0
        if waiting_ahead > 0:
            # Seats free at the rate sequences finish: seats / (expected output × TPOT) per second.
            seat_wait_s = waiting_ahead * max(1, expected_output_tokens) * tpot_s / seats
        ttft_s = prefill_s + seat_wait_s
        if s.ttft_slo_s is not None and seqs_now > 0 and ttft_s > s.ttft_slo_s:
            fits_compute = False
            if not full:
                return None
        e2e_s = s.ttft_weight * ttft_s + max(0, expected_output_tokens - 1) * tpot_s
        plain_e2e_s = e2e_s
        if recompute_cost:
            # A prefix held elsewhere: recomputing it here also stalls every sequence running here for the
            # length of that prefill (their steps wait for it), a cost the newcomer's own latency omits.
            e2e_s += (prompt_tokens - cached_tokens) * step.prefill_seconds_per_token * ttft_k * running
        if not full:
            # A request released near its deadline must not come in just late: predictions are ~5-30% off
            # (chunked prefill steps shared with the rest of a burst), so a margin is kept (TTFT_MARGIN_*).
            if deadline_s is not None and now + ttft_s * TTFT_MARGIN_FACTOR + TTFT_MARGIN_S > deadline_s:
                return None
            self.last_latency = (ttft_s, tpot_s, plain_e2e_s)
            return e2e_s
        return Estimate(
            backend_id=state.backend_id, seqs_after=seqs_after, seats=seats, kv_projected_tokens=kv_projected,
            kv_capacity_tokens=kv_capacity, ttft_s=ttft_s, tpot_s=tpot_s, e2e_s=e2e_s,
            fits_memory=fits_memory, fits_compute=fits_compute, tpot_seats=tpot_seats,
        )

    def interference_factor(self, state: BackendState) -> float:
        return state.interference.factor if self.settings.calibrate else 1.0

    def _net_negative(self, state: BackendState, prompt_tokens: int, expected_output_tokens: int,
                      now: float) -> bool:
        """Whether this backend lowers what its GPU decodes at saturation (sched/interference.py).

        Judged with each member's learned factor, never below sum-of-steps (1.0): a factor learned below 1 (MPS,
        engines that overlap) improves the TPOT predictions but does not by itself bring an idle engine back,
        since an idle engine's siblings can learn nothing about it.
        """
        if not self.settings.judge_net_negative or not self.settings.calibrate:
            return False
        ctx = prompt_tokens + expected_output_tokens / 2.0
        siblings = [self._member_capacity(sib, ctx, prompt_tokens, expected_output_tokens)
                    for sib in state.gpu_siblings]
        me = self._member_capacity(state, ctx, prompt_tokens, expected_output_tokens)

        # The member that decodes most alone is never judged (ties: the busier one, then the name), so that two
        # that each look negative beside the other cannot both refuse work: one keeps the GPU, the other drains.
        def rank(m: MemberCapacity, b: BackendState) -> tuple[float, int, str]:
            return (m.seats / m.step_s, len(b.inflight), b.backend_id)

        mine = rank(me, state)
        if all(mine > rank(m, b) for m, b in zip(siblings, state.gpu_siblings, strict=True)):
            return False
        return is_net_negative(me, siblings)

    def _member_capacity(self, state: BackendState, ctx_tokens: float, prompt_tokens: int,
                         expected_output_tokens: int) -> MemberCapacity:
        profile = state.spec.profile
        step = profile.step if profile is not None else GENERIC_STEP
        seats = profile.max_num_seqs if profile is not None else GENERIC_MAX_NUM_SEQS
        kv_capacity = state.kv_capacity_tokens()
        if kv_capacity is not None and ctx_tokens > 0:
            seats = max(1, min(seats, int(kv_capacity * self.settings.kv_high_watermark / ctx_tokens)))
        churn = _churn(step, prompt_tokens, expected_output_tokens, 1)
        # The profile's step, uncalibrated: the judgement compares members with one another, and a correction
        # learned from a burst (every prompt of a cold start prefilled at once) must not condemn the big engine.
        step_s = step.decode_step_seconds(seats, int(ctx_tokens * seats)) + churn * seats
        return MemberCapacity(seats=seats, step_s=step_s, factor=max(1.0, self.interference_factor(state)))

    def refresh_shared(self, state: BackendState, now: float) -> None:
        """The load of `state` changed: every member of its GPU group starts a new piece of its sibling-step
        integral (sched/interference.py)."""
        for member in (state, *state.gpu_siblings):
            member.interference.set_shared(now, self.shared_gpu_step_seconds(member, now))

    def shared_gpu_step_seconds(self, state: BackendState, now: float) -> float:
        """GPU time the busy engines sharing `state`'s GPU take per step of theirs (uncalibrated).

        A GPU time-slices between processes, so with two busy engines on one card each step of one waits
        for about one step of the other: its TPOT is its own step plus theirs. Each sibling's step comes
        from its own profile (measured alone, on the whole GPU) at its current batch, prefill churn
        included. Idle siblings cost nothing: one alone on the card runs at its profiled speed.
        """
        total_s = 0.0
        for sib in state.gpu_siblings:
            seqs, kv_used = sib.load_view(now, self.health)
            if seqs <= 0:
                continue
            profile = sib.spec.profile
            step = profile.step if profile is not None else GENERIC_STEP
            max_num_seqs = profile.max_num_seqs if profile is not None else GENERIC_MAX_NUM_SEQS
            batch = seqs if seqs < max_num_seqs else max_num_seqs
            churn_s = self.population_churn_seconds_per_seq(sib, step)
            total_s += step.decode_step_seconds(batch, kv_used) + churn_s * batch
        return total_s

    @staticmethod
    def population_churn_seconds_per_seq(state: BackendState, step: StepTimeModel) -> float:
        """`churn_seconds_per_seq` of the requests already on `state`, with no newcomer."""
        n = state.fleet_requests
        return _churn(step, state.own_prompt_tokens + state.remote_prompt_tokens,
                      state.own_expected_output_tokens + state.remote_expected_output_tokens, n) if n else 0.0

    @staticmethod
    def churn_seconds_per_seq(state: BackendState, step: StepTimeModel, prompt_tokens: int,
                              expected_output_tokens: int) -> float:
        """Prefill time each decoding sequence pays per output token, in steady state.

        A property of the backend's population of requests (their mean prompt over their mean output),
        not of the newcomer: one long prompt with max_tokens=1 must not make the batch look slow.
        """
        return _churn(step, state.own_prompt_tokens + state.remote_prompt_tokens + prompt_tokens,
                      state.own_expected_output_tokens + state.remote_expected_output_tokens
                      + expected_output_tokens, state.fleet_requests + 1)

    def _knee_seqs(self, step: StepTimeModel, mean_ctx: float, cap: int, churn_s_per_seq: float = 0.0) -> int:
        """Smallest batch whose decode throughput reaches `knee_throughput_fraction` of the batch at `cap`.

        With step(n) = a + k·n, throughput n/step(n) rises towards 1/k; past the knee a bigger batch
        only makes every sequence slower for little gain.
        """
        f = self.settings.knee_throughput_fraction
        if f >= 1.0 or cap <= 1:
            return cap
        a = step.fixed_seconds
        k = step.decode_seconds_per_seq + step.context_seconds_per_token * mean_ctx + churn_s_per_seq
        if k <= 0:
            return cap
        best = cap / (a + k * cap)
        # n / (a + k n) >= f * best  <=>  n (1 - f k best) >= f a best
        denom = 1.0 - f * k * best
        if denom <= 0:
            return cap
        return max(1, min(cap, math.ceil(f * a * best / denom)))

    # --- calibration ------------------------------------------------------------------------------
    def record_completion(self, state: BackendState, req: InflightRequest, now: float) -> None:
        """Compare what was observed with what the profile predicts for the load the request really saw."""
        if req.first_token_at_s is None:
            self._record_unstreamed(state, req, now)
            return
        observed_ttft = req.first_token_at_s - req.dispatched_at_s
        state.observed_ttft_s.add(observed_ttft)
        if req.predicted_ttft_s is not None:
            state.predicted_ttft_s.add(req.predicted_ttft_s)
            if req.predicted_ttft_base_s and observed_ttft > 0:
                state.ttft_correction.add(_clip(observed_ttft / req.predicted_ttft_base_s))
        decode_s = now - req.first_token_at_s
        if req.output_tokens <= 1 or decode_s <= 0:
            return
        observed_tpot = decode_s / (req.output_tokens - 1)
        state.observed_tpot_s.add(observed_tpot)
        if req.predicted_tpot_s is not None:
            state.predicted_tpot_s.add(req.predicted_tpot_s)
        own_base = self._decode_step_base_s(state, req, now, req.seq_integral_at_first_token,
                                            req.kv_integral_at_first_token, decode_s)
        # Siblings on the same GPU: their summed step, averaged over this request's decode (the scheduler keeps
        # its integral as their loads change), so the correction does not learn the contention as its own.
        shared_s = 0.0
        if state.gpu_siblings:
            shared_s = (state.interference.integral_at(now) - req.shared_integral_at_first_token) / decode_s
        if shared_s > 0:
            # Busy siblings: what they cost it beyond its own (calibrated) step is the interference factor's
            # evidence (sched/interference.py). The own correction learns only while it has the GPU to itself, as
            # its profile was measured: beside busy siblings the two could not be told apart.
            state.interference.observe(own_base * self.tpot_factor(state), shared_s, observed_tpot)
        elif own_base > 0:
            state.tpot_correction.add(_clip(observed_tpot / own_base))

    def _decode_step_base_s(self, state: BackendState, req: InflightRequest, now: float, seq_integral_at: float,
                            kv_integral_at: float, span_s: float) -> float:
        """The uncorrected decode step (churn included) of the batch `req` ran in over the last `span_s`: our own
        load integrals since the given marks, or the snapshot's figure when another client's traffic makes the
        engine busier."""
        mean_seqs = max(1.0, (state.load_integral_seq_s - seq_integral_at) / span_s)
        mean_kv = max(0.0, (state.load_integral_kv_s - kv_integral_at) / span_s)
        snap = state.fresh_snapshot(now, self.health)
        if snap is not None and snap.running:
            mean_seqs = max(mean_seqs, float(snap.running))
        step = self.base_step(state)
        seqs = int(round(mean_seqs))
        churn = self.churn_seconds_per_seq(state, step, req.prefill_tokens, req.expected_output_tokens)
        return step.decode_step_seconds(seqs, int(mean_kv)) + churn * seqs

    def _record_unstreamed(self, state: BackendState, req: InflightRequest, now: float) -> None:
        """A non-streamed answer: no first token was seen, but its whole time over its tokens bounds its TPOT from
        above (it also holds its queueing and prefill). That is evidence only that the model is too slow: when even
        the bound is below what the calibrated model says for the batch the request decoded in, the correction moves
        down towards it; never up (the prefill and queue in it could hide any TPOT). Without this, traffic that
        never streams never calibrated TPOT: against an instant backend with no profile the generic profile's
        recent-prefill term predicted 154 ms a token, over the derived 100 ms objective, and 32-61% of requests
        were held for ~13 ms (bench/results/dataplane.md, fourth pass)."""
        elapsed_s = now - req.dispatched_at_s
        if req.output_tokens < 2 or elapsed_s <= 0 or state.gpu_siblings:
            return
        tpot_bound_s = elapsed_s / (req.output_tokens - 1)
        own_base = self._decode_step_base_s(state, req, now, req.seq_integral_at_dispatch,
                                            req.kv_integral_at_dispatch, elapsed_s)
        if own_base <= 0:
            return
        ratio = _clip(tpot_bound_s / own_base)
        if ratio < self.tpot_factor(state):
            state.tpot_correction.add(ratio)

    def record_overdue(self, state: BackendState, req: InflightRequest, now: float) -> None:
        """A request still without its first token long after it was predicted: the backend is slower than the
        model says by at least this much, now, although nothing has completed there to say so."""
        waited_s = now - req.dispatched_at_s
        state.observed_ttft_s.add(waited_s)  # a lower bound: it has not even started
        base = req.predicted_ttft_base_s
        if base is not None and base > 0:
            state.ttft_correction.add(_clip(waited_s / base))

    def idle_ttft_s(self, state: BackendState, prompt_tokens: int) -> float:
        """TTFT of a prompt on `state` with nothing else running there (calibrated): the least any wait adds to."""
        step = self.base_step(state)
        _, max_batched_tokens = self._limits(state.spec.profile)
        chunks = math.ceil(max(1, prompt_tokens) / max(1, max_batched_tokens))
        return (prompt_tokens * step.prefill_seconds_per_token + chunks * step.fixed_seconds) * self.ttft_factor(state)

    def predict(self, state: BackendState, demand: Demand, expected_output_tokens: int, now: float) -> Estimate:
        return self.estimate(state, demand, expected_output_tokens, now)

    def base_ttft(self, estimate: Estimate, state: BackendState) -> float:
        return self.base_ttft_s(estimate.ttft_s, state)

    def base_ttft_s(self, ttft_s: float, state: BackendState) -> float:
        """A TTFT predicted on `state` before its online correction."""
        k = self.ttft_factor(state)
        return ttft_s / k if k > 0 else ttft_s


def _churn(step: StepTimeModel, prompt_tokens: int, expected_output_tokens: int, n: int) -> float:
    """Per output token of each decoding sequence: the prefill of its successor, for `n` requests in all."""
    return step.prefill_seconds_per_token * (prompt_tokens / n) / max(MIN_CHURN_OUTPUT_TOKENS,
                                                                       expected_output_tokens / n)


def _clip(x: float) -> float:
    lo, hi = CORRECTION_BOUNDS
    return min(hi, max(lo, x))
