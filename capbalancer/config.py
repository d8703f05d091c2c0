"""The proxy's YAML config, read into frozen dataclasses and validated up front.

Every error names the file and the key path (`cfg.yaml: models.llama.backends[2].url: not a URL`), so a
user can fix a file without reading our code. Every limit has a default: an empty `models:` entry with one
backend URL is a complete config. docs/config.md documents each key; deploy/capbalancer.example.yaml
shows them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from capbalancer.fleet.description import FleetDescription, FleetError, load_fleet
from capbalancer.profiling.schema import ENGINE_KINDS, Profile, ProfileError
from capbalancer.sched.outlier import OutlierSettings
from capbalancer.sched.types import BackendSpec, HealthSettings, PoolSettings
from capbalancer.yamlfile import read_yaml

BACKEND_ENGINES = (*ENGINE_KINDS, "auto")  # auto: let the fleet monitor detect the engine
API_KEY_MODES = ("replace", "passthrough")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key path (also in `key_path`)."""

    def __init__(self, message: str, key_path: str = "") -> None:
        super().__init__(message)
        self.key_path = key_path


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float = 5.0  # TCP connect to a backend
    first_byte_s: float = 60.0  # request sent -> first body byte (covers queueing and prefill)
    stream_idle_s: float = 60.0  # longest gap between two chunks of a response
    total_s: float = 600.0  # whole request, first byte to last


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 10 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    body_read_timeout_s: float = 30.0  # a client sending its body slower than this gets 408
    # A client connection with no request in progress is closed after this: idle between requests, or still
    # trickling its request line and headers (slow-loris), counted from the connection's start or last response.
    idle_timeout_s: float = 30.0
    admin_token_env: str = "CAPBALANCER_ADMIN_TOKEN"  # the admin API is off unless this variable is set
    access_log: bool = True  # one JSON line per request on stdout (server/access_log.py)
    tracing: bool = False  # OpenTelemetry spans (extra `otel`; server/tracing.py)
    # Bounds on what a backend or an admin caller can make the proxy hold in memory (issue 14). A streamed
    # response is relayed chunk by chunk with backpressure and needs no body limit.
    max_upstream_body_bytes: int = 64 * 1024 * 1024  # a non-streamed answer (or an error body) beyond: 502
    max_upstream_header_bytes: int = 64 * 1024  # an answer's status line and headers together
    max_upstream_headers: int = 100
    max_admin_body_bytes: int = 1024 * 1024
    # Client connections open at once; one more is answered 503 + Retry-After at once (never left in the
    # kernel's backlog). 0: derived from the process's file-descriptor limit (see capbalancer.server.frontdoor).
    max_connections: int = 0
    # Accept connections on a thread of their own that answers /health and /ready itself: probes stay fast
    # while the event loop is saturated, and the backlog is drained whatever the loop is doing.
    accept_thread: bool = True
    # The client-facing server of the proxied routes: `httptools` (server/fastserver.py: an asyncio.Protocol on
    # httptools, handing everything it does not vouch for to aiohttp) or `aiohttp` (aiohttp's server for all).
    http_server: str = "httptools"


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval_s: float = 1.0
    timeout_s: float = 2.0
    failure_threshold: int = 3
    success_threshold: int = 1
    stale_after_s: float = 3.0

    def to_scheduler(self) -> HealthSettings:
        return HealthSettings(failure_threshold=self.failure_threshold, success_threshold=self.success_threshold,
                              stale_after_s=self.stale_after_s)


@dataclass(frozen=True, slots=True)
class RetrySettings:
    max_attempts: int = 2  # attempts in all (1 = no retry); only before any byte reached the client
    max_total_s: float = 10.0  # no new attempt once this long has passed since the first


@dataclass(frozen=True, slots=True)
class BackendConfig:
    url: str  # scheme://host:port, no path
    name: str
    engine: str = "vllm"
    profile_ref: str | None = None
    profile: Profile | None = None
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)  # never printed
    api_key_mode: str = "replace"
    weight: float | None = None  # None: `weighted` uses the profile's throughput (1 without a profile)
    timeouts: Timeouts = Timeouts()
    gpu_group: str | None = None  # backends naming the same group share one GPU (see BackendSpec.gpu_group)
    kv_events: str | None = None  # vLLM's KV-event publisher (tcp://host:5557): precise prefix mode

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    policy: str
    policy_options: Mapping[str, float] = field(default_factory=dict)
    default: bool = False
    aliases: tuple[str, ...] = ()
    default_max_tokens: int = 256
    hold_max_requests: int = 1024
    hold_timeout_s: float = 30.0
    backends: tuple[BackendConfig, ...] = ()
    # Serve any model name (pools built from `serve --backend URL`, where we do not know the names).
    match_any: bool = False
    tokenizer: str | None = None  # a tokenizer.json counting prompt tokens exactly (else estimated)

    def pool_settings(self) -> PoolSettings:
        return PoolSettings(name=self.name, policy=self.policy, policy_options=dict(self.policy_options),
                            default_max_tokens=self.default_max_tokens, hold_max_requests=self.hold_max_requests,
                            hold_timeout_s=self.hold_timeout_s)

    def backend_specs(self) -> list[BackendSpec]:
        return [backend_spec(b, self.name) for b in self.backends]


@dataclass(frozen=True, slots=True)
class ClientKey:
    """An API key clients must present (`Authorization: Bearer KEY`) once any is configured."""

    name: str
    key: str = field(repr=False)
    priority: int = 0  # the highest priority its requests get (the header may only lower it)
    rate_limit_rps: float | None = None  # None: no limit
    rate_limit_burst: float = 0.0  # bucket size; 0 means 2 seconds' worth of the rate
    models: tuple[str, ...] = ()  # empty: every model


@dataclass(frozen=True, slots=True)
class SharingConfig:
    """Replicas sharing reservations through a store (docs/replicas.md); absent: each proxy counts alone."""

    store_url: str  # redis://host:port/db, rediss://..., unix:///path.sock (Redis, Valkey); nats://host:port (NATS)
    interval_ms: float = 50.0  # how often this replica publishes its state and reads the others'
    staleness_ms: float = 1000.0  # a replica not heard from for this long stops counting
    timeout_ms: float = 200.0  # one store call longer than this: the store counts as unreachable
    replica_id: str | None = None  # None: $CAPBALANCER_REPLICA_ID, else host name and process id
    namespace: str = "capbalancer"  # key prefix: proxies of one fleet share it, other fleets must not


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerSettings = ServerSettings()
    timeouts: Timeouts = Timeouts()
    health: HealthConfig = HealthConfig()
    retries: RetrySettings = RetrySettings()
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    source: str = "<config>"  # the file it came from ("" when built from --backend)
    fleet: str | None = None
    clients: tuple[ClientKey, ...] = ()  # empty: no client authentication
    sharing: SharingConfig | None = None  # None: this proxy counts only its own requests
    outlier: OutlierSettings = OutlierSettings()  # ejection of failing backends (sched/outlier.py)

    @property
    def default_model(self) -> str:
        for m in self.models.values():
            if m.default:
                return m.name
        return next(iter(self.models))

    def model_for(self, name: str | None) -> ModelConfig | None:
        """The pool that serves `name` (a model name or alias; None: the default pool)."""
        if name is None:
            return self.models[self.default_model]
        found = self.models.get(name)
        if found is not None:
            return found
        for m in self.models.values():
            if name in m.aliases:
                return m
        for m in self.models.values():
            if m.match_any:
                return m
        return None

    def served_names(self) -> list[str]:
        names: list[str] = []
        for m in self.models.values():
            names.append(m.name)
            names.extend(m.aliases)
        return names

    def backends(self) -> list[tuple[ModelConfig, BackendConfig]]:
        return [(m, b) for m in self.models.values() for b in m.backends]

    def summary(self) -> str:
        lines = [f"config {self.source or '(from --backend)'}: listen {self.server.host}:{self.server.port}"]
        for m in self.models.values():
            flags = " (default)" if m.name == self.default_model else ""
            alias = f" aliases={list(m.aliases)}" if m.aliases else ""
            lines.append(f"  model {m.name}{flags}: policy={m.policy}{alias} backends={len(m.backends)}")
            for b in m.backends:
                prof = f" profile={b.profile.name}" if b.profile is not None else ""
                key = " api_key=(set)" if b.resolved_api_key() else ""
                gpu = f" gpu_group={b.gpu_group}" if b.gpu_group is not None else ""
                weight = f" weight={b.weight:g}" if b.weight is not None else ""
                lines.append(f"    {b.name}: {b.url} engine={b.engine}{weight}{prof}{gpu}{key}")
        return "\n".join(lines)


def backend_spec(b: BackendConfig, pool: str) -> BackendSpec:
    # "auto" is resolved by the fleet monitor; until then the scheduler treats it as a plain OpenAI server.
    engine = "openai" if b.engine == "auto" else b.engine
    return BackendSpec(backend_id=b.name, pool=pool, url=b.url, engine=engine, profile=b.profile, weight=b.weight,
                       gpu_group=b.gpu_group)


def default_policy() -> str:
    from capbalancer.sched.policies import policy_names

    return "capacity" if "capacity" in policy_names() else "least_requests"


# ---------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------

class _Reader:
    """Typed access to one mapping of the YAML tree, with the key path for error messages."""

    def __init__(self, data: Any, path: str, where: str, allowed: Sequence[str]) -> None:
        self.where = where
        self.path = path
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail("", f"must be a mapping, got {_kind(data)}")
        self.data: dict[str, Any] = data
        for key in data:
            if key not in allowed:
                self.fail(str(key), f"unknown key (known: {', '.join(allowed)})")

    def key_path(self, key: str) -> str:
        if not key:
            return self.path
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str) -> None:
        path = self.key_path(key)
        raise ConfigError(f"{self.where}: {path or '(top level)'}: {message}", path)

    def number(self, key: str, default: float, *, minimum: float = 0.0, positive: bool = True) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"must be a number, got {_kind(value)}")
        if positive and value <= minimum:
            self.fail(key, f"must be > {minimum:g}, got {value!r}")
        if not positive and value < minimum:
            self.fail(key, f"must be >= {minimum:g}, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 1, maximum: int | None = None) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, got {_kind(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            self.fail(key, f"must be {bound}, got {value!r}")
        return int(value)

    def string(self, key: str, default: str | None) -> str | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, got {_kind(value)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {_kind(value)}")
        return value

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        value = self.data.get(key, default)
        if value not in choices:
            self.fail(key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def child(self, key: str, allowed: Sequence[str]) -> _Reader:
        return _Reader(self.data.get(key), self.key_path(key), self.where, allowed)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return f"{type(value).__name__} {value!r}"


_TIMEOUT_KEYS = ("connect_s", "first_byte_s", "stream_idle_s", "total_s")


def _timeouts(r: _Reader, key: str, base: Timeouts) -> Timeouts:
    t = r.child(key, _TIMEOUT_KEYS)
    return Timeouts(connect_s=t.number("connect_s", base.connect_s), first_byte_s=t.number("first_byte_s", base.first_byte_s),
                    stream_idle_s=t.number("stream_idle_s", base.stream_idle_s), total_s=t.number("total_s", base.total_s))


def check_url(url: Any) -> str | None:
    """None if `url` is a usable backend base URL, else why not."""
    if not isinstance(url, str) or not url:
        return "not a URL"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not a URL (want http://host:port or https://host:port)"
    try:
        parts.port  # noqa: B018  # raises on a bad port
    except ValueError:
        return "not a URL (bad port)"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "not a URL (a backend URL has no path: the proxy appends the request's own path)"
    return None


def _default_name(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


_BACKEND_KEYS = ("url", "name", "engine", "profile", "api_key_env", "api_key", "api_key_mode", "weight", "timeouts",
                 "gpu_group", "kv_events")


def _backend(r: _Reader, base_timeouts: Timeouts, base_dir: Path | None) -> BackendConfig:
    url = r.data.get("url")
    why = check_url(url)
    if why:
        r.fail("url", why)
    url = url.rstrip("/")
    name = r.string("name", None) or _default_name(url)
    engine = r.choice("engine", "vllm", BACKEND_ENGINES)
    profile_ref = r.string("profile", None)
    profile = None
    if profile_ref is not None:
        from capbalancer.profiling.library import resolve_profile

        try:
            profile = resolve_profile(profile_ref, base_dir)
        except ProfileError as exc:
            r.fail("profile", str(exc))
    api_key_env = r.string("api_key_env", None)
    api_key = r.string("api_key", None)
    if api_key_env and api_key:
        r.fail("api_key", "set either api_key or api_key_env, not both")
    if api_key_env and not os.environ.get(api_key_env):
        # Unset would silently send no key (or, in passthrough mode, the client's): refuse the file instead.
        r.fail("api_key_env", f"environment variable {api_key_env} is not set (or empty)")
    return BackendConfig(url=url, name=name, engine=engine, profile_ref=profile_ref, profile=profile,
                         api_key_env=api_key_env, api_key=api_key,
                         api_key_mode=r.choice("api_key_mode", "replace", API_KEY_MODES),
                         weight=r.number("weight", 1.0) if "weight" in r.data else None,
                         timeouts=_timeouts(r, "timeouts", base_timeouts), gpu_group=_gpu_group(r),
                         kv_events=_kv_events(r))


def _kv_events(r: _Reader) -> str | None:
    endpoint = r.string("kv_events", None)
    if endpoint is None:
        return None
    if not endpoint.startswith(("tcp://", "ipc://")):
        r.fail("kv_events", f"must be a ZMQ endpoint such as tcp://host:5557, got {endpoint[:80]!r}")
    try:
        import msgspec  # noqa: F401  (optional extra)
        import zmq  # noqa: F401
    except ImportError:
        r.fail("kv_events", "needs pyzmq and msgspec: pip install 'capbalancer[kv-events]'")
    return endpoint


def parse_backend(data: Any, base_timeouts: Timeouts, base_dir: Path | None, where: str) -> BackendConfig:
    """One backend entry, read as the file's `models.<m>.backends[i]` is (the admin API's POST body too)."""
    return _backend(_Reader(data, "", where, _BACKEND_KEYS), base_timeouts, base_dir)


def _gpu_group(r: _Reader) -> str | None:
    # A card is often named by its index (`gpu_group: 1`); any scalar names the group.
    value = r.data.get("gpu_group")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return r.string("gpu_group", None)


_MODEL_KEYS = ("policy", "policy_options", "default", "aliases", "default_max_tokens", "hold", "backends", "timeouts",
               "tokenizer")


def _model(name: str, r: _Reader, base_timeouts: Timeouts, base_dir: Path | None) -> ModelConfig:
    from capbalancer.sched.policies import UnknownPolicy, make_policy, policy_names

    policy = r.string("policy", None) or default_policy()
    if policy not in policy_names():
        r.fail("policy", f"unknown policy {policy!r} (known: {', '.join(policy_names())})")
    options = r.data.get("policy_options") or {}
    if not isinstance(options, dict):
        r.fail("policy_options", f"must be a mapping, got {_kind(options)}")
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            r.fail(f"policy_options.{key}", f"must be a number, got {_kind(value)}")
    try:
        make_policy(policy, dict(options))  # the policy itself judges its options
    except (UnknownPolicy, ValueError, TypeError) as exc:
        r.fail("policy_options", str(exc))
    aliases = r.data.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        r.fail("aliases", "must be a list of model names")
    hold = r.child("hold", ("max_requests", "timeout_s"))
    timeouts = _timeouts(r, "timeouts", base_timeouts)
    rows = r.data.get("backends") or []
    if not isinstance(rows, list):
        r.fail("backends", f"must be a list, got {_kind(rows)}")
    backends = tuple(_backend(_Reader(row, f"{r.path}.backends[{i}]", r.where, _BACKEND_KEYS), timeouts, base_dir)
                     for i, row in enumerate(rows))
    tokenizer = r.string("tokenizer", None)
    if tokenizer is not None:
        tok_path = Path(tokenizer) if base_dir is None or Path(tokenizer).is_absolute() else base_dir / tokenizer
        if not tok_path.is_file():
            r.fail("tokenizer", f"no tokenizer file at {tok_path}")
        try:
            import tokenizers  # noqa: F401  (optional extra)
        except ImportError:
            r.fail("tokenizer", "needs the tokenizers package: pip install 'capbalancer[tokenizer]'")
        tokenizer = str(tok_path)
    return ModelConfig(name=name, policy=policy, policy_options=dict(options), default=r.boolean("default", False),
                       aliases=tuple(aliases), default_max_tokens=r.integer("default_max_tokens", 256),
                       hold_max_requests=hold.integer("max_requests", 1024, minimum=0),
                       hold_timeout_s=hold.number("timeout_s", 30.0), backends=backends, tokenizer=tokenizer)


_TOP_KEYS = ("server", "timeouts", "health", "retries", "fleet", "models", "admin", "clients", "sharing", "outlier")
_CLIENT_KEYS = ("name", "key", "key_env", "priority", "rate_limit_rps", "rate_limit_burst", "models")
_SERVER_KEYS = ("host", "port", "max_body_bytes", "max_header_bytes", "drain_timeout_s", "body_read_timeout_s",
                "idle_timeout_s", "admin_token_env", "access_log", "tracing", "max_upstream_body_bytes",
                "max_upstream_header_bytes", "max_upstream_headers", "max_admin_body_bytes", "max_connections",
                "accept_thread", "http_server")


def parse_config(data: Any, where: str = "<config>", base_dir: Path | None = None) -> Config:
    top = _Reader(data, "", where, _TOP_KEYS)
    s = top.child("server", _SERVER_KEYS)
    admin = top.child("admin", ("token_env",))  # `admin.token_env` is the same as server.admin_token_env
    token_env = admin.string("token_env", None) or s.string("admin_token_env", "CAPBALANCER_ADMIN_TOKEN")
    server = ServerSettings(host=s.string("host", "127.0.0.1"), port=s.integer("port", 8000, minimum=0, maximum=65535),
                            max_body_bytes=s.integer("max_body_bytes", 10 * 1024 * 1024),
                            max_header_bytes=s.integer("max_header_bytes", 16 * 1024, minimum=256),
                            drain_timeout_s=s.number("drain_timeout_s", 30.0, positive=False),
                            body_read_timeout_s=s.number("body_read_timeout_s", 30.0),
                            idle_timeout_s=s.number("idle_timeout_s", 30.0),
                            admin_token_env=token_env,
                            max_upstream_body_bytes=s.integer("max_upstream_body_bytes", 64 * 1024 * 1024, minimum=1024),
                            max_upstream_header_bytes=s.integer("max_upstream_header_bytes", 64 * 1024, minimum=1024),
                            max_upstream_headers=s.integer("max_upstream_headers", 100, minimum=8),
                            max_admin_body_bytes=s.integer("max_admin_body_bytes", 1024 * 1024, minimum=1024),
                            max_connections=s.integer("max_connections", 0, minimum=0),
                            accept_thread=s.boolean("accept_thread", True),
                            http_server=s.choice("http_server", "httptools", ("httptools", "aiohttp")),
                            access_log=s.boolean("access_log", True), tracing=s.boolean("tracing", False))
    if server.tracing:
        try:
            import opentelemetry.trace  # noqa: F401  (optional extra)
        except ImportError:
            s.fail("tracing", "needs OpenTelemetry: pip install 'capbalancer[otel]'")
    timeouts = _timeouts(top, "timeouts", Timeouts())
    h = top.child("health", ("interval_s", "timeout_s", "failure_threshold", "success_threshold", "stale_after_s"))
    health = HealthConfig(interval_s=h.number("interval_s", 1.0), timeout_s=h.number("timeout_s", 2.0),
                          failure_threshold=h.integer("failure_threshold", 3),
                          success_threshold=h.integer("success_threshold", 1),
                          stale_after_s=h.number("stale_after_s", 3.0))
    rt = top.child("retries", ("max_attempts", "max_total_s"))
    retries = RetrySettings(max_attempts=rt.integer("max_attempts", 2), max_total_s=rt.number("max_total_s", 10.0))

    models_data = top.data.get("models") or {}
    if not isinstance(models_data, dict):
        top.fail("models", f"must be a mapping of model name -> pool, got {_kind(models_data)}")
    model_keys = _MODEL_KEYS
    models: dict[str, ModelConfig] = {}
    for name, body in models_data.items():
        if not isinstance(name, str) or not name:
            top.fail("models", f"model names must be non-empty strings, got {name!r}")
        models[name] = _model(name, _Reader(body, f"models.{name}", where, model_keys), timeouts, base_dir)

    fleet_ref = top.string("fleet", None)
    if fleet_ref is not None:
        fleet_path = Path(fleet_ref) if base_dir is None or Path(fleet_ref).is_absolute() else base_dir / fleet_ref
        try:
            fleet = load_fleet(fleet_path)
        except FleetError as exc:
            top.fail("fleet", str(exc))
        try:
            models = merge_fleet(models, fleet, timeouts, fleet_path.parent)
        except ConfigError as exc:
            top.fail("fleet", str(exc))

    _check_models(top, models)
    return Config(server=server, timeouts=timeouts, health=health, retries=retries, models=models,
                  source=where, fleet=fleet_ref, clients=_clients(top, models), sharing=_sharing(top),
                  outlier=_outlier(top))


def _sharing(top: _Reader) -> SharingConfig | None:
    if top.data.get("sharing") is None:
        return None
    r = top.child("sharing", ("store_url", "interval_ms", "staleness_ms", "timeout_ms", "replica_id", "namespace"))
    url = r.string("store_url", None)
    if url is None or urlsplit(url).scheme not in ("redis", "rediss", "unix", "nats", "tls"):
        r.fail("store_url", "must be a redis://, rediss:// or unix:// URL (Redis, Valkey) or nats:// or tls:// (NATS)")
    interval = r.number("interval_ms", 50.0)
    staleness = r.number("staleness_ms", 1000.0)
    if staleness < 2 * interval:
        r.fail("staleness_ms", f"must be at least twice interval_ms ({interval:g}): else live replicas drop out")
    return SharingConfig(store_url=url or "", interval_ms=interval, staleness_ms=staleness,
                         timeout_ms=r.number("timeout_ms", 200.0), replica_id=r.string("replica_id", None),
                         namespace=r.string("namespace", "capbalancer") or "capbalancer")


def _outlier(top: _Reader) -> OutlierSettings:
    o = top.child("outlier", ("consecutive_failures", "base_ejection_s", "max_ejection_s", "max_ejected_fraction",
                              "first_token_timeout_min_s", "first_token_timeout_factor", "first_token_timeout_max_s"))
    d = OutlierSettings()
    settings = OutlierSettings(
        consecutive_failures=o.integer("consecutive_failures", d.consecutive_failures, minimum=0),
        base_ejection_s=o.number("base_ejection_s", d.base_ejection_s),
        max_ejection_s=o.number("max_ejection_s", d.max_ejection_s),
        max_ejected_fraction=o.number("max_ejected_fraction", d.max_ejected_fraction, positive=False),
        first_token_timeout_min_s=o.number("first_token_timeout_min_s", d.first_token_timeout_min_s),
        first_token_timeout_factor=o.number("first_token_timeout_factor", d.first_token_timeout_factor),
        first_token_timeout_max_s=o.number("first_token_timeout_max_s", d.first_token_timeout_max_s))
    if settings.max_ejected_fraction > 1:
        o.fail("max_ejected_fraction", f"must be between 0 and 1, got {settings.max_ejected_fraction:g}")
    if settings.max_ejection_s < settings.base_ejection_s:
        o.fail("max_ejection_s", f"must be >= base_ejection_s ({settings.base_ejection_s:g})")
    if settings.first_token_timeout_max_s < settings.first_token_timeout_min_s:
        o.fail("first_token_timeout_max_s", f"must be >= first_token_timeout_min_s "
               f"({settings.first_token_timeout_min_s:g})")
    return settings


def _clients(top: _Reader, models: Mapping[str, ModelConfig]) -> tuple[ClientKey, ...]:
    rows = top.data.get("clients") or []
    if not isinstance(rows, list):
        top.fail("clients", f"must be a list, got {_kind(rows)}")
    out: list[ClientKey] = []
    names: set[str] = set()
    for i, row in enumerate(rows):
        r = _Reader(row, f"clients[{i}]", top.where, _CLIENT_KEYS)
        name = r.string("name", f"client-{i}") or f"client-{i}"
        if name in names:
            r.fail("name", f"{name!r} is used twice")
        names.add(name)
        literal, env = r.string("key", None), r.string("key_env", None)
        if (literal is None) == (env is None):
            r.fail("key", "set exactly one of key or key_env")
        key = literal if literal is not None else os.environ.get(env or "")
        if not key:
            r.fail("key_env", f"environment variable {env} is not set or empty")
        allowed = r.data.get("models") or []
        if not isinstance(allowed, list) or not all(isinstance(m, str) for m in allowed):
            r.fail("models", "must be a list of model names")
        unknown = [m for m in allowed if m not in models]
        if unknown:
            r.fail("models", f"unknown model(s) {', '.join(unknown)}")
        rps = r.data.get("rate_limit_rps")
        out.append(ClientKey(
            name=name, key=key or "", priority=r.integer("priority", 0, minimum=-1000, maximum=1000),
            rate_limit_rps=None if rps is None else r.number("rate_limit_rps", 0.0),
            rate_limit_burst=r.number("rate_limit_burst", 0.0, positive=False),
            models=tuple(allowed)))
    return tuple(out)


def merge_fleet(models: dict[str, ModelConfig], fleet: FleetDescription, timeouts: Timeouts,
                base_dir: Path | None) -> dict[str, ModelConfig]:
    """Add a fleet description's instances to the pools of their model (creating pools as needed)."""
    from capbalancer.profiling.library import resolve_profile

    out = dict(models)
    for i, inst in enumerate(fleet.instances):
        profile = None
        if inst.profile is not None:
            try:
                profile = resolve_profile(inst.profile, base_dir)
            except ProfileError as exc:
                raise ConfigError(f"{fleet.source}: instances[{i}].profile: {exc}") from None
            if inst.time_scale != 1.0:
                # A simulated instance slowed by time_scale really is that much slower: the scheduler
                # must predict its real latencies, not the modelled GPU's.
                profile = replace(profile, step=profile.step.scaled(inst.time_scale))
        if inst.api_key_env and not os.environ.get(inst.api_key_env):
            raise ConfigError(f"{fleet.source}: instances[{i}].api_key_env: environment variable "
                              f"{inst.api_key_env} is not set (or empty)")
        pool = out.get(inst.model)
        if pool is None:
            pool = ModelConfig(name=inst.model, policy=default_policy())
        b = BackendConfig(url=inst.url, name=inst.name, engine=inst.engine, profile_ref=inst.profile,
                          profile=profile, api_key_env=inst.api_key_env, timeouts=timeouts, gpu_group=inst.gpu_group)
        out[inst.model] = replace(pool, backends=(*pool.backends, b))
    return out


def _check_models(top: _Reader, models: dict[str, ModelConfig]) -> None:
    if not models:
        top.fail("models", "no models configured (add `models:` with backends, or `fleet:`)")
    defaults = [m.name for m in models.values() if m.default]
    if len(defaults) > 1:
        top.fail(f"models.{defaults[1]}.default", f"only one model may be the default ({defaults[0]} already is)")
    seen_names: dict[str, str] = {}
    served: dict[str, str] = {}
    for m in models.values():
        if not m.backends:
            top.fail(f"models.{m.name}.backends", "needs at least one backend")
        for i, b in enumerate(m.backends):
            if b.name in seen_names:
                top.fail(f"models.{m.name}.backends[{i}].name",
                         f"{b.name!r} is already the name of a backend of {seen_names[b.name]}")
            seen_names[b.name] = m.name
        for served_name in (m.name, *m.aliases):
            if served_name in served and served[served_name] != m.name:
                top.fail(f"models.{m.name}.aliases", f"{served_name!r} is already served by {served[served_name]}")
            served[served_name] = m.name


def load_config(path: str | Path) -> Config:
    path = Path(path)
    data = read_yaml(path, ConfigError)
    return parse_config(data, where=str(path), base_dir=path.resolve().parent)


def config_from_backends(urls: Sequence[str], policy: str | None = None, model: str = "default",
                         server: ServerSettings | None = None) -> Config:
    """A one-pool config for `serve --backend URL ...`: the pool answers to any model name."""
    rows = [{"url": u, "engine": "auto"} for u in urls]
    data: dict[str, Any] = {"models": {model: {"backends": rows, "default": True}}}
    if policy:
        data["models"][model]["policy"] = policy
    cfg = parse_config(data, where="--backend")
    models = {k: replace(m, match_any=True) for k, m in cfg.models.items()}
    return replace(cfg, server=server or cfg.server, source="", models=models)


def config_from_fleet(fleet: FleetDescription, policy: str | None = None,
                      server: ServerSettings | None = None) -> Config:
    """A config serving every instance of a fleet description (the embedded simulated cluster)."""
    models = merge_fleet({}, fleet, Timeouts(), Path(fleet.source).parent if fleet.source != "<fleet>" else None)
    if policy:
        models = {k: replace(m, policy=policy) for k, m in models.items()}
    first = next(iter(models))
    models[first] = replace(models[first], default=True)
    return Config(server=server or ServerSettings(), models=models, source=fleet.source, fleet=fleet.source)
