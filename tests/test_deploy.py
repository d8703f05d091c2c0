"""deploy: launch scripts pass bash -n and pin the planned flags, manifests parse and carry the planned TP,
the proxy config and fleet description name every instance with a resolvable profile, and a local sim
deployment starts, answers, and stops cleanly."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from support import REPO, capbalancer

from capbalancer.fleet.description import load_fleet
from capbalancer.profiling.library import resolve_profile

CLUSTERS = REPO / "deploy" / "clusters"


def make_plan(tmp_path: Path, cluster: str, *extra: str) -> tuple[Path, dict]:
    out = tmp_path / f"{cluster}.plan.yaml"
    proc = subprocess.run(capbalancer("plan", "--cluster", str(CLUSTERS / f"{cluster}.yaml"), "--out", str(out), *extra),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return out, yaml.safe_load(out.read_text())


def deploy(plan: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(capbalancer("deploy", "--plan", str(plan), "--out", str(out), *args),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def planned_instances(plan: dict) -> dict[str, dict]:
    return {i["name"]: {**i, "machine": m["name"]} for m in plan["machines"] for i in m["instances"]}


@pytest.mark.parametrize("engine", ["vllm", "tgi"])
def test_launch_scripts_pass_bash_n_and_pin_the_plan(tmp_path: Path, engine: str) -> None:
    plan_path, plan = make_plan(tmp_path, "mixed-fleet")
    out = tmp_path / "out"
    deploy(plan_path, out, "--target", "scripts", "--engine", engine)
    scripts = sorted((out / "scripts").glob("*.sh"))
    assert len(scripts) == sum(1 for m in plan["machines"] if m["instances"])
    for script in scripts:
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script}: {check.stderr}"
        assert os.access(script, os.X_OK)
    for name, inst in planned_instances(plan).items():
        text = (out / "scripts" / f"machine-{inst['machine']}.sh").read_text()
        line = next(ln for ln in text.splitlines() if f'"$LOG_DIR/{name}.log"' in ln and "setsid" in ln)
        assert f"CUDA_VISIBLE_DEVICES={','.join(map(str, inst['gpu_ids']))} " in line
        assert f"--port {inst['port']} " in line
        if engine == "vllm":
            assert f"--tensor-parallel-size {inst['tp']} " in line
            assert f"--max-num-seqs {inst['max_num_seqs']} " in line
            assert f"--max-num-batched-tokens {inst['max_num_batched_tokens']} " in line
            assert f"--max-model-len {inst['max_model_len']} " in line
            assert f"--gpu-memory-utilization {inst['gpu_memory_utilization']:g} " in line
        else:
            assert f"--num-shard {inst['tp']} " in line
            assert f"--max-batch-total-tokens {inst['kv_capacity_tokens']} " in line
            assert "--max-concurrent-requests " in line
        if "p100" in inst["machine"] or "v100" in inst["machine"]:
            assert "--dtype" in line  # no bf16 on these


def test_kubernetes_manifests_parse_and_carry_the_planned_tp(tmp_path: Path) -> None:
    plan_path, plan = make_plan(tmp_path, "h100-l4")
    out = tmp_path / "out"
    deploy(plan_path, out, "--target", "kubernetes")
    planned = planned_instances(plan)
    seen = set()
    for path in sorted((out / "kubernetes" / "base").glob("*.yaml")):
        if path.name == "kustomization.yaml":  # tests/test_k8s_kustomize.py renders and validates the tree
            continue
        docs = list(yaml.safe_load_all(path.read_text()))
        kinds = [d["kind"] for d in docs]
        if path.name == "capbalancer.yaml":
            assert kinds == ["ConfigMap", "Deployment", "Service"]
            config = yaml.safe_load(docs[0]["data"]["capbalancer.yaml"])
            backends = config["models"][plan["model"]]["backends"]
            assert {b["name"] for b in backends} == set(planned)
            continue
        assert kinds == ["Deployment", "Service"]
        dep, svc = docs
        name = dep["metadata"]["annotations"]["capbalancer/planned-machine"]
        inst = next(i for n, i in planned.items() if n.replace(".", "-") == dep["metadata"]["name"])
        assert name == inst["machine"]
        pod = dep["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == inst["tp"]
        args = container["args"]
        assert args[args.index("--tensor-parallel-size") + 1] == str(inst["tp"])
        assert pod["nodeSelector"]["nvidia.com/gpu.product"] in ("NVIDIA-H100-80GB-HBM3", "NVIDIA-L4")
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
        seen.add(dep["metadata"]["name"])
    assert len(seen) == len(planned)


def test_common_outputs_name_every_instance_with_a_resolvable_profile(tmp_path: Path) -> None:
    # h100 machine with pcie4 links: its TP>1 profiles are not shipped and must be written out.
    cluster = tmp_path / "c.yaml"
    cluster.write_text(yaml.safe_dump({"model": "llama-2-13b", "machines": [
        {"name": "h", "gpu": "h100-80g", "count": 2, "interconnect": "pcie4"},
        {"name": "p", "gpu": "p100-16g", "count": 2}]}))
    out_plan = tmp_path / "plan.yaml"
    proc = subprocess.run(capbalancer("plan", "--cluster", str(cluster), "--out", str(out_plan),
                                      "--strategy", "max-tp"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    deploy(out_plan, out, "--target", "scripts")
    fleet = load_fleet(out / "fleet.yaml")
    plan = yaml.safe_load(out_plan.read_text())
    assert {i.name for i in fleet.instances} == set(planned_instances(plan))
    for inst in fleet.instances:
        profile = resolve_profile(inst.profile, base_dir=out)
        assert profile.tp == planned_instances(plan)[inst.name]["tp"]
    assert any("pcie4" in i.profile for i in fleet.instances)
    config = yaml.safe_load((out / "capbalancer.yaml").read_text())
    assert len(config["models"]["llama-2-13b"]["backends"]) == len(fleet.instances)
    prom = yaml.safe_load((out / "prometheus.yml").read_text())
    groups = prom["scrape_configs"][1]["static_configs"]
    assert sum(len(g["targets"]) for g in groups) == len(fleet.instances)
    assert {g["labels"]["backend"] for g in groups} == {i.name for i in fleet.instances}
    dashboard = json.loads((out / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    assert "vllm:kv_cache_usage_perc" in exprs
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"model", "backend"}
    # every proxy series the dashboard reads is one the proxy exports
    from capbalancer.server.metrics import ProxyMetrics
    from capbalancer.server.pool_metrics import EXPORTED_NAMES
    exported = {m.name for m in ProxyMetrics().registry.collect()} | set(EXPORTED_NAMES)
    import re
    used = set(re.findall(r"(capbalancer_[a-z_]+?)(?:_bucket|_total)?\b", exprs))
    assert used and all(any(u == e or u.startswith(e) for e in exported) for u in used), (used, exported)
    assert config["server"]["port"] == 8080
