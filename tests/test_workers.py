"""`capbalancer serve --workers 2`: two real proxy processes on one port, sharing through the redis-server
their parent starts; every request answered; SIGTERM stops them all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import openai
from backends import Backend
from support import free_port

from capbalancer.loadtest.procs import stop_process_group


def _ready(url: str) -> dict:
    # A new connection each time: the kernel picks the worker (SO_REUSEPORT).
    with urllib.request.urlopen(url + "/ready", timeout=5) as resp:
        return json.loads(resp.read())


def test_two_workers_share_one_port_and_one_view(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Backend(name="a", chunks=2) as a:
        log = open(tmp_path / "serve.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "capbalancer.cli", "serve", "--workers", "2", "--backend",
                                 a.url, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "CAPBALANCER_REPLICA_ID": "t"})
        try:
            seen: dict[str, dict] = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (
                    len(seen) == 2 and all(s.get("other_replicas") == 1 for s in seen.values())):
                try:
                    sharing = _ready(url).get("sharing", {})
                    seen[sharing["replica_id"]] = sharing
                except OSError:
                    pass
                time.sleep(0.05)
            assert sorted(seen) == ["t-w0", "t-w1"], (seen, (tmp_path / "serve.log").read_text()[-2000:])
            assert all(s["state"] == "shared" and s["other_replicas"] == 1 for s in seen.values()), seen
            client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=20)
            for i in range(20):
                out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"hi {i}"}],
                                                     max_tokens=2)
                assert out.choices[0].message.content
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            # The workers and the store went with it: the port is free again.
            import socket

            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
        finally:
            if proc.poll() is None:
                stop_process_group(proc)
            log.close()
