"""The Prometheus text parser: agreement with prometheus_client, edge cases, and garbage → ParseError only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from capbalancer.fleet.promtext import ParseError, Sample, has_sample_prefix, parse, parse_all

DATA = Path(__file__).parent / "data"
PAGES = [DATA / "real" / "vllm-cpu-metrics.txt", DATA / "real" / "vllm-cpu-metrics-loaded.txt",
         *sorted((DATA / "metrics").glob("*.txt"))]
VALID_PAGES = [p for p in PAGES if p.name not in ("garbage-html.txt", "vllm-truncated.txt")]


def _base(name: str) -> str:
    # The library renames a counter's samples to end in _total even where the page (TGI) does not.
    return name[:-6] if name.endswith("_total") else name


def _library_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(_base(s.name), dict(s.labels), s.value) for f in text_string_to_metric_families(text)
            for s in f.samples]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("page", VALID_PAGES, ids=lambda p: p.name)
def test_full_parse_agrees_with_prometheus_client(page: Path) -> None:
    text = page.read_text()
    ours = sorted(((_base(s.name), s.labels, s.value) for v in parse_all(text).values() for s in v), key=repr)
    theirs = sorted(_library_samples(text), key=repr)
    assert len(ours) == len(theirs)
    for (n1, l1, v1), (n2, l2, v2) in zip(ours, theirs, strict=True):
        assert (n1, l1) == (n2, l2) and _same(v1, v2)


@pytest.mark.parametrize("page", VALID_PAGES, ids=lambda p: p.name)
def test_selective_parse_is_the_full_parse_restricted(page: Path) -> None:
    text = page.read_text()
    everything = parse_all(text)
    names = list(everything)[::3] + ["absent_metric", "vllm:num_requests_waiting"]
    got = parse(text, names)
    assert got == {n: everything[n] for n in names if n in everything}


def test_prefix_of_a_longer_name_is_not_matched() -> None:
    text = ('vllm:num_requests_waiting_by_reason{reason="capacity"} 3.0\n'
            'vllm:num_requests_waiting{engine="0"} 2.0\n')
    got = parse(text, ["vllm:num_requests_waiting"])
    assert got == {"vllm:num_requests_waiting": [Sample("vllm:num_requests_waiting", {"engine": "0"}, 2.0)]}


def test_escapes_special_values_timestamps_crlf_and_comments() -> None:
    text = ("# HELP m A help line that mentions m{x=\"1\"} 5\r\n"
            "# TYPE m gauge\r\n"
            "\r\n"
            'm{path="C:\\\\dir\\"q\\"",note="a\\nb",comma="x,y=z"} NaN\r\n'
            "m{a=\"1\"} +Inf 1700000000000\r\n"
            "m -Inf\r\n"
            "m{a=\"2\",} 1.5e+09 -5\r\n"
            "  # indented comment\n"
            "m_total 7")
    got = parse(text, ["m", "m_total"])
    first, second, third, fourth = got["m"]
    assert first.labels == {"path": 'C:\\dir"q"', "note": "a\nb", "comma": "x,y=z"} and math.isnan(first.value)
    assert second == Sample("m", {"a": "1"}, math.inf, 1700000000000)
    assert third == Sample("m", {}, -math.inf)
    assert fourth == Sample("m", {"a": "2"}, 1.5e9, -5)
    assert got["m_total"] == [Sample("m_total", {}, 7.0)]
    assert parse_all(text)["m"] == got["m"]


@pytest.mark.parametrize("line", [
    'm{a="1"',  # unterminated labels
    'm{a="1} 2',  # unterminated value
    "m{a=1} 2",  # unquoted value
    'm{1a="x"} 2',  # bad label name
    'm{a="x",a="y"} 2',  # duplicate label
    'm{a="x"}2',  # no blank before the value
    "m ",  # no value
    "m twelve",
    "m 1_000",
    "m infinity",
    "m 1 2 3",
    "m 1 1.5",  # timestamps are integers
    "m 1 " + "9" * 5000,  # past int()'s digit limit
])
def test_malformed_wanted_line_raises_parse_error(line: str) -> None:
    with pytest.raises(ParseError):
        parse(f"# TYPE m gauge\n{line}\n", ["m"])
    with pytest.raises(ParseError):
        parse_all(f"# TYPE m gauge\n{line}\n")


def test_garbage_in_unwanted_lines_is_not_read() -> None:
    text = "<html>not metrics</html>\nother{{{ 1\nm 3\n"
    assert parse(text, ["m"]) == {"m": [Sample("m", {}, 3.0)]}
    with pytest.raises(ParseError):
        parse_all(text)


def test_empty_and_html_pages() -> None:
    assert parse("", ["vllm:num_requests_running"]) == {}
    assert parse_all("") == {}
    html = (DATA / "metrics" / "garbage-html.txt").read_text()
    assert parse(html, ["vllm:num_requests_running"]) == {}
    with pytest.raises(ParseError):
        parse_all(html)
    with pytest.raises(ParseError):
        parse(b"m 1\n", ["m"])  # type: ignore[arg-type]


def test_truncated_page_inside_a_wanted_series_raises() -> None:
    text = (DATA / "metrics" / "vllm-truncated.txt").read_text()
    with pytest.raises(ParseError):
        parse(text, ["vllm:kv_cache_usage_perc"])
    assert parse(text, ["vllm:num_requests_running"])["vllm:num_requests_running"][0].value == 6.0


def test_sample_prefix_ignores_comments() -> None:
    assert has_sample_prefix("# HELP vllm:x y\nsglang:a 1\n", "sglang:")
    assert not has_sample_prefix("# HELP vllm:x y\nsglang:a 1\n", "vllm:")
    assert has_sample_prefix("tgi_queue_size 0", "tgi_")


_METRIC_CHARS = st.sampled_from(list('mvl:_{}="\\, \t\n\r#0123456789.eE+-NaIf') + ["\u00e9", "\x00"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(_METRIC_CHARS, max_size=200))
def test_random_text_gives_a_result_or_parse_error(text: str) -> None:
    for fn in (lambda: parse(text, ["m", "vllm:x", "m_total"]), lambda: parse_all(text)):
        try:
            result = fn()
        except ParseError:
            continue
        assert all(isinstance(s, Sample) and isinstance(s.value, float) for v in result.values() for s in v)


_PAGE = (DATA / "metrics" / "sglang.txt").read_text()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(_PAGE)), st.integers(0, 40), st.text(max_size=8))
def test_mutated_real_page_gives_a_result_or_parse_error(at: int, cut: int, insert: str) -> None:
    text = _PAGE[:at] + insert + _PAGE[at + cut:]
    try:
        parse(text, ["sglang:num_running_reqs", "sglang:token_usage", "sglang:prompt_tokens_total"])
    except ParseError:
        pass
