"""Helpers shared by tests: free ports, real subprocesses that are always cleaned up, readiness waits."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from capbalancer.loadtest.procs import stop_process_group

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until GET url answers (any status below 500), or fail with the process's output."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{out[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
            last = str(exc)
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s: {last}")


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    stop_process_group(proc, timeout_s)


@contextlib.contextmanager
def running(args: list[str], ready_url: str | None = None, timeout_s: float = 30.0,
            env: dict[str, str] | None = None, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """Start a real process in its own process group; wait for ready_url; always stop it after."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # Output to a file, never a pipe nobody reads: a process that logs more than the pipe holds (64 KB) would block
    # in its next write and look hung (seen with a fault server's tracebacks, tests/faults.py).
    output = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT, env=full_env,
                            cwd=str(cwd or REPO), start_new_session=True)
    try:
        if ready_url is not None:
            try:
                wait_http(ready_url, timeout_s, proc)
            except (RuntimeError, TimeoutError) as exc:
                output.seek(0)
                tail = output.read()[-4000:].decode(errors="replace")
                raise type(exc)(f"{exc}\n--- its output ---\n{tail}") from None
        yield proc
    finally:
        stop_process(proc)
        output.close()


def capbalancer(*args: str) -> list[str]:
    """argv for running the CLI from the current interpreter (no reliance on PATH)."""
    return [PYTHON, "-m", "capbalancer.cli", *args]


def post_json(url: str, body: object, timeout_s: float = 10.0) -> tuple[int, object]:
    """POST a JSON body; (status, the JSON answer) for any status."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
