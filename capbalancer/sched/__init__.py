"""The scheduling core: pure, no I/O, clock given (DESIGN invariant 1).

Its modules may run compiled by mypyc (`make compile`, tools/compile_sched.py): the same source as C
extensions beside the .py files, about four times less CPU per decision (bench/results/compiled.md). A
compiled build is used only when it was built from these very sources: the build records their hashes in
compiled.json, and where one differs (a source edited or checked out since) the .py files load instead, with a
warning; so does everything with CAPBALANCER_PURE=1 set. `COMPILED` says which this process runs, `BUILD` says
it in words (`capbalancer --version`, the serve log).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

MANIFEST = "compiled.json"  # written by tools/compile_sched.py: {"sources": {file name: sha256}, "mypyc": version}
_HERE = os.path.dirname(os.path.abspath(__file__))


def build_state(folder: str, environ: Mapping[str, str]) -> tuple[bool, str, bool]:
    """(compiled, in words, whether to warn) for the package in `folder`: compiled only when this interpreter's
    extension of the scheduler is there, CAPBALANCER_PURE is not set, and every source hashes as it did when built."""
    if not any(os.path.exists(os.path.join(folder, "scheduler" + s)) for s in importlib.machinery.EXTENSION_SUFFIXES):
        return False, "pure Python", False
    if environ.get("CAPBALANCER_PURE", "") not in ("", "0"):
        return False, "pure Python (CAPBALANCER_PURE is set: the compiled build is not loaded)", False
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        sources: dict[str, str] = manifest["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, f"pure Python (the compiled build has no readable {MANIFEST}: rebuild with `make compile`)", True
    for name, digest in sorted(sources.items()):
        try:
            with open(os.path.join(folder, name), "rb") as f:
                same = hashlib.sha256(f.read()).hexdigest() == digest
        except OSError:
            same = False
        if not same:
            return False, (f"pure Python (the compiled build is stale: {name} changed since it was built; "
                           "rebuild with `make compile`)"), True
    return True, f"compiled (mypyc {manifest.get('mypyc', '?')})", False


class _SourcesFirst:
    """Finds this package's modules as their .py files, ahead of the extensions beside them."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        package, _, leaf = fullname.rpartition(".")
        source = os.path.join(_HERE, leaf + ".py")
        if package != __name__ or not os.path.exists(source):
            return None
        return importlib.util.spec_from_file_location(fullname, source)


COMPILED, BUILD, _warn = build_state(_HERE, os.environ)
if not COMPILED and BUILD != "pure Python":
    # A build is there but must not run: the modules load from their sources (before any of them is imported).
    sys.meta_path.insert(0, _SourcesFirst())  # type: ignore[arg-type]
    if _warn:
        warnings.warn(f"capbalancer.sched: {BUILD}", RuntimeWarning, stacklevel=2)
