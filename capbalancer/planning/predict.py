"""What one instance delivers under a workload: its best steady-state batch and the throughput that follows.

At steady state a saturated continuous-batching engine decodes a batch of B sequences every step and,
amortized, prefills B x prompt/output prompt tokens per step (the requests that replace finished ones).
The batch is limited by seats (max_num_seqs), by KV memory (an average sequence holds prompt + output/2
tokens, in whole blocks), by the per-step token budget (max_num_batched_tokens), and under the goodput
objective by the SLO: the largest batch whose step still meets the TPOT target, and whose step with a
whole prompt in it meets the TTFT target. Output throughput = B / step(B), which grows with B, so the
largest allowed batch is the best one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from capbalancer.planning.cluster import Workload
from capbalancer.profiling.schema import Profile


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_seconds: float | None = None
    tpot_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class InstancePrediction:
    batch: int
    limit: str  # what capped the batch: max_num_seqs | kv | max_num_batched_tokens | slo_tpot | slo_ttft | none
    step_seconds: float
    tpot_seconds: float
    ttft_seconds: float
    output_tokens_per_second: float
    kv_capacity_tokens: int


def mean_footprint_tokens(profile: Profile, workload: Workload) -> int:
    tokens = workload.prompt_tokens + workload.output_tokens / 2
    return int(math.ceil(tokens / profile.block_size) * profile.block_size)


def steady_step_seconds(profile: Profile, workload: Workload, batch: int) -> float:
    prefill_per_step = batch * workload.prompt_tokens / workload.output_tokens
    context = batch * (workload.prompt_tokens + workload.output_tokens / 2)
    return profile.step.step_seconds(0, batch, 0) + profile.step.prefill_seconds_per_token * prefill_per_step \
        + profile.step.context_seconds_per_token * context


def ttft_seconds(profile: Profile, workload: Workload, batch: int) -> float:
    """A new request's first token: one step carrying its whole prompt beside the running batch."""
    return steady_step_seconds(profile, workload, batch) + profile.step.prefill_seconds_per_token \
        * workload.prompt_tokens


def _batch_caps(profile: Profile, workload: Workload) -> list[tuple[int, str]]:
    caps = [(profile.max_num_seqs, "max_num_seqs"),
            (profile.kv_capacity_tokens // mean_footprint_tokens(profile, workload), "kv")]
    tokens_per_seq_step = 1 + workload.prompt_tokens / workload.output_tokens
    caps.append((int(profile.max_num_batched_tokens // tokens_per_seq_step), "max_num_batched_tokens"))
    return caps


def _largest_batch_meeting(limit_s: float, cost, upper: int) -> int:
    """Largest b in [0, upper] with cost(b) <= limit_s, for cost increasing in b (binary search)."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= limit_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def predict_instance(profile: Profile, workload: Workload, slo: Slo | None = None) -> InstancePrediction:
    if workload.prompt_tokens + workload.output_tokens > profile.max_model_len:
        return InstancePrediction(0, "max_model_len", 0.0, 0.0, 0.0, 0.0, profile.kv_capacity_tokens)
    batch, limit = min(_batch_caps(profile, workload))
    if slo is not None and batch > 0:
        if slo.tpot_seconds is not None:
            b = _largest_batch_meeting(slo.tpot_seconds, lambda n: steady_step_seconds(profile, workload, n), batch)
            if b < batch:
                batch, limit = b, "slo_tpot"
        if slo.ttft_seconds is not None:
            b = _largest_batch_meeting(slo.ttft_seconds, lambda n: ttft_seconds(profile, workload, n), batch)
            if b < batch:
                batch, limit = b, "slo_ttft"
    if batch <= 0:
        return InstancePrediction(0, limit, 0.0, 0.0, 0.0, 0.0, profile.kv_capacity_tokens)
    step = steady_step_seconds(profile, workload, batch)
    return InstancePrediction(batch=batch, limit=limit, step_seconds=step, tpot_seconds=step,
                              ttft_seconds=ttft_seconds(profile, workload, batch),
                              output_tokens_per_second=batch / step,
                              kv_capacity_tokens=profile.kv_capacity_tokens)
