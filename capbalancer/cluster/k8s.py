"""Kubernetes output for N proxy replicas: the proxy Deployment scaled, `sharing:` in its config, and the
store (a one-pod Valkey Deployment and Service) unless an external one is named.

The store holds only a few KB of short-lived state that the replicas republish every interval, so it
needs no persistence and no replica of its own: if it restarts, the proxies count alone for a moment and
re-join (docs/replicas.md). Each pod's replica id is its pod name (downward API).
"""

from __future__ import annotations

from typing import Any

import yaml

STORE_NAME = "capbalancer-store"
STORE_IMAGE = "valkey/valkey:8-alpine"
STORE_PORT = 6379


def store_manifests(labels: dict[str, str]) -> list[dict[str, Any]]:
    store_labels = {**labels, "app.kubernetes.io/name": STORE_NAME}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": STORE_NAME, "labels": store_labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": STORE_NAME}},
                  "template": {"metadata": {"labels": store_labels}, "spec": {"containers": [{
                      "name": "valkey", "image": STORE_IMAGE,
                      # Nothing to persist: replicas republish their state every interval.
                      "args": ["--save", "", "--appendonly", "no", "--maxmemory", "64mb"],
                      "ports": [{"name": "redis", "containerPort": STORE_PORT}],
                      "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5},
                      "resources": {"requests": {"cpu": "100m", "memory": "32Mi"},
                                    "limits": {"memory": "128Mi"}}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": STORE_NAME, "labels": store_labels},
         "spec": {"selector": {"app.kubernetes.io/name": STORE_NAME},
                  "ports": [{"name": "redis", "port": STORE_PORT, "targetPort": "redis"}]}},
    ]


def with_replicas(docs: list[dict[str, Any]], replicas: int, store_url: str | None = None,
                  config_map: str = "capbalancer-config", config_key: str = "capbalancer.yaml",
                  deployment: str = "capbalancer") -> list[dict[str, Any]]:
    """The proxy's manifests (`docs`, as render_k8s.proxy_manifests makes them) for `replicas` replicas."""
    if replicas <= 1:
        return docs
    url = store_url or f"redis://{STORE_NAME}:{STORE_PORT}/0"
    labels: dict[str, str] = {}
    for doc in docs:
        meta = doc.get("metadata", {})
        if doc.get("kind") == "ConfigMap" and meta.get("name") == config_map:
            config = yaml.safe_load(doc["data"][config_key])
            config["sharing"] = {"store_url": url, "interval_ms": 50, "staleness_ms": 1000, "timeout_ms": 200}
            doc["data"][config_key] = yaml.safe_dump(config, sort_keys=False)
        if doc.get("kind") == "Deployment" and meta.get("name") == deployment:
            labels = dict(meta.get("labels", {}))
            doc["spec"]["replicas"] = replicas
            for container in doc["spec"]["template"]["spec"]["containers"]:
                container.setdefault("env", []).append(
                    {"name": "CAPBALANCER_REPLICA_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
                # /ready stays 200 while sharing is degraded: a replica counting alone still serves.
    return docs + ([] if store_url else store_manifests(labels))
