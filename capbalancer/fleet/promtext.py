"""Prometheus text exposition (format 0.0.4) parser that reads only the series it is asked for.

Why our own parser and not `prometheus_client.parser.text_string_to_metric_families`: the monitor polls
every backend about once a second and needs eight series out of a vLLM page of ~450 samples (histograms
make up most of it). The library can only parse every line into families, labels and values. We find
the wanted lines with one regex that jumps between newlines and parse only those. Measured with
`.venv/bin/python bench/promparse_speed.py --repeat 9` on the captured real vLLM 0.32 page
(tests/data/real/vllm-cpu-metrics.txt, 55 KB, 457 samples) on a shared 2-core machine (load ~8):
library 14.1 ms/page, our full parse 6.1 ms (2.3x), our selective parse 0.23 ms (61x), the whole vLLM
adapter 0.31 ms (46x). Runs under lighter load gave 43x-124x for the selective parse. That margin, and
a per-poll cost small enough for hundreds of backends on one event loop, are why we keep our own.

Handled: comments (`# HELP`, `# TYPE`, anything after `#`), blank lines, `\\r\\n`, labels with escaped
`\\"`, `\\\\` and `\\n`, values `NaN`/`+Inf`/`-Inf`/exponents, an optional integer timestamp (ms), counters'
`_total` sample names (we match sample names, not family names). Anything malformed on a line we read
raises `ParseError`, and nothing else: a poll loop catches one exception type and keeps running.
Lines of families nobody asked for are not validated; garbage there goes unnoticed by design.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ParseError", "Sample", "parse", "parse_all", "has_sample_prefix"]

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# float() also takes 'infinity', 'nan' and '1_000', which the format does not.
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_UNESCAPE = {"\\": "\\", '"': '"', "n": "\n"}
_SPECIAL_VALUES = {"NaN": math.nan, "+Inf": math.inf, "-Inf": -math.inf, "Inf": math.inf}


class ParseError(ValueError):
    """The text is not valid Prometheus exposition where we read it."""


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float
    timestamp_ms: int | None = None


def parse(text: str, wanted: Iterable[str]) -> dict[str, list[Sample]]:
    """The samples of each wanted sample name (e.g. `vllm:prompt_tokens_total`), in page order.

    Names absent from the page are absent from the result. Only lines that start with a wanted name are
    parsed; the rest of the page is skipped without being split into lines."""
    if not isinstance(text, str):
        raise ParseError(f"expected text, got {type(text).__name__}")
    names = tuple(dict.fromkeys(n for n in wanted if n))
    if not names:
        return {}
    out: dict[str, list[Sample]] = {}
    first, rest = _line_finders(names)
    m = first.match(text)  # the page's first line has no newline before it
    if m is not None:
        out.setdefault(m.group(1), []).append(_parse_line(m.group(0), len(m.group(1))))
    for m in rest.finditer(text):
        out.setdefault(m.group(1), []).append(_parse_line(m.group(0)[1:], len(m.group(1))))
    return out


@functools.lru_cache(maxsize=64)
def _line_finders(names: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """Regexes for whole sample lines of these names. The one for later lines starts with a literal
    newline, which lets the regex engine jump between line starts (about 8x faster than a str.find per
    name on a vLLM page). A name must be followed by '{' or a blank, so `..._waiting` does not match
    `..._waiting_by_reason`; '#' lines never match."""
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    tail = r")[{ \t][^\n]*"
    return re.compile("(" + alternatives + tail), re.compile("\n(" + alternatives + tail)


def parse_all(text: str) -> dict[str, list[Sample]]:
    """Every sample on the page, by sample name (tests, detection and the benchmark use it)."""
    if not isinstance(text, str):
        raise ParseError(f"expected text, got {type(text).__name__}")
    out: dict[str, list[Sample]] = {}
    for lineno, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped or stripped[0] == "#":
            continue
        m = _METRIC_NAME.match(stripped)
        try:
            sample = _parse_line(stripped, m.end() if m is not None else 0)
        except ParseError as exc:
            raise ParseError(f"line {lineno}: {exc}") from None
        out.setdefault(sample.name, []).append(sample)
    return out


def has_sample_prefix(text: str, prefix: str) -> bool:
    """Whether some sample line (not a comment) starts with `prefix`, e.g. `vllm:`."""
    return text.startswith(prefix) or ("\n" + prefix) in text


def _parse_line(line: str, name_len: int) -> Sample:
    """One sample line whose metric name is `line[:name_len]`."""
    if line.endswith("\r"):
        line = line[:-1]
    name = line[:name_len]
    if _METRIC_NAME.fullmatch(name) is None:
        raise ParseError(f"bad metric name in {line[:80]!r}")
    pos = name_len
    labels: dict[str, str] = {}
    if pos < len(line) and line[pos] == "{":
        labels, pos = _parse_labels(line, pos + 1)
    rest = line[pos:].split()
    if not rest or len(rest) > 2 or (pos < len(line) and line[pos] not in " \t"):
        raise ParseError(f"expected 'value [timestamp]' after {name!r} in {line[:80]!r}")
    value = _parse_value(rest[0])
    timestamp_ms: int | None = None
    if len(rest) == 2:
        ts = rest[1]
        digits = ts[1:] if ts[:1] == "-" else ts
        # int() refuses over 4300 digits with a plain ValueError; a millisecond timestamp has at most 19.
        if not digits.isdigit() or not digits.isascii() or len(digits) > 19:
            raise ParseError(f"bad timestamp {ts[:40]!r} for {name!r}")
        timestamp_ms = int(ts)
    return Sample(name, labels, value, timestamp_ms)


def _parse_labels(line: str, pos: int) -> tuple[dict[str, str], int]:
    """Labels from just after '{' to the matching '}'; returns them and the index after '}'."""
    labels: dict[str, str] = {}
    n = len(line)
    while True:
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos < n and line[pos] == "}":
            return labels, pos + 1
        eq = line.find("=", pos)
        if eq < 0:
            raise ParseError(f"unterminated labels in {line[:80]!r}")
        key = line[pos:eq].strip()
        if _LABEL_NAME.fullmatch(key) is None:
            raise ParseError(f"bad label name {key[:40]!r}")
        q = eq + 1
        while q < n and line[q] in " \t":
            q += 1
        if q >= n or line[q] != '"':
            raise ParseError(f"label {key!r} value is not quoted")
        start = q + 1
        close = line.find('"', start)
        if close < 0:
            raise ParseError(f"unterminated value of label {key!r}")
        if line.find("\\", start, close) < 0:
            value = line[start:close]  # fast path: nothing escaped
        else:
            value, close = _unescape(line, start, key)
        if key in labels:
            raise ParseError(f"duplicate label {key!r}")
        labels[key] = value
        pos = close + 1
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos < n and line[pos] == ",":
            pos += 1
        elif pos < n and line[pos] == "}":
            return labels, pos + 1
        else:
            raise ParseError(f"expected ',' or '}}' after label {key!r}")


def _unescape(line: str, start: int, key: str) -> tuple[str, int]:
    """The value of a label whose text has backslash escapes; returns it and the closing quote's index."""
    chars: list[str] = []
    i, n = start, len(line)
    while i < n:
        c = line[i]
        if c == "\\":
            if i + 1 >= n:
                break
            nxt = line[i + 1]
            # The format defines \\, \" and \n; keep any other pair as written, like Prometheus does.
            chars.append(_UNESCAPE.get(nxt, "\\" + nxt))
            i += 2
        elif c == '"':
            return "".join(chars), i
        else:
            chars.append(c)
            i += 1
    raise ParseError(f"unterminated value of label {key!r}")


def _parse_value(token: str) -> float:
    special = _SPECIAL_VALUES.get(token)
    if special is not None:
        return special
    if _FLOAT.fullmatch(token) is None:
        raise ParseError(f"bad sample value {token[:40]!r}")
    return float(token)
