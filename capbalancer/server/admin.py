"""Admin API under /admin/: live backend state, drain/undrain, add/remove backends, reload.

Off unless the environment variable named by `server.admin_token_env` holds a token; then every call
needs `Authorization: Bearer <token>`, compared in constant time. While off, /admin/* answers 404, as if
it did not exist.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import replace
from pathlib import Path

import orjson
from aiohttp import web

from capbalancer.config import BACKEND_ENGINES, BackendConfig, Config, ConfigError, check_url, load_config
from capbalancer.profiling.schema import ProfileError
from capbalancer.server.errors import ProxyError, error_response, from_exception
from capbalancer.server.proxy import STATE, ProxyState

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
    # `engine` is the one in use (detected, for `auto`); the configured one tells an `auto` backend apart.
    configured = {b.name: b.engine for _, b in state.config.backends()}
    for name, row in out["backends"].items():
        row["engine_configured"] = configured.get(name)
    return _json(out)


def _positive_number(body: dict, key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ProxyError(400, f"{key} must be a number > 0, got {value!r}", param=key)
    return float(value)


def _gpu_group(body: dict) -> str | None:
    value = body.get("gpu_group")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ProxyError(400, f"gpu_group must be a card name or index, got {value!r}", param="gpu_group")
    return str(value)


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
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise ProxyError(400, "body must be JSON: {url, name, model, engine, profile, weight, gpu_group}") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "body must be a JSON object: {url, name, model, engine, profile, weight, gpu_group}")
    url = body.get("url")
    why = check_url(url)
    if why:
        raise ProxyError(400, f"url: {why}", param="url")
    config = state.config
    model = config.model_for(body.get("model")) if body.get("model") is not None else \
        config.models[config.default_model]
    if model is None:
        raise ProxyError(404, f"model {body.get('model')!r} is not served here; add it in the config file",
                         param="model")
    name = body.get("name") or url.split("//", 1)[1].rstrip("/")
    if not isinstance(name, str) or name in state.driver.scheduler.backends:
        raise ProxyError(409, f"a backend named {name!r} already exists", param="name")
    engine = body.get("engine", "vllm")
    if engine not in BACKEND_ENGINES:
        raise ProxyError(400, f"engine must be one of {', '.join(BACKEND_ENGINES)}", param="engine")
    profile = None
    profile_ref = body.get("profile")
    if profile_ref is not None:
        from capbalancer.profiling.library import resolve_profile

        try:
            base = Path(config.source).resolve().parent if config.source and config.source != "--backend" else None
            profile = resolve_profile(str(profile_ref), base)
        except ProfileError as exc:
            raise ProxyError(400, f"profile: {exc}", param="profile") from None
    b = BackendConfig(url=url.rstrip("/"), name=name, engine=engine, profile_ref=profile_ref, profile=profile,
                      timeouts=config.timeouts, weight=_positive_number(body, "weight"),
                      gpu_group=_gpu_group(body))
    add_backend(state, model, b)
    state.config = with_backend(config, model.name, b)
    state.admin_added[name] = (model.name, b)
    log.info("admin: backend %s (%s) added to %s", name, b.url, model.name)
    return _json({"backend": name, "model": model.name, "url": b.url}, status=201)


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
