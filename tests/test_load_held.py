"""Load held (issue 7 §3), the in-suite size: 2,000 concurrent open streams on one proxy process, 1,600
streaming through it and 400 waiting in its hold queue, then all released and read to the end.
bench/concurrency.py runs the same at 10,000 (figures in docs/reliability.md).

Asserted: every stream completes; the proxy's RSS stays bounded; after the run no client socket is
left and every remaining socket is an idle keep-alive connection in an upstream pool (no fd leak).
"""

from __future__ import annotations

import sys

from support import REPO

sys.path.insert(0, str(REPO / "bench"))

from concurrency import run  # noqa: E402

STREAMS = 2000
HELD = 400


def test_2000_concurrent_open_streams_bounded_memory_no_fd_leak():
    report = run(STREAMS, n_backends=2, n_workers=2, held=HELD, open_timeout_s=120.0, verbose=False)
    print("\nload held:", report)
    assert report["proxy_alive"]
    # All open at once: streaming on the backends through the proxy, or held in its queue.
    assert report["open_on_backends"] + report["held_in_proxy"] == STREAMS, report
    assert report["held_in_proxy"] >= HELD // 2, report  # the hold queue really carried part of the load
    assert report["during"]["client"] == STREAMS, report
    assert report["outcome"] == {"complete": STREAMS}, report
    # Bounded memory: well under 100 KiB per open stream over the idle process.
    grown_kb = report["during"]["rss_kb"] - report["before"]["rss_kb"]
    assert grown_kb < STREAMS * 100, report
    # No leak: no client socket left; the rest of the growth is idle pooled upstream connections.
    after = report["after"]
    assert after["client"] == 0, report
    assert after["fds"] - after["upstream"] <= report["before"]["fds"] + 4, report
    assert after["upstream"] <= report["open_on_backends"] + 8, report
