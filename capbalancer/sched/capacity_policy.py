"""`capacity`: send each request where it will be served best, or hold it until some backend has room.

For every routable backend the capacity model predicts what the request would see there (TTFT, TPOT,
end-to-end time) and whether the backend can take it without queueing behind its own batch or running
out of KV blocks. Among those that can, the lowest predicted end-to-end time wins: a fast GPU takes work
until its growing batch makes it as slow as the next one, which evens out predicted work rate rather
than request counts. When none can, the request is held at the proxy (late binding) and dispatched the
moment a completion or a fresher snapshot frees room.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from capbalancer.sched.admission import derived_objective_s
from capbalancer.sched.backend import BackendState
from capbalancer.sched.capacity import CapacityModel, CapacitySettings, Latency
from capbalancer.sched.fairness import DEFAULT_MARGIN, FairShare
from capbalancer.sched.policies import PolicyContext, register
from capbalancer.sched.prefix_wait import should_wait
from capbalancer.sched.types import Demand

OPTION_NAMES = ("kv_growth_reserve", "kv_high_watermark", "knee_throughput_fraction", "tpot_slo_ms",
                "ttft_slo_ms", "ttft_weight", "calibrate", "hold", "ttft_objective_factor", "ttft_objective_floor_ms",
                "tpot_objective_factor", "tpot_objective_floor_ms", "judge_net_negative",
                "tpot_slo_margin", "fair_shedding", "fair_shedding_margin", "prefix_tie_fraction",
                "adapt_kv_reserve", "overload_idle_fraction")


def settings_from_options(options: dict[str, float]) -> tuple[CapacitySettings, bool]:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown capacity option(s) {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}")
    defaults = CapacitySettings()
    tpot_slo_ms = options.get("tpot_slo_ms")
    ttft_slo_ms = options.get("ttft_slo_ms")
    settings = CapacitySettings(
        kv_growth_reserve=float(options.get("kv_growth_reserve", defaults.kv_growth_reserve)),
        kv_high_watermark=float(options.get("kv_high_watermark", defaults.kv_high_watermark)),
        knee_throughput_fraction=float(options.get("knee_throughput_fraction", defaults.knee_throughput_fraction)),
        tpot_slo_s=None if tpot_slo_ms is None else float(tpot_slo_ms) / 1000.0,
        ttft_slo_s=None if ttft_slo_ms is None else float(ttft_slo_ms) / 1000.0,
        ttft_weight=float(options.get("ttft_weight", defaults.ttft_weight)),
        calibrate=bool(options.get("calibrate", 1)),
        ttft_objective_factor=float(options.get("ttft_objective_factor", defaults.ttft_objective_factor)),
        ttft_objective_floor_s=float(options.get("ttft_objective_floor_ms",
                                                 defaults.ttft_objective_floor_s * 1000.0)) / 1000.0,
        overload_idle_fraction=float(options.get("overload_idle_fraction", defaults.overload_idle_fraction)),
        tpot_objective_factor=float(options.get("tpot_objective_factor", defaults.tpot_objective_factor)),
        tpot_objective_floor_s=float(options.get("tpot_objective_floor_ms",
                                                 defaults.tpot_objective_floor_s * 1000.0)) / 1000.0,
        judge_net_negative=bool(options.get("judge_net_negative", 1)),
        tpot_slo_margin=float(options.get("tpot_slo_margin", defaults.tpot_slo_margin)),
        prefix_tie_fraction=float(options.get("prefix_tie_fraction", defaults.prefix_tie_fraction)),
        # Learned per backend unless the user fixed the share (sched/kv_reserve.py).
        adapt_kv_reserve=bool(options.get("adapt_kv_reserve", "kv_growth_reserve" not in options)),
    )
    return settings, bool(options.get("hold", 1))


class CapacityPolicy:
    name = "capacity"

    def __init__(self, settings: CapacitySettings, hold: bool = True, fair: FairShare | None = None) -> None:
        self.settings = settings
        self.hold = hold
        # Under overload, every prompt-size class loses the same share (sched/fairness.py); None: shed by cost.
        self.fair = fair
        self._model: CapacityModel | None = None
        self._turn = 0
        # The scheduler's model last seen, and whether ours predicts as it does (same settings, health, prefix
        # index): then the chosen backend's prediction is handed over (`PolicyContext.prediction`).
        self._capacity: CapacityModel | None = None
        self._same_as_capacity = False

    def _model_for(self, ctx: PolicyContext) -> CapacityModel:
        if self._model is None or self._model.health is not ctx.health:
            self._model = CapacityModel(ctx.health, self.settings)
            self._capacity = None
        self._model.prefix = ctx.prefix
        if ctx.capacity is not self._capacity:
            self._capacity = ctx.capacity
            self._same_as_capacity = (ctx.capacity is not None and ctx.capacity.settings == self.settings
                                      and ctx.capacity.health is ctx.health)
        return self._model

    def choose(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> BackendState | None:
        if not candidates:
            return None
        model = self._model_for(ctx)
        n = len(candidates)
        self._turn += 1
        best: BackendState | None = None
        best_score = float("inf")
        fallback: BackendState | None = None
        fallback_score = float("inf")
        # Start the scan at a rotating offset so exact ties (identical idle backends) take turns.
        deadline = demand.deadline_s
        prompt, expected, now = demand.prompt_tokens, ctx.expected_output_tokens, ctx.now
        offset = self._turn
        # Prefix cache: each backend is scored with the prompt tokens it probably holds already, so a holder
        # wins by its shorter prefill and smaller KV need, and loses when it is slow, busy or full anyway.
        index = ctx.prefix
        hashes = demand.prefix.hashes
        if index is None or not (hashes or demand.session_id is not None):
            index = None
        held: list[tuple[int, int]] | None = None
        best_j = -1
        roomless: list[int] = []  # candidates with no room now (only counted when prefixes are known)
        scored: list[tuple[int, float]] = []
        if index is not None:
            held = [index.expected_cached_tokens(b.backend_id, hashes, demand.prefix.block_tokens, prompt,
                                                 demand.session_id) for b in candidates]
            # Only where some backend holds part of the prompt does recomputing it elsewhere cost anything extra.
            recompute = any(c for c, _ in held)
        best_latency = model.last_latency
        latencies: dict[int, Latency] = {}  # by candidate, where near-ties may move the choice
        for i in range(n):
            j = (offset + i) % n
            b = candidates[j]
            # None: no room, or the first token would come only after the deadline.
            if held is None:
                score = model.score(b, prompt, expected, now, deadline)
            else:
                cached, shared = held[j]
                score = model.score(b, prompt, expected, now, deadline, cached, shared, recompute)
                if score is None:
                    roomless.append(j)
                else:
                    scored.append((j, score))
                    latencies[j] = model.last_latency
            if score is not None and score < best_score:
                best, best_score, best_j = b, score, j
                best_latency = model.last_latency
        if best is not None and held is not None and len(scored) > 1:
            # Near-ties go to where the prefix is, else to the session's last backend: predictions closer than
            # `prefix_tie_fraction` are within calibration noise, and moving a conversation for no predicted gain
            # only spreads its cache over two backends (the rotation of exact ties is for new work).
            limit = best_score * (1.0 + self.settings.prefix_tie_fraction)
            session_backend = index.session_backend(demand.session_id) if index is not None else None
            near = [(j, sc) for j, sc in scored if sc <= limit]
            if len(near) > 1:
                j, sc = max(near, key=lambda x: (held[x[0]][0], candidates[x[0]].backend_id == session_backend,
                                                  -x[1]))
                best, best_score, best_j = candidates[j], sc, j
                best_latency = latencies[j]
        if best is not None and ctx.wait_for_prefix and held is not None and roomless:
            # A held request being released: the backend holding most of its prefix may be worth waiting for.
            hj = max(roomless, key=lambda j: held[j][0])
            if held[hj][0] > held[best_j][0] and should_wait(model, candidates[hj], best, best_score, demand,
                                                             expected, now):
                ctx.waiting_for = candidates[hj].backend_id
                return None
        if best is None and not self.hold:
            for b in candidates:
                est = model.estimate(b, demand, expected, now)
                if est.e2e_s < fallback_score:
                    fallback, fallback_score = b, est.e2e_s
        if best is not None and self._same_as_capacity and ctx.capacity.prefix is ctx.prefix:
            cached, shared = held[best_j] if held is not None else (0, 0)
            ctx.prediction = (best, best_latency, cached, shared)
        return best if best is not None else fallback

    def unservable(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> bool:
        """True when no backend could produce its first token before the deadline, even with a seat now."""
        if demand.deadline_s is None or not candidates:
            return False
        return self.loaded_ttft_s(demand, candidates, ctx) > demand.deadline_s - ctx.now

    def loaded_ttft_s(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> float:
        """The least TTFT any candidate predicts for `demand` as loaded now (its batch, its prefill backlog)."""
        model = self._model_for(ctx)
        return min(model.estimate(b, demand, ctx.expected_output_tokens, ctx.now).ttft_s for b in candidates)

    def ttft_deadline_s(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext,
                        idle_s: float | None = None) -> float | None:
        """When `demand`'s first token is due by its TTFT objective, counted from its arrival (time held
        counts): the user's `ttft_slo_ms`, else the derived default; None when neither applies. `idle_s`:
        `idle_ttft_s` for these candidates when the caller has it already."""
        s = self.settings
        if s.ttft_slo_s is not None:
            return demand.arrival_s + s.ttft_slo_s
        if s.ttft_objective_factor <= 0 or not candidates or demand.api == "embeddings":
            return None
        if idle_s is None:
            idle_s = self.idle_ttft_s(demand, candidates, ctx)
        objective = derived_objective_s(idle_s, s.ttft_objective_factor, s.ttft_objective_floor_s)
        return None if objective is None else demand.arrival_s + objective

    def idle_ttft_s(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> float:
        """The least TTFT any candidate could give `demand`: what must be left of its objective to start it."""
        model = self._model_for(ctx)
        return min(model.idle_ttft_s(b, demand.prompt_tokens) for b in candidates)


def _make(options: dict[str, float], rng: random.Random) -> CapacityPolicy:
    settings, hold = settings_from_options(options)
    return CapacityPolicy(settings, hold, fair_share_from_options(options))


def fair_share_from_options(options: dict[str, float]) -> FairShare | None:
    """`fair_shedding` 1 (default): equal service across prompt sizes under overload; 0: cost-weighted."""
    if not float(options.get("fair_shedding", 1)):
        return None
    return FairShare(margin=float(options.get("fair_shedding_margin", DEFAULT_MARGIN)))


register("capacity")(_make)
