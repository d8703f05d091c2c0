"""Reading the project's YAML files (config, fleet, profiles, plans, clusters, specs) with one kind of error.

Errors name the file and say what and where is wrong, never quoting the file: PyYAML's own message prints
the offending line, which in a config file may hold an API key, and these messages reach logs and the
admin API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def yaml_error_summary(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or "syntax error"
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def read_yaml(path: str | Path, error: type[Exception]) -> Any:
    """The parsed document at `path`; unreadable or invalid files raise `error` with a clear message."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {yaml_error_summary(exc)}") from None
