"""Roofline estimator: sizes from the spec files, memory fit, and the shipped library stays in sync."""

from __future__ import annotations

import pytest

from capbalancer.profiling.library import SHIPPED_PROFILES_DIR, resolve_profile
from capbalancer.profiling.roofline import (
    DoesNotFit,
    closed_loop_estimate,
    default_limits,
    estimate_by_name,
    estimate_profile,
)
from capbalancer.profiling.specs import load_specs


def test_parameter_counts_match_published_sizes() -> None:
    specs = load_specs()
    published_billions = {"llama-2-7b": 6.74, "llama-2-13b": 13.02, "llama-2-70b": 68.98,
                          "llama-3.1-8b": 8.03, "opt-30b": 29.96}
    for name, billions in published_billions.items():
        assert specs.model(name).total_params / 1e9 == pytest.approx(billions, abs=0.05), name


def test_kv_bytes_per_token_of_the_measured_8b_shape() -> None:
    # gpu-vllm/README.md: 128 KiB per token (2 x 32 layers x 8 KV heads x 128 x 2 B).
    assert load_specs().model("llama-3.1-8b-vocab4096").kv_bytes_per_token == 128 * 1024


def test_kv_capacity_within_2_percent_of_real_h100_and_h200() -> None:
    specs = load_specs()
    model = specs.model("llama-3.1-8b-vocab4096")
    for gpu_name, util, measured in (("h100-80g", 0.45, 175_440), ("h200", 0.85, 856_928), ("h200", 0.13, 32_352)):
        gpu = specs.gpu(gpu_name)
        profile = estimate_profile(gpu, model, 1, None, default_limits(gpu, model, util))
        assert abs(profile.kv_capacity_tokens - measured) / measured < 0.02, (gpu_name, util)


def test_concurrency_one_tpot_close_to_h100_measurement() -> None:
    specs = load_specs()
    model = specs.model("llama-3.1-8b-vocab4096")
    gpu = specs.gpu("h100-80g")
    profile = estimate_profile(gpu, model, 1, None, default_limits(gpu, model, 0.45))
    est = closed_loop_estimate(profile, 1, 512, 128)
    assert est.tpot_seconds == pytest.approx(6.28e-3, rel=0.05)


def test_13b_needs_two_p100s_and_opt30b_needs_four_3090s() -> None:
    with pytest.raises(DoesNotFit, match="short"):
        estimate_by_name("p100-16g", "llama-2-13b", 1)
    assert estimate_by_name("p100-16g", "llama-2-13b", 2).kv_capacity_tokens >= 4096
    with pytest.raises(DoesNotFit):
        estimate_by_name("rtx3090", "opt-30b", 2)
    assert estimate_by_name("rtx3090", "opt-30b", 4).max_model_len == 2048


def test_tp_shrinks_weights_time_and_grows_kv() -> None:
    one = estimate_by_name("a100-80g", "llama-2-13b", 1)
    two = estimate_by_name("a100-80g", "llama-2-13b", 2)
    assert two.kv_capacity_tokens > 2 * one.kv_capacity_tokens  # the second GPU's weight share becomes KV
    assert two.step.fixed_seconds < one.step.fixed_seconds
    assert two.step.prefill_seconds_per_token < one.step.prefill_seconds_per_token


def test_slow_interconnect_costs_more_than_nvlink() -> None:
    nvlink = estimate_by_name("a100-80g", "llama-2-13b", 4, interconnect="nvlink3")
    pcie = estimate_by_name("a100-80g", "llama-2-13b", 4, interconnect="pcie3")
    assert pcie.step.fixed_seconds > nvlink.step.fixed_seconds
    assert pcie.step.prefill_seconds_per_token > nvlink.step.prefill_seconds_per_token


def test_vllm_batch_defaults_differ_by_gpu() -> None:
    assert estimate_by_name("h100-80g", "llama-3.1-8b", 1).max_num_seqs == 1024
    assert estimate_by_name("a100-80g", "llama-3.1-8b", 1).max_num_seqs == 256
    assert estimate_by_name("l4", "llama-3.1-8b", 1).max_num_batched_tokens == 2048


def test_shipped_library_matches_the_estimator() -> None:
    """A profile file's name is its path, and regenerating would not change it (data and code in sync)."""
    specs = load_specs()
    paths = sorted(p for p in SHIPPED_PROFILES_DIR.glob("*/*.yaml") if p.parent.name in specs.gpus)
    assert len(paths) > 50
    for path in paths:
        name = str(path.relative_to(SHIPPED_PROFILES_DIR))[: -len(".yaml")]
        profile = resolve_profile(name)
        assert profile.name == name
        if profile.source == "estimated":
            fresh = estimate_by_name(profile.gpu, profile.model, profile.tp, specs)
            assert fresh.kv_capacity_tokens == profile.kv_capacity_tokens, name
            assert fresh.step.fixed_seconds == pytest.approx(profile.step.fixed_seconds), name


def test_required_library_profiles_exist() -> None:
    for name in ("a100-80g/llama-2-13b-tp1", "p100-16g/llama-2-13b-tp2", "rtx3090/opt-30b-tp4",
                 "a100-80g/opt-30b-tp1", "h100-80g/llama-3.1-8b-tp1", "l4/llama-3.1-8b-tp1",
                 "rtx3090/llama-3.1-8b-tp1"):
        assert resolve_profile(name).source == "estimated"
