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
import pytest
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


@pytest.mark.parametrize("n_cores", [1, 2])
def test_workers_auto_starts_one_per_usable_core(tmp_path, n_cores):
    """`--workers auto` counts the cores the process may use: restricted to one or two by its affinity mask (not
    the host's count), it starts that many workers (fewer only if this host's cgroup quota allows fewer), says
    how it counted, and serves."""
    from capbalancer.cluster.workers import UsableCpus, usable_cpus

    cores = sorted(os.sched_getaffinity(0))[:n_cores]
    expected = UsableCpus(affinity=len(cores), quota_cpus=usable_cpus().quota_cpus).count
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Backend(name="a", chunks=2) as a:
        log_path = tmp_path / "serve.log"
        log = open(log_path, "wb")
        proc = subprocess.Popen([sys.executable, "-m", "capbalancer.cli", "serve", "--workers", "auto", "--backend",
                                 a.url, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, "CAPBALANCER_REPLICA_ID": "t"},
                                preexec_fn=lambda: os.sched_setaffinity(0, cores))
        try:
            seen: set[str] = set()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(seen) < expected:
                try:
                    seen.add(_ready(url).get("sharing", {}).get("replica_id", "single"))
                except OSError:
                    pass
                time.sleep(0.05)
            text = log_path.read_text()
            assert f"--workers auto: {expected} (affinity {len(cores)} cores" in text, text[-2000:]
            assert seen == ({f"t-w{i}" for i in range(expected)} if expected > 1 else {"single"}), (seen, text[-2000:])
            client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=20)
            out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert out.choices[0].message.content
        finally:
            if proc.poll() is None:
                stop_process_group(proc)
            log.close()


def test_usable_cpus_reads_the_cgroup_quota(tmp_path):
    """A container's CPU limit caps `--workers auto` below its affinity mask (which shows every host core)."""
    from capbalancer.cluster.workers import UsableCpus, cgroup_quota_cpus, usable_cpus

    assert cgroup_quota_cpus(cpu_max="150000 100000\n") == 1.5
    assert cgroup_quota_cpus(cpu_max="max 100000\n") is None
    assert cgroup_quota_cpus(cpu_max="garbage") is None
    assert cgroup_quota_cpus(cfs_quota_us="-1\n", cfs_period_us="100000\n") is None
    assert cgroup_quota_cpus(cfs_quota_us="50000\n", cfs_period_us="100000\n") == 0.5
    assert UsableCpus(affinity=16, quota_cpus=1.5).count == 2  # a fraction of a core still gets a worker
    assert UsableCpus(affinity=16, quota_cpus=0.5).count == 1
    assert UsableCpus(affinity=2, quota_cpus=8.0).count == 2
    assert UsableCpus(affinity=4, quota_cpus=None).count == 4
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("300000 100000\n")
    assert usable_cpus(str(v2)).quota_cpus == 3.0
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(str(v1)).quota_cpus == 2.0
    assert usable_cpus(str(tmp_path / "none")).quota_cpus is None
