"""What observing a request costs the proxy: one access-log line, one OpenTelemetry span.

    .venv/bin/python bench/access_log_cost.py [--lines 50000] [--spans 20000]

The line goes through the real logger and handler into memory (no disk); the span through the SDK with a
synchronous in-memory exporter (the worst case: production uses a batching processor).
"""

from __future__ import annotations

import argparse
import io
import time

from capbalancer.server import access_log, tracing
from capbalancer.server.access_log import RequestRecord


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--spans", type=int, default=20_000)
    args = parser.parse_args()
    access_log.install_handler(io.StringIO())
    now = time.monotonic()
    record = RequestRecord(started_s=now, method="POST", path="/v1/completions", request_id="abc-1", model="m",
                           pool="m", backend="a100-0", retries=0, held_ms=0.0, first_byte_s=now + 0.05,
                           tokens_in=600, tokens_out=200, status=200)
    t = time.perf_counter()
    for _ in range(args.lines):
        access_log.emit(record)
    print(f"access-log line: {(time.perf_counter() - t) / args.lines * 1e6:.1f} us")
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        print("span: opentelemetry-sdk not installed (pip install '.[otel]')")
        return
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    tracer = provider.get_tracer("bench")
    headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    t = time.perf_counter()
    for _ in range(args.spans):
        span, _upstream = tracing.start_span(tracer, "POST", "/v1/completions", headers)
        tracing.end_span(span, record)
    print(f"span (start, attributes, end, in-memory export): {(time.perf_counter() - t) / args.spans * 1e6:.1f} us")


if __name__ == "__main__":
    main()
