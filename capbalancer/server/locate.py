"""Finding the backend that holds a stored object (a /v1/responses id) this process has not seen created.

The affinity map (affinity.py) is this process's memory. Another worker of `serve --workers N`, another
replica, or this process before a restart may have created the object; then, rather than 404, every
routable backend is asked for it (`GET /v1/responses/{id}`, concurrently, bounded in time) and the one that
answers 200 holds it. Engines make response ids unique, so at most one does. The answer is remembered, so
the search costs one fan-out per object per process.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import quote

from multidict import CIMultiDictProxy

from capbalancer.server.proxy import ProxyState
from capbalancer.server.relay import Upstream
from capbalancer.server.upstream_http import UpstreamHTTPError

log = logging.getLogger("capbalancer.server")

LOCATE_TIMEOUT_S = 2.0  # each backend's answer; an engine that keeps responses answers a lookup at once
MAX_LOOKUP_BODY_BYTES = 1 << 20  # the object itself is read and dropped: only the status matters


async def _holds(up: Upstream, path: str, headers: list[tuple[str, str]]) -> bool:
    try:
        async with asyncio.timeout(min(LOCATE_TIMEOUT_S, up.timeouts.first_byte_s)):
            resp = await up.pool.request("GET", path, headers)
            try:
                await resp.read(MAX_LOOKUP_BODY_BYTES)
            except BaseException:
                resp.close()
                raise
            resp.release()
            return resp.status == 200
    except (TimeoutError, UpstreamHTTPError, OSError):
        return False


async def locate_object(state: ProxyState, object_id: str, client_headers: CIMultiDictProxy[str],
                        request_id: str) -> str | None:
    """The backend holding response `object_id`, asking the routable backends of every pool; None if none."""
    scheduler = state.driver.scheduler
    names = sorted({b.backend_id for pool in state.config.models for b in scheduler.routable_backends(pool)})
    ups = [state.upstreams[n] for n in names if n in state.upstreams]
    if not ups:
        return None
    path = "/v1/responses/" + quote(object_id, safe="")
    drop_auth = bool(state.config.clients)
    found = await asyncio.gather(*(_holds(up, path, up.request_header_list(client_headers, request_id,
                                                                          drop_client_auth=drop_auth))
                                   for up in ups))
    holders = [up.name for up, held in zip(ups, found, strict=True) if held]
    if not holders:
        return None
    if len(holders) > 1:
        log.warning("response %r is held by %d backends (%s): using %s", object_id, len(holders),
                    ", ".join(holders), holders[0])
    state.affinity.remember(object_id, holders[0], state.driver.clock())
    return holders[0]
