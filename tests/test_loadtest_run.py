"""Load tests against real backend processes on 127.0.0.1: timing, error kinds, the CLI and its JSON."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
from pathlib import Path

import pytest
from faults import FaultBackend
from support import capbalancer, free_port

from capbalancer.loadtest.report import check_document
from capbalancer.loadtest.runner import LoadtestConfig, run_loadtest
from capbalancer.loadtest.stats import Slo
from capbalancer.loadtest.workloads import SyntheticWorkload, parse_length


def workload(output_len: int = 10) -> SyntheticWorkload:
    return SyntheticWorkload(parse_length("50"), parse_length(str(output_len)), seed=1)


def run(url: str, **kw) -> object:
    kw.setdefault("workload", workload())
    kw.setdefault("request_timeout_s", 20.0)
    return asyncio.run(run_loadtest(LoadtestConfig(url=url, **kw)))


@pytest.fixture(scope="module")
def paced():
    # 10 chunks, first after 200 ms, then one every 50 ms: TTFT ≈ 200 ms, TPOT = ITL ≈ 50 ms.
    with FaultBackend("paced", chunks=10, chunk_delay_s=0.05, first_byte_delay_s=0.2,
                      response_headers={"x-capbalancer-backend": "paced-0"}) as b:
        yield b


@pytest.mark.parametrize("api", ["completions", "chat", "tgi"])
def test_stream_timing_matches_the_server_pacing(paced: FaultBackend, api: str):
    result = run(paced.url, api=api, model="m", num_requests=6, slo=Slo(ttft_ms=1000, tpot_ms=200))
    s = result.summary
    assert s["completed"] == 6 and s["failed"] == 0
    assert all(r.output_tokens == 10 and r.output_tokens_source == "events" for r in result.records)
    # Generous upper bounds: 2 shared cores add scheduling delay, never remove any.
    assert 190 <= s["mean_ttft_ms"] <= 450
    assert 45 <= s["mean_tpot_ms"] <= 120
    assert 45 <= s["median_itl_ms"] <= 120
    assert s["mean_e2el_ms"] == pytest.approx(s["mean_ttft_ms"] + 9 * s["mean_tpot_ms"], rel=0.01)
    assert s["request_goodput"] == pytest.approx(s["request_throughput"])
    assert result.backends == {"paced-0": pytest.approx({
        "requests": 6, "share": 1.0, "completed": 6, "output_tokens": 60, "mean_ttft_ms": s["mean_ttft_ms"],
        "p99_ttft_ms": s["p99_ttft_ms"], "mean_tpot_ms": s["mean_tpot_ms"], "good_requests": 6})}


def test_request_body_carries_the_output_budget(paced: FaultBackend):
    paced.reset()
    run(paced.url, model="m", num_requests=2, ignore_eos=True,
        workload=SyntheticWorkload(parse_length("12"), parse_length("7"), seed=0))
    bodies = [json.loads(r["body"]) for r in paced.stats()["recent"] if r["path"] == "/v1/completions"]
    assert len(bodies) == 2
    for body in bodies:
        assert body["max_tokens"] == 7 and body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True} and body["model"] == "m"
        assert len(body["prompt"].split()) == 12


def test_open_loop_rate_and_closed_loop_concurrency():
    with FaultBackend("fast", chunks=3, chunk_delay_s=0.2) as b:
        # 30 requests at 15/s: the last one leaves about 2 s after the first.
        t0 = time.perf_counter()
        result = run(b.url, model="m", num_requests=30, request_rate_per_s=15.0, seed=2)
        assert result.summary["completed"] == 30
        last_start = max(r.start_s for r in result.records)
        assert 1.2 <= last_start <= 3.5
        assert time.perf_counter() - t0 < 10
        # Closed loop of 3 users for 2 s: never more than 3 in flight at the server.
        b.reset()
        result = run(b.url, model="m", duration_s=2.0, max_concurrency=3)
        assert result.stopped_by == "duration"
        assert b.stats()["max_inflight"] <= 3
        assert result.summary["max_concurrent_requests"] == 3
        assert result.summary["completed"] >= 6  # ~0.4 s each, 3 at a time, for 2 s
        assert max(r.start_s for r in result.records) < 2.0


@pytest.mark.parametrize("knobs,kind", [
    ({"api": "status", "status": 503}, "http_503"),
    ({"api": "status", "status": 429}, "http_429"),
    ({"api": "hang"}, "timeout"),
    ({"api": "stall", "after_chunks": 2}, "timeout"),
    ({"api": "die", "after_chunks": 2}, "disconnect"),
])
def test_errors_are_classified_by_kind(knobs: dict, kind: str):
    with FaultBackend("faulty", chunks=5, **knobs) as b:
        result = run(b.url, model="m", num_requests=2, request_timeout_s=1.5)
    assert result.summary["completed"] == 0
    assert result.errors == {kind: 2} if kind != "disconnect" else result.errors.get("disconnect", 0) >= 1
    first = result.records[0]
    assert not first.success and first.error_detail


def test_refused_connection_is_a_connect_error_and_the_run_still_ends():
    result = run(f"http://127.0.0.1:{free_port()}", model="m", num_requests=3)
    assert result.errors == {"connect": 3}
    assert result.summary["completed"] == 0 and result.summary["failed"] == 3


def test_cli_json_document_and_plot(paced: FaultBackend, tmp_path: Path):
    out = tmp_path / "run.json"
    png = tmp_path / "run.png"
    proc = subprocess.run(
        capbalancer("loadtest", paced.url, "--num-requests", "8", "--request-rate", "20", "--prompt-len",
                    "uniform:20:40", "--output-len", "10", "--slo", "ttft=1000,tpot=300", "--json", str(out),
                    "--plot", str(png), "--percentiles", "50,90,99.9", "--quiet"),
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Request goodput (req/s):" in proc.stdout and "paced-0" in proc.stdout
    doc = json.loads(out.read_text())
    assert check_document(doc) == []
    assert doc["config"]["model"] == "m"  # discovered from GET /v1/models
    assert doc["summary"]["completed"] == 8 and "p99.9_ttft_ms" in doc["summary"]
    assert len(doc["requests"]) == 8 and doc["requests"][0]["itl_s"]
    assert doc["backends"]["paced-0"]["share"] == 1.0
    assert sum(doc["timeline"]["output_tokens_per_s"]) == pytest.approx(80.0)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert check_document({"schema": "other"}) != []


def test_cli_without_matplotlib_says_how_to_get_it(paced: FaultBackend, tmp_path: Path):
    blocker = tmp_path / "block"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('blocked for a test')\n")
    import os
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    proc = subprocess.run(capbalancer("loadtest", paced.url, "--num-requests", "1", "--plot",
                                      str(tmp_path / "x.png"), "--quiet"),
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    assert "pip install 'capbalancer[plot]'" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_cli_refuses_an_unbounded_run(paced: FaultBackend):
    proc = subprocess.run(capbalancer("loadtest", paced.url, "--duration", "5", "--quiet"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "without limit" in proc.stderr


def test_trace_replay_keeps_the_recorded_spacing(paced: FaultBackend):
    from capbalancer.loadtest.workloads import load_trace
    trace = load_trace(Path(__file__).parent / "data" / "workloads" / "trace.jsonl")
    result = run(paced.url, model="m", workload=trace, num_requests=3, trace_speed=2.0)
    starts = [r.start_s for r in result.records]
    assert result.summary["completed"] == 3
    assert starts[1] - starts[0] == pytest.approx(0.25, abs=0.1)
    assert starts[2] - starts[0] == pytest.approx(0.625, abs=0.1)
    assert not math.isinf(result.duration_s)


def test_progress_bar_shows_completed_in_flight_errors_and_rate(paced: FaultBackend):
    import io

    from capbalancer.loadtest.progress import ProgressBar
    stream = io.StringIO()
    bar = ProgressBar(6, None, label="t", stream=stream, enabled=True)
    asyncio.run(run_loadtest(LoadtestConfig(url=paced.url, model="m", workload=workload(), num_requests=6,
                                            request_rate_per_s=8.0), progress=bar, progress_interval_s=0.05))
    bar.close()
    text = stream.getvalue()
    assert "6/6" in text and "in_flight=" in text and "errors=0" in text and "req/s=" in text
    assert ProgressBar(6, None, stream=io.StringIO()).enabled is False  # not a terminal: no bar
