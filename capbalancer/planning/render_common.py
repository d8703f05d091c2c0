"""What every deploy target gets: the proxy config, the fleet description, profiles that are not shipped,
a Prometheus scrape example and the Grafana dashboard.

Instance URLs depend on the target: the machine's address for launch scripts, the Service's DNS name on
Kubernetes, 127.0.0.1 for a local run, so the URL scheme is passed in.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from capbalancer.planning.plan import PlanFile, PlannedInstance
from capbalancer.profiling.schema import save_profile
from capbalancer.shipped import shipped_dir

DEPLOY_DIR = shipped_dir("deploy")
DASHBOARD_PATH = DEPLOY_DIR / "grafana" / "capbalancer-dashboard.json"

FLEET_ENGINE = {"vllm": "vllm", "tgi": "tgi", "sim": "vllm"}  # the simulator speaks vLLM's API by default


def dns_name(name: str) -> str:
    """A Kubernetes / DNS-1035 label from an instance name."""
    out = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return (out if out[:1].isalpha() else f"i-{out}")[:63].rstrip("-")


def host_url(inst: PlannedInstance) -> str:
    return f"http://{inst.address}:{inst.port}"


def profile_ref_for(inst: PlannedInstance, out_dir: Path, absolute: bool) -> str:
    """Shipped profiles by name; others are written under out/profiles/ and referred to by path."""
    if inst.profile_shipped:
        return inst.profile_ref
    path = out_dir / "profiles" / f"{inst.profile_ref}.yaml"
    if not path.exists():
        save_profile(inst.profile, path)
    return str(path.resolve()) if absolute else str(path.relative_to(out_dir))


def fleet_dict(plan: PlanFile, engine: str, url_of: Callable[[PlannedInstance], tuple[str, int]], out_dir: Path,
               absolute_profiles: bool, time_scale: float = 1.0) -> dict[str, Any]:
    rows = []
    for inst in plan.instances:
        host, port = url_of(inst)
        row: dict[str, Any] = {"name": inst.name, "engine": FLEET_ENGINE[engine], "host": host, "port": port,
                               "profile": profile_ref_for(inst, out_dir, absolute_profiles)}
        if engine == "sim" and time_scale != 1.0:
            row["time_scale"] = time_scale
        rows.append(row)
    return {"model": plan.model, "instances": rows}


def proxy_config_dict(plan: PlanFile, fleet: dict[str, Any], policy: str = "capacity", host: str = "0.0.0.0",
                      port: int = 8080, profile_of: dict[str, str] | None = None) -> dict[str, Any]:
    profile_of = profile_of or {}
    backends = [{"name": r["name"], "url": f"http://{r['host']}:{r['port']}", "engine": r["engine"],
                 "profile": profile_of.get(r["name"], r["profile"])} for r in fleet["instances"]]
    return {"server": {"host": host, "port": port},
            "models": {plan.model: {"policy": policy, "backends": backends}}}


def slowed_profiles(plan: PlanFile, out_dir: Path, time_scale: float) -> dict[str, str]:
    """Profiles of simulated instances as they actually run: step times x time_scale.

    A `capbalancer sim --time-scale X` instance is X times slower than its profile, and the proxy plans with
    the profile it is given, so the proxy config points at these (the fleet keeps the originals + time_scale)."""
    out: dict[str, str] = {}
    for inst in plan.instances:
        p = inst.profile
        slowed = dataclasses.replace(p, name=f"{p.name}@x{time_scale:g}", step=p.step.scaled(time_scale),
                                     notes=f"{p.notes}; step times x{time_scale:g} (simulated with --time-scale)")
        path = out_dir / "profiles" / "time-scaled" / f"{inst.profile_ref}@x{time_scale:g}.yaml"
        save_profile(slowed, path)
        out[inst.name] = str(path.resolve())
    return out


def prometheus_dict(fleet: dict[str, Any], proxy_target: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "5s", "evaluation_interval": "15s"},
        "scrape_configs": [
            {"job_name": "capbalancer", "metrics_path": "/metrics", "static_configs": [{"targets": [proxy_target]}]},
            {"job_name": "engines", "metrics_path": "/metrics",
             # One group per instance: its `backend` label (the proxy's name for it) lets the dashboard's
             # model and backend variables filter the engines' own series too.
             "static_configs": [{"targets": [f"{r['host']}:{r['port']}"],
                                 "labels": {"model": fleet["model"], "backend": r["name"]}}
                                for r in fleet["instances"]]},
        ],
    }


def write_yaml(path: Path, data: Any, header: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=120))
    return path


def write_common(plan: PlanFile, out_dir: Path, engine: str, proxy_port: int,
                 url_of: Callable[[PlannedInstance], tuple[str, int]] | None = None,
                 proxy_host: str = "0.0.0.0", absolute_profiles: bool = False, time_scale: float = 1.0) -> list[Path]:
    url_of = url_of or (lambda inst: (inst.address, inst.port))
    fleet = fleet_dict(plan, engine, url_of, out_dir, absolute_profiles, time_scale)
    profile_of = slowed_profiles(plan, out_dir, time_scale) if engine == "sim" and time_scale != 1.0 else None
    written = [
        write_yaml(out_dir / "fleet.yaml", fleet,
                   f"# Fleet description for plan {plan.source} (capbalancer.fleet.description).\n"),
        write_yaml(out_dir / "capbalancer.yaml",
                   proxy_config_dict(plan, fleet, host=proxy_host, port=proxy_port, profile_of=profile_of),
                   f"# capbalancer serve --config capbalancer.yaml   (proxy on {proxy_host}:{proxy_port})\n"
                   f"# Every backend of the plan with its profile; predicted total "
                   f"{plan.predicted_output_tokens_per_second:,.0f} output tokens/s.\n"),
        write_yaml(out_dir / "prometheus.yml", prometheus_dict(fleet, f"capbalancer:{proxy_port}"),
                   "# Prometheus scrape example: the proxy and every engine instance of the plan.\n"),
    ]
    grafana = out_dir / "grafana-dashboard.json"
    shutil.copyfile(DASHBOARD_PATH, grafana)
    json.loads(grafana.read_text())  # fail here, not in Grafana, if the shipped dashboard is broken
    written.append(grafana)
    written.extend(sorted((out_dir / "profiles").rglob("*.yaml")) if (out_dir / "profiles").exists() else [])
    return written
