"""The plan file: what `capbalancer plan` writes and `capbalancer deploy` reads.

It is self-contained: every instance carries its GPUs, port, engine limits, profile name and prediction,
and a profile that is not shipped under profiles/ is embedded whole, so deploy needs nothing but this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from capbalancer.planning.search import ClusterPlan, explain_loss
from capbalancer.profiling.schema import Profile, ProfileError
from capbalancer.yamlfile import read_yaml

BASE_PORT = 8000


class PlanError(ValueError):
    """A plan file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class PlannedInstance:
    name: str
    machine: str
    address: str
    gpu: str
    tp: int
    gpu_ids: tuple[int, ...]
    port: int
    profile_ref: str
    profile: Profile
    profile_shipped: bool
    predicted_output_tokens_per_second: float
    predicted_batch: int


@dataclass(frozen=True, slots=True)
class PlanFile:
    model: str
    objective: str
    predicted_output_tokens_per_second: float
    instances: tuple[PlannedInstance, ...]
    machines: tuple[dict[str, Any], ...]
    source: str = "<plan>"


def plan_to_dict(plan: ClusterPlan) -> dict[str, Any]:
    machines = []
    next_port: dict[str, int] = {}  # per address: machines that share one (e.g. all on 127.0.0.1) share ports
    for mp in plan.machines:
        instances = []
        next_gpu = 0
        for k, inst in enumerate(mp.chosen.instances):
            p = inst.prediction
            profile = inst.choice.profile
            port = next_port.get(mp.machine.address, BASE_PORT)
            next_port[mp.machine.address] = port + 1
            row: dict[str, Any] = {
                "name": f"{mp.machine.name}-i{k}", "tp": inst.tp,
                "gpu_ids": list(range(next_gpu, next_gpu + inst.tp)), "port": port,
                "profile": inst.choice.ref, "profile_source": profile.source,
                "kv_capacity_tokens": profile.kv_capacity_tokens, "max_num_seqs": profile.max_num_seqs,
                "max_num_batched_tokens": profile.max_num_batched_tokens, "max_model_len": profile.max_model_len,
                "block_size": profile.block_size, "gpu_memory_utilization": profile.gpu_memory_utilization,
                "predicted": {"batch": p.batch, "limit": p.limit,
                              "output_tokens_per_second": round(p.output_tokens_per_second, 1),
                              "tpot_ms": round(p.tpot_seconds * 1e3, 2), "ttft_ms": round(p.ttft_seconds * 1e3, 2)},
            }
            if not inst.choice.shipped:
                row["profile_data"] = profile.to_dict()
            instances.append(row)
            next_gpu += inst.tp
        machines.append({
            "name": mp.machine.name, "gpu": mp.machine.gpu, "count": mp.machine.count,
            "interconnect": mp.machine.interconnect, "address": mp.machine.address,
            "shape": mp.chosen.shape, "leftover_gpus": mp.leftover_gpus,
            "predicted_output_tokens_per_second": round(mp.chosen.value, 1),
            "options_considered": mp.options_considered,
            "unusable_tp": {tp: why for tp, why in mp.unusable_tp.items()},
            "instances": instances,
        })
    out: dict[str, Any] = {
        "kind": "capbalancer-plan", "model": plan.model, "objective": plan.objective, "strategy": plan.strategy,
        "workload": {"prompt_tokens": plan.workload.prompt_tokens, "output_tokens": plan.workload.output_tokens},
    }
    if plan.slo is not None:
        out["slo"] = {"ttft_ms": None if plan.slo.ttft_seconds is None else plan.slo.ttft_seconds * 1e3,
                      "tpot_ms": None if plan.slo.tpot_seconds is None else plan.slo.tpot_seconds * 1e3}
    out["predicted_output_tokens_per_second"] = round(plan.value, 1)
    runner = plan.runner_up()
    if runner is not None:
        mp, loss = runner
        assert mp.runner_up is not None
        out["runner_up"] = {"machine": mp.machine.name, "shape": mp.runner_up.shape,
                            "predicted_output_tokens_per_second": round(plan.value - loss, 1),
                            "loss_tokens_per_second": round(loss, 1),
                            "why": explain_loss(mp.chosen, mp.runner_up)}
    out["machines"] = machines
    return out


def save_plan(plan: ClusterPlan, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(plan_to_dict(plan), sort_keys=False, width=120))


def parse_plan(data: Any, where: str = "<plan>") -> PlanFile:
    from capbalancer.profiling.library import resolve_profile

    if not isinstance(data, dict) or data.get("kind") != "capbalancer-plan":
        raise PlanError(f"{where}: not a plan file (kind: capbalancer-plan missing)")
    instances = []
    machines = data.get("machines")
    if not isinstance(machines, list):
        raise PlanError(f"{where}: machines: must be a list")
    for i, m in enumerate(machines):
        for j, row in enumerate(m.get("instances") or []):
            w = f"{where}: machines[{i}].instances[{j}]"
            try:
                if "profile_data" in row:
                    profile = Profile.from_dict(row["profile_data"], where=f"{w}.profile_data")
                    shipped = False
                else:
                    profile = resolve_profile(row["profile"])
                    shipped = True
                instances.append(PlannedInstance(
                    name=str(row["name"]), machine=str(m["name"]), address=str(m.get("address", "127.0.0.1")),
                    gpu=str(m["gpu"]), tp=int(row["tp"]), gpu_ids=tuple(int(g) for g in row["gpu_ids"]),
                    port=int(row["port"]), profile_ref=str(row["profile"]), profile=profile,
                    profile_shipped=shipped,
                    predicted_output_tokens_per_second=float(row["predicted"]["output_tokens_per_second"]),
                    predicted_batch=int(row["predicted"]["batch"])))
            except (KeyError, TypeError, ValueError) as exc:
                if isinstance(exc, ProfileError):
                    raise PlanError(f"{w}: {exc}") from None
                raise PlanError(f"{w}: malformed ({exc!r})") from None
    if not instances:
        raise PlanError(f"{where}: the plan deploys no instance")
    return PlanFile(model=str(data["model"]), objective=str(data.get("objective", "throughput")),
                    predicted_output_tokens_per_second=float(data.get("predicted_output_tokens_per_second", 0)),
                    instances=tuple(instances), machines=tuple(machines), source=where)


def load_plan(path: str | Path) -> PlanFile:
    return parse_plan(read_yaml(path, PlanError), where=str(path))
