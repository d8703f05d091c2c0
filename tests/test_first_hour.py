"""A newcomer's first hour: the mistakes people make first end in one clear line, and the defaults work."""

from __future__ import annotations

import socket
import subprocess
import urllib.request

from tests.support import PYTHON, REPO, capbalancer, free_port, running


def test_make_run_takes_a_port() -> None:
    port = free_port()
    with running(["make", "--no-print-directory", "run", f"PORT={port}", f"PYTHON={PYTHON}"],
                 ready_url=f"http://127.0.0.1:{port}/ready", timeout_s=60, cwd=REPO):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
            assert resp.status == 200


def test_a_busy_port_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run(capbalancer("serve", "--port", str(port)), capture_output=True, text=True,
                             timeout=60, cwd=REPO)
    assert res.returncode == 1
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert f"port {port}" in lines[0] and "already in use" in lines[0] and "--port" in lines[0]
    assert "Traceback" not in res.stderr
