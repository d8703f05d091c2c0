"""Only a build hook; all metadata is in pyproject.toml.

The CLI needs the repository's profiles/ and deploy/ folders (profiles, GPU and model specs, templates,
the dashboard). They live at the top of the repository, where people edit them, so a wheel would not
carry them: this hook copies them into the package as capbalancer/_shipped/ (see capbalancer/shipped.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED_FOLDERS = ("profiles", "deploy")  # the same names as capbalancer/shipped.py
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


class BuildPyWithShipped(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the source tree's folders directly
        target = Path(self.build_lib) / "capbalancer" / "_shipped"
        for name in SHIPPED_FOLDERS:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, target / name, ignore=IGNORED, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithShipped})
