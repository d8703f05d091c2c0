"""capbalancer profile: recovers a simulated instance's profile, reads engine facts, fits honestly."""

from __future__ import annotations

import random
import subprocess

import pytest
from support import capbalancer, free_port, running

from capbalancer.profiling.fit import StepSample, fit_step_model
from capbalancer.profiling.library import resolve_profile
from capbalancer.profiling.profiler import make_probe_plan, parse_prometheus
from capbalancer.profiling.schema import StepTimeModel, load_profile

TRUE_PROFILE = "a100-80g/llama-2-13b-tp1"


def profile_sim(tmp_path, engine: str, *extra: str, time_scale: float = 2.0) -> tuple[subprocess.CompletedProcess, object]:
    port = free_port()
    out = tmp_path / f"{engine}.yaml"
    with running(capbalancer("sim", "--engine", engine, "--profile", TRUE_PROFILE, "--port", str(port),
                             "--time-scale", str(time_scale)), ready_url=f"http://127.0.0.1:{port}/health"):
        proc = subprocess.run(capbalancer("profile", "--url", f"http://127.0.0.1:{port}", "--engine", engine,
                                          "--gpu", "a100-80g", "--model", "llama-2-13b", "--time-scale",
                                          str(time_scale), "--out", str(out), *extra),
                              capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "looks time-scaled" not in proc.stderr  # --time-scale given: the times are divided by it
    return proc, load_profile(out)


def test_profiling_a_vllm_sim_recovers_its_profile_within_5_percent(tmp_path) -> None:
    # Time scale 4: a sim step's CPU work (a token event per stream) must fit in its real duration even on a
    # host shared by many busy processes, or token delivery falls behind and inflates the step times.
    proc, measured = profile_sim(tmp_path, "vllm", "--max-concurrency", "32", "--decode-tokens", "24", time_scale=4.0)
    truth = resolve_profile(TRUE_PROFILE)
    for name in ("fixed_seconds", "prefill_seconds_per_token", "decode_seconds_per_seq", "context_seconds_per_token"):
        got, want = getattr(measured.step, name), getattr(truth.step, name)
        assert got == pytest.approx(want, rel=0.05), f"{name}: measured {got}, true {want}"
    assert measured.kv_capacity_tokens == truth.kv_capacity_tokens
    assert measured.source == "measured" and measured.fit is not None and measured.fit.r_squared > 0.99
    assert measured.name == TRUE_PROFILE
    assert measured.engine_version  # from /version
    assert measured.engine_flags["block_size"] == "16" and "num_gpu_blocks" in measured.engine_flags
    assert "POOR FIT" not in proc.stderr


def test_profiling_a_tgi_sim_reads_tgi_facts(tmp_path) -> None:
    _, measured = profile_sim(tmp_path, "tgi", "--max-concurrency", "8", "--decode-tokens", "24")
    truth = resolve_profile(TRUE_PROFILE)
    assert measured.kv_capacity_tokens == truth.kv_capacity_tokens  # tgi_batch_max_total_tokens
    assert measured.engine == "tgi" and measured.engine_version  # /info version
    assert "max_concurrent_requests" in measured.engine_flags
    assert measured.step.fixed_seconds == pytest.approx(truth.step.fixed_seconds, rel=0.05)
    assert measured.step.prefill_seconds_per_token == pytest.approx(truth.step.prefill_seconds_per_token, rel=0.05)


def test_probe_plan_respects_max_concurrency_and_the_kv_cache() -> None:
    plan = make_probe_plan(max_concurrency=6, max_model_len=4096, kv_capacity_tokens=None)
    assert max(plan.decode_batches) == 6 and plan.total_requests < 100
    small = make_probe_plan(max_concurrency=64, max_model_len=4096, kv_capacity_tokens=8000)
    assert all(b * (1024 + small.decode_tokens) <= 0.8 * 8000 for b in small.decode_batches)
    short = make_probe_plan(max_concurrency=4, max_model_len=512, kv_capacity_tokens=None)
    assert max(short.prefill_lengths) + short.decode_tokens < 512
    assert max(short.decode_prompt_lengths) + short.decode_tokens < 512


def _synthetic(step: StepTimeModel, noise: float, seed: int = 1) -> list[StepSample]:
    rng = random.Random(seed)
    rows = [(p, 0, 0) for p in (128, 256, 512, 1024, 2048)]
    rows += [(0, b, b * c) for b in (1, 4, 16, 64) for c in (150, 1100)]
    return [StepSample(p, b, c, step.step_seconds(p, b, int(c)) * (1 + rng.gauss(0, noise))) for p, b, c in rows]


def test_fit_recovers_exact_coefficients_and_reports_quality() -> None:
    truth = StepTimeModel(0.012, 90e-6, 40e-6, 3e-7)
    fit = fit_step_model(_synthetic(truth, 0.0))
    for name in ("fixed_seconds", "prefill_seconds_per_token", "decode_seconds_per_seq", "context_seconds_per_token"):
        assert getattr(fit.step, name) == pytest.approx(getattr(truth, name), rel=1e-6)
    assert fit.quality.r_squared == pytest.approx(1.0) and fit.quality.samples == 13 and not fit.poor


def test_fit_never_returns_a_negative_coefficient() -> None:
    truth = StepTimeModel(0.012, 90e-6, 0.0, 3e-7)  # no per-sequence cost: noise would push it below zero
    for seed in range(10):
        fit = fit_step_model(_synthetic(truth, 0.03, seed))
        assert min(fit.step.fixed_seconds, fit.step.prefill_seconds_per_token, fit.step.decode_seconds_per_seq,
                   fit.step.context_seconds_per_token) >= 0


def test_fit_flags_an_engine_the_linear_model_does_not_describe() -> None:
    # Quadratic in the batch (not what the model assumes), plus heavy noise.
    rng = random.Random(3)
    samples = [StepSample(0, b, b * 500, 0.01 + 2e-5 * b * b * (1 + rng.gauss(0, 0.3))) for b in (1, 2, 4, 8, 16, 32, 64, 128)]
    samples += [StepSample(p, 0, 0, 0.01 + 1e-4 * p) for p in (128, 512)]
    assert fit_step_model(samples).poor


def test_estimate_mode_writes_the_roofline_profile(tmp_path) -> None:
    out = tmp_path / "est.yaml"
    proc = subprocess.run(capbalancer("profile", "--estimate", "--gpu", "l4", "--model", "llama-3.1-8b",
                                      "--out", str(out)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert load_profile(out) == resolve_profile("l4/llama-3.1-8b-tp1")
    bad = subprocess.run(capbalancer("profile", "--estimate", "--gpu", "p100-16g", "--model", "llama-2-13b",
                                     "--out", str(out)), capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "short" in bad.stderr


def test_prometheus_parser_reads_info_labels() -> None:
    text = ('# HELP vllm:cache_config_info x\nvllm:cache_config_info{block_size="16",num_gpu_blocks="10965",'
            'engine="0"} 1.0\nvllm:num_requests_running{engine="0",model_name="m"} 3\n')
    rows = parse_prometheus(text)
    assert rows[0] == ("vllm:cache_config_info", {"block_size": "16", "num_gpu_blocks": "10965", "engine": "0"}, 1.0)
    assert rows[1][2] == 3.0


def test_fit_leaves_out_steps_timed_at_zero_instead_of_refusing() -> None:
    # On a busy host a stream's tokens can arrive in one burst: those steps time at 0 s. They carry no
    # information; the fit must use the others and still recover the model.
    truth = StepTimeModel(0.010, 0.0001, 0.0002, 1e-7)
    samples = _synthetic(truth, 0.0) + [StepSample(0, 8, 4000, 0.0), StepSample(0, 16, 8000, 0.0)]
    fit = fit_step_model(samples)
    assert fit.step.fixed_seconds == pytest.approx(truth.fixed_seconds, rel=1e-3)
    assert fit.quality.samples == len(samples) - 2
    with pytest.raises(ValueError, match="measurable duration"):
        fit_step_model([StepSample(0, 8, 4000, 0.0)] * 6)
