"""Run `capbalancer serve` as a real process in front of real vLLM servers, from a written config file."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml

from tests.real_engine.server import SERVED_MODEL
from tests.support import REPO, capbalancer, free_port, stop_process, wait_http


def write_config(path: Path, backends: Mapping[str, str], policy: str,
                 profiles: Mapping[str, Path] | None = None, port: int = 0,
                 hold_timeout_s: float = 120.0, backend_options: Mapping[str, dict] | None = None,
                 model_options: dict | None = None) -> Path:
    """A one-model config: backends maps name -> base URL (no /v1); profiles maps name -> profile file;
    backend_options and model_options add keys to a backend's row and to the model."""
    rows = []
    for name, url in backends.items():
        row: dict[str, object] = {"name": name, "url": url, "engine": "vllm"}
        if profiles and name in profiles:
            row["profile"] = str(profiles[name])
        row.update((backend_options or {}).get(name, {}))
        rows.append(row)
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        # Poll often: the tiny model's requests last a second or two, so a 1 s poll would lag them.
        "health": {"interval_s": 0.25, "timeout_s": 2.0},
        "models": {SERVED_MODEL: {"policy": policy, "hold": {"timeout_s": hold_timeout_s}, "backends": rows,
                                  **(model_options or {})}},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.contextmanager
def proxy(tmp: Path, backends: Mapping[str, str], policy: str,
          profiles: Mapping[str, Path] | None = None, backend_options: Mapping[str, dict] | None = None,
          model_options: dict | None = None, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Yield the proxy's base URL (no /v1); stops it (SIGTERM, then SIGKILL) afterwards."""
    port = free_port()
    config = write_config(tmp / f"capbalancer-{policy}.yaml", backends, policy, profiles, port,
                          backend_options=backend_options, model_options=model_options)
    # A log file, not a pipe: a load test can make the proxy log more than a pipe holds.
    with open(tmp / f"capbalancer-{policy}.log", "wb") as log:
        proc = subprocess.Popen(capbalancer("serve", "--config", str(config), "--log-level", "warning"),
                                stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            try:
                wait_http(f"http://127.0.0.1:{port}/v1/models", 30, proc)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}\n{(tmp / f'capbalancer-{policy}.log').read_text()[-4000:]}") from None
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_process(proc)
