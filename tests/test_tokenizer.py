"""A pool with a local tokenizer counts prompt tokens exactly; without one they are estimated from
characters. Observed in the scheduler's own accounting through the admin API, on real processes."""

from __future__ import annotations

import threading

from faults import FaultBackend, Proxy, proxy_config
from tokenizers import Tokenizer, models, pre_tokenizers


def _word_tokenizer(path) -> None:
    # One token per whitespace-separated word: far from the 4-characters-per-token estimate.
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def _held_kv_tokens(tokenizer_path) -> int:
    prompt = " ".join(["supercalifragilistic"] * 50)  # 50 words, 1,049 characters
    return held_kv_tokens(tokenizer_path, "/v1/completions",
                          {"model": "m", "prompt": prompt, "max_tokens": 4, "stream": True})


def held_kv_tokens(tokenizer_path, path: str, body: dict) -> int:
    """The KV tokens the scheduler reserves for `body` (held at a backend that never answers), as the admin
    API shows them: its prompt tokens as the proxy counted them, plus the first output token."""
    with FaultBackend("b0") as b:
        cfg = proxy_config([b], admin_token=True, overrides={"health": {"interval_s": 30.0}})
        if tokenizer_path is not None:
            cfg["models"]["m"]["tokenizer"] = str(tokenizer_path)
        with Proxy(config=cfg, admin_token="adm") as proxy:
            b.set(api="hold")
            done = threading.Thread(target=proxy.request, args=("POST", path, body), daemon=True)
            done.start()
            try:
                for _ in range(100):
                    _, state = proxy.admin("GET", "backends")
                    if state["backends"]["b0"]["inflight"] == 1:
                        break
                return state["backends"]["b0"]["kv_used_estimate_tokens"]
            finally:
                b.release()
                done.join(10)


def test_local_tokenizer_counts_prompt_tokens_exactly(tmp_path):
    path = tmp_path / "tokenizer.json"
    _word_tokenizer(path)
    exact = _held_kv_tokens(path)
    estimated = _held_kv_tokens(None)
    assert 50 <= exact <= 52  # 50 prompt tokens (+ the first output token, once it arrived)
    assert estimated >= 250  # ~1,049 characters / 4


def test_a_missing_tokenizer_file_is_a_config_error_naming_the_key(tmp_path):
    import pytest

    from capbalancer.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"models\.m\.tokenizer: no tokenizer file at"):
        parse_config({"models": {"m": {"tokenizer": "nope.json", "backends": [{"url": "http://127.0.0.1:1"}]}}},
                     where="cfg.yaml", base_dir=tmp_path)
