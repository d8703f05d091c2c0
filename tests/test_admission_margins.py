"""Two corrections to `capacity`'s predictions under load (issue 15 §3-4), on the pure capacity model:

* a backend sent prompts faster than its sequences finish (a step in load) decodes slower than the steady-state
  churn says: its recent prefill rate raises the predicted TPOT, so admission stops before every request there
  misses the TPOT objective;
* a request is dispatched only if its predicted first token, with a margin (1.1 x + 30 ms), meets its deadline:
  held requests released at the last moment came in 10-90 ms late.
"""

from __future__ import annotations

from capbalancer.profiling.schema import Profile, StepTimeModel
from capbalancer.sched.backend import BackendState, InflightRequest
from capbalancer.sched.capacity import CapacityModel, CapacitySettings
from capbalancer.sched.prefill_rate import WINDOW_S, PrefillRate
from capbalancer.sched.types import BackendSpec, Demand, HealthSettings

STEP = StepTimeModel(fixed_seconds=0.01, prefill_seconds_per_token=5e-5, decode_seconds_per_seq=1e-4,
                     context_seconds_per_token=0.0)
PROFILE = Profile(name="p", gpu="g", model="m", tp=1, engine="vllm", kv_capacity_tokens=10_000_000, step=STEP,
                  max_num_seqs=512, max_num_batched_tokens=8192)


def test_prefill_rate_reads_a_steady_stream_and_decays():
    r = PrefillRate()
    for i in range(400):  # 1,000 tokens every 0.1 s: 10,000 tokens/s
        r.add(1000, i * 0.1)
    assert 9000 < r.per_s(39.9) < 11000
    assert r.per_s(39.9 + 5 * WINDOW_S) < 100  # quiet since


def loaded(sent_within_s: float, n: int = 50) -> BackendState:
    """`n` requests of 3,000-token prompts sent over `sent_within_s` seconds before t = 10."""
    state = BackendState(BackendSpec(backend_id="b", pool="m", engine="vllm", profile=PROFILE))
    for i in range(n):
        t = 10.0 - sent_within_s + sent_within_s * i / n
        req = InflightRequest(request_id=f"r{i}", backend_id="b", prompt_tokens=3000, max_tokens=200,
                              expected_output_tokens=200, dispatched_at_s=t)
        state.add_inflight(req)
        state.set_progress(req, 100, t)  # decoding already: no prefill backlog ahead of the newcomer
    return state


def test_a_burst_of_prompts_raises_the_predicted_tpot():
    model = CapacityModel(HealthSettings(), CapacitySettings())
    d = Demand(request_id="new", pool="m", prompt_tokens=3000, max_tokens=200, arrival_s=10.0)
    slow_fill = model.estimate(loaded(600.0), d, 200, 10.0).tpot_s  # 50 requests over 10 minutes
    burst = model.estimate(loaded(1.0), d, 200, 10.0).tpot_s  # the same 50 within the last second
    # 150,000 tokens in 1 s at 50 us each: 7.5 s of prefill, and every decode step waits for its share.
    assert burst > 1.5 * slow_fill, (burst, slow_fill)


def test_dispatch_keeps_a_margin_before_the_deadline():
    model = CapacityModel(HealthSettings(), CapacitySettings())
    state = BackendState(BackendSpec(backend_id="b", pool="m", engine="vllm", profile=PROFILE))
    d = Demand(request_id="new", pool="m", prompt_tokens=2000, max_tokens=200, arrival_s=0.0)
    ttft = model.estimate(state, d, 200, 0.0).ttft_s
    assert model.score(state, 2000, 200, 0.0, deadline_s=1.1 * ttft + 0.031) is not None
    assert model.score(state, 2000, 200, 0.0, deadline_s=ttft + 0.001) is None  # would come in just late
