"""Config loading: typed values, defaults, and errors that name the file and the key path."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from support import capbalancer

from capbalancer.config import ConfigError, config_from_backends, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, data: object, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_full_config_maps_to_scheduler_objects(tmp_path):
    path = write(tmp_path, {
        "server": {"port": 9100, "max_body_bytes": 1000},
        "timeouts": {"first_byte_s": 7},
        "health": {"failure_threshold": 5},
        "retries": {"max_attempts": 3},
        "models": {
            "llama": {"policy": "least_requests", "default": True, "aliases": ["l"], "default_max_tokens": 64,
                      "hold": {"max_requests": 10, "timeout_s": 5},
                      "backends": [{"url": "http://127.0.0.1:8001", "name": "a100-0",
                                    "profile": "a100-80g/llama-2-13b-tp1", "weight": 2, "gpu_group": 0,
                                    "timeouts": {"stream_idle_s": 3}},
                                   {"url": "http://127.0.0.1:8002/"}]},
            "opt": {"policy": "round_robin", "backends": [{"url": "http://127.0.0.1:8003", "engine": "tgi"}]},
        },
    })
    cfg = load_config(path)
    assert cfg.server.port == 9100 and cfg.server.max_body_bytes == 1000
    assert cfg.health.to_scheduler().failure_threshold == 5
    llama = cfg.models["llama"]
    pool = llama.pool_settings()
    assert (pool.name, pool.policy, pool.default_max_tokens, pool.hold_max_requests, pool.hold_timeout_s) == \
        ("llama", "least_requests", 64, 10, 5.0)
    specs = llama.backend_specs()
    assert [s.backend_id for s in specs] == ["a100-0", "127.0.0.1:8002"]
    assert specs[0].profile is not None and specs[0].weight == 2.0 and specs[0].pool == "llama"
    assert (specs[0].gpu_group, specs[1].gpu_group) == ("0", None)  # a card index names a group as well as a string
    b0, b1 = llama.backends
    assert b0.timeouts.first_byte_s == 7 and b0.timeouts.stream_idle_s == 3  # inherited, then overridden
    assert b1.url == "http://127.0.0.1:8002" and b1.timeouts.stream_idle_s == 60
    assert cfg.model_for(None) is llama and cfg.model_for("l") is llama and cfg.model_for("opt").name == "opt"
    assert cfg.model_for("unknown") is None


@pytest.mark.parametrize("data, expected", [
    ({"models": {"llama": {"backends": [{"url": "http://a:1"}, {"url": "http://a:2"}, {"url": "localhost:80"}]}}},
     "models.llama.backends[2].url: not a URL"),
    ({"models": {"llama": {"backends": [{"url": "http://a:1/v1"}]}}}, "models.llama.backends[0].url: not a URL"),
    ({"models": {"llama": {"policy": "fastest", "backends": [{"url": "http://a:1"}]}}},
     "models.llama.policy: unknown policy 'fastest'"),
    ({"models": {"llama": {"backends": [{"url": "http://a:1", "engine": "triton"}]}}},
     "models.llama.backends[0].engine: 'triton' is not one of"),
    ({"models": {"llama": {"backends": [{"url": "http://a:1", "profile": "no/such-profile"}]}}},
     "models.llama.backends[0].profile: profile 'no/such-profile' not found"),
    ({"models": {"llama": {"backends": [{"url": "http://a:1", "weight": "heavy"}]}}},
     "models.llama.backends[0].weight: must be a number"),
    ({"models": {"llama": {"backends": [{"url": "http://a:1", "gpu_group": ["gpu0"]}]}}},
     "models.llama.backends[0].gpu_group: must be a non-empty string, got list"),
    ({"models": {"llama": {"backends": [{"url": "http://a:1", "timeouts": {"connect_s": 0}}]}}},
     "models.llama.backends[0].timeouts.connect_s: must be > 0"),
    ({"models": {"llama": {"hold": {"max_requests": -1}, "backends": [{"url": "http://a:1"}]}}},
     "models.llama.hold.max_requests: must be >= 0"),
    ({"models": {"llama": {"backends": []}}}, "models.llama.backends: needs at least one backend"),
    ({"models": {"a": {"backends": [{"url": "http://a:1", "name": "x"}]},
                 "b": {"backends": [{"url": "http://a:2", "name": "x"}]}}}, "models.b.backends[0].name: 'x' is already"),
    ({"models": {"a": {"default": True, "backends": [{"url": "http://a:1"}]},
                 "b": {"default": True, "backends": [{"url": "http://a:2"}]}}}, "models.b.default: only one model"),
    ({"models": {"a": {"backendz": []}}}, "models.a.backendz: unknown key"),
    ({"server": {"port": 70000}, "models": {"a": {"backends": [{"url": "http://a:1"}]}}}, "server.port: must be in"),
    ({"timeouts": {"total_s": "long"}, "models": {"a": {"backends": [{"url": "http://a:1"}]}}},
     "timeouts.total_s: must be a number"),
    ({}, "models: no models configured"),
    (["not", "a", "mapping"], "(top level): must be a mapping"),
    ({"models": {"a": {"policy": "capacity", "policy_options": {"bogus": 1}, "backends": [{"url": "http://a:1"}]}}},
     "models.a.policy_options: unknown capacity option"),
])
def test_errors_name_file_and_key_path(tmp_path, data, expected):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message


def test_yaml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "models: [unclosed"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_defaults_and_backend_only_config():
    cfg = parse_config({"models": {"m": {"backends": [{"url": "http://127.0.0.1:9"}]}}})
    assert cfg.server.max_body_bytes == 10 * 1024 * 1024 and cfg.timeouts.total_s == 600
    assert cfg.retries.max_attempts == 2 and cfg.server.admin_token_env == "CAPBALANCER_ADMIN_TOKEN"
    assert cfg.models["m"].policy in ("capacity", "least_requests")
    quick = config_from_backends(["http://127.0.0.1:1", "http://127.0.0.1:2"], "round_robin")
    pool = quick.models[quick.default_model]
    assert pool.policy == "round_robin" and len(pool.backends) == 2
    assert quick.model_for("any/model-name") is pool  # --backend pools serve whatever name the client uses


def test_fleet_file_adds_backends_grouped_by_model(tmp_path):
    write(tmp_path, {"model": "llama", "instances": [
        {"name": "g0", "engine": "vllm", "port": 8101, "profile": "a100-80g/llama-2-13b-tp1"},
        {"name": "g1", "engine": "vllm", "port": 8102},
        {"name": "o0", "engine": "tgi", "port": 8103, "model": "opt"}]}, "fleet.yaml")
    cfg = load_config(write(tmp_path, {"fleet": "fleet.yaml",
                                       "models": {"llama": {"policy": "round_robin", "backends": [{"url": "http://h:1"}]}}}))
    assert [b.name for b in cfg.models["llama"].backends] == ["h:1", "g0", "g1"]
    assert cfg.models["llama"].policy == "round_robin"
    assert [b.url for b in cfg.models["opt"].backends] == ["http://127.0.0.1:8103"]
    with pytest.raises(ConfigError, match=r"cfg.yaml: fleet: .*instances\[0\].port"):
        write(tmp_path, {"model": "llama", "instances": [{"name": "x", "port": "nope"}]}, "fleet.yaml")
        load_config(tmp_path / "cfg.yaml")


def test_check_config_command(tmp_path):
    bad = write(tmp_path, {"models": {"llama": {"backends": [{"url": "http://a:1"}, {"url": "http://a:2"},
                                                             {"url": "nope"}]}}})
    run = subprocess.run(capbalancer("check-config", str(bad)), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 1
    assert f"{bad}: models.llama.backends[2].url: not a URL" in run.stderr
    good = write(tmp_path, {"models": {"llama": {"backends": [{"url": "http://a:1", "name": "g"}]}}}, "good.yaml")
    run = subprocess.run(capbalancer("check-config", str(good)), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "model llama" in run.stdout and "g: http://a:1" in run.stdout


def test_example_config_is_valid():
    cfg = load_config(REPO / "deploy" / "capbalancer.example.yaml")
    assert cfg.models
