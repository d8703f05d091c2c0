"""The discrete-event runner: determinism, agreement with the profile, and that it drives the real Scheduler."""

from pathlib import Path

import pytest
import yaml

from capbalancer.loadtest.stats import Slo
from capbalancer.profiling.schema import load_profile
from capbalancer.sim.des import DesOptions, instance_capacity, run_des
from capbalancer.sim.workload import WorkloadSpecError, parse_workload

PROFILES = Path(__file__).parent / "data" / "profiles"
FAST = load_profile(PROFILES / "fast-13b.yaml")
SLOW = load_profile(PROFILES / "slow-13b.yaml")
HETERO = [("fast0", FAST), ("slow0", SLOW), ("slow1", SLOW)]


def test_same_seed_same_result_other_seed_other_result():
    wl = "rate=6,n=300,prompt=lognormal:mean=600:sigma=0.8,output=lognormal:mean=200:sigma=0.7,seed=3"
    a = run_des(HETERO, wl, "least_requests")
    b = run_des(HETERO, wl, "least_requests")
    c = run_des(HETERO, wl, "least_requests", seed=4)
    key = lambda r: [(x.backend, x.ttft_s, x.e2el_s, x.output_tokens) for x in r.records]  # noqa: E731
    assert key(a) == key(b)
    assert a.summary == b.summary
    assert key(a) != key(c)


def test_low_load_ttft_is_the_profiles_prefill_time():
    # One request about every 20 s (near-regular gaps) on one instance: each finds the engine idle.
    r = run_des([("slow0", SLOW)], "rate=0.05,burstiness=100,n=20,prompt=500,output=20,seed=1", "round_robin")
    prefill_ms = SLOW.step.step_seconds(500, 0, 0) * 1e3
    assert r.summary["completed"] == 20
    assert r.summary["median_ttft_ms"] == pytest.approx(prefill_ms, rel=1e-6)
    assert r.summary["p99_ttft_ms"] == pytest.approx(prefill_ms, rel=1e-6)
    tpot_ms = SLOW.step.decode_step_seconds(1, 510) * 1e3
    assert r.summary["median_tpot_ms"] == pytest.approx(tpot_ms, rel=0.01)


def test_policies_differ_on_an_unequal_cluster_and_shares_follow_the_policy():
    wl = "rate=5,n=400,seed=1"
    slo = Slo(ttft_ms=2000, tpot_ms=100)
    rr = run_des(HETERO, wl, "round_robin", DesOptions(slo=slo))
    cap = run_des(HETERO, wl, "capacity", DesOptions(slo=slo))
    # round robin gives every instance a third whatever its speed
    assert [rr.instances[n]["requests"] for n in ("fast0", "slow0", "slow1")] == [134, 133, 133]
    # the capacity policy sends most work to the fast instance and keeps more requests within the SLO
    assert cap.instances["fast0"]["share"] > 0.6
    assert cap.summary["request_goodput"] > rr.summary["request_goodput"]
    assert rr.instances["slow0"]["utilisation"] > 0.9


def test_overload_is_held_and_everything_is_resolved():
    r = run_des(HETERO, "rate=inf,n=1500,prompt=300,output=100,seed=2", "capacity",
                DesOptions(hold_timeout_s=1000.0, hold_max_requests=5000,
                           policy_options={"ttft_objective_factor": 0}))  # hold as long as it takes
    assert r.summary["held"] > 0  # the scheduler held requests (late binding), the runner dispatched them
    assert r.summary["completed"] == 1500


def test_closed_loop_keeps_the_concurrency():
    r = run_des([("fast0", FAST)], "concurrency=4,n=40,prompt=200,output=50,seed=1", "round_robin")
    assert r.summary["completed"] == 40
    # four at a time: the first four start together, each later one when one finishes
    starts = sorted(x.start_s for x in r.records)
    assert starts[:4] == [0.0] * 4 and starts[4] > 0


def test_fleet_file_and_workload_yaml(tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"model": "llama-2-13b", "instances": [
        {"name": "a", "engine": "vllm", "port": 9001, "profile": str(PROFILES / "fast-13b.yaml")},
        {"name": "b", "engine": "vllm", "port": 9002, "profile": str(PROFILES / "slow-13b.yaml")}]}))
    wl = tmp_path / "wl.yaml"
    wl.write_text(yaml.safe_dump({"n": 50, "rate": 2, "prompt": 100, "output": 20, "seed": 1}))
    r = run_des(str(fleet), str(wl), "least_requests")
    assert r.summary["completed"] == 50
    assert set(r.instances) == {"a", "b"}


def test_workload_spec_errors_name_the_key():
    with pytest.raises(WorkloadSpecError, match="unknown key"):
        parse_workload("rate=1,bogus=2")
    with pytest.raises(WorkloadSpecError, match="rate"):
        parse_workload("rate=-1")


def test_instance_capacity_orders_the_gpus():
    wl = "prompt=lognormal:mean=600:sigma=0.8,output=lognormal:mean=200:sigma=0.7,seed=1"
    fast = instance_capacity(FAST, wl, n=800)
    slow = instance_capacity(SLOW, wl, n=400)
    assert fast["output_throughput"] > 4 * slow["output_throughput"] > 0


def test_des_command_compares_policies_and_writes_json(tmp_path):
    import json
    import subprocess

    from support import REPO, capbalancer

    out = tmp_path / "des.json"
    proc = subprocess.run(
        capbalancer("des", "--cluster", "deploy/fleets/hels-a100x2-p100x2.yaml", "--workload",
                    "rate=3,n=400,seed=1", "--policy", "round_robin,capacity", "--slo", "ttft=3000,tpot=150",
                    "--json", str(out)),
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "policy round_robin" in proc.stdout and "policy capacity" in proc.stdout
    rr, cap = json.loads(out.read_text())
    assert rr["policy"] == "round_robin" and cap["policy"] == "capacity"
    assert rr["summary"]["completed"] == cap["summary"]["completed"] == 400
    assert set(rr["instances"]) == {"a100-0", "a100-1", "p100-pair-0"}
    assert rr["instances"]["p100-pair-0"]["share"] > 0.3  # round robin feeds the slow pair a third
    assert cap["summary"]["request_goodput"] > rr["summary"]["request_goodput"]
    bad = subprocess.run(capbalancer("des", "--cluster", "deploy/fleets/hels-a100x2-p100x2.yaml", "--policy",
                                     "no_such_policy"), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown policy" in bad.stderr


def test_every_example_fleet_resolves_its_profiles():
    from support import REPO

    from capbalancer.sim.des import instances_from_fleet

    files = sorted((REPO / "deploy" / "fleets").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        instances = instances_from_fleet(f)
        assert len({i.profile.name for i in instances}) >= 2, f  # every example is heterogeneous
        scaled = instances_from_fleet(f, apply_time_scale=True)
        assert scaled[0].profile.step.fixed_seconds == pytest.approx(2 * instances[0].profile.step.fixed_seconds)


def test_ideal_is_the_sum_of_the_instances_alone():
    from capbalancer.sim.des import ideal_throughput

    wl = "prompt=300,output=100,seed=1"
    ideal = ideal_throughput(HETERO, wl, n=600)
    fast = instance_capacity(FAST, wl, n=600)["request_throughput"]
    slow = instance_capacity(SLOW, wl, n=600)["request_throughput"]
    assert ideal["request_throughput"] == pytest.approx(fast + 2 * slow)
    assert set(ideal["instances"]) == {"fast0", "slow0", "slow1"}
