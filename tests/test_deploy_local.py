"""deploy --target local --engine sim: instances start, answer, and stop cleanly; a failed start cleans up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from support import capbalancer, free_port, stop_process
from test_deploy import make_plan, planned_instances


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read().decode()


def test_local_sim_deploy_starts_serves_and_stops_cleanly(tmp_path: Path) -> None:
    plan_path, plan = make_plan(tmp_path, "hels-llama-2-13b")
    out = tmp_path / "out"
    proxy_port = free_port()
    proc = subprocess.Popen(capbalancer("deploy", "--plan", str(plan_path), "--target", "local", "--engine", "sim",
                                        "--out", str(out), "--time-scale", "2", "--proxy-port", str(proxy_port)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        listing = out / "local-instances.yaml"
        deadline = time.monotonic() + 60
        while not listing.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "local deploy never became ready"
            time.sleep(0.1)
        running = yaml.safe_load(listing.read_text())["instances"]
        planned = planned_instances(plan)
        assert {r["name"] for r in running} == set(planned)
        for row in running:
            status, _ = _get(row["url"] + "/health")
            assert status == 200
            _, metrics = _get(row["url"] + "/metrics")
            blocks = planned[row["name"]]["kv_capacity_tokens"] // 16
            assert f'num_gpu_blocks="{blocks}"' in metrics
        # the proxy in front of them is up too, and serves a completion
        listed = yaml.safe_load(listing.read_text())["proxy"]
        assert listed["url"] == f"http://127.0.0.1:{proxy_port}"
        req = urllib.request.Request(listed["url"] + "/v1/completions", method="POST",
                                     data=b'{"prompt": "hi", "max_tokens": 4}',
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200 and resp.headers["x-capbalancer-backend"] in planned
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(listed["pid"], 0)
        for row in running:
            with pytest.raises(ProcessLookupError):
                os.kill(row["pid"], 0)
            port = int(row["url"].rsplit(":", 1)[1])
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0
        assert "stopped 2 instance(s)" in proc.stdout.read().decode()
    finally:
        stop_process(proc)


def test_local_deploy_that_cannot_start_reports_and_cleans_up(tmp_path: Path) -> None:
    plan_path, _ = make_plan(tmp_path, "h100-l4")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        # The second instance gets the blocked port; the others must be stopped when it fails.
        proc = subprocess.run(capbalancer("deploy", "--plan", str(plan_path), "--target", "local", "--engine", "sim",
                                          "--out", str(tmp_path / "out"), "--base-port", str(port - 1),
                                          "--proxy-port", str(free_port()),
                                          "--ready-timeout", "30"), capture_output=True, text=True, timeout=90)
    finally:
        blocker.close()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "exited with" in proc.stdout and "stopped 6 instance(s)" in proc.stdout
