"""deploy --target kubernetes --proxy-replicas N: the proxy scaled, sharing in its config, the store rendered
(or an external one named); and the standalone example under deploy/replicas/ parses and validates."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import yaml
from support import REPO
from test_deploy import deploy, make_plan

from capbalancer.config import parse_config

K8S_VERSION = "1.30.0"


def _proxy_docs(out: Path) -> list[dict]:
    docs = list(yaml.safe_load_all((out / "kubernetes" / "base" / "capbalancer.yaml").read_text()))
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any schema error
    return docs


def test_kubernetes_replicas_share_through_a_rendered_or_external_store(tmp_path: Path) -> None:
    plan_path, _ = make_plan(tmp_path, "h100-l4")
    deploy(plan_path, tmp_path / "a", "--target", "kubernetes", "--proxy-replicas", "3")
    docs = _proxy_docs(tmp_path / "a")
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("ConfigMap", "capbalancer-config"), ("Deployment", "capbalancer"), ("Service", "capbalancer"),
        ("Deployment", "capbalancer-store"), ("Service", "capbalancer-store")]
    config = parse_config(yaml.safe_load(docs[0]["data"]["capbalancer.yaml"]))
    assert config.sharing is not None and config.sharing.store_url == "redis://capbalancer-store:6379/0"
    proxy = docs[1]
    assert proxy["spec"]["replicas"] == 3
    env = proxy["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "CAPBALANCER_REPLICA_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in env

    deploy(plan_path, tmp_path / "b", "--target", "kubernetes", "--proxy-replicas", "2",
           "--store-url", "redis://valkey.shared:6379/3")
    docs = _proxy_docs(tmp_path / "b")
    assert [d["metadata"]["name"] for d in docs] == ["capbalancer-config", "capbalancer", "capbalancer"]
    assert yaml.safe_load(docs[0]["data"]["capbalancer.yaml"])["sharing"]["store_url"] == "redis://valkey.shared:6379/3"


def test_standalone_replicas_example_validates() -> None:
    base = REPO / "deploy" / "replicas"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    docs = [d for name in kustomization["resources"] for d in yaml.safe_load_all((base / name).read_text())]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    config = parse_config(yaml.safe_load(config_map["data"]["capbalancer.yaml"]))
    assert config.sharing is not None
    proxy = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "capbalancer")
    assert proxy["spec"]["replicas"] >= 2
    assert any(d["kind"] == "Service" and d["metadata"]["name"] == "capbalancer-store" for d in docs)
