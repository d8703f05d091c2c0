"""Prefix-reusing session workloads (loadtest/sessions.py): prefixes byte-identical across turns, sessions sent
turn after turn to a real simulated engine with x-session-id and the OpenAI user field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import capbalancer, free_port, running

from capbalancer.loadtest.sessions import SessionWorkload, parse_workload_spec
from capbalancer.loadtest.workloads import WorkloadError, parse_length


def _workload(spec: str, seed: int = 0) -> SessionWorkload:
    kind, opts = parse_workload_spec(spec)
    return SessionWorkload(kind, opts, parse_length("30"), seed=seed)


def test_multi_turn_prompts_grow_by_appending() -> None:
    sessions = _workload("multi-turn:turns=4:think=1").sessions()
    for _ in range(5):
        s = next(sessions)
        prompts = [t.prompt for t in s.turns]
        assert len(prompts) >= 2
        for a, b in zip(prompts, prompts[1:], strict=False):
            assert b.startswith(a) and len(b) > len(a)  # the cached prefix is byte-exact
        assert {t.session_id for t in s.turns} == {s.session_id}
        assert s.think_times_s[0] == 0 and all(x >= 0 for x in s.think_times_s)
        assert [m["role"] for m in s.turns[1].messages][:3] == ["system", "user", "assistant"]


def test_shared_prompt_tenants_share_the_system_prompt_and_runs_repeat() -> None:
    w = _workload("shared-prompt:tenants=2:system=200")
    firsts = {}
    for s in _take(w.sessions(), 12):
        tenant = s.session_id.split("-")[0]
        head = s.turns[0].prompt[:700]
        assert firsts.setdefault(tenant, head) == head
    assert len(firsts) == 2
    a = [t.prompt for t in _take(iter(_workload("agentic", seed=3)), 5)]
    b = [t.prompt for t in _take(iter(_workload("agentic", seed=3)), 5)]
    assert a == b


def _take(it, n):
    for _ in range(n):
        yield next(it)


def test_lognormal_option_and_unknown_option() -> None:
    w = _workload("multi-turn:user=lognormal:mean=50:sigma=0.5:max=90:turns=2-3")
    assert w.user_len.describe().startswith("lognormal") and (w.turns.low, w.turns.high) == (2, 3)
    with pytest.raises(WorkloadError):
        _workload("multi-turn:bogus=1")
    with pytest.raises(WorkloadError):
        _workload("nonsense")


@pytest.fixture
def sim_engine():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(capbalancer("sim", "--engine", "vllm", "--profile", "l4/llama-3.1-8b-tp1", "--port", str(port)),
                 ready_url=url + "/health"):
        yield url


def test_sessions_against_a_real_sim_engine(sim_engine, tmp_path) -> None:
    out = tmp_path / "lt.json"
    p = subprocess.run([sys.executable, "-m", "capbalancer.cli", "loadtest", sim_engine, "--api", "chat",
                        "--workload", "multi-turn:turns=3:think=0.05", "--max-concurrency", "3",
                        "--request-rate", "inf", "--num-requests", "12", "--output-len", "5", "--quiet",
                        "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(out.read_text())
    reqs = doc["requests"]
    assert len(reqs) == 12 and all(r["success"] for r in reqs)
    # three users, three turns each, then new sessions: prompts grow within a session
    assert max(r["prompt_len"] for r in reqs) > min(r["prompt_len"] for r in reqs)
    assert doc["config"]["workload"]["kind"] == "multi-turn"
