"""Engines sharing one GPU in the simulator (fleet gpu_group): the contention model, exact timing of planned
runs under it, the discrete-event runner with groups, and the fleet file's gpu_group."""

import dataclasses
import random
from pathlib import Path

import pytest
import yaml

from capbalancer.fleet.description import FleetError, load_fleet, parse_fleet
from capbalancer.profiling.schema import load_profile
from capbalancer.sim.des import (
    DesInstance,
    DesOptions,
    ideal_throughput,
    instance_capacity,
    instances_from_fleet,
    run_des,
    shared_gpu_capacity,
)
from capbalancer.sim.engine import EngineConfig, EngineModel, Finished, SimRequest
from capbalancer.sim.gpu_share import SharedGpu

PROFILES = Path(__file__).parent / "data" / "profiles"
FAST = load_profile(PROFILES / "fast-13b.yaml")
# The same engine without the context term: its decode steps are all equal, so the times are exact sums.
FLAT = dataclasses.replace(FAST, step=dataclasses.replace(FAST.step, context_seconds_per_token=0.0))


def engines(n, profile=FAST, shared=True, per_token_events=False):
    out = [EngineModel(EngineConfig.from_profile(profile), per_token_events=per_token_events) for _ in range(n)]
    if shared:
        gpu = SharedGpu("gpu0")
        for e in out:
            e.share_gpu(gpu)
    return out


def drive(engs, arrivals, check=False):
    """arrivals: (time, engine index, request id, prompt, output). Returns {request id: finish time}."""
    pending = sorted(arrivals)
    done = {}

    def collect(events):
        for ev in events:
            if isinstance(ev, Finished):
                done[ev.request_id] = ev.time_s

    while pending and pending[0][0] == 0.0:  # all of them join the first step
        _, j, rid, p, o = pending.pop(0)
        collect(engs[j].add_request(SimRequest(rid, p, o, o, 0.0), 0.0))

    while pending or not all(e.is_idle() for e in engs):
        for e in engs:
            e.next_event_s()  # compose every plan first: composing one may move a sibling's next event
        times = [e.next_event_s() for e in engs]
        k = min((t, j) for j, t in enumerate(times) if t is not None)[1] if any(t is not None for t in times) else None
        if pending and (k is None or pending[0][0] <= times[k]):
            at, j, rid, p, o = pending.pop(0)
            collect(engs[j].add_request(SimRequest(rid, p, o, o, at), at))
        else:
            collect(engs[k].advance_to(times[k]))
        if check:
            for e in engs:
                e.check_invariants()
    return done


def batch(j, n, prompt=100, output=200, at=0.0):
    return [(at, j, f"e{j}-{i}", prompt, output) for i in range(n)]


def test_two_busy_engines_on_one_gpu_each_take_the_sum_of_both_steps():
    # Identical loads on both: every step of each lasts its own step plus the other's, i.e. twice a solo
    # step, so each finishes in exactly twice the solo time (half its solo decode throughput).
    solo = drive(engines(1, FLAT, shared=False), batch(0, 32))
    both = drive(engines(2, FLAT), batch(0, 32) + batch(1, 32))
    own_prefill = FLAT.step.step_seconds(32 * 100, 0, 0)
    own_decode = FLAT.step.decode_step_seconds(32, 0)
    assert solo["e0-0"] == pytest.approx(own_prefill + 199 * own_decode, rel=1e-12)
    for i in range(32):
        assert both[f"e0-{i}"] == pytest.approx(2 * solo[f"e0-{i}"], rel=1e-12)
        assert both[f"e1-{i}"] == pytest.approx(2 * solo[f"e0-{i}"], rel=1e-12)


def test_with_growing_context_two_busy_engines_run_at_about_half_speed():
    solo = drive(engines(1, FAST, shared=False), batch(0, 64, prompt=600))
    both = drive(engines(2, FAST), batch(0, 64, prompt=600) + batch(1, 64, prompt=600))
    ratio = max(both.values()) / max(solo.values())
    # The sibling's context growth since its batch last changed is not passed on (gpu_share.py): slightly
    # under 2x, by about half the context term's share of a step.
    assert 1.95 < ratio <= 2.0


def test_an_engine_alone_in_its_group_or_beside_an_idle_sibling_runs_at_solo_speed():
    work = [(0.5 * i, 0, f"e0-{i}", 300 + 10 * i, 50 + 7 * i) for i in range(20)]
    solo = drive(engines(1, FAST, shared=False), work)
    alone = drive(engines(1, FAST), work)  # a group of one
    beside_idle = drive(engines(2, FAST), work)  # the sibling never gets a request
    assert alone == solo
    assert beside_idle == solo


def test_a_sibling_slows_only_while_it_is_busy():
    # e1 serves one request from t=0; e0's request arrives after e1 finished and runs at solo speed.
    sibling = [(0.0, 1, "s", 200, 50)]
    early = drive(engines(2, FLAT), sibling + [(0.0, 0, "x", 200, 50)])
    late = drive(engines(2, FLAT), sibling + [(10.0, 0, "x", 200, 50)])
    solo = drive(engines(1, FLAT, shared=False), [(0.0, 0, "x", 200, 50)])
    assert late["s"] < 10.0
    assert late["x"] - 10.0 == pytest.approx(solo["x"], rel=1e-12)  # the idle sibling costs nothing
    assert early["x"] == pytest.approx(2 * solo["x"], rel=1e-12)  # both busy the whole time: twice as long


def random_arrivals(seed, engines_n, per_engine, prompt, output, rate=4.0):
    rng = random.Random(seed)
    out = []
    for j in range(engines_n):
        t = 0.0
        for i in range(per_engine):
            t += rng.expovariate(rate)
            out.append((t, j, f"e{j}-{i}", rng.randint(*prompt), rng.randint(*output)))
    return out


def test_planned_runs_agree_with_step_by_step_under_random_sharing():
    # Runs of decode steps are planned ahead and cut when a sibling changes; stepping one step at a time
    # (per-token events: no runs) must give the same times under the model, with KV blocks conserved.
    tiny = load_profile(PROFILES / "tiny-kv.yaml")  # short of KV: preemptions happen too
    for prof, arrivals in ((FAST, random_arrivals(7, 3, 60, (10, 900), (1, 300))),
                           (tiny, random_arrivals(8, 3, 40, (10, 600), (1, 300), rate=2.0))):
        fast_engines = engines(3, prof)
        fast_way = drive(fast_engines, arrivals, check=True)
        step_way = drive(engines(3, prof, per_token_events=True), arrivals)
        assert fast_way.keys() == step_way.keys() and len(fast_way) == len(arrivals)
        for rid, t in step_way.items():
            assert fast_way[rid] == pytest.approx(t, rel=1e-9, abs=1e-9), rid
        solo = drive(engines(3, prof, shared=False), arrivals)
        assert sum(fast_way.values()) > sum(solo.values()) + 1.0
        if prof is tiny:
            assert sum(e.preemptions_total for e in fast_engines) > 0


def test_a_sibling_change_at_a_step_boundary_applies_from_the_step_starting_there():
    # Equal steps: e0's run and e1's steps end together. e1's new request is composed at one of those
    # common boundaries, so e0's step starting there must already wait for e1's prefill (as step by step);
    # a2 arrives on e0 during that step and starts at its end.
    arrivals = [(0.0, 0, "a", 100, 300), (0.0, 1, "b", 100, 300), (1.0, 1, "b2", 500, 50),
                (1.1, 0, "a2", 50, 20)]
    fast_way = drive(engines(2, FLAT), arrivals)
    step_way = drive(engines(2, FLAT, per_token_events=True), arrivals)
    for rid, t in step_way.items():
        assert fast_way[rid] == pytest.approx(t, rel=1e-12), rid


# --- the discrete-event runner ---------------------------------------------------------------------------

def shared_fleet(groups):
    return [DesInstance(name, FAST, gpu_group=groups.get(name)) for name in ("a", "b", "c")]


def test_des_ungrouped_and_lone_instances_are_unchanged_and_a_shared_pair_serves_half():
    key = lambda r, names=None: [(x.backend, x.ttft_s, x.e2el_s) for x in r.records  # noqa: E731
                                 if names is None or x.backend in names]
    wl = "n=300,rate=8,prompt=lognormal:mean=400:sigma=0.8,output=lognormal:mean=150:sigma=0.7,seed=1"
    apart = run_des(shared_fleet({}), wl, "round_robin")
    plain = run_des([DesInstance(i.name, i.profile) for i in shared_fleet({})], wl, "round_robin")
    lone_groups = run_des(shared_fleet({"a": "g0", "b": "g1", "c": "g2"}), wl, "round_robin")
    assert key(apart) == key(plain) == key(lone_groups)  # no sibling: exactly as before
    shared = run_des(shared_fleet({"b": "g1", "c": "g1"}), wl, "round_robin")
    # round robin sends the same requests to a either way: a, alone on its GPU, serves them identically
    assert key(shared, {"a"}) == key(apart, {"a"})
    assert shared.instances["b"]["mean_tpot_ms"] > 1.5 * apart.instances["b"]["mean_tpot_ms"]
    # Saturated with identical loads (a closed loop, round robin over two), a pair on one GPU serves half.
    sat = "n=400,concurrency=64,prompt=400,output=150,seed=1"
    pair = [DesInstance("b", FLAT, gpu_group="g1"), DesInstance("c", FLAT, gpu_group="g1")]
    two_gpus = run_des([DesInstance("b", FLAT), DesInstance("c", FLAT)], sat, "round_robin")
    one_gpu = run_des(pair, sat, "round_robin")
    assert one_gpu.summary["output_throughput"] == pytest.approx(0.5 * two_gpus.summary["output_throughput"],
                                                                 rel=0.02)
    assert one_gpu.summary["mean_tpot_ms"] == pytest.approx(2 * two_gpus.summary["mean_tpot_ms"], rel=0.02)


def test_des_tells_the_scheduler_about_groups_unless_hidden():
    # b is a little faster than a on paper but shares its GPU with c. Told, capacity keeps c idle while b
    # serves (a request on c would slow b's batch); not told, it spreads over c and every TPOT suffers.
    b_prof = dataclasses.replace(FAST, name="test/fast-13b-x0.9", step=FAST.step.scaled(0.9))
    fleet = [DesInstance("a", FAST), DesInstance("b", b_prof, gpu_group="g1"), DesInstance("c", FAST, gpu_group="g1")]
    wl = "n=600,rate=10,prompt=400,output=150,seed=2"
    told = run_des(fleet, wl, "capacity")
    hidden = run_des(fleet, wl, "capacity", DesOptions(gpu_groups_to_scheduler=False))
    assert told.instances["c"]["share"] < hidden.instances["c"]["share"] - 0.1
    assert told.summary["mean_tpot_ms"] < 0.8 * hidden.summary["mean_tpot_ms"]


def test_shared_gpu_capacity_is_about_half_a_gpu_each():
    wl = "prompt=400,output=150,seed=1"
    solo = instance_capacity(FAST, wl, n=400)["output_throughput"]
    pair = shared_gpu_capacity([FAST, FAST], wl, n=400)
    for cap in pair:
        assert cap["output_throughput"] == pytest.approx(solo / 2, rel=0.08)
    ideal = ideal_throughput(shared_fleet({"b": "g1", "c": "g1"}), wl, n=400)
    assert ideal["output_throughput"] == pytest.approx(2 * solo, rel=0.08)
    assert ideal["instances"]["a"]["output_throughput"] == solo


# --- the fleet file --------------------------------------------------------------------------------------

def fleet_rows(**extra):
    rows = [{"name": "a", "port": 8001, "profile": "x"}, {"name": "b", "port": 8002, "profile": "x"}]
    for k, v in extra.items():
        rows[1][k] = v
    return {"model": "m", "instances": rows}


def test_fleet_gpu_group_is_parsed_and_round_trips(tmp_path):
    data = fleet_rows(gpu_group=1)
    data["instances"][0]["gpu_group"] = "1"
    fleet = parse_fleet(data)
    assert [i.gpu_group for i in fleet.instances] == ["1", "1"]  # a card index names the group too
    assert parse_fleet(fleet_rows()).instances[1].gpu_group is None
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump(fleet.to_dict()))
    assert [i.gpu_group for i in load_fleet(path).instances] == ["1", "1"]


@pytest.mark.parametrize(("extra", "first_row", "message"), [
    ({"gpu_group": ["g"]}, {}, "instances[1].gpu_group: must be a group name or a GPU index (an integer >= 0), "
                               "got ['g']"),
    ({"gpu_group": ""}, {}, "instances[1].gpu_group: must be a group name or a GPU index"),
    ({"gpu_group": True}, {}, "instances[1].gpu_group: must be a group name or a GPU index"),
    ({"gpu_group": -1}, {}, "instances[1].gpu_group: must be a group name or a GPU index"),
    ({"gpu_group": "g", "host": "10.0.0.2"}, {"gpu_group": "g"},
     "instances[1].gpu_group: group 'g' spans hosts 127.0.0.1 (instances[0] 'a') and 10.0.0.2"),
    ({"gpu_group": "g", "time_scale": 2}, {"gpu_group": "g"},
     "instances[1].gpu_group: group 'g' mixes time_scale 1 (instances[0] 'a') and 2"),
])
def test_fleet_gpu_group_errors_name_the_key(extra, first_row, message):
    data = fleet_rows(**extra)
    data["instances"][0].update(first_row)
    with pytest.raises(FleetError) as err:
        parse_fleet(data, where="f.yaml")
    assert f"f.yaml: {message}" in str(err.value)


def test_fleet_groups_reach_the_des_instances_and_the_proxy_config(tmp_path):
    from capbalancer.config import parse_config

    fleet_file = tmp_path / "fleet.yaml"
    prof = str(PROFILES / "fast-13b.yaml")
    fleet_file.write_text(yaml.safe_dump({"model": "m", "instances": [
        {"name": "a", "port": 8001, "profile": prof},
        {"name": "b", "port": 8002, "profile": prof, "gpu_group": "g1"},
        {"name": "c", "port": 8003, "profile": prof, "gpu_group": "g1"}]}))
    assert [i.gpu_group for i in instances_from_fleet(fleet_file)] == [None, "g1", "g1"]
    cfg = parse_config({"fleet": str(fleet_file)}, where="cfg.yaml", base_dir=tmp_path)
    specs = cfg.models["m"].backend_specs()
    assert [s.gpu_group for s in specs] == [None, "g1", "g1"]


def test_the_shipped_shared_gpu_fleet_mirrors_the_real_gpu_layout():
    fleet = Path(__file__).resolve().parent.parent / "deploy" / "fleets" / "h200-x2-shared.yaml"
    a, b, c = instances_from_fleet(fleet)
    assert [i.gpu_group for i in (a, b, c)] == ["gpu0", "gpu1", "gpu1"]
    assert b.profile.step == c.profile.step == a.profile.step  # one model, one GPU kind, measured alone
    assert a.profile.kv_capacity_tokens > b.profile.kv_capacity_tokens > 5 * c.profile.kv_capacity_tokens
    assert (b.profile.gpu_memory_utilization, c.profile.gpu_memory_utilization) == (0.45, 0.14)
