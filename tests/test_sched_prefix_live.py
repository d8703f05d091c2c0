"""Prefix affinity through the live proxy: a real `capbalancer serve` process, two backend processes, the
official OpenAI client. The proxy hashes each prompt (sched/prefix_hash.py) and the default `capacity` policy
keeps a conversation on the backend that holds it, while new conversations still spread."""

from __future__ import annotations

import openai
from backends import Backend, ProxyProcess


def test_conversations_stay_where_their_prefix_is_and_spread_across_backends():
    with Backend(name="a", chunks=4) as a, Backend(name="b", chunks=4) as b:
        config = {"models": {"m": {"default": True,
                                   "backends": [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}]}}}
        with ProxyProcess(config) as proxy:
            c = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0, timeout=20)
            placed: dict[int, set[str]] = {}
            for turn in range(3):
                for s in range(6):
                    system = f"Session {s} instructions. " + "Follow the house rules carefully. " * 60
                    messages = [{"role": "system", "content": system}]
                    for t in range(turn + 1):
                        messages.append({"role": "user", "content": f"turn {t} of session {s}, please help " * 8})
                    raw = c.chat.completions.with_raw_response.create(model="m", messages=messages, max_tokens=4)
                    placed.setdefault(s, set()).add(raw.headers["x-capbalancer-backend"])
            assert all(len(backends) == 1 for backends in placed.values()), placed
            assert {next(iter(v)) for v in placed.values()} == {"a", "b"}
            # No prompt to hash in common (each turn a new short text), only the OpenAI `user` field: the
            # session's last backend is a soft preference. Prompts this short leave the hint no tokens to count,
            # and two idle backends score alike: each user's requests must still stay together (near-ties go to
            # the session's backend; they used to alternate a, b, a, b through the rotation of exact ties).
            for user in ("alice", "bob", "carol"):
                seen = set()
                for i in range(4):
                    raw = c.chat.completions.with_raw_response.create(
                        model="m", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=4, user=user)
                    seen.add(raw.headers["x-capbalancer-backend"])
                assert len(seen) == 1, (user, seen)
