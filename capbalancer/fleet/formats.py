"""The two YAML files that `--cluster` takes, told apart, so that the wrong one gets a hint, not a puzzle.

* a **fleet file** (`instances:`): engine instances that exist (or are simulated), each with its address and
  profile. `sim --cluster`, `des --cluster` and `serve`'s `fleet:` key read it. Examples: deploy/fleets/.
* a **cluster file** (`machines:`): machines and their GPUs, before anything runs. `plan --cluster` reads it
  and chooses the instances; `deploy --plan` then writes the fleet file (fleet.yaml). Examples: deploy/clusters/.
"""

from __future__ import annotations

from typing import Any

FLEET_HINT = ("a fleet file lists engine instances (`instances:` with name, engine, profile, host, port), "
              "as in deploy/fleets/")
CLUSTER_HINT = ("a cluster file lists machines (`machines:` with name, gpu, count), as in deploy/clusters/")


def looks_like_cluster(data: Any) -> bool:
    return isinstance(data, dict) and "machines" in data and "instances" not in data


def looks_like_fleet(data: Any) -> bool:
    return isinstance(data, dict) and "instances" in data and "machines" not in data


def cluster_given_for_fleet(where: str) -> str:
    return (f"{where} is a cluster file (machines:), the input of `capbalancer plan`; this command takes a "
            f"fleet file: {FLEET_HINT}. From a cluster: `capbalancer plan --cluster {where} --out plan.yaml`, "
            f"then `capbalancer deploy --plan plan.yaml --target scripts --out DIR` writes DIR/fleet.yaml")


def fleet_given_for_cluster(where: str) -> str:
    return (f"{where} is a fleet file (instances:), the input of `sim`, `des` and `serve`; "
            f"`plan --cluster` takes a cluster file: {CLUSTER_HINT}")
