"""Only build hooks; all metadata is in pyproject.toml.

The CLI needs the repository's profiles/ and deploy/ folders (profiles, GPU and model specs, templates,
the dashboard). They live at the top of the repository, where people edit them, so a wheel would not
carry them: this hook copies them into the package as capbalancer/_shipped/ (see capbalancer/shipped.py).

With CAPBALANCER_COMPILE=1 the wheel also carries the scheduling core compiled by mypyc (a platform wheel;
tools/build_backend.py puts mypy in the build environment, and a C compiler and Python's headers must be
there): the same extensions and compiled.json that `make compile` builds in place (tools/compile_sched.py), so
the installed package loads them exactly as a checkout does (capbalancer/sched/__init__.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED_FOLDERS = ("profiles", "deploy")  # the same names as capbalancer/shipped.py
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


def _compile_sched() -> ModuleType:
    """tools/compile_sched.py, loaded by path (tools/ is not a package, and the sdist carries it)."""
    spec = importlib.util.spec_from_file_location("compile_sched", ROOT / "tools" / "compile_sched.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = _compile_sched()
COMPILE = TOOL.compile_requested()  # the same reading as tools/build_backend.py's


class BuildExtCompiled(build_ext):
    """Makes the compiled core's extensions when the build needs them (not when setup.py is read: pip reads it
    first to learn the build requirements, before mypy is in the build environment)."""

    def finalize_options(self) -> None:
        building = set(self.distribution.commands) & {"bdist_wheel", "build", "build_ext", "install"}
        if COMPILE and building and not self.distribution.ext_modules:
            why = TOOL.missing_tools()
            if why is not None:  # asked for explicitly: say why rather than ship a pure wheel under a platform tag
                raise SystemExit(f"CAPBALANCER_COMPILE is set, but the scheduling core cannot be compiled: {why}")
            os.chdir(ROOT)  # mypyc names modules by their paths from the project root
            self.distribution.ext_modules = TOOL.extensions(separate=False, opt_level="3",
                                                            build_dir=ROOT / "build" / "mypyc-wheel")
        super().finalize_options()


class CompiledDistribution(Distribution):
    def has_ext_modules(self) -> bool:  # a platform wheel, and build_ext runs, when the core is compiled
        return COMPILE or super().has_ext_modules()


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
        if COMPILE:  # the record the package checks before it loads the extensions beside these sources
            manifest = Path(self.build_lib) / "capbalancer" / "sched" / "compiled.json"
            manifest.write_text(TOOL.manifest_text(separate=False))


setup(cmdclass={"build_py": BuildPyWithShipped, "build_ext": BuildExtCompiled}, distclass=CompiledDistribution)
