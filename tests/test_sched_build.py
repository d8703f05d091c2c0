"""The scheduling core's optional compiled build (tools/compile_sched.py, `make compile`): which one loads, that a
stale or unwanted build never does, and that the compiled one decides exactly as the plain Python one."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES

import pytest

import capbalancer.sched as sched_pkg
import capbalancer.sched.scheduler as scheduler_mod
from capbalancer.sched import build_state
from tests.support import REPO


def test_the_flag_says_which_build_is_loaded() -> None:
    assert sched_pkg.COMPILED == scheduler_mod.__file__.endswith(tuple(EXTENSION_SUFFIXES))
    assert sched_pkg.BUILD.startswith("compiled" if sched_pkg.COMPILED else "pure Python")


def test_only_a_build_of_these_very_sources_loads(tmp_path) -> None:
    src = tmp_path / "scheduler.py"
    src.write_text("x = 1\n")
    assert build_state(str(tmp_path), {}) == (False, "pure Python", False)  # nothing built: nothing to say
    (tmp_path / f"scheduler{EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    compiled, words, warn = build_state(str(tmp_path), {})
    assert not compiled and warn and "compiled.json" in words  # built by hand, or half removed: not trusted
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    (tmp_path / "compiled.json").write_text(json.dumps({"sources": {"scheduler.py": digest}, "mypyc": "9.9"}))
    assert build_state(str(tmp_path), {}) == (True, "compiled (mypyc 9.9)", False)
    compiled, words, warn = build_state(str(tmp_path), {"CAPBALANCER_PURE": "1"})
    assert not compiled and not warn and "CAPBALANCER_PURE" in words
    assert build_state(str(tmp_path), {"CAPBALANCER_PURE": "0"})[0]
    src.write_text("x = 2\n")  # edited (or checked out) since the build
    compiled, words, warn = build_state(str(tmp_path), {})
    assert not compiled and warn and "stale" in words and "scheduler.py" in words


# Every policy on a mixed fleet (two profiled GPUs and one backend without a profile), in bursts that fill it:
# routes, holds, releases, expiries, refusals. Prints a digest of every decision and event, and which build ran.
DECIDE = r"""
import hashlib, random, sys
import capbalancer.sched as pkg, capbalancer.sched.scheduler as mod
from capbalancer.profiling.library import resolve_profile
from capbalancer.sched.policies import policy_names
from capbalancer.sched.scheduler import Scheduler
from capbalancer.sched.types import BackendSpec, Demand, PoolSettings

h = hashlib.sha256()
for policy, options in [(p, {}) for p in policy_names()] + [("capacity", {"ttft_objective_factor": 0.0})]:
    s = Scheduler([PoolSettings(name="m", policy=policy, policy_options=options, hold_max_requests=64,
                                hold_timeout_s=2.0)])
    for name, ref in (("h100", "h100-80g/llama-3.1-8b-tp1"), ("l4", "l4/llama-3.1-8b-tp1"), ("plain", None)):
        s.add_backend(BackendSpec(name, "m", engine="vllm", profile=resolve_profile(ref) if ref else None), 0.0)
    rng, live, now = random.Random(7), [], 0.0
    for i in range(400):
        now += rng.expovariate(200.0)
        d = s.submit(Demand(f"q{i}", "m", rng.randint(10, 4000), rng.randint(16, 1024), now,
                            priority=rng.choice((0, 0, 1))), now)
        h.update(f"{policy} {i} {d!r}".encode())
        if type(d).__name__ == "Route":
            live.append(f"q{i}")
        for ev in s.tick(now):
            h.update(repr(ev).encode())
        while live and (len(live) > 300 or rng.random() < 0.45):
            rid = live.pop(rng.randrange(len(live)))
            for ev in s.finish(rid, now, output_tokens=rng.randint(1, 500)):
                h.update(repr(ev).encode())
                if type(ev).__name__ == "Dispatch":
                    live.append(ev.request_id)
print(pkg.COMPILED, mod.__file__.endswith(".py"), h.hexdigest())
"""


def _decide(env_extra: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "CAPBALANCER_PURE"}
    env.update(PYTHONPATH=str(REPO), **env_extra)
    return subprocess.run([sys.executable, "-c", DECIDE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=True).stdout.split()


@pytest.mark.skipif(not sched_pkg.COMPILED, reason="no compiled build loaded here (make compile)")
def test_the_compiled_build_decides_exactly_as_the_plain_python_one() -> None:
    pure = _decide({"CAPBALANCER_PURE": "1"})
    compiled = _decide({})
    assert pure[:2] == ["False", "True"] and compiled[:2] == ["True", "False"]
    assert compiled[2] == pure[2]
