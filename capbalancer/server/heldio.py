"""Non-blocking socket calls that keep the GIL: the front door's (server/frontdoor.py).

Why: CPython's socket methods and `os.close` release the GIL around every system call, even one on a
non-blocking descriptor that cannot wait. While the event loop's thread is busy, a thread that has released
the GIL gets it back only once the loop is made to yield it, after a switch interval (`sys.setswitchinterval`,
0.5 ms in `serve`): the "convoy effect" of CPython's GIL (bpo-7946). Refusing a connection at the door takes
about seven such calls (accept, peek, send, shutdown, the drain's read, close...), so under a 10x overload the
door refused a few hundred connections a second and its 429s waited hundreds of milliseconds
(bench/results/robust5.md, seventh pass). The same calls made through `ctypes.PyDLL`, which holds the GIL
across the foreign call, on descriptors that are non-blocking, cost about a microsecond each: the door then
gives the GIL up only in its `select`, once a wake-up, however many connections that wake-up brings.

Every call here must be one that cannot block: descriptors made by `HeldIO.accept` are non-blocking, and
`recv`/`send` also pass MSG_DONTWAIT. Linux only (accept4, MSG_DONTWAIT, MSG_NOSIGNAL); `AVAILABLE` is False
elsewhere and the door uses the socket module as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import sys

_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
_SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
_SOCK_CLOEXEC = getattr(socket, "SOCK_CLOEXEC", 0)


def _load() -> ctypes.PyDLL | None:
    if not sys.platform.startswith("linux") or not (_MSG_DONTWAIT and _SOCK_NONBLOCK):
        return None
    try:
        libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.accept4.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        libc.accept4.restype = ctypes.c_int
        libc.recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.recv.restype = ctypes.c_ssize_t
        libc.send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
        libc.send.restype = ctypes.c_ssize_t
        libc.shutdown.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.shutdown.restype = ctypes.c_int
        libc.close.argtypes = [ctypes.c_int]
        libc.close.restype = ctypes.c_int
        libc.setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
        libc.setsockopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load()
AVAILABLE = _libc is not None
_ONE = ctypes.c_int(1)


def _fail() -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"[Errno {err}]")  # OSError picks the subclass: EAGAIN -> BlockingIOError, ...


class HeldIO:
    """The calls, with one receive buffer: use one instance per thread."""

    def __init__(self, buffer_bytes: int = 65536) -> None:
        if _libc is None:
            raise RuntimeError("GIL-holding socket calls need Linux's libc")
        self._libc = _libc
        self._buf = ctypes.create_string_buffer(buffer_bytes)
        self._buf_bytes = buffer_bytes

    def accept(self, listener: socket.socket) -> int:
        """A new connection's descriptor, non-blocking and close-on-exec; BlockingIOError when none waits."""
        fd = self._libc.accept4(listener.fileno(), None, None, _SOCK_NONBLOCK | _SOCK_CLOEXEC)
        if fd < 0:
            raise _fail()
        return fd

    def set_nodelay(self, fd: int) -> None:
        """TCP_NODELAY, as asyncio sets it; quietly nothing for a socket that is not TCP."""
        self._libc.setsockopt(fd, socket.IPPROTO_TCP, socket.TCP_NODELAY, ctypes.byref(_ONE), 4)

    def recv(self, fd: int, n: int, peek: bool = False) -> bytes:
        """Up to `n` bytes (at most the buffer's); b"" at the peer's EOF; BlockingIOError when none are there."""
        got = self._libc.recv(fd, self._buf, min(n, self._buf_bytes),
                              _MSG_DONTWAIT | (socket.MSG_PEEK if peek else 0))
        if got < 0:
            raise _fail()
        return ctypes.string_at(self._buf, got)  # only what came (`.raw` would copy the whole buffer first)

    def send(self, fd: int, data: bytes) -> int:
        """Bytes sent (a small answer into an empty socket buffer goes whole); BlockingIOError when it is full."""
        sent = self._libc.send(fd, data, len(data), _MSG_DONTWAIT | _MSG_NOSIGNAL)
        if sent < 0:
            raise _fail()
        return sent

    def shutdown_write(self, fd: int) -> None:
        if self._libc.shutdown(fd, socket.SHUT_WR) < 0:
            raise _fail()

    def close(self, fd: int) -> None:
        self._libc.close(fd)  # close(2) on a socket never waits unless SO_LINGER is set, which nothing here sets


class SocketModuleIO:
    """The same calls through the socket module (which releases the GIL around each): where `AVAILABLE` is
    False. Each call wraps the descriptor for a moment and lets it go again."""

    def accept(self, listener: socket.socket) -> int:
        conn, _ = listener.accept()
        conn.setblocking(False)
        return conn.detach()

    def _call(self, fd: int, op: str, *args: object) -> object:
        s = socket.socket(fileno=fd)
        try:
            return getattr(s, op)(*args)
        finally:
            s.detach()

    def set_nodelay(self, fd: int) -> None:
        try:
            self._call(fd, "setsockopt", socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def recv(self, fd: int, n: int, peek: bool = False) -> bytes:
        return self._call(fd, "recv", n, socket.MSG_PEEK if peek else 0)  # type: ignore[return-value]

    def send(self, fd: int, data: bytes) -> int:
        return self._call(fd, "send", data)  # type: ignore[return-value]

    def shutdown_write(self, fd: int) -> None:
        self._call(fd, "shutdown", socket.SHUT_WR)

    def close(self, fd: int) -> None:
        socket.socket(fileno=fd).close()


def door_io() -> HeldIO | SocketModuleIO:
    """What the front door's thread makes its calls with: the GIL-holding calls where they exist."""
    return HeldIO() if AVAILABLE else SocketModuleIO()
