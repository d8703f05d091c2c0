"""The Kubernetes output as a kustomize tree: the rendered manifests as a base, two overlays on it.

    kubernetes/base/                    every Deployment/Service/ConfigMap, and kustomization.yaml
    kubernetes/overlays/staging/        namespace capbalancer-staging
    kubernetes/overlays/production/     namespace capbalancer, proxy CPU/memory requests and limits

    kubectl apply -k DIR/kubernetes/overlays/production

Each overlay pins the proxy image (`images:`): point `newName` at your registry after `make image` and a
push. The fields used (`bases`, `patchesStrategicMerge`, `images`, `namespace`) are the ones every kubectl
since 1.14 understands: Debian's kubectl (1.20) embeds kustomize 2.0.3, which knows no newer ones, while
kustomize 5 still accepts them (with a deprecation notice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from capbalancer import __version__

PROXY_IMAGE_NAME = "capbalancer"
PROXY_IMAGE = f"{PROXY_IMAGE_NAME}:{__version__}"  # what `make image` builds from the Dockerfile

# Sized for one proxy process: ~1 core carries a few thousand requests/s of relaying (bench/RESULTS.md).
_PRODUCTION_PROXY_RESOURCES = {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}


def _dump(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def _kustomization(**fields: Any) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **fields}


def _namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def _images() -> list[dict[str, str]]:
    return [{"name": PROXY_IMAGE_NAME, "newName": PROXY_IMAGE_NAME, "newTag": __version__}]


def write_kustomize(k8s_dir: Path, base_files: list[Path]) -> list[Path]:
    """Write kustomization.yaml beside `base_files` (in k8s_dir/base) and the overlays; returns the paths."""
    base = k8s_dir / "base"
    written = []
    path = base / "kustomization.yaml"
    path.write_text(_dump(_kustomization(resources=[p.name for p in base_files])))
    written.append(path)

    overlays: dict[str, dict[str, Any]] = {
        "staging": {"namespace": "capbalancer-staging", "patches": {}},
        "production": {"namespace": "capbalancer", "patches": {"proxy-resources.yaml": {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "capbalancer"},
            "spec": {"template": {"spec": {"containers": [
                {"name": "capbalancer", "resources": _PRODUCTION_PROXY_RESOURCES}]}}}}}},
    }
    for name, spec in overlays.items():
        d = k8s_dir / "overlays" / name
        d.mkdir(parents=True, exist_ok=True)
        files = {"namespace.yaml": _namespace(spec["namespace"]), **spec["patches"]}
        for file_name, doc in files.items():
            (d / file_name).write_text(_dump(doc))
            written.append(d / file_name)
        fields: dict[str, Any] = {"namespace": spec["namespace"], "bases": ["../../base"],
                                  "resources": ["namespace.yaml"], "images": _images()}
        if spec["patches"]:
            fields["patchesStrategicMerge"] = list(spec["patches"])
        path = d / "kustomization.yaml"
        path.write_text(_dump(_kustomization(**fields)))
        written.append(path)
    return written
