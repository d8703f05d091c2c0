"""Process-level limits of the proxy (issue 14): file descriptors, and telling the proxy's own resource
exhaustion apart from a backend's failure.

Why the fd limit matters: every client connection and every upstream connection is a descriptor. Under a
10x overload the default soft limit (1024 on most distributions) runs out long before the CPU does; the
listening socket then cannot accept (connections pile up in the kernel backlog, /health probes time out)
and every upstream connect fails with EMFILE, which used to read as "backend unreachable" and marked
healthy engines down. So: raise the soft limit to the hard one at start, and treat EMFILE/ENFILE as the
proxy's own overload (503 `proxy_overloaded`), never as evidence against a backend.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("capbalancer.server")

# Out of descriptors (per process, system-wide) or of kernel memory for sockets: the proxy's fault.
FD_EXHAUSTION_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
# Descriptors kept for what is not a client connection: upstream pools, health polls, logs, the loop.
FD_RESERVE = 256


def raise_fd_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns (soft, hard) as they are after."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return (0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:  # e.g. a container capping below the reported hard limit
        log.warning("cannot raise the file-descriptor limit from %d to %d: %s", soft, target, exc)
        return soft, hard
    return target, hard


def fd_soft_limit() -> int:
    try:
        import resource
    except ImportError:
        return 1 << 16
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def default_max_connections(fd_limit: int) -> int:
    """Client connections to allow at once when `server.max_connections` is 0 (auto).

    A proxied request holds two descriptors (client + upstream); keep FD_RESERVE for the rest, so an
    accepted connection can always get its upstream one and EMFILE stays the exception, not the rule."""
    return max(64, (fd_limit - FD_RESERVE) // 2)


def is_fd_exhaustion(exc: BaseException | None) -> bool:
    """True if `exc` (or what it wraps) is the process or system running out of descriptors."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in FD_EXHAUSTION_ERRNOS:
            return True
        inner = getattr(exc, "os_error", None)  # upstream_http.ConnectError
        if isinstance(inner, OSError) and inner.errno in FD_EXHAUSTION_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


async def read_body_bounded(resp: aiohttp.ClientResponse, limit_bytes: int,
                            too_large: Callable[[str], Exception]) -> bytes:
    """A whole aiohttp response body, or `too_large(reason)` raised as soon as it is known to pass `limit_bytes`
    (from Content-Length before reading, else while reading): memory stays bounded whatever the engine sends."""
    if resp.content_length is not None and resp.content_length > limit_bytes:
        raise too_large(f"body of {resp.content_length} bytes is too large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit_bytes:
            raise too_large(f"body over {limit_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
