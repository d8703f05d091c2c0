"""Child processes for the demo and the peer benchmark: started in their own process group, logged to a
file, waited for over HTTP, and always stopped (the whole group, by the id we started) when done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


class ProcessFailed(RuntimeError):
    pass


@dataclass(slots=True)
class ManagedProcess:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_process_group(self.proc, timeout_s)


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 10.0) -> int | None:
    """SIGTERM the process group of a child started in its own session, SIGKILL it after `timeout_s`; its exit
    code (None only if even SIGKILL did not end it within 5 s)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    return proc.returncode


def capbalancer_argv(*args: str) -> list[str]:
    """Run the CLI with this interpreter, so a venv's capbalancer is used whatever PATH says."""
    return [sys.executable, "-m", "capbalancer.cli", *args]


def start_process(name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - the child owns it; closed when we are done with it
    try:
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                cwd=str(cwd) if cwd else None, start_new_session=True)
    finally:
        log.close()
    return ManagedProcess(name=name, proc=proc, log_path=log_path)


def wait_http(url: str, timeout_s: float, process: ManagedProcess | None = None,
              ok_below: int = 500) -> None:
    """Wait until GET url answers with a status below ok_below, or raise with the process's log."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise ProcessFailed(f"{process.name} exited with {process.proc.returncode} before {url} answered; "
                                f"log {process.log_path}:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                if resp.status < ok_below:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < ok_below:
                return
            last = f"HTTP {exc.code}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.1)
    where = f"; log {process.log_path}:\n{process.log_tail()}" if process is not None else ""
    raise ProcessFailed(f"{url} did not answer within {timeout_s:g} s ({last}){where}")


class ProcessGroup:
    """Processes stopped together, newest first, however the block is left."""

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []

    def add(self, process: ManagedProcess) -> ManagedProcess:
        self.processes.append(process)
        return process

    def stop(self, process: ManagedProcess) -> None:
        process.stop()
        if process in self.processes:
            self.processes.remove(process)

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()


@contextlib.contextmanager
def process_group() -> Iterator[ProcessGroup]:
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.stop_all()
