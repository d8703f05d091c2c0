"""Where the files that ship with capbalancer live: profiles/ (with gpus.yaml, models.yaml) and deploy/
(templates, Grafana dashboard, Prometheus example, example fleets and clusters, the kustomize base).

In a source tree (a git checkout, an editable install) they are the repository's own top-level folders, so
an edit there takes effect at once. An installed wheel has no source tree: setup.py's build step copies the
same folders into the package as `capbalancer/_shipped/`, and they are read from there.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_ROOT = _PACKAGE_DIR.parent
PACKAGED_DIR = _PACKAGE_DIR / "_shipped"
SHIPPED_FOLDERS = ("profiles", "deploy")


def in_source_tree() -> bool:
    """True when running from the repository (its pyproject.toml beside the package)."""
    return (_SOURCE_ROOT / "pyproject.toml").is_file() and (_SOURCE_ROOT / "profiles").is_dir()


def shipped_dir(name: str) -> Path:
    """The folder `name` (one of SHIPPED_FOLDERS): the source tree's, else the installed package's copy."""
    if name not in SHIPPED_FOLDERS:
        raise ValueError(f"not a shipped folder: {name!r}")
    return _SOURCE_ROOT / name if in_source_tree() else PACKAGED_DIR / name
