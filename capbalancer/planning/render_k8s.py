"""Kubernetes manifests: a Deployment and a Service per planned instance, and the proxy in front of them.

GPUs are requested as `nvidia.com/gpu: <tp>` and the node chosen by the GPU feature discovery label
`nvidia.com/gpu.product`, so an instance lands on the GPU type it was planned for (not necessarily on the
same machine as in the plan: any node of that type gives the same prediction, up to its interconnect).
Readiness is the engine's /health, the proxy's /ready (a routable backend). The files form a kustomize
base with staging and production overlays (render_kustomize.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from capbalancer.planning.plan import PlanFile, PlannedInstance
from capbalancer.planning.render_common import dns_name, proxy_config_dict
from capbalancer.planning.render_kustomize import PROXY_IMAGE, write_kustomize
from capbalancer.planning.render_scripts import tgi_args, vllm_args
from capbalancer.profiling.specs import load_specs


class _NoAliasDumper(yaml.SafeDumper):
    # Shared label dicts would otherwise come out as &id001 anchors, legal but unreadable in a manifest.
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_block(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # Multi-line strings (the proxy config in a ConfigMap) as literal blocks, readable with kubectl get -o yaml.
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_NoAliasDumper.add_representer(str, _str_block)


def dump_all(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_NoAliasDumper, sort_keys=False)


ENGINE_IMAGES = {"vllm": "vllm/vllm-openai:latest", "tgi": "ghcr.io/huggingface/text-generation-inference:latest"}
CONTAINER_PORT = 8000


def _labels(inst: PlannedInstance, model: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": dns_name(inst.name), "app.kubernetes.io/part-of": "capbalancer",
            "capbalancer/model": dns_name(model), "capbalancer/tp": str(inst.tp)}


def instance_manifests(plan: PlanFile, inst: PlannedInstance, engine: str, model_ref: str,
                       image: str | None) -> list[dict[str, Any]]:
    gpu = load_specs().gpu(inst.gpu)
    name = dns_name(inst.name)
    labels = _labels(inst, plan.model)
    # Inside the pod the engine sees only its own GPUs and listens on one fixed port.
    pod_inst = dataclasses.replace(inst, port=CONTAINER_PORT, gpu_ids=tuple(range(inst.tp)))
    argv = (vllm_args if engine == "vllm" else tgi_args)(pod_inst, plan.model, model_ref)
    container = {
        "name": engine, "image": image or ENGINE_IMAGES[engine],
        "command": argv[:1] if engine == "tgi" else ["vllm"], "args": argv[1:],
        "ports": [{"name": "http", "containerPort": CONTAINER_PORT}],
        "resources": {"limits": {"nvidia.com/gpu": inst.tp}, "requests": {"nvidia.com/gpu": inst.tp}},
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5,
                           "failureThreshold": 3},
        "startupProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10,
                         "failureThreshold": 90},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 15,
                          "failureThreshold": 4},
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
        "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token",
                                                                     "optional": True}}}],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {"capbalancer/planned-machine": inst.machine,
                                     "capbalancer/profile": inst.profile_ref,
                                     "capbalancer/predicted-output-tokens-per-second":
                                         f"{inst.predicted_output_tokens_per_second:.0f}"}},
        "spec": {
            "replicas": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "strategy": {"type": "Recreate"},  # never two copies holding the same GPUs' worth of memory
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"nvidia.com/gpu.product": gpu.k8s_product_label},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [container],
                    # Tensor parallelism exchanges through shared memory; the container default (64 MiB) is too small.
                    "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
        "spec": {"selector": {"app.kubernetes.io/name": name},
                 "ports": [{"name": "http", "port": CONTAINER_PORT, "targetPort": "http"}]},
    }
    return [deployment, service]


def proxy_manifests(plan: PlanFile, engine: str, proxy_port: int) -> list[dict[str, Any]]:
    fleet = {"model": plan.model, "instances": [
        {"name": i.name, "engine": engine, "host": dns_name(i.name), "port": CONTAINER_PORT,
         "profile": i.profile_ref if i.profile_shipped else f"/etc/capbalancer/profiles/{i.profile_ref}.yaml"}
        for i in plan.instances]}
    config = proxy_config_dict(plan, fleet, host="0.0.0.0", port=proxy_port)
    labels = {"app.kubernetes.io/name": "capbalancer", "app.kubernetes.io/part-of": "capbalancer"}
    profile_files = {f"{dns_name(i.profile_ref)}.yaml": yaml.safe_dump(i.profile.to_dict(), sort_keys=False)
                     for i in plan.instances if not i.profile_shipped}
    docs: list[dict[str, Any]] = [{
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "capbalancer-config", "labels": labels},
        "data": {"capbalancer.yaml": yaml.safe_dump(config, sort_keys=False)},
    }]
    volumes = [{"name": "config", "configMap": {"name": "capbalancer-config"}}]
    mounts = [{"name": "config", "mountPath": "/etc/capbalancer/config"}]
    if profile_files:
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "capbalancer-profiles",
                                                                            "labels": labels},
                     "data": profile_files})
        volumes.append({"name": "profiles", "configMap": {"name": "capbalancer-profiles", "items": [
            {"key": f"{dns_name(i.profile_ref)}.yaml", "path": f"{i.profile_ref}.yaml"}
            for i in plan.instances if not i.profile_shipped]}})
        mounts.append({"name": "profiles", "mountPath": "/etc/capbalancer/profiles"})
    docs.append({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "capbalancer", "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": "capbalancer"}},
                 "template": {"metadata": {"labels": labels, "annotations": {"prometheus.io/scrape": "true",
                                                                             "prometheus.io/port": str(proxy_port)}},
                              "spec": {"containers": [{
                                  "name": "capbalancer", "image": PROXY_IMAGE,
                                  "args": ["serve", "--config", "/etc/capbalancer/config/capbalancer.yaml",
                                           "--port", str(proxy_port)],
                                  "ports": [{"name": "http", "containerPort": proxy_port}],
                                  # Ready once a backend is routable; alive while the process answers.
                                  "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"},
                                                     "periodSeconds": 5},
                                  "livenessProbe": {"httpGet": {"path": "/health", "port": "http"},
                                                    "periodSeconds": 15, "failureThreshold": 4},
                                  "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                                      "allowPrivilegeEscalation": False,
                                                      "readOnlyRootFilesystem": True},
                                  "volumeMounts": mounts}],
                                  "volumes": volumes}}},
    })
    docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "capbalancer", "labels": labels},
                 "spec": {"selector": {"app.kubernetes.io/name": "capbalancer"},
                          "ports": [{"name": "http", "port": proxy_port, "targetPort": "http"}]}})
    return docs


def write_manifests(plan: PlanFile, out_dir: Path, engine: str, model_path: str | None = None,
                    image: str | None = None, proxy_port: int = 8080, proxy_replicas: int = 1,
                    store_url: str | None = None) -> list[Path]:
    if engine not in ("vllm", "tgi"):
        raise ValueError(f"Kubernetes manifests are for vllm or tgi, not {engine!r}")
    model_ref = model_path or load_specs().model(plan.model).hf_id
    k8s_dir = out_dir / "kubernetes"
    base_dir = k8s_dir / "base"
    base_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for inst in plan.instances:
        path = base_dir / f"{dns_name(inst.name)}.yaml"
        path.write_text(f"# {inst.name}: TP{inst.tp} on {inst.gpu}, planned on machine {inst.machine}\n"
                        + dump_all(instance_manifests(plan, inst, engine, model_ref, image)))
        written.append(path)
    path = base_dir / "capbalancer.yaml"
    from capbalancer.cluster.k8s import with_replicas  # N replicas share reservations (docs/replicas.md)

    path.write_text("# The capbalancer proxy in front of the plan's instances.\n"
                    + dump_all(with_replicas(proxy_manifests(plan, engine, proxy_port), proxy_replicas, store_url)))
    written.append(path)
    return written + write_kustomize(k8s_dir, written)
