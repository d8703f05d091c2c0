"""Data the scheduler takes and gives. Plain dataclasses; times are scheduler-clock seconds (`now`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from capbalancer.profiling.schema import Profile
from capbalancer.sched.prefix_hash import PrefixKey


@dataclass(slots=True)
class Demand:
    """A request as the scheduler sees it: what it will cost, not what it says."""

    request_id: str
    pool: str  # the model pool that serves it
    prompt_tokens: int  # estimated (or exact, with a local tokenizer)
    max_tokens: int  # upper bound on output tokens (the request's, or the pool's default)
    arrival_s: float
    priority: int = 0  # higher is served first from the hold queue
    deadline_s: float | None = None  # absolute time by which it must leave the hold queue
    stream: bool = False
    api: str = "openai"  # openai | tgi | embeddings: embeddings generate nothing
    # The prompt's chained block hashes (sched/prefix_hash.py): what a backend may already hold in its cache.
    prefix: PrefixKey = field(default_factory=PrefixKey)
    session_id: str | None = None  # x-session-id or the OpenAI `user` field: a soft affinity hint
    # Whether prompt_tokens was counted (a tokenizer) or estimated from characters, and whether max_tokens was
    # the request's own or the pool's default: a request is refused as too long only on what it really asks.
    prompt_tokens_exact: bool = True
    max_tokens_explicit: bool = True
    # Only these backends may serve it (a LoRA adapter that only they hold); None: any of the pool's.
    only_backends: frozenset[str] | None = None
    sequences: int = 1  # n / best_of: max_tokens bounds them all; each alone needs max_tokens / sequences
    # The front door judged it against the queue's bound and passed it on (server/overload.py): it was counted
    # in transit there, so the bound, which moves while the event loop lags, does not refuse it again here.
    door_passed: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    backend_id: str


@dataclass(frozen=True, slots=True)
class Hold:
    reason: str  # why no backend took it now (e.g. "kv", "compute", "queue-order")
    queue_position: int


@dataclass(frozen=True, slots=True)
class Reject:
    status: int  # 429 (queue full / over a rate), 503 (no backend can serve, deadline passed), 400 (too long)
    reason: str
    retry_after_s: float
    code: str = ""  # the OpenAI error code, where one says more than the status (context_length_exceeded)


Decision = Route | Hold | Reject


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A held request that may now go to `backend_id`."""

    request_id: str
    backend_id: str
    held_seconds: float


@dataclass(frozen=True, slots=True)
class Expire:
    """A held request that leaves without being served: answer it with `status` and `Retry-After`."""

    request_id: str
    status: int
    reason: str
    retry_after_s: float


Event = Dispatch | Expire


@dataclass(frozen=True, slots=True)
class BackendSpec:
    backend_id: str  # unique name
    pool: str  # the model pool it serves
    url: str = ""
    engine: str = "openai"  # vllm | tgi | sglang | openai
    profile: Profile | None = None  # None: no profile; capacity policies fall back to observed figures
    weight: float | None = None  # static weight for `weighted`; None: the profile's throughput, else 1
    # Backends with the same gpu_group share one GPU's compute (several engines on one card, time-sliced):
    # a step of one waits for the steps of the others, so load on one slows them all. None: a GPU of its own.
    gpu_group: str | None = None


@dataclass(frozen=True, slots=True)
class HealthSettings:
    failure_threshold: int = 3  # consecutive failed health polls before a backend is marked down
    success_threshold: int = 1  # consecutive good polls before a down backend is routed again
    stale_after_s: float = 3.0  # a snapshot older than this is unknown, not empty


@dataclass(frozen=True, slots=True)
class PoolSettings:
    name: str
    policy: str = "capacity"
    policy_options: dict[str, float] = field(default_factory=dict)
    default_max_tokens: int = 256  # when a request names none
    hold_max_requests: int = 1024  # a full hold queue answers 429
    hold_timeout_s: float = 30.0  # default deadline for a held request
    retry_after_s: float = 1.0  # advice in Retry-After when nothing can serve
