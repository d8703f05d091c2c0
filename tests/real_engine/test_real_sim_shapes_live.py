"""The simulator's vLLM flavour and a live real vLLM answer the same requests with the same shapes:
core routes, metric families (name, type, label keys) and JSON keys of responses, stream chunks and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.real_engine.capture import capture
from tests.real_engine.conftest import VllmPair
from tests.real_engine.shapes import Transcript, diff_transcripts
from tests.real_engine.sim_server import sim_server

pytestmark = pytest.mark.real_engine


def test_sim_and_live_real_vllm_agree_on_api_shapes(vllm_pair: VllmPair, tmp_path: Path) -> None:
    capture(vllm_pair.small.url, tmp_path / "real", "real-")
    with sim_server() as url:
        capture(url, tmp_path / "sim", "sim-")
    real = Transcript.load(tmp_path / "real", "real-")
    sim = Transcript.load(tmp_path / "sim", "sim-")
    assert "POST /v1/completions" in real.routes  # the live capture read the real route table
    assert diff_transcripts(real, sim) == []
