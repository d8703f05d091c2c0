"""The compact encoding of one replica's state in the store: JSON arrays, no field names.

`{"b": {backend: [requests, kv, reserved_kv, pending_prefill, prompt, expected_output]},
  "p": {pool: [held, release_rate_per_s, head_age_s, head_priority]}}` is ~40 bytes a busy backend: a 100-backend fleet publishes
a few KB per replica per interval. A version byte in front lets a later layout coexist during an upgrade.
"""

from __future__ import annotations

import orjson

from capbalancer.sched.remote import BackendLoad, PoolLoad, ReplicaState

VERSION = b"1"
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024  # a corrupt or hostile entry must not make every replica parse megabytes


class WireError(ValueError):
    pass


def encode(state: ReplicaState) -> bytes:
    body = {
        "b": {bid: [x.requests, x.kv_tokens, x.reserved_kv_tokens, x.pending_prefill_tokens, x.prompt_tokens,
                    x.expected_output_tokens] for bid, x in state.backends.items()},
        "p": {name: [p.held, round(p.release_rate_per_s, 3), round(p.head_age_s, 4), p.head_priority]
              for name, p in state.pools.items()},
    }
    return VERSION + orjson.dumps(body)


def decode(replica_id: str, payload: bytes) -> ReplicaState:
    if len(payload) > MAX_PAYLOAD_BYTES or payload[:1] != VERSION:
        raise WireError(f"replica {replica_id}: unknown or oversized state ({len(payload)} bytes)")
    try:
        body = orjson.loads(payload[1:])
        backends = {str(bid): BackendLoad(*(int(v) for v in _row(row, 6))) for bid, row in body.get("b", {}).items()}
        pools = {str(name): PoolLoad(int(row[0]), float(row[1]), float(row[2]), int(row[3]))
                 for name, row in body.get("p", {}).items() if _row(row, 4)}
    except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
        raise WireError(f"replica {replica_id}: malformed state: {exc}") from None
    return ReplicaState(replica_id, backends, pools)


def _row(row: object, n: int) -> list:
    if not isinstance(row, list) or len(row) != n:
        raise ValueError(f"expected {n} numbers, got {row!r}"[:200])
    return row
