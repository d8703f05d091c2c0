"""Routing policies: given a demand and the routable backends of its pool, pick one or hold.

A policy is a small object with `choose(demand, candidates, ctx) -> BackendState | None`; None means
"no backend should take this now: hold it". Policies are pure: the clock and every input come in `ctx`
and the candidates, and randomness comes from a seeded generator, so a run is reproducible in the
discrete-event runner and identical in the live proxy.

New policies register themselves with `@register("name")`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from capbalancer.sched.backend import BackendState
from capbalancer.sched.capacity import CapacityModel, Latency
from capbalancer.sched.prefix_index import PrefixIndex
from capbalancer.sched.types import Demand, HealthSettings


@dataclass(slots=True)
class PolicyContext:
    now: float
    health: HealthSettings
    expected_output_tokens: int  # what the scheduler expects this demand to generate
    capacity: CapacityModel  # the scheduler's model (default settings, shared online corrections)
    prefix: PrefixIndex | None = None  # the scheduler's prefix index (sched/prefix_index.py)
    # Releasing a held request: it may keep waiting for the backend holding its prefix (sched/prefix_wait.py);
    # the policy names that backend in `waiting_for` when it does.
    wait_for_prefix: bool = False
    waiting_for: str | None = None
    # Set by a policy whose prediction for the backend it chose is what `ctx.capacity.estimate` would give:
    # (that backend, its Latency, cached prompt tokens, shared KV tokens). The dispatch then takes it as is.
    prediction: tuple[BackendState, Latency, int, int] | None = None


class Policy(Protocol):
    name: str

    def choose(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> BackendState | None:
        ...


PolicyFactory = Callable[[dict[str, float], random.Random], Policy]
_REGISTRY: dict[str, PolicyFactory] = {}


class UnknownPolicy(ValueError):
    pass


def register(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def deco(factory: PolicyFactory) -> PolicyFactory:
        _REGISTRY[name] = factory
        return factory

    return deco


def policy_names() -> list[str]:
    _load_builtin_policies()
    return sorted(_REGISTRY)


def make_policy(name: str, options: dict[str, float] | None = None, rng: random.Random | None = None) -> Policy:
    _load_builtin_policies()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownPolicy(f"unknown policy {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return factory(dict(options or {}), rng or random.Random(0))


def _load_builtin_policies() -> None:
    # Policies defined in other modules register on import; importing here keeps the registry complete
    # without import-time side effects in this module.
    import importlib

    for module in ("capbalancer.sched.baselines", "capbalancer.sched.capacity_policy"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


class RoundRobin:
    """Each routable backend in turn, whatever its load (nginx's and every router's default)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> BackendState | None:
        if not candidates:
            return None
        pick = candidates[self._next % len(candidates)]
        self._next += 1
        return pick


class LeastRequests:
    """Fewest requests this proxy has in flight on the backend; ties broken in turn."""

    name = "least_requests"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> BackendState | None:
        if not candidates:
            return None
        fewest = min(len(b.inflight) for b in candidates)
        tied = [b for b in candidates if len(b.inflight) == fewest]
        pick = tied[self._turn % len(tied)]
        self._turn += 1
        return pick


class RandomChoice:
    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, demand: Demand, candidates: Sequence[BackendState], ctx: PolicyContext) -> BackendState | None:
        return self._rng.choice(candidates) if candidates else None


register("round_robin")(lambda options, rng: RoundRobin())
register("least_requests")(lambda options, rng: LeastRequests())
register("random")(lambda options, rng: RandomChoice(rng))
