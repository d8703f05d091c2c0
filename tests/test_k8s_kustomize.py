"""`deploy --target kubernetes` is a kustomize tree that `kubectl kustomize` renders (base and overlays) into
manifests the Kubernetes API schemas accept; the proxy runs the image the Dockerfile builds, ready on /ready.

kubectl comes from `make k8s-tools` (Debian's package when none is installed); kubernetes-validate checks
each rendered object against the OpenAPI schema of a recent Kubernetes release, offline.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from support import REPO, capbalancer

from capbalancer import __version__

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed: run `make k8s-tools`")
K8S_VERSION = "1.30.0"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("k8s")
    plan = tmp / "plan.yaml"
    subprocess.run(capbalancer("plan", "--cluster", str(REPO / "deploy" / "clusters" / "h100-l4.yaml"), "--out",
                               str(plan)), check=True, capture_output=True, cwd=REPO, timeout=120)
    subprocess.run(capbalancer("deploy", "--plan", str(plan), "--target", "kubernetes", "--out", str(tmp / "out")),
                   check=True, capture_output=True, cwd=REPO, timeout=120)
    return tmp / "out" / "kubernetes"


def _render(path: Path) -> list[dict]:
    res = subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.mark.parametrize("which", ["base", "overlays/staging", "overlays/production"])
def test_every_rendered_object_is_valid(tree: Path, which: str) -> None:
    docs = _render(tree / which)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") == kinds.count("Service") >= 2  # the instances and the proxy
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any schema error
    proxy = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "capbalancer")
    container = proxy["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"capbalancer:{__version__}"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["securityContext"]["runAsNonRoot"] is True
    if which != "base":
        namespace = "capbalancer" if which.endswith("production") else "capbalancer-staging"
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {namespace}
        assert any(d["kind"] == "Namespace" and d["metadata"]["name"] == namespace for d in docs)
    if which.endswith("production"):
        assert container["resources"]["requests"]["cpu"] == "1"


def test_the_image_the_manifests_name_is_the_one_make_image_builds() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"docker build .*-t capbalancer:\$\(VERSION\)", makefile)
    assert f'__version__ = "{__version__}"' in (REPO / "capbalancer" / "__init__.py").read_text()
