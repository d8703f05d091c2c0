"""Admin API under /admin/: live backend state, drain/undrain, add/remove backends, reload.

Off unless the environment variable named by `server.admin_token_env` holds a token; then every call
needs `Authorization: Bearer <token>`, compared in constant time. While off, /admin/* answers 404, as if
it did not exist.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import replace
from pathlib import Path

import orjson
from aiohttp import web

from capbalancer.config import BackendConfig, Config, ConfigError, load_config, parse_backend
from capbalancer.server.errors import ProxyError, error_response, from_exception
from capbalancer.server.proxy import STATE, ProxyState, read_body

log = logging.getLogger("capbalancer.admin")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/backends", backends)
    app.router.add_post("/admin/backends", add)
    app.router.add_delete("/admin/backends/{name}", delete)
    app.router.add_post("/admin/backends/{name}/drain", drain)
    app.router.add_post("/admin/backends/{name}/undrain", undrain)
    app.router.add_post("/admin/reload", reload)


def _authorize(request: web.Request) -> ProxyState:
    state = request.app[STATE]
    if state.admin_token is None:
        raise ProxyError(404, "not found (the admin API is off: set the token environment variable)")
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.admin_token.encode()):
        raise ProxyError(401, "admin API: missing or wrong bearer token", code="unauthorized")
    return state


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _admin(handler):  # noqa: ANN001, ANN202  # small decorator: auth + OpenAI-shaped errors
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(_authorize(request), request)
        except ProxyError as exc:
            return from_exception(exc)

    return wrapped


@_admin
async def backends(state: ProxyState, request: web.Request) -> web.Response:
    out = state.driver.scheduler.describe(state.driver.clock())
    out["poller"] = state.poller_kind
    if state.gate is not None:  # refusal at arrival (server/overload.py): the loop's lag, what the door shed
        out["overload"] = state.gate.describe()
    # `engine` is the one in use (detected, for `auto`); the configured one tells an `auto` backend apart.
    configured = {b.name: b.engine for _, b in state.config.backends()}
    loop_now = asyncio.get_running_loop().time()
    for name, row in out["backends"].items():
        row["engine_configured"] = configured.get(name)
        sub = state.kv_subscribers.get(name)
        if sub is not None:  # precise prefix mode: is the engine's event stream arriving, and whole?
            row["kv_events"] = sub.describe(loop_now)
    return _json(out)


def _known(state: ProxyState, name: str) -> None:
    if name not in state.driver.scheduler.backends:
        raise ProxyError(404, f"no backend named {name!r}", code="backend_not_found")


def _set_draining(state: ProxyState, request: web.Request, draining: bool) -> web.Response:
    name = request.match_info["name"]
    _known(state, name)
    state.driver.set_draining(name, draining)
    log.info("admin: backend %s %s", name, "draining" if draining else "undrained")
    return _json({"backend": name, "draining": draining})


@_admin
async def drain(state: ProxyState, request: web.Request) -> web.Response:
    return _set_draining(state, request, True)


@_admin
async def undrain(state: ProxyState, request: web.Request) -> web.Response:
    return _set_draining(state, request, False)


@_admin
async def add(state: ProxyState, request: web.Request) -> web.Response:
    from capbalancer.server.app import add_backend

    try:
        settings = state.config.server  # bounded: an admin token is no licence to fill the proxy's memory
        body = orjson.loads(await read_body(request, settings.max_admin_body_bytes, settings.body_read_timeout_s))
    except orjson.JSONDecodeError:
        raise ProxyError(400, "body must be JSON: {url, name, model, engine, profile, weight, gpu_group}") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "body must be a JSON object: {url, name, model, engine, profile, weight, gpu_group}")
    config = state.config
    fields = dict(body)
    model_name = fields.pop("model", None)  # where it goes; the rest is a backend entry, as in the file
    base = Path(config.source).resolve().parent if config.source and config.source != "--backend" else None
    try:
        b = parse_backend(fields, config.timeouts, base, "request body")
    except ConfigError as exc:
        raise ProxyError(400, str(exc), param=exc.key_path or None) from None
    model = config.model_for(model_name) if model_name is not None else config.models[config.default_model]
    if model is None:
        raise ProxyError(404, f"model {model_name!r} is not served here; add it in the config file", param="model")
    if b.name in state.driver.scheduler.backends:
        raise ProxyError(409, f"a backend named {b.name!r} already exists", param="name")
    add_backend(state, model, b)
    state.config = with_backend(config, model.name, b)
    state.admin_added[b.name] = (model.name, b)
    log.info("admin: backend %s (%s) added to %s", b.name, b.url, model.name)
    return _json({"backend": b.name, "model": model.name, "url": b.url}, status=201)


@_admin
async def delete(state: ProxyState, request: web.Request) -> web.Response:
    from capbalancer.server.app import remove_backend

    name = request.match_info["name"]
    _known(state, name)
    remove_backend(state, name)
    state.admin_added.pop(name, None)
    models = {k: replace(m, backends=tuple(b for b in m.backends if b.name != name))
              for k, m in state.config.models.items()}
    state.config = replace(state.config, models=models)
    log.info("admin: backend %s removed", name)
    return _json({"backend": name, "removed": True})


@_admin
async def reload(state: ProxyState, request: web.Request) -> web.Response:
    ok, message, changes = reload_config(state)
    if not ok:
        return error_response(400, message, code="invalid_config")
    return _json({"reloaded": True, "changes": changes})


def with_backend(config: Config, model_name: str, backend: BackendConfig) -> Config:
    models = dict(config.models)
    models[model_name] = replace(models[model_name], backends=(*models[model_name].backends, backend))
    return replace(config, models=models)


def reload_config(state: ProxyState) -> tuple[bool, str, list[str]]:
    """Re-read the config file; an invalid one is refused and the running config kept. Backends added through
    the admin API stay, unless the file now names them itself or no longer serves their model."""
    from capbalancer.server.app import apply_config

    if state.config_path is None:
        return False, "this proxy was started without --config: nothing to reload", []
    try:
        new = load_config(state.config_path)
    except ConfigError as exc:
        log.error("reload refused, keeping the running config: %s", exc)
        return False, str(exc), []
    in_file = {b.name for _, b in new.backends()}
    for name, (model_name, b) in list(state.admin_added.items()):
        if name in in_file or model_name not in new.models:
            del state.admin_added[name]  # the file took it over, or its model is gone
        else:
            new = with_backend(new, model_name, b)
    changes = apply_config(state, new)
    log.info("config reloaded from %s: %s", state.config_path, "; ".join(changes) or "no changes")
    return True, "", changes
