"""Start and stop real vLLM (CPU build) OpenAI servers on 127.0.0.1, with everything they write kept in
a private temporary directory that is removed afterwards."""

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SERVED_MODEL = "tiny-llama"
MAX_MODEL_LEN = 1024
BLOCK_SIZE_TOKENS = 128  # vLLM's CPU backend default
# Loading a model with --enforce-eager takes ~35-60 s on a core; allow for a busy, shared machine.
START_TIMEOUT_S = float(os.environ.get("CAPBALANCER_VLLM_START_TIMEOUT", "420"))


@dataclass(frozen=True)
class ServerSpec:
    name: str
    cpu: int = 0                       # VLLM_CPU_OMP_THREADS_BIND: the core its OpenMP threads own
    kv_cache_gib: int = 1              # VLLM_CPU_KVCACHE_SPACE
    num_gpu_blocks: int | None = None  # --num-gpu-blocks-override (blocks of 128 tokens)
    max_num_seqs: int | None = None
    extra_args: tuple[str, ...] = ()


@dataclass
class VllmServer:
    spec: ServerSpec
    url: str          # http://127.0.0.1:PORT (no /v1)
    port: int
    log_path: Path
    scratch: Path
    proc: subprocess.Popen
    started_at: float
    start_seconds: float | None = None
    _log: object = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Block until /health answers 200; raise with the log tail if the server dies or takes too long."""
        deadline = self.started_at + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM {self.name} exited with {self.proc.returncode} before it was "
                                   f"healthy:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                if _status(self.url + "/health") == 200:
                    self.start_seconds = time.monotonic() - self.started_at
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM {self.name} not healthy after {timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, n: int = 6000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        return "(no log)"

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the process group (the API server forks an engine core), SIGKILL what is left,
        and remove the scratch directory with its ZMQ sockets and caches."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout_s)
        # The engine-core child can outlive the API server; it is still in our process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def _status(url: str, timeout_s: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def launch(python: Path, model_dir: Path, port: int, spec: ServerSpec, log_dir: Path | None = None) -> VllmServer:
    """Start one server and return at once (call wait_healthy): two servers load in parallel."""
    scratch = Path(tempfile.mkdtemp(prefix=f"cbv-{spec.name}-"))
    log_path = (log_dir or scratch) / f"vllm-{spec.name}.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib),
        # One core per instance; the default binds every instance to core 0.
        "VLLM_CPU_OMP_THREADS_BIND": str(spec.cpu),
        # vLLM writes ZMQ sockets, vllm_dist_* dirs, an inductor cache and ~/.cache/vllm: keep them here.
        "VLLM_RPC_BASE_PATH": str(scratch), "VLLM_CACHE_ROOT": str(scratch / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"), "TMPDIR": str(scratch),
        "HF_HOME": str(scratch / "hf"),
        # Dev routes, for POST /reset_prefix_cache: benches empty the prefix caches between runs.
        "VLLM_SERVER_DEV_MODE": "1",
    }
    args = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", SERVED_MODEL, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
            "--uvicorn-log-level", "warning"]
    if spec.num_gpu_blocks is not None:
        args += ["--num-gpu-blocks-override", str(spec.num_gpu_blocks)]
    if spec.max_num_seqs is not None:
        args += ["--max-num-seqs", str(spec.max_num_seqs)]
    args += list(spec.extra_args)
    log = open(log_path, "wb")  # a file, not a pipe: vLLM logs a lot and a full pipe would stall it
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(scratch),
                            start_new_session=True)
    return VllmServer(spec=spec, url=f"http://127.0.0.1:{port}", port=port, log_path=log_path,
                      scratch=scratch, proc=proc, started_at=time.monotonic(), _log=log)


@contextlib.contextmanager
def vllm_servers(python: Path, model_dir: Path, specs: Sequence[ServerSpec], ports: Sequence[int],
                 log_dir: Path | None = None) -> Iterator[list[VllmServer]]:
    """Run several real vLLM servers (started in parallel) until the block exits."""
    servers: list[VllmServer] = []
    try:
        for spec, port in zip(specs, ports, strict=True):
            servers.append(launch(python, model_dir, port, spec, log_dir))
        for server in servers:
            server.wait_healthy()
        yield servers
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def vllm_server(python: Path, model_dir: Path, port: int, spec: ServerSpec,
                log_dir: Path | None = None) -> Iterator[VllmServer]:
    with vllm_servers(python, model_dir, [spec], [port], log_dir) as (server,):
        yield server


def usable_cpus() -> list[int]:
    """Cores this process may run on; a second server gets the second one when there is one."""
    return sorted(os.sched_getaffinity(0))
