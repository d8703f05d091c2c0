"""Outlier ejection and the first-token timer, pure, on a virtual clock (sched/outlier.py, Scheduler)."""

import pytest

from capbalancer.profiling.schema import Profile, StepTimeModel
from capbalancer.sched.outlier import OutlierDetector, OutlierSettings
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Demand, Hold, PoolSettings, Reject, Route

POOL = ["a", "b", "c"]


def fail_n(det, backend, n, now, pool=POOL):
    return [det.on_failure(backend, now, pool, "500") for _ in range(n)]


def test_five_consecutive_failures_eject_and_a_success_resets_the_count():
    det = OutlierDetector(OutlierSettings())
    assert fail_n(det, "a", 4, 0.0) == [False] * 4
    det.on_success("a", 0.5)
    assert fail_n(det, "a", 4, 1.0) == [False] * 4  # the count started again
    assert det.on_failure("a", 1.0, POOL) is True
    assert det.ejected("a", 1.0) and det.ejected("a", 30.9)
    assert not det.ejected("a", 31.0)  # 30 s, then probation


def test_backoff_doubles_to_the_cap_and_probation_reejects_on_one_failure():
    det = OutlierDetector(OutlierSettings(base_ejection_s=30, max_ejection_s=100))
    fail_n(det, "a", 5, 0.0)
    assert det.blocks("a", 29.0, inflight=0)
    assert not det.blocks("a", 30.0, inflight=0)  # probation: one trial at a time
    assert det.blocks("a", 30.0, inflight=1)
    assert det.on_failure("a", 31.0, POOL) is True  # one failure on probation ejects again
    assert det.ejected("a", 31.0 + 59.9) and not det.ejected("a", 31.0 + 60.0)  # doubled
    assert det.on_failure("a", 91.5, POOL) is True
    assert det.ejected("a", 91.5 + 99.9) and not det.ejected("a", 91.5 + 100.0)  # capped at 100, not 120
    det.on_success("a", 192.0)  # the probation's trial succeeded: well again, backoff forgotten
    assert not det.blocks("a", 192.0, inflight=5)
    assert fail_n(det, "a", 4, 193.0) == [False] * 4  # needs five in a row again


def test_at_most_half_the_pool_is_ejected_and_a_pool_of_one_never():
    det = OutlierDetector(OutlierSettings())
    assert fail_n(det, "a", 5, 0.0)[-1] is True
    assert fail_n(det, "b", 10, 0.0) == [False] * 10  # floor(3 * 0.5) = 1 already out
    det1 = OutlierDetector(OutlierSettings())
    assert fail_n(det1, "solo", 20, 0.0, pool=["solo"]) == [False] * 20


def test_first_token_timeout_is_clamped():
    s = OutlierSettings()
    assert s.first_token_timeout_s(0.1) == 5.0
    assert s.first_token_timeout_s(2.0) == 10.0
    assert s.first_token_timeout_s(60.0) == 30.0
    assert s.first_token_timeout_s(None) == 5.0


def _sched(policy="capacity", n=3, profile=None, **outlier):
    sched = Scheduler([PoolSettings(name="m", policy=policy)], outlier=OutlierSettings(**outlier))
    for i in range(n):
        sched.add_backend(BackendSpec(backend_id=f"b{i}", pool="m", profile=profile), 0.0)
    return sched


def _demand(i, prompt=100, max_tokens=50, stream=True, arrival_s=0.0, **kw):
    return Demand(request_id=f"r{i}", pool="m", prompt_tokens=prompt, max_tokens=max_tokens, arrival_s=arrival_s,
                  stream=stream, **kw)


@pytest.mark.parametrize("policy", ["capacity", "round_robin", "least_requests", "least_kv", "random",
                                    "power_of_two", "weighted", "cache_aware", "llm_d"])
def test_5xx_only_backend_is_ejected_under_every_policy(policy):
    sched = _sched(policy)
    now, sent_to_b0, sent_to_b0_late = 0.0, 0, 0
    for i in range(300):
        now = i * 0.1
        d = sched.submit(_demand(i, arrival_s=now), now)
        assert isinstance(d, Route)
        if d.backend_id == "b0":
            sent_to_b0 += 1
            sent_to_b0_late += now >= 10.0
            sched.finish(f"r{i}", now + 0.01, ok=False, fault=True)  # a 500 at once
        else:
            sched.on_first_token(f"r{i}", now + 0.01)
            sched.finish(f"r{i}", now + 0.02, output_tokens=10, fault=False)
    # Ejected after five in a row (capacity may have stopped choosing it sooner: it never completes anything).
    assert sched.outlier.records["b0"].ejected_total >= 1 or sent_to_b0 < 5
    assert sent_to_b0_late <= 2  # at most a probation trial after its 30 s


def test_hung_backend_is_ejected_by_the_first_token_timer():
    sched = _sched("round_robin")  # the policy that keeps sending it the most
    now = 0.0
    for i in range(200):
        now = i * 0.1
        sched.check_first_tokens(now)
        d = sched.submit(_demand(i), now)
        if d.backend_id != "b0":  # b0 never answers; the others at once
            sched.on_first_token(f"r{i}", now + 0.01)
            sched.finish(f"r{i}", now + 0.02, output_tokens=10, fault=False)
    assert sched.backends["b0"].ttft_correction.count >= 5  # calibration saw it as slow
    assert sched.outlier.ejected("b0", now)
    assert sched.describe(now)["backends"]["b0"]["outlier"]["ejected"]
    # Its requests were counted once each: when the relay's own timeout ends them, no second failure.
    rec = sched.outlier.records["b0"]
    stuck = [r for r in list(sched.backends["b0"].inflight)]
    for rid in stuck:
        sched.finish(rid, now, ok=False, fault=True)
    assert rec.ejected_total == 1 and rec.consecutive_failures == 0


def test_first_token_timer_is_lenient_with_plain_responses_and_quiet_on_time():
    sched = _sched("round_robin", n=2)
    sched.submit(_demand(1, stream=False, max_tokens=2000), 0.0)  # a long answer, ~30 s predicted
    sched.submit(_demand(2, stream=True), 0.0)
    sched.on_first_token("r2", 1.0)
    sched.check_first_tokens(20.0)
    assert not sched.outlier.records  # a plain answer has until ~5× its e2e; the stream started in time
    assert sched.next_first_token_due_s() is not None
    sched.submit(_demand(3, stream=True), 20.0)
    sched.check_first_tokens(24.9)
    assert not sched.outlier.records
    sched.check_first_tokens(25.0)
    assert sum(r.consecutive_failures for r in sched.outlier.records.values()) == 1


def test_whole_pool_never_ejected_even_with_others_down():
    sched = _sched("round_robin", n=2)
    sched.report_failure("b1", 0.0, "refused")
    for i in range(10):
        sched.submit(_demand(i), 0.0)
        sched.finish(f"r{i}", 0.1, ok=False, fault=True)
    assert isinstance(sched.submit(_demand(99), 1.0), Route)  # b0 is still tried: nothing else is left


PROFILE = Profile(name="p", gpu="g", model="m", tp=1, engine="vllm", kv_capacity_tokens=8192,
                  step=StepTimeModel(0.01, 1e-5, 1e-4, 1e-8), max_model_len=4096)


def test_unservable_request_gets_400_at_once_even_behind_a_queue():
    sched = _sched("capacity", n=2, profile=PROFILE)
    too_long = sched.submit(_demand(1, prompt=4000, max_tokens=200), 0.0)
    assert isinstance(too_long, Reject) and too_long.status == 400 and too_long.code == "context_length_exceeded"
    assert isinstance(sched.submit(_demand(2, prompt=3800, max_tokens=200), 0.0), Route)  # fits exactly
    # An estimated prompt gets a margin; a default max_tokens counts as one token.
    assert not isinstance(sched.submit(_demand(3, prompt=4500, max_tokens=10, prompt_tokens_exact=False), 0.0),
                          Reject)
    assert not isinstance(sched.submit(_demand(4, prompt=4000, max_tokens=256, max_tokens_explicit=False), 0.0),
                          Reject)
    assert sched.submit(_demand(5, prompt=6000, max_tokens=10, prompt_tokens_exact=False), 0.0).status == 400


def test_unknown_limits_never_refuse():
    sched = _sched("capacity", n=2, profile=None)
    assert not isinstance(sched.submit(_demand(1, prompt=10**6, max_tokens=10), 0.0), Reject)
    assert isinstance(Hold("x", 0), Hold)
