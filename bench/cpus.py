"""Give the proxy cores of its own in a benchmark: `--proxy-cpus 0,1` pins it there, everything else elsewhere.

On a small shared box the proxy, the engines (or the instant backend) and the load generator take turns on
the same cores, so a proxy's figure there is bounded by what the others leave it. On a larger machine the
benchmarks pin the proxy's process group (every worker and every thread) to `--proxy-cpus` and the rest of the
benchmark (this process, hence all it starts from then on) to the other cores, so what is measured is the
proxy with that many cores, as it would run on a host of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def parse_cpus(spec: str) -> set[int]:
    """'0,1' or '0-3,8' -> {0, 1} / {0, 1, 2, 3, 8}."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def keep_off(proxy_cpus: set[int]) -> set[int]:
    """Pin this process (and what it starts later) to every core but the proxy's; the cores left."""
    rest = os.sched_getaffinity(0) - proxy_cpus
    if not rest:
        raise SystemExit(f"--proxy-cpus {sorted(proxy_cpus)} leaves no core for the load generator and backends")
    os.sched_setaffinity(0, rest)
    return rest


def group_stats(pgid: int) -> Iterator[tuple[int, list[str]]]:
    """(pid, /proc/PID/stat fields after the command name) of every live process in process group `pgid`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == pgid:  # field 5 of stat: the process group
            yield int(entry), fields


def pin_group(pgid: int, cpus: set[int]) -> int:
    """Pin every thread of every live process in process group `pgid` to `cpus`; how many threads were pinned.
    Threads and processes started later inherit the mask of the thread that starts them."""
    pinned = 0
    for pid, _ in group_stats(pgid):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), cpus)
                pinned += 1
        except OSError:
            continue  # gone meanwhile
    return pinned
