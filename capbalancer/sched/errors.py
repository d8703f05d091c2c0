"""The scheduler's own error, in a module of its own: it subclasses KeyError (an unknown pool or backend is a
missing key), which a mypyc-compiled module cannot define as a native class, so this one is never compiled
(bench/results/compiled.md)."""

from __future__ import annotations


class SchedulerError(KeyError):
    pass
