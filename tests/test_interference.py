"""Interference between engines sharing a GPU (issue 14 §5): the simulator's factor beyond sum-of-steps, the
scheduler's online estimate of it, and the net-negative judgement that leaves a harmful instance idle."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from capbalancer.fleet.description import FleetError, parse_fleet
from capbalancer.sched.interference import InterferenceEstimate, MemberCapacity, is_net_negative
from capbalancer.sim.des import DesOptions, run_des

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import interference as bench  # noqa: E402  (bench/interference.py: the H200 pair)


def test_estimate_starts_at_sum_of_steps_and_learns_the_real_factor():
    est = InterferenceEstimate()
    assert est.factor == 1.0
    for _ in range(20):  # alone on the GPU, as profiled: pins the own scale, says nothing about k
        est.observe(own_s=0.03, shared_s=0.0, observed_tpot_s=0.03)
    assert est.count == 0 and est.factor == pytest.approx(1.0)
    for i in range(60):
        shared = 0.01 + 0.0005 * (i % 7)
        est.observe(own_s=0.03, shared_s=shared, observed_tpot_s=0.03 + 2.5 * shared)
    assert est.factor == pytest.approx(2.5, abs=0.3)
    for _ in range(300):  # MPS switched on: the siblings now overlap; forgetting follows (with no solo period
        # left to pin the own scale, the prior shares the blame: well below sum-of-steps, not exactly 0.3)
        est.observe(own_s=0.03, shared_s=0.012, observed_tpot_s=0.03 + 0.3 * 0.012)
    assert est.factor < 0.8


def test_net_negative_is_judged_at_saturation():
    big = MemberCapacity(seats=256, step_s=0.038, factor=1.0)
    small = MemberCapacity(seats=48, step_s=0.020, factor=1.0)
    assert is_net_negative(small, [big])  # its steps cost the big batch more than its own batch decodes
    assert not is_net_negative(big, [small])
    half = MemberCapacity(seats=128, step_s=0.03, factor=1.0)
    assert not is_net_negative(half, [half])  # two equal halves tie: neither is negative
    overlapping = dataclasses.replace(big, factor=0.1)  # MPS: the small one's steps barely slow the big one
    assert not is_net_negative(dataclasses.replace(small, factor=0.1), [overlapping])
    assert not is_net_negative(small, [])


def test_fleet_interference_key():
    fleet = parse_fleet({"instances": [{"name": "a", "port": 1, "model": "m", "gpu_group": "g", "interference": 2},
                                       {"name": "b", "port": 2, "model": "m", "gpu_group": "g"}]})
    assert [i.interference for i in fleet.instances] == [2.0, 1.0]
    assert fleet.to_dict()["instances"][0]["interference"] == 2.0
    with pytest.raises(FleetError, match="interference"):
        parse_fleet({"instances": [{"name": "a", "port": 1, "model": "m", "interference": "lots"}]})


def _throughput(instances, policy="capacity", n=1200, **policy_options):
    if policy == "capacity":
        # Throughput at saturation, with no goodput objectives (they cap a busy GPU's batch on their own).
        policy_options = {"ttft_objective_factor": 0, "tpot_objective_factor": 0, **policy_options}
    opts = DesOptions(poll_interval_s=1.0, policy_options=policy_options)
    result = run_des(instances, f"{bench.WORKLOAD},n={n},concurrency=256,seed=3", policy, opts)
    return bench.steady_throughput(result.records)[0], result


def test_simulated_interference_slows_the_neighbour_beyond_sum_of_steps():
    split = [dataclasses.replace(i, weight=0.2 if i.name == "C" else 0.8) for i in bench.pair(1.0)]
    first_order, r1 = _throughput(split, "weighted")
    worse, r2 = _throughput([dataclasses.replace(i, interference=2.0) for i in split], "weighted")
    assert worse < 0.93 * first_order
    assert r2.summary["p50_tpot_ms"] > r1.summary["p50_tpot_ms"]


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_capacity_leaves_the_net_negative_instance_idle(factor):
    """The H200 lesson in the DES: C (small KV) beside B (large KV) on one GPU. Capacity reaches >= 0.95 of the
    best static plan, which is B alone; judged without the interference term it does not."""
    pair = bench.pair(factor)
    # Long enough that the one probe C gets at the start (how B learns the factor) is a small part of the run.
    alone, _ = _throughput([i for i in pair if i.name == "B"], n=3000)
    learned, result = _throughput(pair, n=3000)
    assert learned >= 0.95 * alone, (learned, alone)
    assert result.instances["C"]["share"] < 0.01  # a probe or two: how its siblings learn the factor
    unjudged, _ = _throughput(pair, judge_net_negative=0)
    assert unjudged < 0.97 * learned, (unjudged, learned)


def test_deploy_warns_when_a_plan_puts_two_engines_on_one_gpu_without_mps(tmp_path):
    import subprocess

    import yaml
    from support import REPO, capbalancer

    from capbalancer.planning.colocation import colocation_warnings
    from capbalancer.planning.plan import load_plan

    plan_path = tmp_path / "p.yaml"
    proc = subprocess.run(capbalancer("plan", "--cluster", str(REPO / "deploy" / "clusters" / "mixed-fleet.yaml"),
                                      "--out", str(plan_path)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "share GPU" not in proc.stderr  # the planner gives every instance GPUs of its own
    plan = yaml.safe_load(plan_path.read_text())
    machine = next(m for m in plan["machines"] if len(m.get("instances") or []) >= 1)
    first = machine["instances"][0]
    twin = {**first, "name": first["name"] + "-twin", "port": first["port"] + 1000}
    machine["instances"].append(twin)  # a hand-edited plan: a second engine on the first one's GPUs
    plan_path.write_text(yaml.safe_dump(plan))
    instances = load_plan(plan_path).instances
    assert colocation_warnings(instances, mps=True) == []
    assert len(colocation_warnings(instances, mps=False)) == len(first["gpu_ids"])
    out = tmp_path / "out"
    proc = subprocess.run(capbalancer("deploy", "--plan", str(plan_path), "--target", "scripts", "--out", str(out)),
                          capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "no-mps")})
    assert proc.returncode == 0, proc.stderr
    assert f"{first['name']}, {twin['name']} share GPU" in proc.stderr and "MPS" in proc.stderr
