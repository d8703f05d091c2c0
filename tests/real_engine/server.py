"""Start and stop one real vLLM (CPU build) OpenAI server on 127.0.0.1, with everything it writes kept
in a private temporary directory that is removed afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SERVED_MODEL = "tiny-llama"
MAX_MODEL_LEN = 1024
# Loading a model with --enforce-eager takes ~33 s on an idle core; allow for a busy, shared machine.
START_TIMEOUT_S = float(os.environ.get("CAPBALANCER_VLLM_START_TIMEOUT", "420"))


@dataclass(frozen=True)
class VllmServer:
    name: str
    url: str          # http://127.0.0.1:PORT (no /v1)
    port: int
    log_path: Path
    num_gpu_blocks: int | None  # the override, when one was given
    pid: int
    start_seconds: float

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


def _get(url: str, timeout_s: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _stop(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM the whole process group (the API server forks an engine core), then SIGKILL stragglers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # The engine-core child may outlive the API server; its group id is still ours.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def vllm_server(python: Path, model_dir: Path, port: int, *, name: str = "vllm", cpu: int = 0,
                kv_cache_gib: int = 1, num_gpu_blocks: int | None = None, max_num_seqs: int | None = None,
                log_dir: Path | None = None, extra_args: list[str] | None = None) -> Iterator[VllmServer]:
    """Run a real vLLM server until the block exits. Fails (never skips) with the server's log tail."""
    scratch = Path(tempfile.mkdtemp(prefix=f"cbv-{name}-"))
    log_path = (log_dir or scratch) / f"{name}.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        # One core per instance; the default binds every instance to core 0.
        "VLLM_CPU_OMP_THREADS_BIND": str(cpu),
        # vLLM writes ZMQ sockets, vllm_dist_* dirs, an inductor cache and ~/.cache/vllm: keep them here.
        "VLLM_RPC_BASE_PATH": str(scratch), "VLLM_CACHE_ROOT": str(scratch / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"), "TMPDIR": str(scratch),
        "HF_HOME": str(scratch / "hf"),
    }
    args = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", SERVED_MODEL, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
            "--uvicorn-log-level", "warning"]
    if num_gpu_blocks is not None:
        args += ["--num-gpu-blocks-override", str(num_gpu_blocks)]
    if max_num_seqs is not None:
        args += ["--max-num-seqs", str(max_num_seqs)]
    args += extra_args or []
    started = time.monotonic()
    log = open(log_path, "wb")  # a file, not a pipe: vLLM logs a lot and a full pipe would stall it
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(scratch),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = started + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM {name} exited with {proc.returncode} before it was healthy:\n"
                                   + _tail(log_path))
            with contextlib.suppress(OSError):
                if _get(url + "/health") == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM {name} not healthy after {START_TIMEOUT_S:.0f}s:\n" + _tail(log_path))
            time.sleep(0.5)
        yield VllmServer(name=name, url=url, port=port, log_path=log_path, num_gpu_blocks=num_gpu_blocks,
                         pid=proc.pid, start_seconds=time.monotonic() - started)
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _tail(path: Path, n: int = 6000) -> str:
    with contextlib.suppress(OSError):
        return path.read_bytes()[-n:].decode(errors="replace")
    return "(no log)"
