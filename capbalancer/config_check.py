"""`check-config`: every error of a config file, not only the first.

The parser (config.py) stops at the first error, which names its key path. To find the next one, the key
is taken out of a copy of the document and the file parsed again, until it parses or nothing more can be
taken out. An error a removal caused (a section emptied by it, named by an enclosing path) is not reported.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from capbalancer.config import Config, ConfigError, parse_config
from capbalancer.yamlfile import read_yaml

MAX_ERRORS = 50
_INDEX = re.compile(r"\[(\d+)\]")


def _steps(data: Any, path: str) -> list[str | int] | None:
    """The keys and list indices of `path` in `data` (keys may contain dots: model names do)."""
    steps: list[str | int] = []
    node, rest = data, path
    while rest:
        if rest.startswith("["):
            m = _INDEX.match(rest)
            if m is None or not isinstance(node, list) or int(m.group(1)) >= len(node):
                return steps if steps else None
            steps.append(int(m.group(1)))
            node, rest = node[int(m.group(1))], rest[m.end():]
        else:
            rest = rest.removeprefix(".")
            if not isinstance(node, dict):
                return steps if steps else None
            # The longest key that the path starts with, followed by a separator or the end.
            match = max((k for k in node if isinstance(k, str) and rest.startswith(k)
                         and rest[len(k):len(k) + 1] in ("", ".", "[")), key=len, default=None)
            if match is None:
                return steps if steps else None
            steps.append(match)
            node, rest = node[match], rest[len(match):]
    return steps


def _remove(data: Any, steps: list[str | int]) -> bool:
    node = data
    for step in steps[:-1]:
        node = node[step]
    last = steps[-1]
    if isinstance(node, dict) and last in node:
        del node[last]
        return True
    if isinstance(node, list) and isinstance(last, int) and last < len(node):
        del node[last]
        return True
    return False


class _Indices:
    """List entries taken out shift the later ones: map the parser's indices back to the file's."""

    def __init__(self) -> None:
        self.deleted: dict[str, list[int]] = {}  # list path (file indices) -> file indices taken out

    def original(self, path: str) -> str:
        out, pos = "", 0
        for m in _INDEX.finditer(path):
            out += path[pos:m.start()]
            j = int(m.group(1))
            for d in sorted(self.deleted.get(out, ())):
                if d <= j:
                    j += 1
            out += f"[{j}]"
            pos = m.end()
        return out + path[pos:]

    def note_removed(self, path: str, steps: list[str | int]) -> str:
        """Record a removal at `path` (parser indices); returns its file path."""
        original = self.original(path)
        if isinstance(steps[-1], int):
            m = list(_INDEX.finditer(original))[-1]
            self.deleted.setdefault(original[:m.start()], []).append(int(m.group(1)))
        return original


def check_config_file(path: str | Path) -> tuple[Config | None, list[ConfigError]]:
    """The parsed config (None if any error) and every error found, in the order the parser meets them."""
    path = Path(path)
    try:
        data = read_yaml(path, ConfigError)
    except ConfigError as exc:
        return None, [exc]
    work = copy.deepcopy(data)
    errors: list[ConfigError] = []
    removed: list[str] = []  # file paths
    indices = _Indices()
    for _ in range(MAX_ERRORS):
        try:
            config = parse_config(copy.deepcopy(work), where=str(path), base_dir=path.resolve().parent)
        except ConfigError as exc:
            key = exc.key_path
            original = indices.original(key)
            caused_by_removal = (any(r == original or r.startswith(original + ".") or r.startswith(original + "[")
                                     for r in removed) if original else bool(removed))
            # A `fleet:` taken out takes its pools with it: what the models then lack follows from that.
            caused_by_removal = caused_by_removal or ("fleet" in removed and original.startswith("models"))
            if not caused_by_removal:
                message = str(exc)
                if original != key:
                    message = message.replace(f": {key}:", f": {original}:", 1)
                errors.append(ConfigError(message, original))
            steps = _steps(work, key) if key else None
            if not steps:
                break
            cut = _path_of(steps)
            if not _remove(work, steps):
                break
            removed.append(indices.note_removed(cut, steps))
            continue
        return (config if not errors else None), errors
    return None, errors


def _path_of(steps: list[str | int]) -> str:
    out = ""
    for step in steps:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out
