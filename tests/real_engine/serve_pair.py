"""Start the real-engine tier's two vLLM servers and keep them up until interrupted, printing the
CAPBALANCER_REAL_VLLM_URLS value that makes the tests (and bench/real_vllm*.py) use them:

    .venv/bin/python -m tests.real_engine.serve_pair [--large-port 18801 --small-port 18802]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from tests.real_engine.conftest import SMALL_KV_BLOCKS
from tests.real_engine.install import ensure_installed
from tests.real_engine.make_model import ensure_model
from tests.real_engine.server import ServerSpec, usable_cpus, vllm_servers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large-port", type=int, default=18801)
    parser.add_argument("--small-port", type=int, default=18802)
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the servers' logs here")
    args = parser.parse_args()
    python = ensure_installed()
    model = ensure_model(python)
    cpus = usable_cpus()
    specs = [ServerSpec(name="large", cpu=cpus[0]),
             ServerSpec(name="small", cpu=cpus[1 % len(cpus)], num_gpu_blocks=SMALL_KV_BLOCKS)]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with vllm_servers(python, model, specs, [args.large_port, args.small_port], args.log_dir) as servers:
        large, small = servers
        print(f"CAPBALANCER_REAL_VLLM_URLS=large={large.url},small={small.url}", flush=True)
        print(f"(healthy after {max(s.start_seconds or 0 for s in servers):.0f}s; Ctrl-C stops both)",
              file=sys.stderr, flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
