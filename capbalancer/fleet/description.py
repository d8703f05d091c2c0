"""The fleet description: one YAML file that names every engine instance of a cluster.

The same file is served by `capbalancer sim --cluster FILE`, emitted by `capbalancer deploy`, and
referenced from the proxy's config (`fleet: FILE`), so one file describes a fleet everywhere:

    model: llama-2-13b            # default served model name for instances that do not set one
    instances:
      - name: a100-0
        engine: vllm              # vllm | tgi | sglang | openai
        profile: a100-80g/llama-2-13b-tp1   # a profile name under profiles/, or a path to a profile file
        host: 127.0.0.1
        port: 8101
        model: llama-2-13b        # optional, overrides the top-level model
        time_scale: 1.0           # simulator only: >1 runs slower than the modelled GPU
        api_key_env: NAME         # optional: env var holding this instance's API key
        gpu_group: gpu1           # optional: instances naming one group share one GPU (a name or a card index)
        lora_modules: {sql: /adapters/sql}   # optional, simulator: LoRA adapters served (name: path)
        interference: 2.0         # simulator only: factor on the busy siblings' steps each step waits for

Instances of one `gpu_group` are engines on one card (several vLLM processes, each with a fraction of its
memory): the proxy's capacity model and the simulator make a step of one wait for the busy others' steps.
They must be on one host and, for the simulator's shared clock, have one `time_scale`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from capbalancer.fleet.formats import cluster_given_for_fleet, looks_like_cluster
from capbalancer.profiling.schema import ENGINE_KINDS
from capbalancer.yamlfile import read_yaml


class FleetError(ValueError):
    """A fleet description that cannot be used; the message names the file and the key path."""


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    name: str
    engine: str
    model: str
    host: str
    port: int
    profile: str | None = None  # profile name or path (resolved by capbalancer.profiling.library)
    time_scale: float = 1.0
    api_key_env: str | None = None
    gpu_group: str | None = None  # instances with the same group share one GPU
    lora_modules: tuple[tuple[str, str], ...] = ()  # simulator: LoRA adapters served, (name, path)
    # Simulator only: how much a busy sibling on its GPU slows it, as a factor on the sibling's step time
    # (1.0: sum-of-steps; real co-location without MPS measured ~2, sim/gpu_share.py).
    interference: float = 1.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class FleetDescription:
    instances: tuple[InstanceSpec, ...]
    source: str = "<fleet>"  # the file it came from, for error messages and relative profile paths

    def to_dict(self) -> dict[str, Any]:
        out = []
        for inst in self.instances:
            row: dict[str, Any] = {"name": inst.name, "engine": inst.engine, "model": inst.model,
                                   "host": inst.host, "port": inst.port}
            if inst.profile is not None:
                row["profile"] = inst.profile
            if inst.time_scale != 1.0:
                row["time_scale"] = inst.time_scale
            if inst.api_key_env:
                row["api_key_env"] = inst.api_key_env
            if inst.gpu_group is not None:
                row["gpu_group"] = inst.gpu_group
            if inst.lora_modules:
                row["lora_modules"] = dict(inst.lora_modules)
            if inst.interference != 1.0:
                row["interference"] = inst.interference
            out.append(row)
        return {"instances": out}


def parse_fleet(data: Any, where: str = "<fleet>") -> FleetDescription:
    if not isinstance(data, dict):
        raise FleetError(f"{where}: a fleet description is a mapping with an 'instances' list")
    if looks_like_cluster(data):
        raise FleetError(cluster_given_for_fleet(where))
    default_model = data.get("model")
    rows = data.get("instances")
    if not isinstance(rows, list) or not rows:
        raise FleetError(f"{where}: instances: must be a non-empty list")
    seen_names: set[str] = set()
    seen_addrs: set[tuple[str, int]] = set()
    instances = []
    for i, row in enumerate(rows):
        path = f"{where}: instances[{i}]"
        if not isinstance(row, dict):
            raise FleetError(f"{path}: must be a mapping")
        unknown = sorted(set(row) - {"name", "engine", "model", "host", "port", "profile", "time_scale",
                                     "api_key_env", "gpu_group", "lora_modules", "interference"})
        if unknown:
            raise FleetError(f"{path}.{unknown[0]}: unknown key")
        name = row.get("name", f"instance-{i}")
        if not isinstance(name, str) or not name:
            raise FleetError(f"{path}.name: must be a non-empty string")
        if name in seen_names:
            raise FleetError(f"{path}.name: {name!r} is used twice")
        engine = row.get("engine", "vllm")
        if engine not in ENGINE_KINDS:
            raise FleetError(f"{path}.engine: {engine!r} is not one of {', '.join(ENGINE_KINDS)}")
        model = row.get("model", default_model)
        if not isinstance(model, str) or not model:
            raise FleetError(f"{path}.model: missing (set it here or at the top level)")
        host = row.get("host", "127.0.0.1")
        if not isinstance(host, str) or not host:
            raise FleetError(f"{path}.host: must be a host name or address")
        port = row.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise FleetError(f"{path}.port: must be an integer in 1..65535, got {port!r}")
        if (host, port) in seen_addrs:
            raise FleetError(f"{path}.port: {host}:{port} is used twice")
        profile = row.get("profile")
        if profile is not None and not isinstance(profile, str):
            raise FleetError(f"{path}.profile: must be a profile name or path")
        time_scale = row.get("time_scale", 1.0)
        if not isinstance(time_scale, (int, float)) or isinstance(time_scale, bool) or time_scale <= 0:
            raise FleetError(f"{path}.time_scale: must be a number > 0, got {time_scale!r}")
        api_key_env = row.get("api_key_env")
        if api_key_env is not None and not isinstance(api_key_env, str):
            raise FleetError(f"{path}.api_key_env: must be an environment variable name")
        gpu_group = row.get("gpu_group")
        if isinstance(gpu_group, int) and not isinstance(gpu_group, bool) and gpu_group >= 0:
            gpu_group = str(gpu_group)  # a card index names the group as well as a string
        elif gpu_group is not None and (not isinstance(gpu_group, str) or not gpu_group):
            raise FleetError(f"{path}.gpu_group: must be a group name or a GPU index (an integer >= 0), "
                             f"got {gpu_group!r}")
        lora = row.get("lora_modules") or {}
        if not isinstance(lora, dict) or not all(isinstance(k, str) and k and isinstance(v, str)
                                                 for k, v in lora.items()):
            raise FleetError(f"{path}.lora_modules: must map adapter names to paths")
        interference = row.get("interference", 1.0)
        if not isinstance(interference, (int, float)) or isinstance(interference, bool) or interference < 0:
            raise FleetError(f"{path}.interference: must be a number >= 0, got {interference!r}")
        seen_names.add(name)
        seen_addrs.add((host, port))
        instances.append(InstanceSpec(name=name, engine=engine, model=model, host=host, port=port,
                                      profile=profile, time_scale=float(time_scale), api_key_env=api_key_env,
                                      gpu_group=gpu_group, lora_modules=tuple(lora.items()),
                                      interference=float(interference)))
    _check_gpu_groups(instances, where)
    return FleetDescription(instances=tuple(instances), source=where)


def _check_gpu_groups(instances: list[InstanceSpec], where: str) -> None:
    """Engines sharing a GPU run on one machine, and the simulator runs them on one clock."""
    first: dict[str, tuple[int, InstanceSpec]] = {}
    for i, inst in enumerate(instances):
        if inst.gpu_group is None:
            continue
        if inst.gpu_group not in first:
            first[inst.gpu_group] = (i, inst)
            continue
        j, other = first[inst.gpu_group]
        path = f"{where}: instances[{i}].gpu_group"
        if inst.host != other.host:
            raise FleetError(f"{path}: group {inst.gpu_group!r} spans hosts {other.host} (instances[{j}] "
                             f"{other.name!r}) and {inst.host}: engines sharing a GPU run on one machine "
                             f"(name groups per machine, e.g. '{inst.host}:0')")
        if inst.time_scale != other.time_scale:
            raise FleetError(f"{path}: group {inst.gpu_group!r} mixes time_scale {other.time_scale:g} "
                             f"(instances[{j}] {other.name!r}) and {inst.time_scale:g}: engines sharing a GPU "
                             f"must run at one speed")


def load_fleet(path: str | Path) -> FleetDescription:
    return parse_fleet(read_yaml(path, FleetError), where=str(path))


def save_fleet(fleet: FleetDescription, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(fleet.to_dict(), sort_keys=False))
