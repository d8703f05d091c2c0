"""Client API keys: required once configured, compared in constant time, per-key model allow-list,
priority ceiling and rate limit. Real proxy and backend processes on 127.0.0.1."""

from __future__ import annotations

import inspect
import json

from faults import FaultBackend, Proxy, proxy_config

from capbalancer.server import clients as clients_module

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_client_keys_gate_the_api_with_limits_and_allow_lists():
    with FaultBackend("b0") as b:
        cfg = proxy_config([b])
        cfg["models"]["other"] = {"backends": [{"url": b.url, "name": "b0-other"}]}
        cfg["clients"] = [
            {"name": "team-a", "key_env": "TEAM_A_KEY", "priority": 5, "rate_limit_rps": 1, "rate_limit_burst": 3},
            {"name": "team-b", "key": "sk-team-b", "models": ["other"]},
        ]
        with Proxy(config=cfg, env={"TEAM_A_KEY": "sk-team-a"}) as proxy:
            status, _, raw = proxy.request("POST", "/v1/chat/completions", CHAT)
            assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
            status, _, _ = proxy.request("POST", "/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-team-"})
            assert status == 401
            a = {"Authorization": "Bearer sk-team-a"}
            statuses = [proxy.request("POST", "/v1/chat/completions", CHAT, a)[0] for _ in range(5)]
            # A burst of 3, refilling at 1/s: the 4th and 5th within the same second are refused.
            assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:], statuses
            status, headers, raw = proxy.request("POST", "/v1/chat/completions", CHAT, a)
            if status == 429:
                assert int(headers["Retry-After"]) >= 1
                assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
            bkey = {"Authorization": "Bearer sk-team-b"}
            status, _, raw = proxy.request("POST", "/v1/chat/completions", CHAT, bkey)
            assert status == 403 and json.loads(raw)["error"]["code"] == "model_not_allowed"
            assert proxy.request("POST", "/v1/chat/completions", {**CHAT, "model": "other"}, bkey)[0] == 200
            assert "sk-team-a" not in proxy.log() and "sk-team-b" not in proxy.log()
            # The client's key is a credential for the proxy: no engine ever receives it.
            seen = {r["headers"].get("Authorization") for r in b.stats()["recent"]}
            assert not any(h and ("sk-team-a" in h or "sk-team-b" in h) for h in seen), seen
        # Refused requests never reached the engine: 3 from team-a's burst (+1 maybe after refill) and 1 from b.
        assert b.stats()["counts"].get("api", 0) <= 5


def test_client_keys_are_compared_in_constant_time():
    source = inspect.getsource(clients_module.ClientAuth.authenticate)
    assert "hmac.compare_digest" in source and "break" not in source  # every key is checked, no early exit
