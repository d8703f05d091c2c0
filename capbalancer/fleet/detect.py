"""Which engine a backend runs ("auto" in config), from what it serves.

Order: the metric-name prefixes on /metrics (`vllm:`, `sglang:`, `tgi_`), then TGI's `/info`, then
SGLang's `/get_model_info`, else a plain OpenAI-compatible server. The pure functions here decide from
responses; the monitor does the I/O and retries while the backend cannot answer, because a backend
that is down says nothing about what it is.
"""

from __future__ import annotations

from typing import Any

from capbalancer.fleet.promtext import has_sample_prefix

__all__ = ["engine_from_metrics", "engine_from_info", "engine_from_model_info", "tgi_info_capacity"]

# vLLM before SGLang: an SGLang server never prints vllm: series, but a vLLM page may carry foreign
# families from the process (python_*, http_*), never sglang: or tgi_.
_PREFIXES = (("vllm:", "vllm"), ("sglang:", "sglang"), ("tgi_", "tgi"))


def engine_from_metrics(text: str) -> str | None:
    for prefix, engine in _PREFIXES:
        if has_sample_prefix(text, prefix):
            return engine
    return None


def engine_from_info(body: Any) -> str | None:
    """TGI's GET /info (router/src/lib.rs `Info`): a `model_id` plus TGI's router fields."""
    if not isinstance(body, dict) or "model_id" not in body:
        return None
    if body.get("router") == "text-generation-router" or "max_total_tokens" in body or "max_input_tokens" in body \
            or "max_batch_total_tokens" in body:
        return "tgi"
    return None


def engine_from_model_info(body: Any) -> str | None:
    """SGLang's GET /get_model_info: `model_path` (and `is_generation`)."""
    if isinstance(body, dict) and "model_path" in body:
        return "sglang"
    return None


def tgi_info_capacity(body: Any) -> int | None:
    """Old TGI (no `tgi_batch_max_total_tokens` gauge) reports its KV budget only in /info."""
    if not isinstance(body, dict):
        return None
    value = body.get("max_batch_total_tokens")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value
