"""Multi-turn conversations through capbalancer in front of two real vLLMs with prefix caching on (their
default): the default capacity policy serves more within the SLO than round_robin and finds at least 90% of
cache_aware's prefix-cache hit rate, read from the engines' own counters. Figures: bench/real_vllm_prefix_policies.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.real_engine.conftest import VllmPair
from tests.support import REPO

pytestmark = pytest.mark.real_engine


def _bench():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("real_vllm_prefix_policies",
                                                  REPO / "bench" / "real_vllm_prefix_policies.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_capacity_beats_round_robin_and_keeps_cache_awares_hit_rate(vllm_pair: VllmPair, tmp_path: Path) -> None:
    bench = _bench()
    backends = {s.name: s.url for s in vllm_pair.both}
    runs = {r.policy: r for r in bench.compare(backends, tmp_path, requests=60, users=12)}
    print("\n" + bench.markdown(list(runs.values())))
    for run in runs.values():
        assert run.completed == 60 and run.failed == 0
    rr, ca, cap = runs["round_robin"], runs["cache_aware"], runs["capacity"]
    assert rr.hit_rate > 0  # the engines' caches are on and the conversations do hit
    assert cap.request_goodput > rr.request_goodput
    assert cap.hit_rate >= 0.9 * ca.hit_rate
