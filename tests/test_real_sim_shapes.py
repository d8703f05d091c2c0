"""The simulator's vLLM flavour against pages captured from a real vLLM 0.32 (tests/data/real/): same core
routes, the same metric families with the same types and label keys, the same JSON keys in responses,
stream chunks and errors. Runs in the normal suite (no vLLM needed);
tests/real_engine/test_real_sim_shapes_live.py does the same against a live real server.
Print the current differences with `.venv/bin/python -m tests.real_engine.shapes`."""

from __future__ import annotations

from pathlib import Path

from tests.real_engine.capture import DATA, capture
from tests.real_engine.shapes import CORE_ROUTES, Transcript, diff_transcripts, parse_families
from tests.real_engine.sim_server import sim_server


def test_sim_matches_captured_real_vllm_shapes(tmp_path: Path) -> None:
    with sim_server() as url:
        capture(url, tmp_path, "sim-")
    real, sim = Transcript.load(DATA), Transcript.load(tmp_path, "sim-")
    assert CORE_ROUTES <= sim.routes
    # The families the fleet adapters read are among those the sim serves, so the diff covers them.
    families = parse_families(sim.metrics)
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:num_preemptions_total", "vllm:cache_config_info"):
        assert name in families
    assert diff_transcripts(real, sim) == []


def test_diff_catches_a_renamed_metric_and_a_dropped_key() -> None:
    # The diff itself must be able to fail: a sim page with a misnamed label and a response missing usage.
    real = Transcript.load(DATA)
    broken_metrics = real.metrics.replace('model_name="tiny-llama"', 'model="tiny-llama"')
    broken = Transcript(**{**real.__dict__, "metrics": broken_metrics,
                           "completion": {k: v for k, v in real.completion.items() if k != "usage"}})
    problems = diff_transcripts(real, broken)
    assert any(p.startswith("metrics: vllm:num_requests_running label keys") for p in problems)
    assert "completion: key usage missing in sim" in problems
