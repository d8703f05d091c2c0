"""Compile the pure scheduling core (capbalancer/sched/) with mypyc, in place: optional, for speed only.

    .venv/bin/python tools/compile_sched.py               # build the extensions next to the sources
    .venv/bin/python tools/compile_sched.py --if-possible # the same, but a missing tool or a failed build
                                                          # only says why (exit 0): what `make test` runs
    .venv/bin/python tools/compile_sched.py --clean       # remove them: the .py files load again
    .venv/bin/python tools/compile_sched.py --separate    # one extension per module (default: one group)

The build records the sha256 of every source it compiled in capbalancer/sched/compiled.json; the package loads
the extensions only while the sources still hash the same (capbalancer/sched/__init__.py), so an edit or a
checkout never runs stale compiled code. Needs mypy (mypyc, in the dev extras), a C compiler and Python's
headers. Measured gain and caveats: bench/results/compiled.md.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import inspect
import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHED = ROOT / "capbalancer" / "sched"
# Never compiled: the package's __init__ (it decides which build loads) and errors.py (a KeyError subclass,
# which mypyc cannot make a native class).
SKIP = {"__init__.py", "errors.py"}
MANIFEST = SCHED / "compiled.json"  # the same name as capbalancer/sched/__init__.py's MANIFEST
BUILD_DIR = ROOT / "build" / "mypyc"
GROUP = "capbalancer.sched.compiled"  # the shared library: capbalancer/sched/compiled__mypyc*.so


def compile_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a wheel's build is asked to carry the compiled core: CAPBALANCER_COMPILE set and not 0 (setup.py
    builds it, tools/build_backend.py puts mypy in the build environment)."""
    return environ.get("CAPBALANCER_COMPILE", "") not in ("", "0")


def sources() -> list[Path]:
    return sorted(p for p in SCHED.glob("*.py") if p.name not in SKIP)


def built_files() -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(SCHED / "*.so")) + glob.glob(str(SCHED / "*.pyd")))


def clean() -> None:
    for p in [*built_files(), MANIFEST]:
        p.unlink(missing_ok=True)
    shutil.rmtree(BUILD_DIR, ignore_errors=True)


def built_from_current_sources() -> bool:
    """Whether a build is there and was made from the sources as they are (what capbalancer/sched/ checks)."""
    try:
        recorded = json.loads(MANIFEST.read_text())["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    current = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sources()}
    return bool(built_files()) and recorded == current


def missing_tools() -> str | None:
    """Why a build cannot run here, or None."""
    try:
        import mypyc  # noqa: F401
    except ImportError:
        return "mypyc is not installed (it comes with mypy: pip install -e '.[dev]')"
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}) on the PATH"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return f"no Python.h in {sysconfig.get_paths()['include']} (Debian: python3-dev)"
    return None


def extensions(separate: bool, opt_level: str, build_dir: Path = BUILD_DIR) -> list[Any]:
    """The setuptools Extensions of the compiled core (mypyc writes their C under `build_dir`); run from ROOT.
    Also what setup.py builds into a wheel with CAPBALANCER_COMPILE=1."""
    from mypyc.build import mypycify

    paths = ["--ignore-missing-imports", *(str(p.relative_to(ROOT)) for p in sources())]
    separate = built_separate(separate)
    # One group names its shared library (else mypyc names it by a hash, at the top of the tree).
    kw: dict[str, Any] = {} if separate else {"group_name": GROUP}
    return list(mypycify(paths, opt_level=opt_level, separate=separate, target_dir=str(build_dir), **kw))


def built_separate(separate: bool) -> bool:
    """Whether a build asked for with `separate` makes one extension per module: also when this mypyc is too old
    to name a group (per-module libraries, which land inside the package)."""
    from mypyc.build import mypycify

    return separate or "group_name" not in inspect.signature(mypycify).parameters


def manifest_text(separate: bool) -> str:
    """compiled.json for a build made from the sources as they are now (capbalancer/sched/__init__.py reads it);
    `separate` as the build was asked for."""
    separate = built_separate(separate)
    try:
        from importlib.metadata import version
        mypyc_version = version("mypy")
    except Exception:  # noqa: BLE001 - the version is only reported
        mypyc_version = "?"
    return json.dumps({
        "sources": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sources()},
        "mypyc": mypyc_version, "python": sys.version.split()[0],
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"), "separate": separate,
    }, indent=1) + "\n"


def build(separate: bool, opt_level: str) -> None:
    from setuptools import Distribution
    from setuptools.command.build_ext import build_ext

    os.chdir(ROOT)  # mypyc's module names come from the paths, relative to the repository root
    clean()
    exts = extensions(separate, opt_level)
    # A bare Distribution: setuptools would otherwise read and validate pyproject.toml, which is not needed here.
    dist = Distribution({"name": "capbalancer-sched-compiled", "ext_modules": exts})
    cmd = build_ext(dist)
    cmd.inplace = True
    cmd.build_temp = str(BUILD_DIR / "temp")
    cmd.build_lib = str(BUILD_DIR / "lib")
    cmd.parallel = os.cpu_count() or 1
    cmd.ensure_finalized()
    cmd.run()
    MANIFEST.write_text(manifest_text(separate))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", action="store_true", help="remove the compiled modules and the build folder")
    ap.add_argument("--if-possible", action="store_true",
                    help="a missing tool or a failed build only says why, removes any partial build, exits 0")
    ap.add_argument("--separate", action="store_true", help="one extension per module, not one group")
    ap.add_argument("--opt-level", default="3")
    args = ap.parse_args()
    if args.clean:
        clean()
        return 0
    why = missing_tools()
    if why is not None:
        if built_files() and not built_from_current_sources():
            clean()  # it would never load again, only warn that it is stale
            why += " (the stale build there is removed)"
        print(f"compile_sched: not compiled, the scheduling core runs as plain Python: {why}")
        return 0 if args.if_possible else 2
    try:
        build(args.separate, args.opt_level)
    except (Exception, SystemExit) as exc:  # mypyc reports type errors with SystemExit
        if not args.if_possible:
            raise
        clean()
        print(f"compile_sched: the mypyc build failed ({type(exc).__name__}: {exc}); the scheduling core runs as "
              "plain Python. Run tools/compile_sched.py to see the whole error.")
        return 0
    print(f"compile_sched: {len(sources())} modules of capbalancer/sched/ compiled "
          f"({len(built_files())} extensions, {sysconfig.get_config_var('EXT_SUFFIX')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
