"""Client keys on every route (issue 14 item 8): /info and /v1/models need a key once keys are configured,
allow-lists apply to them, the caller's key never reaches an engine, and an unset api_key_env is a config
error. Real proxy and backend processes (tests/evil_backend.py records the GETs it is sent)."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest
from faults import Proxy
from support import PYTHON, REPO, capbalancer, free_port, running

from capbalancer.config import ConfigError, parse_config

KEYS = {"alice": "sk-alice-0c4f9e", "bob": "sk-bob-77a1d2", "carol": "sk-carol-5b3e80"}


@pytest.fixture(scope="module")
def backend():
    port = free_port()
    with running([PYTHON, str(REPO / "tests" / "evil_backend.py"), "--port", str(port)],
                 ready_url=f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def proxy(backend):
    config = {
        "models": {
            "m": {"default": True, "backends": [{"url": backend, "name": "e-pass", "engine": "openai",
                                                  "api_key_mode": "passthrough"}]},
            "n": {"backends": [{"url": backend, "name": "e-rep", "engine": "openai", "api_key": "sk-engine-1"}]},
        },
        "clients": [{"name": "alice", "key": KEYS["alice"], "models": ["m"]},
                    {"name": "bob", "key": KEYS["bob"]},
                    {"name": "carol", "key": KEYS["carol"], "models": ["n"]}],
    }
    with Proxy(config=config) as p:
        yield p


def seen(backend: str) -> list[dict]:
    with urllib.request.urlopen(backend + "/_seen", timeout=5) as resp:
        return json.loads(resp.read())


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.mark.parametrize("path", ["/info", "/v1/models"])
def test_routes_need_a_valid_key(proxy, path):
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEYS["bob"]}):
        status, _, body = proxy.request("GET", path, headers=headers)
        assert status == 401, (path, headers, status)
        assert json.loads(body)["error"]["code"] == "invalid_api_key"


def test_model_list_follows_the_allow_list(proxy):
    ids = {}
    for who in KEYS:
        status, _, body = proxy.request("GET", "/v1/models", headers=auth(who))
        assert status == 200
        ids[who] = sorted(d["id"] for d in json.loads(body)["data"])
    assert ids == {"alice": ["m"], "bob": ["m", "n"], "carol": ["n"]}


def test_info_needs_the_default_pool_and_never_forwards_the_callers_key(proxy, backend):
    before = len(seen(backend))
    assert proxy.request("GET", "/info", headers=auth("alice"))[0] == 200
    assert proxy.request("GET", "/info", headers=auth("bob"))[0] == 200
    status, _, body = proxy.request("GET", "/info", headers=auth("carol"))  # may not use m, the default pool
    assert status == 403 and json.loads(body)["error"]["code"] == "model_not_allowed"
    infos = [s for s in seen(backend)[before:] if s["path"] == "/info"]
    assert len(infos) == 2
    # passthrough mode, but the client's key is a credential for the proxy: the engine never sees it
    assert all(s["authorization"] is None for s in infos), infos
    assert not any(k in json.dumps(seen(backend)) for k in KEYS.values())


def test_unset_api_key_env_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CAPB_TEST_UNSET_KEY", raising=False)
    data = {"models": {"m": {"backends": [{"url": "http://127.0.0.1:9", "api_key_env": "CAPB_TEST_UNSET_KEY"}]}}}
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cfg.yaml")
    assert "models.m.backends[0].api_key_env" in str(info.value) and "CAPB_TEST_UNSET_KEY" in str(info.value)
    monkeypatch.setenv("CAPB_TEST_UNSET_KEY", "sk-set")
    assert parse_config(data, "cfg.yaml").models["m"].backends[0].resolved_api_key() == "sk-set"
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(data))
    monkeypatch.delenv("CAPB_TEST_UNSET_KEY")
    out = subprocess.run(capbalancer("check-config", str(path)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "CAPB_TEST_UNSET_KEY is not set" in out.stderr
