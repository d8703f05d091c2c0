"""Every test cleans up the processes it started: checked, not assumed.

Each test runs with a marker in the environment its subprocesses inherit (proxies, simulated engines, stores,
and their children). After the test, any live process still carrying that test's marker is a leak: it is
killed and the test errors, naming it. Processes of module- and session-scoped fixtures are started before the
marker is set, so they are not counted. `CAPBALANCER_LEAK_CHECK=warn` only reports; `off` skips the check.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

MARK = "CAPBALANCER_TEST_NODE"
PROC = Path("/proc")
GRACE_S = 3.0  # a process may still be on its way out (SIGTERM sent, exit pending) when the test returns


def _carrying(token: bytes) -> dict[int, str]:
    """Live (not zombie) processes whose environment holds `token`, with their command lines."""
    found: dict[int, str] = {}
    me = os.getpid()
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if token not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.fixture(autouse=True)
def _no_leaked_processes(request: pytest.FixtureRequest):
    mode = os.environ.get("CAPBALANCER_LEAK_CHECK", "fail")
    if mode == "off" or not PROC.is_dir():
        yield
        return
    value = f"{os.getpid()}:{request.node.nodeid}"
    token = f"{MARK}={value}\0".encode()
    os.environ[MARK] = value
    try:
        yield
    finally:
        os.environ.pop(MARK, None)
    deadline = time.monotonic() + GRACE_S
    leaked = _carrying(token)
    while leaked and time.monotonic() < deadline:
        time.sleep(0.1)
        leaked = _carrying(token)
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if leaked:
        names = "; ".join(f"pid {pid}: {cmd[:160]}" for pid, cmd in leaked.items())
        message = f"the test left {len(leaked)} process(es) running (now killed): {names}"
        if mode == "warn":
            with open("/tmp/capbalancer-leaks.txt", "a") as out:
                out.write(f"{request.node.nodeid}: {message}\n")
        else:
            pytest.fail(message, pytrace=False)
