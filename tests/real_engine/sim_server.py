"""Run `capbalancer sim --engine vllm` as a real process, serving the tiny model's name and KV geometry."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.real_engine.server import SERVED_MODEL
from tests.support import capbalancer, free_port, running

HAND_PROFILE = Path(__file__).resolve().parent.parent / "data" / "real" / "tiny-llama-cpu-hand.yaml"


@contextlib.contextmanager
def sim_server(profile: Path = HAND_PROFILE, time_scale: float = 1.0) -> Iterator[str]:
    """Yield the base URL (no /v1) of a simulated vLLM serving SERVED_MODEL with `profile`."""
    port = free_port()
    args = capbalancer("sim", "--engine", "vllm", "--profile", str(profile), "--port", str(port),
                       "--model", SERVED_MODEL, "--time-scale", str(time_scale))
    with running(args, ready_url=f"http://127.0.0.1:{port}/health", timeout_s=30):
        yield f"http://127.0.0.1:{port}"
