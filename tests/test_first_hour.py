"""A newcomer's first hour: the mistakes people make first end in one clear line, and the defaults work."""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.request
from pathlib import Path

from tests.support import PYTHON, REPO, capbalancer, free_port, running


def test_make_run_takes_a_port() -> None:
    port = free_port()
    with running(["make", "--no-print-directory", "run", f"PORT={port}", f"PYTHON={PYTHON}"],
                 ready_url=f"http://127.0.0.1:{port}/ready", timeout_s=60, cwd=REPO):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
            assert resp.status == 200


def test_a_busy_port_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run(capbalancer("serve", "--port", str(port)), capture_output=True, text=True,
                             timeout=60, cwd=REPO)
    assert res.returncode == 1
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert f"port {port}" in lines[0] and "already in use" in lines[0] and "--port" in lines[0]
    assert "Traceback" not in res.stderr


def _cli(*args: str, timeout: float = 120, cwd=REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(capbalancer(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_the_wrong_kind_of_cluster_file_names_the_right_one() -> None:
    res = _cli("plan", "--cluster", "deploy/fleets/embedded.yaml")
    assert res.returncode != 0 and "is a fleet file (instances:)" in res.stderr and "machines:" in res.stderr
    for command in ("des", "sim"):
        res = _cli(command, "--cluster", "deploy/clusters/h100-l4.yaml")
        assert res.returncode != 0 and "is a cluster file (machines:)" in res.stderr, res.stderr
        assert "capbalancer plan --cluster deploy/clusters/h100-l4.yaml" in res.stderr
        assert "Traceback" not in res.stderr


def test_deploy_local_without_vllm_is_one_clear_line(tmp_path) -> None:
    plan = tmp_path / "plan.yaml"
    assert _cli("plan", "--cluster", "deploy/clusters/h100-l4.yaml", "--out", str(plan)).returncode == 0
    env = {**os.environ, "PATH": str(Path(PYTHON).parent)}  # the venv's bin: no `vllm` there
    res = subprocess.run(capbalancer("deploy", "--plan", str(plan), "--target", "local", "--out", str(tmp_path / "o")),
                         capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert res.returncode == 2
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "`vllm` is not installed" in lines[0] and "--engine sim" in lines[0], lines


def test_des_out_of_the_box_is_sized_to_its_fleet_and_ends_with_a_verdict() -> None:
    res = _cli("des", "--cluster", "deploy/fleets/embedded.yaml", "--workload", "n=300")
    assert res.returncode == 0, res.stderr
    first, last = res.stdout.splitlines()[0], res.stdout.splitlines()[-1]
    assert "= 80% of the fleet's ideal" in first
    assert last.startswith("verdict: ") and "capacity keep" in last and "best goodput capacity" in last, last


def test_check_config_lists_every_error(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "server: {port: 99999, colour: blue}\n"
        "models:\n"
        "  llama-3.1-8b:\n"
        "    policy: nope\n"
        "    backends:\n"
        "      - {url: 'not a url', name: a}\n"
        "      - {url: 'http://10.0.0.2:8000', name: b, enginee: vllm}\n"
        "      - {url: 'http://10.0.0.3:8000', name: c}\n"
        "  other: {backends: []}\n")
    res = _cli("check-config", str(bad))
    assert res.returncode == 1
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    paths = [ln.split(": ")[2] for ln in errors]
    assert paths == ["server.colour", "server.port", "models.llama-3.1-8b.policy",
                     "models.llama-3.1-8b.backends[0].url", "models.llama-3.1-8b.backends[1].enginee",
                     "models.other.backends"], errors
    assert res.stderr.splitlines()[-1] == "6 error(s)"
    ok = _cli("check-config", "deploy/capbalancer.example.yaml")
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1] == "ok"


def test_loadtest_plot_has_slo_lines_and_backends_and_failures_print_no_latency(tmp_path) -> None:
    from PIL import Image

    port = free_port()
    png = tmp_path / "run.png"
    with running(capbalancer("serve", "--port", str(port)), ready_url=f"http://127.0.0.1:{port}/ready", timeout_s=60):
        res = _cli("loadtest", f"http://127.0.0.1:{port}", "--num-requests", "12", "--request-rate", "6",
                   "--output-len", "8", "--prompt-len", "64", "--slo", "ttft=2000,tpot=100", "--plot", str(png),
                   "--quiet")
    assert res.returncode == 0, res.stderr
    description = Image.open(png).info["Description"]
    assert "SLO 2000 ms" in description and "SLO 100 ms" in description
    assert "TTFT by backend (ms): " in description and "sim-a100-0" in description
    dead = free_port()  # nothing listens here: every request fails
    res = _cli("loadtest", f"http://127.0.0.1:{dead}", "--model", "m", "--num-requests", "3", "--quiet")
    assert res.returncode == 1
    assert "No request succeeded" in res.stdout and "0.00" not in res.stdout.split("Time to First Token")[1]


def test_profile_warns_when_the_engine_looks_time_scaled(tmp_path) -> None:
    port = free_port()
    with running(capbalancer("sim", "--engine", "vllm", "--profile", "a100-80g/llama-2-13b-tp1", "--port", str(port),
                             "--time-scale", "2"), ready_url=f"http://127.0.0.1:{port}/health"):
        res = _cli("profile", "--url", f"http://127.0.0.1:{port}", "--engine", "vllm", "--gpu", "a100-80g",
                   "--model", "llama-2-13b", "--max-concurrency", "4", "--decode-tokens", "8",
                   "--out", str(tmp_path / "p.yaml"), timeout=240)
    assert res.returncode == 0, res.stderr
    assert "looks time-scaled" in res.stderr and "--time-scale 2" in res.stderr, res.stderr
