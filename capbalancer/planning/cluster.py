"""The cluster file `capbalancer plan` reads: which machines there are and what GPUs they hold.

    model: llama-2-13b          # optional: the default for --model
    workload:                   # optional: the traffic shape throughput is predicted for
      prompt_tokens: 512
      output_tokens: 128
    machines:
      - name: a100-box
        gpu: a100-80g           # a key of profiles/gpus.yaml
        count: 2
        interconnect: nvlink3   # optional: defaults to the GPU's own (gpus.yaml)
        address: 10.0.0.11      # optional: where the instances will listen (default 127.0.0.1)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capbalancer.fleet.formats import fleet_given_for_cluster, looks_like_fleet
from capbalancer.profiling.specs import SpecBook, SpecError
from capbalancer.yamlfile import read_yaml


class ClusterError(ValueError):
    """A cluster file that cannot be used; the message names the file and the key path."""


@dataclass(frozen=True, slots=True)
class Machine:
    name: str
    gpu: str
    count: int
    interconnect: str
    address: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Workload:
    prompt_tokens: int = 512
    output_tokens: int = 128


@dataclass(frozen=True, slots=True)
class Cluster:
    machines: tuple[Machine, ...]
    model: str | None = None
    workload: Workload = Workload()
    source: str = "<cluster>"

    @property
    def gpu_count(self) -> int:
        return sum(m.count for m in self.machines)


def _positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ClusterError(f"{where}: must be a positive integer, got {value!r}")
    return value


def parse_cluster(data: Any, specs: SpecBook, where: str = "<cluster>") -> Cluster:
    if not isinstance(data, dict):
        raise ClusterError(f"{where}: a cluster file is a mapping with a 'machines' list")
    if looks_like_fleet(data):
        raise ClusterError(fleet_given_for_cluster(where))
    unknown = sorted(set(data) - {"model", "workload", "machines"})
    if unknown:
        raise ClusterError(f"{where}: {unknown[0]}: unknown key")
    rows = data.get("machines")
    if not isinstance(rows, list) or not rows:
        raise ClusterError(f"{where}: machines: must be a non-empty list")
    machines = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        path = f"{where}: machines[{i}]"
        if not isinstance(row, dict):
            raise ClusterError(f"{path}: must be a mapping")
        bad = sorted(set(row) - {"name", "gpu", "count", "interconnect", "address"})
        if bad:
            raise ClusterError(f"{path}.{bad[0]}: unknown key")
        name = row.get("name", f"machine-{i}")
        if not isinstance(name, str) or not name or name in seen:
            raise ClusterError(f"{path}.name: must be a unique non-empty string, got {name!r}")
        seen.add(name)
        gpu = row.get("gpu")
        try:
            gpu_spec = specs.gpu(str(gpu))
        except SpecError as exc:
            raise ClusterError(f"{path}.gpu: {exc}") from None
        link = row.get("interconnect", gpu_spec.interconnect)
        try:
            specs.interconnect(str(link))
        except SpecError as exc:
            raise ClusterError(f"{path}.interconnect: {exc}") from None
        address = row.get("address", "127.0.0.1")
        if not isinstance(address, str) or not address:
            raise ClusterError(f"{path}.address: must be a host name or address")
        machines.append(Machine(name=name, gpu=gpu_spec.name, count=_positive_int(row.get("count", 1), f"{path}.count"),
                                interconnect=str(link), address=address))
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ClusterError(f"{where}: model: must be a model name")
    wl = data.get("workload") or {}
    if not isinstance(wl, dict) or set(wl) - {"prompt_tokens", "output_tokens"}:
        raise ClusterError(f"{where}: workload: takes prompt_tokens and output_tokens")
    workload = Workload(prompt_tokens=_positive_int(wl.get("prompt_tokens", 512), f"{where}: workload.prompt_tokens"),
                        output_tokens=_positive_int(wl.get("output_tokens", 128), f"{where}: workload.output_tokens"))
    return Cluster(machines=tuple(machines), model=model, workload=workload, source=where)


def load_cluster(path: str | Path, specs: SpecBook) -> Cluster:
    return parse_cluster(read_yaml(path, ClusterError), specs, where=str(path))
