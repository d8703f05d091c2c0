"""Planner: exhaustive search equals brute force, SLO handling, naive strategies, the CLI, and the Hels solver."""

from __future__ import annotations

import itertools
import random
import subprocess

import pytest
import yaml
from support import REPO, capbalancer

from capbalancer.planning.catalog import ProfileCatalog
from capbalancer.planning.cluster import Cluster, ClusterError, Machine, Workload, parse_cluster
from capbalancer.planning.hels import brute_force, build_group, solve
from capbalancer.planning.plan import parse_plan, plan_to_dict
from capbalancer.planning.predict import Slo, predict_instance
from capbalancer.planning.search import plan_cluster
from capbalancer.profiling.specs import load_specs

GPUS = ("a100-80g", "a100-40g", "h100-80g", "l4", "rtx3090", "p100-16g", "v100-32g")
MODELS = ("llama-2-7b", "llama-2-13b", "llama-3.1-8b", "opt-30b")


def brute_force_value(cluster: Cluster, catalog: ProfileCatalog, workload: Workload, slo: Slo | None) -> float:
    """Every combination of per-machine instance counts (k1, k2, k4, k8) across all machines at once."""
    per_machine: list[list[float]] = []
    for m in cluster.machines:
        values = []
        for counts in itertools.product(range(m.count + 1), range(m.count // 2 + 1), range(m.count // 4 + 1),
                                        range(m.count // 8 + 1)):
            tps = (1, 2, 4, 8)
            if sum(k * t for k, t in zip(counts, tps, strict=False)) > m.count:
                continue
            total = 0.0
            for k, tp in zip(counts, tps, strict=False):
                if k == 0:
                    continue
                got = catalog.get(m.gpu, tp, m.interconnect)
                if isinstance(got, str) or not catalog.specs.model(catalog.model).tp_supported(tp):
                    total = float("-inf")
                    break
                total += k * predict_instance(got.profile, workload, slo).output_tokens_per_second
            values.append(total)
        per_machine.append(values)
    return max(sum(combo) for combo in itertools.product(*per_machine))


def random_cluster(rng: random.Random) -> Cluster:
    machines = tuple(
        Machine(name=f"m{i}", gpu=rng.choice(GPUS), count=rng.choice((1, 2, 3, 4, 8)),
                interconnect=rng.choice(("nvlink3", "pcie4", "pcie3")))
        for i in range(rng.randint(1, 3)))
    return Cluster(machines=machines, workload=Workload(rng.choice((128, 512, 2000)), rng.choice((64, 256, 1024))))


@pytest.mark.parametrize("seed", range(12))
def test_planner_equals_brute_force_on_random_clusters(seed: int) -> None:
    rng = random.Random(seed)
    specs = load_specs()
    cluster = random_cluster(rng)
    model = rng.choice(MODELS)
    catalog = ProfileCatalog(specs=specs, model=model)
    slo = Slo(ttft_seconds=rng.choice((0.5, 2.0)), tpot_seconds=rng.choice((0.05, 0.2))) if seed % 2 else None
    plan = plan_cluster(cluster, catalog, objective="goodput" if slo else "throughput", slo=slo)
    expected = brute_force_value(cluster, catalog, cluster.workload, slo)
    assert plan.value == pytest.approx(max(expected, 0.0), rel=1e-9, abs=1e-9)
    for mp in plan.machines:
        assert mp.chosen.gpus_used <= mp.machine.count
        if mp.runner_up is not None:
            assert mp.runner_up.value <= mp.chosen.value + 1e-9


def test_goodput_plan_meets_the_slo_and_throughput_plan_may_not() -> None:
    specs = load_specs()
    cluster = parse_cluster(yaml.safe_load((REPO / "deploy/clusters/h100-l4.yaml").read_text()), specs)
    catalog = ProfileCatalog(specs=specs, model="llama-3.1-8b")
    slo = Slo(ttft_seconds=1.0, tpot_seconds=0.05)
    good = plan_cluster(cluster, catalog, objective="goodput", slo=slo)
    through = plan_cluster(cluster, catalog)
    for mp in good.machines:
        for inst in mp.chosen.instances:
            assert inst.prediction.tpot_seconds <= 0.05 + 1e-12
            assert inst.prediction.ttft_seconds <= 1.0 + 1e-12
    assert any(i.prediction.tpot_seconds > 0.05 for mp in through.machines for i in mp.chosen.instances)
    assert good.value < through.value


def test_naive_strategies_never_beat_the_search() -> None:
    specs = load_specs()
    for name in ("hels-llama-2-13b", "h100-l4", "mixed-fleet"):
        cluster = parse_cluster(yaml.safe_load((REPO / f"deploy/clusters/{name}.yaml").read_text()), specs)
        catalog = ProfileCatalog(specs=specs, model=cluster.model)
        best = plan_cluster(cluster, catalog).value
        for strategy in ("max-tp", "tp1", "min-tp"):
            assert plan_cluster(cluster, catalog, strategy=strategy).value <= best + 1e-9, (name, strategy)


def test_max_tp_uses_one_big_instance_per_machine() -> None:
    specs = load_specs()
    cluster = Cluster(machines=(Machine("a", "l4", 4, "pcie4"),), workload=Workload())
    plan = plan_cluster(cluster, ProfileCatalog(specs=specs, model="llama-3.1-8b"), strategy="max-tp")
    assert [i.tp for i in plan.machines[0].chosen.instances] == [4]
    plan = plan_cluster(cluster, ProfileCatalog(specs=specs, model="llama-3.1-8b"), strategy="min-tp")
    assert [i.tp for i in plan.machines[0].chosen.instances] == [1, 1, 1, 1]


def test_tp1_everywhere_leaves_machines_idle_where_one_gpu_cannot_hold_the_model() -> None:
    specs = load_specs()
    cluster = Cluster(machines=(Machine("a", "a100-80g", 2, "nvlink3"), Machine("r", "rtx3090", 4, "pcie4")),
                      workload=Workload())
    catalog = ProfileCatalog(specs=specs, model="llama-2-13b")
    tp1 = plan_cluster(cluster, catalog, strategy="tp1")
    assert [len(m.chosen.instances) for m in tp1.machines] == [2, 0]
    min_tp = plan_cluster(cluster, catalog, strategy="min-tp")
    assert [i.tp for i in min_tp.machines[1].chosen.instances] == [2, 2]


def test_model_that_fits_nowhere_leaves_the_machine_idle_and_says_why() -> None:
    specs = load_specs()
    cluster = Cluster(machines=(Machine("r", "rtx3090", 2, "pcie4"),), workload=Workload())
    plan = plan_cluster(cluster, ProfileCatalog(specs=specs, model="opt-30b"))
    assert plan.value == 0 and plan.machines[0].leftover_gpus == 2
    assert "short" in plan.machines[0].unusable_tp[2]


def test_cluster_file_errors_name_the_key() -> None:
    specs = load_specs()
    with pytest.raises(ClusterError, match=r"machines\[0\]\.gpu"):
        parse_cluster({"machines": [{"name": "x", "gpu": "tpu-v9", "count": 1}]}, specs)
    with pytest.raises(ClusterError, match=r"machines\[0\]\.count"):
        parse_cluster({"machines": [{"name": "x", "gpu": "l4", "count": 0}]}, specs)


def test_plan_dict_round_trips_into_deployable_instances() -> None:
    specs = load_specs()
    cluster = Cluster(machines=(Machine("h", "h100-80g", 4, "pcie4"), Machine("a", "a100-80g", 2, "nvlink3")),
                      workload=Workload())
    plan = plan_cluster(cluster, ProfileCatalog(specs=specs, model="llama-2-13b"))
    parsed = parse_plan(yaml.safe_load(yaml.safe_dump(plan_to_dict(plan))))
    assert len(parsed.instances) == sum(len(m.chosen.instances) for m in plan.machines)
    assert parsed.predicted_output_tokens_per_second == pytest.approx(plan.value, rel=1e-3)
    for inst in parsed.instances:
        assert len(inst.gpu_ids) == inst.tp == inst.profile.tp
        if inst.machine == "h" and inst.tp > 1:  # non-default link: embedded, not a shipped name
            assert not inst.profile_shipped and inst.profile_ref.endswith("-pcie4")


def test_plan_cli_prints_table_runner_up_and_hels(tmp_path) -> None:
    out = tmp_path / "plan.yaml"
    proc = subprocess.run(capbalancer("plan", "--cluster", str(REPO / "deploy/clusters/hels-llama-2-13b.yaml"),
                                      "--out", str(out), "--hels"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "runner-up:" in proc.stdout and "why it lost" in proc.stdout
    assert "cannot run an uneven head split" in proc.stdout
    data = yaml.safe_load(out.read_text())
    assert data["kind"] == "capbalancer-plan" and data["runner_up"]["loss_tokens_per_second"] >= 0
    bad = subprocess.run(capbalancer("plan", "--cluster", str(out), "--objective", "goodput"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


@pytest.mark.parametrize("requests", [16, 32, 128])
def test_hels_stepwise_is_near_the_brute_force_optimum_and_beats_even(requests: int) -> None:
    specs = load_specs()
    for model, gpus in (("llama-2-13b", ["a100-80g", "a100-80g", "p100-16g", "p100-16g"]),
                        ("opt-30b", ["a100-80g", "rtx3090", "rtx3090"]),
                        ("llama-2-7b", ["h100-80g", "l4", "l4", "v100-32g"])):
        group = build_group(specs.model(model), [specs.gpu(g) for g in gpus], specs.interconnect("eth100"))
        result = solve(group, requests, 576)
        optimum = brute_force(group, requests, 576)
        assert sum(result.hels.heads) == specs.model(model).heads
        assert sum(result.hels.kv_fraction) == pytest.approx(1.0)
        if optimum.fits:
            assert result.hels.tpot_s <= optimum.tpot_s * 1.05, (model, requests)
        if result.even.fits:
            assert result.hels.tpot_s <= result.even.tpot_s


def test_hels_even_split_runs_out_of_memory_like_vllm_in_the_poster() -> None:
    """Poster Table 3: vLLM on A100x2 + P100x2 with Llama-2-13B is OOM at batch 128; Hels is not."""
    specs = load_specs()
    group = build_group(specs.model("llama-2-13b"),
                        [specs.gpu(g) for g in ("a100-80g", "a100-80g", "p100-16g", "p100-16g")],
                        specs.interconnect("eth100"))
    result = solve(group, 128, 576)
    assert not result.even.fits and result.hels.fits
    assert solve(group, 32, 576).even.fits


def test_a_measured_profile_takes_precedence_over_the_roofline(tmp_path) -> None:
    import dataclasses

    from capbalancer.profiling.library import resolve_profile
    from capbalancer.profiling.schema import save_profile

    specs = load_specs()
    estimated = resolve_profile("l4/llama-3.1-8b-tp1")
    measured = dataclasses.replace(estimated, source="measured", kv_capacity_tokens=estimated.kv_capacity_tokens // 2,
                                   step=estimated.step.scaled(0.5))
    save_profile(measured, tmp_path / "l4" / "llama-3.1-8b-tp1.yaml")
    cluster = Cluster(machines=(Machine("l", "l4", 1, "pcie4"),), workload=Workload())
    plain = plan_cluster(cluster, ProfileCatalog(specs=specs, model="llama-3.1-8b"))
    with_measured = plan_cluster(cluster, ProfileCatalog(specs=specs, model="llama-3.1-8b",
                                                         profile_dirs=[tmp_path]))
    chosen = with_measured.machines[0].chosen.instances[0]
    assert chosen.choice.profile.source == "measured"
    assert chosen.prediction.kv_capacity_tokens == measured.kv_capacity_tokens
    assert not chosen.choice.shipped  # deploy embeds it rather than naming a shipped file
    assert plain.machines[0].chosen.instances[0].choice.profile.source == "estimated"
