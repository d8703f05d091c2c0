"""`capbalancer demo` end to end: a real sim cluster, the real proxy twice, the same load through each."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from support import capbalancer

from capbalancer.loadtest.report import check_document


@pytest.mark.slow
def test_demo_capacity_beats_round_robin_within_90_s(tmp_path: Path):
    out = tmp_path / "demo.json"
    png = tmp_path / "demo.png"
    t0 = time.monotonic()
    proc = subprocess.run(capbalancer("demo", "--quiet", "--json", str(out), "--plot", str(png),
                                      "--logs", str(tmp_path / "logs")),
                          capture_output=True, text=True, timeout=150)
    elapsed_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed_s < 90, f"demo took {elapsed_s:.0f} s"
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:5] == ["policy", "done", "failed", "req/s", "tok/s"]
    assert lines[2].startswith("round_robin") and lines[3].startswith("capacity")
    docs = json.loads(out.read_text())
    assert set(docs) == {"round_robin", "capacity"}
    for doc in docs.values():
        assert check_document(doc) == []
    rr, cap = docs["round_robin"], docs["capacity"]
    # Same load through both: same seed, so the same requests were sent.
    assert [r["prompt_len"] for r in rr["requests"]] == [r["prompt_len"] for r in cap["requests"]]
    # Round robin spreads evenly over unequal GPUs; capacity does not.
    assert all(abs(b["share"] - 1 / 3) < 0.05 for b in rr["backends"].values()) and len(rr["backends"]) == 3
    assert cap["backends"]["h100-0"]["share"] > 0.6
    # The point of the demo: more requests within the SLO, and a far shorter TTFT tail.
    assert cap["summary"]["request_goodput"] > 1.3 * rr["summary"]["request_goodput"]
    assert cap["summary"]["p99_ttft_ms"] < 0.5 * rr["summary"]["p99_ttft_ms"]
    assert png.read_bytes()[:4] == b"\x89PNG"
