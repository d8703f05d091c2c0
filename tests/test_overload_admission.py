"""Admission under sustained overload (issue 14, targets 2-3): the hold queue stays as short as keeps the backends
busy, so the excess is refused at arrival instead of held up to its TTFT objective and refused then.

The rule (sched/admission.py): an M/M/1/K bound on the queue from the measured ratio of requests offered to the
queue per request released, in lumps of the measured release bulk; and a held request must be able to leave the
queue in time for its TTFT as the backends are loaded now. Pure checks on the scheduler, a DES check of what
happens at 10x and 2x (goodput kept), and one live check with real processes and the default policy.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import yaml
from faults import ADMIN_TOKEN_ENV, FaultBackend, Proxy, proxy_config
from support import REPO

from capbalancer.profiling.library import resolve_profile
from capbalancer.profiling.schema import Profile, StepTimeModel
from capbalancer.sched.admission import (
    EARLY_MIN_RELEASES,
    EMPTY_GRACE_S,
    FORECAST_MIN_OUTPUTS,
    STANDING_MIN_S,
    BackendForecast,
    DrainRate,
    OverloadRatio,
    SeatForecast,
    standing_queue_limit,
)
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Demand, Dispatch, Expire, Hold, PoolSettings, Reject, Route
from capbalancer.sim.des import DesInstance, DesOptions, run_des

T0 = 5000.0


def seats_profile(seats: int) -> Profile:
    return Profile(name=f"seats{seats}", gpu="test", model="m", tp=1, engine="vllm", kv_capacity_tokens=100_000,
                   step=StepTimeModel(fixed_seconds=0.01, prefill_seconds_per_token=1e-4,
                                      decode_seconds_per_seq=2e-4, context_seconds_per_token=1e-7),
                   max_num_seqs=seats, max_num_batched_tokens=2048)


def test_the_bound_follows_the_overload_ratio():
    f = 1e-4
    assert standing_queue_limit(10.0, f) == 4  # 10x: a few requests keep the seats busy
    assert standing_queue_limit(2.0, f) == 13
    assert standing_queue_limit(1.2, f) == 41  # near capacity a queue is what turns bursts into throughput
    assert standing_queue_limit(1.0, f) == 9999
    assert standing_queue_limit(0.5, f) is None  # the queue empties on its own: nothing to bound
    assert standing_queue_limit(10.0, 0.0) is None  # off
    assert standing_queue_limit(None, f) is None  # not measured
    # The M/M/1/K idle probability at the bound is within the fraction, one shorter is not.
    for r in (1.2, 2.0, 10.0):
        k = standing_queue_limit(r, f)
        assert (r - 1) / (r ** (k + 1) - 1) <= f < (r - 1) / (r ** k - 1)


def test_ratio_is_of_decayed_counts_and_survives_waves():
    ratio = OverloadRatio()
    now = T0
    assert ratio.current(now) is None
    # 1 s of a 10x overload: 10 offered per release, releases one at a time.
    for i in range(100):
        now = T0 + i * 0.01
        for _ in range(10):
            ratio.on_offered(now)
        ratio.on_released(1, now)
    assert 9.0 < (ratio.current(now) or 0) < 11.0
    assert ratio.bulk == 1.0
    # A lull between two waves of retries: releases go on, nobody new comes for 0.3 s. A per-window ratio read
    # ~0 here and dropped the bound; the decayed one stays high.
    for i in range(30):
        ratio.on_released(1, now + 0.01 * (i + 1))
    now += 0.3
    assert (ratio.current(now) or 0) > 5.0
    # Lumps of 4: the queue must hold whole lumps.
    lumpy = OverloadRatio()
    for i in range(40):
        for _ in range(8):
            lumpy.on_offered(T0 + i * 0.05)
        lumpy.on_released(4, T0 + i * 0.05)
    assert lumpy.bulk == 4.0
    assert lumpy.hold_limit(T0 + 2.0, 1e-4) == 4 * standing_queue_limit(lumpy.current(T0 + 2.0), 1e-4)


def _sustained(sched: Scheduler, seconds: float, arrivals_per_s: float, service_s: float) -> dict[str, int]:
    """One backend of 2 seats, each request served `service_s`; arrivals at a fixed rate. Returns counts."""
    out = {"route": 0, "hold": 0, "reject": 0, "expired": 0, "released": 0, "max_held": 0}
    ends: list[tuple[float, str]] = []
    n = int(seconds * arrivals_per_s)

    def late(ev: Expire) -> bool:  # held after the first 3 s (before: the queue built with no ratio yet)
        return int(ev.request_id[1:]) >= 3.0 * arrivals_per_s
    for i in range(n):
        now = T0 + i / arrivals_per_s
        while ends and ends[0][0] <= now:
            t, rid = ends.pop(0)
            for ev in sched.finish(rid, t, output_tokens=10) + sched.tick(t):
                if isinstance(ev, Dispatch):
                    out["released"] += 1
                    ends.append((t + service_s, ev.request_id))
                elif isinstance(ev, Expire) and late(ev):
                    out["expired"] += 1
            ends.sort()
        for ev in sched.tick(now):
            out["expired"] += isinstance(ev, Expire) and late(ev)
        d = sched.submit(Demand(request_id=f"r{i}", pool="m", prompt_tokens=100, max_tokens=100, arrival_s=now),
                         now)
        if isinstance(d, Route):
            out["route"] += 1
            ends.append((now + service_s, f"r{i}"))
            ends.sort()
        elif isinstance(d, Hold):
            out["hold"] += 1
        else:
            assert isinstance(d, Reject) and d.status == 429, d
            out["reject"] += 1
        if now >= T0 + 3.0:  # the queue built before the first releases (no ratio yet) has drained by then
            out["max_held"] = max(out["max_held"], len(sched.pools["m"].hold))
    return out


def make(**options) -> Scheduler:
    sched = Scheduler([PoolSettings(name="m", policy="capacity", policy_options=options)])
    sched.add_backend(BackendSpec(backend_id="b", pool="m", engine="vllm", profile=seats_profile(2)), T0)
    return sched


def test_sustained_overload_is_refused_at_arrival_not_held_then_refused():
    # 2 seats of 0.1 s: 20 req/s served; 200 req/s arrive (10x) for 20 s.
    bounded = _sustained(make(), 20.0, 200.0, 0.1)
    unbounded = _sustained(make(overload_idle_fraction=0), 20.0, 200.0, 0.1)
    # The queue stays a few requests long (4 at 10x), not the ~40 its 2 s objective would allow ...
    assert bounded["max_held"] <= 12, bounded
    assert unbounded["max_held"] >= 30, unbounded
    # ... few held requests run out of time in it, and the backends serve as much.
    assert bounded["expired"] <= 0.05 * bounded["hold"] + 2, bounded
    assert bounded["released"] + bounded["route"] >= 0.95 * (unbounded["released"] + unbounded["route"]), (
        bounded, unbounded)


def test_a_request_the_door_passed_is_not_refused_by_the_bound_but_still_by_its_objective():
    # A standing 10x overload: the queue is at its bound, so a newcomer is refused for the queue's length ...
    sched = make()
    _sustained(sched, 8.0, 200.0, 0.1)
    now = T0 + 8.0
    pool = sched.pools["m"]
    limit = pool.overload.hold_limit(now, 0.05)
    assert limit is not None and len(pool.hold) >= limit
    plain = sched.submit(Demand(request_id="plain", pool="m", prompt_tokens=100, max_tokens=100, arrival_s=now), now)
    assert isinstance(plain, Reject) and "as long as this sustained overload needs" in plain.reason
    # ... but one the front door judged against the bound and passed on (counted in transit there while the event
    # loop lagged) is held: its place was taken when it arrived, and a refusal now would be a late 429.
    passed = sched.submit(Demand(request_id="passed", pool="m", prompt_tokens=100, max_tokens=100, arrival_s=now,
                                 door_passed=True), now)
    assert isinstance(passed, Hold), passed
    # The TTFT objective still refuses what could not start in time, passed or not.
    for k in range(60):
        d = sched.submit(Demand(request_id=f"p{k}", pool="m", prompt_tokens=100, max_tokens=100, arrival_s=now,
                                door_passed=True), now)
        if isinstance(d, Reject):
            assert "objective" in d.reason or "hold queue would take" in d.reason, d.reason
            break
    else:
        raise AssertionError("60 more passed requests were all held past the objective")


def test_des_10x_fewer_requests_held_then_refused_and_2x_goodput_is_kept():
    """One L4 (~8 req/s of this workload), deterministic DES: at 10x few requests are held and then refused at
    their objective, and the bound never adds to them, serving as many; at 2x, where a queue still turns
    fluctuations into throughput, goodput is that of no bound. Held-then-refused at 10x, of 3,200: 575 with
    neither the bound nor the early drain estimate, 360 with the bound alone, 237-244 with the early estimate
    (sched/admission.py EARLY_MIN_RELEASES), which now does most of what the bound did here."""
    inst = [DesInstance("a", resolve_profile("l4/llama-3.1-8b-tp1"))]

    def run(rate: float, **options) -> tuple[float, int, int]:
        r = run_des(inst, f"rate={rate},n={int(rate * 40)},prompt=300,output=150,seed=3", "capacity",
                    DesOptions(profile_error=0.0, policy_options=options))
        served = [x for x in r.records if x.success]
        on_time = sum(1 for x in served if x.ttft_s is not None and x.ttft_s <= 2.0)
        late = sum(1 for x in r.records if x.status == 429 and any(
            k in (x.error_detail or "") for k in ("held past its deadline", "cannot start before its deadline")))
        return on_time / len(r.records), len(served), late

    _, served10, late10 = run(80.0)
    _, served10_off, late10_off = run(80.0, overload_idle_fraction=0)
    assert late10 <= late10_off and late10 <= 0.09 * 3200, (late10, late10_off)
    assert served10 >= 0.97 * served10_off, (served10, served10_off)
    good2, _, _ = run(16.0)
    good2_off, _, _ = run(16.0, overload_idle_fraction=0)
    assert good2 >= good2_off - 0.02, (good2, good2_off)


def _admin(proxy: Proxy) -> dict:
    req = urllib.request.Request(proxy.url + "/admin/backends", headers={"Authorization": "Bearer adm"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_live_sustained_overload_refuses_at_arrival(tmp_path: Path):
    """Real proxy (default capacity policy), two engines of 2 seats answering in 0.2 s, 48 clients sending back
    to back (~12x what the seats serve) for 6 s: most of the excess is refused when it arrives; few are held,
    and few of those run out of their objective in the queue. Fails with `overload_idle_fraction: 0` (the
    queue then stands at the length the 2 s objective allows: 18% of the answers had been held)."""
    profile = yaml.safe_load((REPO / "profiles" / "h100-80g" / "llama-2-13b-tp1.yaml").read_text())
    profile.update(name="test/seats2", max_num_seqs=2, kv_capacity_tokens=10**9)
    path = tmp_path / "seats.yaml"
    path.write_text(yaml.safe_dump(profile))
    backends = [FaultBackend(f"h{i}", api="hold", hold_s=0.2, chunks=2, metrics="404") for i in range(2)]
    try:
        for b in backends:
            b.start()
        cfg = proxy_config(backends, policy="capacity")  # default options
        cfg["server"] = {"admin_token_env": ADMIN_TOKEN_ENV}
        for row in cfg["models"]["m"]["backends"]:
            row["profile"] = str(path)
        with Proxy(config=cfg, admin_token="adm") as proxy:
            body = json.dumps({"model": "m", "stream": True, "max_tokens": 4,
                               "messages": [{"role": "user", "content": "hi"}]}).encode()
            req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                   b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
            statuses: dict[int, int] = {}

            async def client(until: float) -> None:
                while time.monotonic() < until:
                    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                    try:
                        writer.write(req)
                        head = await reader.readuntil(b"\r\n\r\n")
                        statuses[int(head[9:12])] = statuses.get(int(head[9:12]), 0) + 1
                        await reader.read()  # every answer here closes (Connection: close or end of stream)
                    finally:
                        writer.close()
                    await asyncio.sleep(0.05)

            async def main() -> None:
                until = time.monotonic() + 6.0
                await asyncio.gather(*(client(until) for _ in range(48)))

            asyncio.run(main())
            admin = _admin(proxy)
            pool = admin["pools"]["m"]
            shed = (admin.get("overload") or {}).get("shed_at_arrival", 0)  # refused by the front door
    finally:
        for b in backends:
            b.stop()
    # Every request the door passed on was read by the loop (answered): none is left counted in transit, where it
    # would make the door refuse for a queue that does not exist.
    assert admin["overload"]["passed_on"] >= statuses.get(200, 0), admin["overload"]
    assert admin["overload"]["in_transit"] == 0, admin["overload"]
    assert statuses.get(200, 0) >= 20 and statuses.get(429, 0) >= 200, statuses
    assert pool["rejected_total"] + shed >= 2 * pool["held_total"], (pool, shed)  # refused at arrival, mostly
    # Measured: with the bound ~5% of the answers had been held, without it ~18% (held up to the objective).
    assert pool["held_total"] <= 0.1 * sum(statuses.values()), (statuses, pool)
    assert pool["expired_total"] <= 0.2 * pool["held_total"] + 5, pool  # held ones leave in time


def test_a_burst_onto_a_quiet_pool_is_held_not_refused_by_a_remembered_ratio():
    """Found by the data-plane bench (wrk -c128 in 5-s rounds with 5-s lulls): the ratio remembered from before a
    lull read a burst of 128 at once as sustained overload, and its last ~40 requests were refused though each would
    have been served within ~15 ms. The bound applies only to a queue that has stood for STANDING_MIN_S."""
    from capbalancer.sched.admission import STANDING_MIN_S

    sched = make()
    pool = sched.pools["m"]
    for _ in range(300):  # an earlier overload at 1.4x, measured ...
        for _ in range(14):
            pool.overload.on_offered(T0)
        for _ in range(10):
            pool.overload.on_released(1, T0)
    now = T0 + 5.0  # ... then a lull: the ratio is still known
    limit = pool.overload.hold_limit(now, 1e-4)
    assert limit is not None and limit < 30, limit
    decisions = [sched.submit(Demand(request_id=f"b{i}", pool="m", prompt_tokens=100, max_tokens=100,
                                     arrival_s=now), now) for i in range(40)]
    assert not any(isinstance(d, Reject) for d in decisions), [d for d in decisions if isinstance(d, Reject)][:3]
    assert sum(isinstance(d, Hold) for d in decisions) >= 30
    # The same queue, still standing STANDING_MIN_S later, is bounded: a newcomer is refused.
    later = now + STANDING_MIN_S
    late = sched.submit(Demand(request_id="late", pool="m", prompt_tokens=100, max_tokens=100, arrival_s=later),
                        later)
    assert isinstance(late, Reject) and late.status == 429, late


def test_an_onset_gets_a_provisional_drain_rate_within_a_quarter_second():
    """Hundreds of releases a second: the rate is known long before the 2 s window ends (without it the queue
    filled to 1,024 at each onset and hundreds were refused at their release ~2 s later: bench/overload.py)."""
    rate = DrainRate()
    rate.on_backlog(100.0)
    for k in range(1, EARLY_MIN_RELEASES):
        rate.on_release(100.0 + 0.02 * k)
    assert rate.rate_per_s is None  # too few releases to tell
    rate.on_release(100.0 + 0.02 * EARLY_MIN_RELEASES)
    assert rate.provisional and 45.0 < rate.rate_per_s < 55.0  # 50 a second
    for k in range(EARLY_MIN_RELEASES + 1, 101):  # the drain slows to 10 a second; the full window replaces it
        rate.on_release(100.0 + 0.32 + 0.1 * (k - EARLY_MIN_RELEASES))
    assert not rate.provisional and rate.rate_per_s < 20.0
    slow = DrainRate()  # a pool draining 2 a second: no early figure from a few releases
    slow.on_backlog(0.0)
    for k in range(1, 4):
        slow.on_release(0.5 * k)
    assert slow.rate_per_s is None


def test_a_queue_that_empties_for_a_moment_still_stands():
    """Lumps of freed room empty a standing queue for moments; each restarted its standing time, so the bound
    was off half the time (live: 0-500 held). A real lull still resets it (the burst-after-a-lull case)."""
    rate = DrainRate()
    rate.on_backlog(10.0)
    assert rate.standing(10.0 + STANDING_MIN_S)
    rate.on_empty(11.0)
    rate.on_backlog(11.0 + EMPTY_GRACE_S / 2)  # a moment later: the same backlog
    assert rate.standing(11.2)
    rate.on_empty(12.0)
    rate.on_empty(12.0 + EMPTY_GRACE_S)  # empty for the whole grace: over
    assert not rate.standing(12.0 + EMPTY_GRACE_S)
    rate.on_backlog(13.0)
    assert not rate.standing(13.1) and rate.standing(13.0 + STANDING_MIN_S)
    lull = DrainRate()
    lull.on_backlog(0.0)
    lull.on_empty(1.0)
    lull.on_backlog(6.0)  # seconds later: judged afresh
    assert not lull.standing(6.1)


def test_a_backlog_that_ended_is_not_standing_before_anything_resets_it():
    """After a lull with no release pass and no newcomer nothing resets the old backlog; its rate and standing
    must not count (the front door reads them live: it refused the first of a new burst after a lull)."""
    rate = DrainRate()
    rate.on_backlog(0.0)
    for k in range(1, 40):
        rate.on_release(0.02 * k)
    rate.on_empty(1.0)  # the queue emptied; then nothing happens for seconds
    assert rate.standing(1.0 + EMPTY_GRACE_S / 2) and rate.current_rate_per_s(1.0) is not None
    assert not rate.standing(7.0) and rate.current_rate_per_s(7.0) is None


def test_a_standing_queue_whose_requests_barely_wait_is_not_bounded():
    """A closed loop on a fast backend keeps a queue that never empties, each request held ~13 ms: the bound must
    not refuse there (wrk -c128 against an instant backend: hundreds of 429s a round). Once the head has waited a
    twentieth of its objective, the bound applies."""
    sched = make()  # 2 seats
    pool = sched.pools["m"]
    now = T0
    for i in range(2):
        assert isinstance(sched.submit(Demand(request_id=f"r{i}", pool="m", prompt_tokens=100, max_tokens=100,
                                              arrival_s=now), now), Route)
    for _ in range(20):  # a measured overload ratio of 10: the bound is 4
        for _ in range(10):
            pool.overload.on_offered(now)
        pool.overload.on_released(1, now)

    def newcomer(i: int, at: float):
        return sched.submit(Demand(request_id=f"n{i}", pool="m", prompt_tokens=100, max_tokens=100, arrival_s=at),
                            at)

    held = [newcomer(i, now) for i in range(10)]
    assert all(isinstance(d, Hold) for d in held)  # a fresh queue: not standing yet
    # The queue has stood since T0 (emptied only for moments), but its head was held only just now.
    while len(pool.hold):  # (the old queue taken back: only a fresh head is in question)
        pool.hold.pop()
    at = T0 + STANDING_MIN_S + 0.01
    fresh = [newcomer(100 + i, at - 0.02) for i in range(6)]
    assert all(isinstance(d, Hold) for d in fresh)
    pool.drain.backlog_since_s = T0
    assert pool.drain.standing(at)
    assert isinstance(newcomer(200, at), Hold)  # the head waited 20 ms of a 2 s objective: not bounded
    later = at + 0.2  # the head has now waited 0.22 s
    refused = newcomer(201, later)
    assert isinstance(refused, Reject) and refused.status == 429 and "as long as" in refused.reason, refused


def _warm(sched: Scheduler, output_tokens: int, n: int = FORECAST_MIN_OUTPUTS) -> None:
    """The pool has seen `n` answers of `output_tokens` (as a proxy that served before the overload has)."""
    for _ in range(n):
        sched.pools["m"].output_lengths.observe(output_tokens)


def test_no_seat_frees_in_time_so_a_newcomer_is_refused_at_once_not_held():
    """No drain measured yet, both seats taken by answers of ~300 tokens (~3 s at this TPOT): a held request could
    not start within its 2 s objective, so the seat forecast refuses it at arrival (before: held ~1.9 s, then
    refused). Answers of ~10 tokens free a seat every ~0.1 s: the same newcomers are held."""
    long_answers = make()
    _warm(long_answers, 300)
    for i in range(2):
        assert isinstance(long_answers.submit(Demand(request_id=f"r{i}", pool="m", prompt_tokens=100,
                                                     max_tokens=300, arrival_s=T0), T0), Route)
    late = long_answers.submit(Demand(request_id="n", pool="m", prompt_tokens=100, max_tokens=300, arrival_s=T0),
                               T0)
    assert isinstance(late, Reject) and late.status == 429 and "seats" in late.reason, late
    short_answers = make()
    _warm(short_answers, 10)
    for i in range(2):
        short_answers.submit(Demand(request_id=f"r{i}", pool="m", prompt_tokens=100, max_tokens=10, arrival_s=T0),
                             T0)
    held = [short_answers.submit(Demand(request_id=f"n{i}", pool="m", prompt_tokens=100, max_tokens=10,
                                        arrival_s=T0), T0) for i in range(10)]
    assert all(isinstance(d, Hold) for d in held), held


def test_no_seat_forecast_before_the_pool_knows_its_answers_lengths():
    """Before FORECAST_MIN_OUTPUTS answers, a request is expected to generate half its max_tokens: a client asking
    4,096 tokens would have its seats forecast to free far too late. No forecast then: held, as before."""
    sched = make()
    _warm(sched, 300, n=FORECAST_MIN_OUTPUTS - 1)
    for i in range(2):
        sched.submit(Demand(request_id=f"r{i}", pool="m", prompt_tokens=100, max_tokens=300, arrival_s=T0), T0)
    assert isinstance(sched.submit(Demand(request_id="n", pool="m", prompt_tokens=100, max_tokens=300,
                                          arrival_s=T0), T0), Hold)


def test_des_onset_of_long_answers_is_refused_at_arrival_not_held_then_refused():
    """3,000 clients at once onto 4 x A100 (1,024 seats) with answers of 256 tokens (~8 s each at a full batch), a
    proxy that has served before (it knows the answers' length): deterministic DES. Before the seat forecast the
    queue held 1,024 at each onset (and after each lull reset the drain rate) and ~5,100 of 20,000 were refused
    when their objective ran out in it (seconds after arriving); with it ~200-450, and the pool serves ~25% more
    on time in less time. Below capacity (400 clients) nothing is refused, as before."""
    from capbalancer.sim.des import _Run

    class Warm(_Run):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            for pool in self.sched.pools.values():
                for _ in range(16):
                    pool.output_lengths.observe(256)

    inst = [DesInstance(f"a{i}", resolve_profile("a100-80g/llama-2-7b-tp1")) for i in range(4)]

    def run(clients: int) -> tuple[int, int, float]:
        r = run_des(inst, f"concurrency={clients},n=20000,prompt=50,output=256,max_tokens=exact,seed=3",
                    "capacity", DesOptions(profile_error=0.15), run_class=Warm)
        on_time = sum(1 for x in r.records if x.success and x.ttft_s is not None and x.ttft_s <= 2.0)
        late = sum(1 for x in r.records if x.status == 429 and any(
            k in (x.error_detail or "") for k in ("held past its deadline", "cannot start before its deadline")))
        return on_time, late, r.sim_seconds

    on_time, late, seconds = run(3000)
    assert late <= 0.03 * 20_000, late  # before: 5,143
    assert on_time / seconds >= 90.0, (on_time, seconds)  # before: 8,867 in 117 s (76 a second)
    below, late_below, _ = run(400)
    assert below == 20_000 and late_below == 0


def test_a_seat_forecast_counts_one_start_per_prefill_time_on_each_backend():
    """Seats that free in time are not enough: requests released together are prefilled one after another, and one
    released by its seat in time came too late by its prefill turn (live, bench/overload.py --seconds 6: 117-524 held
    at the onset, then refused at their release; 0-6 with this cap). Ten seats freeing at once, each running a
    request 0.5 s: 40 starts in 2 s by the seats; a backend prefilling one request per 0.1 s starts 20."""
    seats = BackendForecast(ends_s=(T0,) * 10, service_s=0.5, prefill_s=0.0)
    assert SeatForecast(built_at_s=T0, starts_at_build=0, backends=(seats,)).starts_by(T0 + 1.99) == 40
    slow_prefill = BackendForecast(ends_s=(T0,) * 10, service_s=0.5, prefill_s=0.1)
    forecast = SeatForecast(built_at_s=T0, starts_at_build=0, backends=(slow_prefill, slow_prefill))
    assert forecast.starts_by(T0 + 1.99) == 2 * 20
    assert forecast.starts_by(T0 + 1.99, enough=5) == 5
    late = BackendForecast(ends_s=(T0 + 3.0,) * 10, service_s=0.5, prefill_s=0.1)  # no seat frees in time
    assert SeatForecast(built_at_s=T0, starts_at_build=0, backends=(late,)).starts_by(T0 + 1.99) == 0
