"""What the scheduler knows about one backend: health, last snapshot, and its own record of requests.

The proxy-side record is what keeps the view from going stale between polls (DESIGN invariant 3): the
view is the last snapshot, plus what was sent since, minus what finished since.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from capbalancer.fleet.snapshot import EngineSnapshot
from capbalancer.sched.interference import InterferenceEstimate
from capbalancer.sched.kv_reserve import KvReserveScale
from capbalancer.sched.prefill_rate import PrefillRate
from capbalancer.sched.types import BackendSpec, HealthSettings


class Health(str, Enum):
    UP = "up"
    DOWN = "down"


@dataclass(slots=True)
class InflightRequest:
    request_id: str
    backend_id: str
    prompt_tokens: int
    max_tokens: int
    expected_output_tokens: int  # what the scheduler expects it to generate (<= max_tokens)
    dispatched_at_s: float
    first_token_at_s: float | None = None
    output_tokens: int = 0
    # The KV tokens this request had when the backend's last snapshot was taken, frozen lazily on its
    # first progress after that snapshot (`kv_snapshot_epoch` says which snapshot the value belongs to).
    kv_snapshot_tokens: int = 0
    kv_snapshot_epoch: int = -1
    # What the policy predicted at dispatch (for online calibration and /admin/backends).
    predicted_ttft_s: float | None = None
    predicted_tpot_s: float | None = None
    predicted_ttft_base_s: float | None = None  # the same prediction before online correction
    # The backend's load integrals when this request was dispatched and when it produced its first token.
    seq_integral_at_dispatch: float = 0.0
    kv_integral_at_dispatch: float = 0.0
    seq_integral_at_first_token: float = 0.0
    kv_integral_at_first_token: float = 0.0
    # Prefix cache (sched/prefix_index.py): prompt tokens expected cached there (no prefill), and of those,
    # held by other requests running there (no new KV either). Fixed at dispatch.
    cached_prompt_tokens: int = 0
    shared_kv_tokens: int = 0
    overdue: bool = False  # its first token did not come in time (Scheduler.check_first_tokens): counted once
    shared_integral_at_first_token: float = 0.0  # its backend's siblings' step integral then (interference)

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens - self.shared_kv_tokens + self.output_tokens

    @property
    def kv_tokens_reserved(self) -> int:
        """KV tokens it will hold at the end if it generates what we expect (never less than now)."""
        return self.prompt_tokens - self.shared_kv_tokens + max(self.output_tokens, self.expected_output_tokens)

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the engine must compute (the rest is a prefix-cache hit)."""
        return self.prompt_tokens - self.cached_prompt_tokens


@dataclass(slots=True)
class Ewma:
    """Exponentially weighted mean that knows whether it has seen anything yet."""

    alpha: float = 0.2
    value: float | None = None
    count: int = 0

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        self.count += 1


@dataclass(slots=True)
class BackendState:
    spec: BackendSpec
    health: Health = Health.UP  # assumed up until polls or the relay say otherwise
    draining: bool = False
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_failure_reason: str = ""
    snapshot: EngineSnapshot | None = None
    snapshot_epoch: int = 0  # counts snapshots taken
    inflight: dict[str, InflightRequest] = field(default_factory=dict)  # in dispatch order
    # Running sums over `inflight`, kept incrementally so a policy reads a backend's load in O(1)
    # (the discrete-event runner asks about 100 backends per request).
    own_kv_tokens: int = 0  # prompt + generated so far
    own_reserved_kv_tokens: int = 0  # prompt + max(generated, expected output)
    own_pending_prefill_tokens: int = 0  # prompts of requests that have not produced a first token
    own_prompt_tokens: int = 0  # prompt tokens to compute (uncached) of our requests in flight: they size the churn
    own_expected_output_tokens: int = 0  # what our requests in flight are expected to generate, in all
    own_kv_at_snapshot: int = 0  # the part of own_kv_tokens the last snapshot already counted
    own_sent_since_snapshot: int = 0  # requests dispatched after the last snapshot was taken
    # KV tokens counted by the last snapshot for requests that have finished since; subtracted from it.
    kv_released_since_snapshot: int = 0
    requests_finished_since_snapshot: int = 0
    # Time integrals of our own load, for calibration: the mean batch a request saw while decoding.
    load_integral_seq_s: float = 0.0
    load_integral_kv_s: float = 0.0
    load_integral_at_s: float = 0.0
    # Observed and predicted costs, for online calibration and /admin/backends (seconds).
    observed_ttft_s: Ewma = field(default_factory=Ewma)
    observed_tpot_s: Ewma = field(default_factory=Ewma)
    predicted_ttft_s: Ewma = field(default_factory=Ewma)
    predicted_tpot_s: Ewma = field(default_factory=Ewma)
    ttft_correction: Ewma = field(default_factory=lambda: Ewma(alpha=0.1))  # observed / predicted
    tpot_correction: Ewma = field(default_factory=lambda: Ewma(alpha=0.1))
    completed: int = 0
    failed: int = 0
    # Other proxy replicas' reservations here, summed over the fresh ones (sched/remote.py keeps them):
    # zero without sharing. The `_at_snapshot` pair is what they were when the last snapshot was taken, so
    # only their change since then moves the snapshot's figures, as our own accounting does.
    remote_requests: int = 0
    remote_kv_tokens: int = 0
    remote_reserved_kv_tokens: int = 0
    remote_pending_prefill_tokens: int = 0
    remote_prompt_tokens: int = 0
    remote_expected_output_tokens: int = 0
    remote_requests_at_snapshot: int = 0
    remote_kv_at_snapshot: int = 0
    # The other backends of this one's gpu_group (kept by the Scheduler): their steps share its GPU.
    gpu_siblings: list[BackendState] = field(default_factory=list, repr=False, compare=False)
    # How much the busy siblings' steps slow this one, learned from its TPOTs (sched/interference.py).
    interference: InterferenceEstimate = field(default_factory=InterferenceEstimate, repr=False)
    # The share of remaining KV growth to keep free here, scaled by its engine's preemptions (sched/kv_reserve.py).
    kv_reserve: KvReserveScale = field(default_factory=KvReserveScale, repr=False)
    # Prompt tokens sent here lately, per second (sched/prefill_rate.py): a growing batch's prefill load.
    recent_prefill: PrefillRate = field(default_factory=PrefillRate, repr=False)

    @property
    def backend_id(self) -> str:
        return self.spec.backend_id

    def routable(self) -> bool:
        return self.health is Health.UP and not self.draining

    def snapshot_is_fresh(self, now: float, settings: HealthSettings) -> bool:
        return self.snapshot is not None and now - self.snapshot.taken_at_s <= settings.stale_after_s

    def fresh_snapshot(self, now: float, settings: HealthSettings) -> EngineSnapshot | None:
        return self.snapshot if self.snapshot_is_fresh(now, settings) else None

    # --- accounting -----------------------------------------------------------------------------
    def _advance_integrals(self, now: float) -> None:
        dt = now - self.load_integral_at_s
        if dt > 0:
            self.load_integral_seq_s += dt * len(self.inflight)
            self.load_integral_kv_s += dt * self.own_kv_tokens
            self.load_integral_at_s = now

    def add_inflight(self, req: InflightRequest) -> None:
        self._advance_integrals(req.dispatched_at_s)
        req.seq_integral_at_dispatch = self.load_integral_seq_s
        req.kv_integral_at_dispatch = self.load_integral_kv_s
        self.inflight[req.request_id] = req
        self.own_kv_tokens += req.kv_tokens
        self.own_reserved_kv_tokens += req.kv_tokens_reserved
        self.own_prompt_tokens += req.prefill_tokens
        self.own_expected_output_tokens += req.expected_output_tokens
        if req.first_token_at_s is None:
            self.own_pending_prefill_tokens += req.prefill_tokens
        self.own_sent_since_snapshot += 1
        self.recent_prefill.add(req.prefill_tokens, req.dispatched_at_s)

    def _sent_after_snapshot(self, req: InflightRequest) -> bool:
        return self.snapshot is None or req.dispatched_at_s > self.snapshot.taken_at_s

    def kv_at_snapshot(self, req: InflightRequest) -> int | None:
        """The KV tokens of `req` that the last snapshot counted; None if it was sent after it."""
        if self._sent_after_snapshot(req):
            return None
        return req.kv_snapshot_tokens if req.kv_snapshot_epoch == self.snapshot_epoch else req.kv_tokens

    def set_progress(self, req: InflightRequest, output_tokens: int, now: float, mark_first_token: bool = True) -> None:
        """Move a request's generated-token count (never backwards) and mark its first token (unless told not to:
        a non-streamed answer's tokens are counted when it ends, which is not when its first token came)."""
        self._advance_integrals(now)
        if (output_tokens > req.output_tokens and req.kv_snapshot_epoch != self.snapshot_epoch
                and not self._sent_after_snapshot(req)):
            # First change since the snapshot: remember what the snapshot saw of this request.
            req.kv_snapshot_tokens = req.kv_tokens
            req.kv_snapshot_epoch = self.snapshot_epoch
        if req.first_token_at_s is None and output_tokens > 0 and mark_first_token:
            req.first_token_at_s = now
            req.seq_integral_at_first_token = self.load_integral_seq_s
            req.kv_integral_at_first_token = self.load_integral_kv_s
            req.shared_integral_at_first_token = self.interference.integral_at(now)
            self.own_pending_prefill_tokens -= req.prefill_tokens
        if output_tokens <= req.output_tokens:
            return
        before_kv, before_reserved = req.kv_tokens, req.kv_tokens_reserved
        req.output_tokens = output_tokens
        self.own_kv_tokens += req.kv_tokens - before_kv
        self.own_reserved_kv_tokens += req.kv_tokens_reserved - before_reserved

    def remove_inflight(self, request_id: str, now: float) -> InflightRequest | None:
        req = self.inflight.get(request_id)
        if req is None:
            return None
        self._advance_integrals(now)
        del self.inflight[request_id]
        self.own_kv_tokens -= req.kv_tokens
        self.own_reserved_kv_tokens -= req.kv_tokens_reserved
        self.own_prompt_tokens -= req.prefill_tokens
        self.own_expected_output_tokens -= req.expected_output_tokens
        if req.first_token_at_s is None:
            self.own_pending_prefill_tokens -= req.prefill_tokens
        at_snapshot = self.kv_at_snapshot(req)
        if at_snapshot is not None:
            self.own_kv_at_snapshot -= at_snapshot
            self.kv_released_since_snapshot += at_snapshot
            self.requests_finished_since_snapshot += 1
        else:
            self.own_sent_since_snapshot -= 1
        return req

    def take_snapshot(self, snapshot: EngineSnapshot) -> None:
        """A new snapshot counts every request dispatched before it was taken, at its size then.

        Only the requests sent after the scrape (the newest few, at the end of the dispatch-ordered
        dict) are visited: the rest are counted in bulk, so a poll costs O(recent), not O(in flight).
        """
        self.snapshot = snapshot
        self.snapshot_epoch += 1
        self.kv_released_since_snapshot = 0
        self.requests_finished_since_snapshot = 0
        sent_after = 0
        kv_after = 0
        for req in reversed(self.inflight.values()):
            if req.dispatched_at_s <= snapshot.taken_at_s:
                break
            sent_after += 1
            kv_after += req.kv_tokens
        self.own_sent_since_snapshot = sent_after
        self.own_kv_at_snapshot = self.own_kv_tokens - kv_after
        self.remote_requests_at_snapshot = self.remote_requests
        self.remote_kv_at_snapshot = self.remote_kv_tokens

    # --- the view between polls ---------------------------------------------------------------
    def requests_estimate(self, now: float, settings: HealthSettings) -> int:
        """Requests on the engine (running + waiting): snapshot, plus sent since, minus finished since."""
        own = len(self.inflight) + self.remote_requests
        snap = self.fresh_snapshot(now, settings)
        if snap is None or snap.running is None:
            return own
        at_snapshot = snap.running + (snap.waiting or 0)
        remote_since = self.remote_requests - self.remote_requests_at_snapshot
        return max(own, at_snapshot + self.own_sent_since_snapshot - self.requests_finished_since_snapshot
                   + remote_since)

    def kv_used_estimate(self, now: float, settings: HealthSettings) -> int:
        """KV tokens in use now: the snapshot's figure moved by what we sent, grew and freed since."""
        own = self.own_kv_tokens
        snap = self.fresh_snapshot(now, settings)
        used = snap.kv_used_tokens if snap is not None else None
        if used is None:
            return own + self.remote_kv_tokens
        growth = own - self.own_kv_at_snapshot + self.remote_kv_tokens - self.remote_kv_at_snapshot
        return max(own + self.remote_kv_tokens, used + growth - self.kv_released_since_snapshot)

    def load_view(self, now: float, settings: HealthSettings) -> tuple[int, int]:
        """(requests_estimate, kv_used_estimate) with one freshness check: the policies' hot path."""
        # Other replicas' requests count as ours do (zero without sharing).
        own_n = len(self.inflight) + self.remote_requests
        own_kv = self.own_kv_tokens + self.remote_kv_tokens
        snap = self.snapshot
        if snap is None or now - snap.taken_at_s > settings.stale_after_s:
            return own_n, own_kv
        seqs = own_n
        if snap.running is not None:
            at_snapshot = snap.running + (snap.waiting or 0)
            seqs = (at_snapshot + self.own_sent_since_snapshot - self.requests_finished_since_snapshot
                    + self.remote_requests - self.remote_requests_at_snapshot)
            if seqs < own_n:
                seqs = own_n
        kv = own_kv
        if snap.kv_usage_fraction is not None and snap.kv_capacity_tokens is not None:
            used = int(round(snap.kv_usage_fraction * snap.kv_capacity_tokens))
            kv = (used + self.own_kv_tokens - self.own_kv_at_snapshot - self.kv_released_since_snapshot
                  + self.remote_kv_tokens - self.remote_kv_at_snapshot)
            if kv < own_kv:
                kv = own_kv
        return seqs, kv

    def kv_external_tokens(self, now: float, settings: HealthSettings) -> int:
        """KV the engine holds that is not ours (other clients, other proxies): never negative."""
        return max(0, self.kv_used_estimate(now, settings) - self.own_kv_tokens)

    # --- fleet-wide sums (this proxy's record plus the other replicas') ---------------------------
    @property
    def fleet_requests(self) -> int:
        return len(self.inflight) + self.remote_requests

    @property
    def fleet_kv_growth_tokens(self) -> int:
        """KV our requests (all replicas') are still expected to add."""
        g = (self.own_reserved_kv_tokens - self.own_kv_tokens
             + self.remote_reserved_kv_tokens - self.remote_kv_tokens)
        return g if g > 0 else 0

    def max_request_tokens(self) -> int | None:
        """The longest request (prompt + max_tokens) this backend can ever take: its max model length, and
        never more than its whole KV cache. None: unknown (no profile, no snapshot), so never refused."""
        limits = []
        if self.spec.profile is not None:
            limits.append(self.spec.profile.max_model_len)
        kv = self.kv_capacity_tokens()
        if kv is not None:
            limits.append(kv)
        return min(limits) if limits else None

    def kv_capacity_tokens(self) -> int | None:
        snap = self.snapshot
        if snap is not None and snap.kv_capacity_tokens:
            return snap.kv_capacity_tokens
        if self.spec.profile is not None:
            return self.spec.profile.kv_capacity_tokens
        return None
