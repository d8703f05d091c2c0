"""Compile the pure scheduling core (capbalancer/sched/) with mypyc, in place: optional, for speed only.

    .venv/bin/python tools/compile_sched.py            # build the .so files next to the sources
    .venv/bin/python tools/compile_sched.py --clean    # remove them (the pure-Python modules load again)
    .venv/bin/python tools/compile_sched.py --separate # one extension per module (default: one group)

Nothing imports this script: without its output the same modules run as plain Python, and
`capbalancer.sched.COMPILED` says which is loaded. Needs mypy (mypyc) and a C compiler; see Makefile `compile`.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHED = ROOT / "capbalancer" / "sched"
# Never compiled: the package's own __init__ (it reports which build is loaded) and errors.py (a KeyError
# subclass, which mypyc cannot make a native class).
SKIP = {"__init__.py", "errors.py"}
BUILD_DIR = ROOT / "build" / "mypyc"
GROUP = "capbalancer.sched.compiled"  # the shared library: capbalancer/sched/compiled__mypyc*.so


def sources() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in SCHED.glob("*.py") if p.name not in SKIP)


def built_files() -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(SCHED / "*.so")) + glob.glob(str(SCHED / "*.pyd")))


def clean() -> None:
    for p in built_files():
        p.unlink()
    shutil.rmtree(BUILD_DIR, ignore_errors=True)


def build(separate: bool, opt_level: str) -> None:
    from mypyc.build import mypycify
    from setuptools import Distribution
    from setuptools.command.build_ext import build_ext

    os.chdir(ROOT)  # mypyc's paths and module names are relative to the repository root
    clean()
    exts = mypycify(["--ignore-missing-imports", *sources()], opt_level=opt_level, separate=separate, target_dir=str(BUILD_DIR),
                    group_name=None if separate else GROUP)
    # A bare Distribution: setuptools would otherwise read pyproject.toml, which is not ours to validate here.
    dist = Distribution({"name": "capbalancer-sched-compiled", "ext_modules": exts})
    cmd = build_ext(dist)
    cmd.inplace = True
    cmd.build_temp = str(BUILD_DIR / "temp")
    cmd.build_lib = str(BUILD_DIR / "lib")
    cmd.parallel = os.cpu_count() or 1
    cmd.ensure_finalized()
    cmd.run()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", action="store_true", help="remove the compiled modules and the build folder")
    ap.add_argument("--separate", action="store_true", help="one extension per module, not one group")
    ap.add_argument("--opt-level", default="3")
    args = ap.parse_args()
    if args.clean:
        clean()
        return 0
    build(args.separate, args.opt_level)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    print(f"compiled {len(sources())} modules of capbalancer/sched/ ({suffix}): "
          + ", ".join(p.name for p in built_files()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
