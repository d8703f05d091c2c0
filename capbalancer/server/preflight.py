"""Checks made before anything starts, so a common mistake ends in one clear line instead of a burst of
log lines from half-started simulators and client sessions."""

from __future__ import annotations

import errno
import socket


def port_problem(host: str, port: int) -> str | None:
    """Why the proxy could not listen on host:port, in one line, or None if it can (now)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # The same option the server sets: a port left in TIME_WAIT by a previous run is usable.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (f"port {port} on {host} is already in use (another capbalancer, or an engine: vLLM "
                        f"also defaults to 8000); choose another with --port N (make run PORT=N)")
            if exc.errno in (errno.EACCES, errno.EPERM):
                return f"not allowed to listen on port {port} (ports below 1024 need privileges); use --port N"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"address {host} is not an address of this machine; use --host"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None
