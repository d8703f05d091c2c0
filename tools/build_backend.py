"""setuptools' build backend, plus mypy in the build environment when the wheel is to carry the compiled core.

    CAPBALANCER_COMPILE=1 pip wheel .     # a platform wheel whose scheduling core is compiled by mypyc
    pip wheel .                           # the pure-Python wheel (any platform), as before

pyproject.toml names this module (backend-path = ["tools"]). Only the build requirements change: mypy is
fetched into pip's isolated build environment only when CAPBALANCER_COMPILE asks for the compiled core, so the
plain wheel's build needs nothing more than setuptools. What the compiled build gains: bench/results/compiled.md.
"""

from __future__ import annotations

from typing import Any

from compile_sched import compile_requested  # beside this file: backend-path puts tools/ on sys.path
from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - the hooks this backend does not change

MYPYC_REQUIREMENT = "mypy>=1.11"  # the same floor as the dev extras in pyproject.toml


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    extra = [MYPYC_REQUIREMENT] if compile_requested() else []
    return list(_setuptools.get_requires_for_build_wheel(config_settings)) + extra
