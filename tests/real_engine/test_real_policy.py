"""Through capbalancer, the capacity policy spares the small-KV real vLLM the preemptions round_robin
drives it into, and serves more requests within the SLO (goodput). Figures: bench/real_vllm_policies.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.real_engine.conftest import VllmPair
from tests.support import REPO

pytestmark = pytest.mark.real_engine


def _bench():
    spec = importlib.util.spec_from_file_location("real_vllm_policies", REPO / "bench" / "real_vllm_policies.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_capacity_policy_cuts_preemptions_and_raises_goodput(vllm_pair: VllmPair, tmp_path: Path) -> None:
    bench = _bench()
    backends = {s.name: s.url for s in vllm_pair.both}
    rr, cap = bench.compare(backends, tmp_path, requests=48, concurrency=16)
    print("\n" + bench.markdown([rr, cap]))
    for run in (rr, cap):
        assert run.completed == 48 and run.failed == 0
    # The load really overflows the small cache under round_robin (else the comparison says nothing).
    assert rr.preemptions["small"] > 0
    assert rr.requests_by_backend["small"] == 24  # round_robin splits evenly, blind to KV
    assert cap.total_preemptions < rr.total_preemptions
    assert cap.request_goodput > rr.request_goodput
