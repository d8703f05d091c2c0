"""Which pool and which backends may serve a model name, and the body each backend must receive.

- A pool's name or alias: its pool, any backend; the body's `model` becomes the name that backend serves
  (from its /v1/models; the pool's name until seen), since vLLM answers 404 to any other name.
- A LoRA adapter: the pool of the backends that hold it (fleet/models.py), and only those backends; the
  name is the adapter's own and passes unchanged.
- A response that continues another (`previous_response_id`): only the backend that holds the previous one.
- Anything else: a catch-all pool (`serve --backend URL`), or 404.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from capbalancer.config import ModelConfig
from capbalancer.server.errors import ProxyError
from capbalancer.server.parsing import ParsedRequest
from capbalancer.server.route_parsing import rewrite_model

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from capbalancer.server.proxy import ProxyState

# Routes whose answer creates an object the engine keeps, and how its id appears in the first bytes.
STATEFUL_CREATE_PATHS = frozenset({"/v1/responses"})
_FIRST_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,256})"')


def resolve_pool(state: ProxyState, name: str | None) -> tuple[ModelConfig, frozenset[str] | None]:
    """The pool serving `name` and, for an adapter, the backends that may; ProxyError 404 when none."""
    config = state.config
    if name is None:
        return config.models[config.default_model], None
    found = config.models.get(name)
    if found is None:
        found = next((m for m in config.models.values() if name in m.aliases), None)
    if found is not None:
        return found, None
    holders = set(state.adapters.backends_with(name))
    if holders:
        for m in config.models.values():
            mine = frozenset(b.name for b in m.backends if b.name in holders)
            if mine:
                return m, mine
    for m in config.models.values():
        if m.match_any:
            return m, None
    served = ", ".join([*config.served_names(), *sorted(state.adapters.adapters())])
    raise ProxyError(404, f"model {name!r} is not served here; models: {served}", param="model",
                     code="model_not_found")


async def pinned_backends(state: ProxyState, parsed: ParsedRequest, now: float, client_headers: CIMultiDictProxy[str],
                          request_id: str) -> frozenset[str] | None:
    """A continuation of a stored response may go only where that response lives."""
    if parsed.previous_id is None:
        return None
    backend = state.affinity.backend_of(parsed.previous_id, now)
    if backend is None:  # created through another worker or replica, or before a restart: ask the backends
        from capbalancer.server.locate import locate_object  # locate imports proxy, which imports this module

        backend = await locate_object(state, parsed.previous_id, client_headers, request_id)
    if backend is None:
        raise ProxyError(404, f"previous response {parsed.previous_id!r} is not held by any backend (never "
                         "created, or expired)", param="previous_response_id", code="not_found")
    return frozenset({backend})


def body_for(state: ProxyState, pool: ModelConfig, parsed: ParsedRequest, path: str, raw: bytes,
             content_type: str, backend: str) -> bytes:
    """`raw` with the model name `backend` serves the pool's model under, when the request named the pool."""
    name = parsed.model
    if name is None or (name != pool.name and name not in pool.aliases):
        return raw  # no name (the engine's default), an adapter, or a catch-all pool's own names
    served = state.adapters.served_name(backend) or pool.name
    if served == name:
        return raw
    return rewrite_model(path, raw, content_type, served)


def remember_created(state: ProxyState, path: str, backend: str, first_bytes: bytes, now: float) -> None:
    """Record which backend created a stateful object (its id is the first "id" of the answer)."""
    if path not in STATEFUL_CREATE_PATHS:
        return
    found = _FIRST_ID.search(first_bytes)
    if found is not None:
        state.affinity.remember(found.group(1).decode("ascii", "replace"), backend, now)
