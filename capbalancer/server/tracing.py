"""OpenTelemetry spans, one SERVER span per proxied request (optional extra: pip install 'capbalancer[otel]').

A caller's W3C `traceparent` (and `tracestate`) makes the span its child; the engine then receives the
proxy span's own `traceparent`, so an engine that traces (vLLM's --otlp-traces-endpoint) hangs its spans
under the proxy's. Spans carry the access-log fields as attributes (gen_ai.* names where OpenTelemetry's
GenAI conventions have one).

Exporting: spans go to the process's global TracerProvider. If none is configured (no
`opentelemetry-instrument`, no SDK set-up) and tracing is on, an SDK provider exporting OTLP over HTTP is
made, configured by the standard OTEL_EXPORTER_OTLP_* / OTEL_SERVICE_NAME variables.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from capbalancer.server.access_log import RequestRecord

log = logging.getLogger("capbalancer.tracing")
TRACER_NAME = "capbalancer"


class TracingUnavailable(RuntimeError):
    pass


def make_tracer(provider: TracerProvider | None = None) -> Tracer:
    """A tracer from `provider`, else from the global provider (set up for OTLP if nothing else set it)."""
    try:
        from opentelemetry import trace
    except ImportError:
        raise TracingUnavailable("server.tracing needs OpenTelemetry: pip install 'capbalancer[otel]'") from None
    if provider is None:
        provider = trace.get_tracer_provider()
        if type(provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
            try:
                provider = _otlp_provider()
            except ImportError:
                raise TracingUnavailable("server.tracing with no tracer provider set up needs the OpenTelemetry "
                                         "SDK: pip install 'capbalancer[otel]'") from None
            trace.set_tracer_provider(provider)
    return provider.get_tracer(TRACER_NAME)


def _otlp_provider() -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = SdkProvider(resource=Resource.create({"service.name": "capbalancer"}))
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("tracing is on but no OTLP exporter is installed: spans are made and dropped "
                    "(pip install 'capbalancer[otel]')")
        return provider
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def _propagator() -> Any:
    # W3C Trace Context always, whatever OTEL_PROPAGATORS says: it is the header engines and gateways use.
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def start_span(tracer: Tracer, method: str, path: str, headers: Any) -> tuple[Span, dict[str, str]]:
    """Start the request's span (a child of the caller's traceparent, if any). Returns the span and the
    headers (traceparent, tracestate) to send upstream in place of the caller's."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    propagator = _propagator()
    parent = propagator.extract(carrier={k.lower(): v for k, v in headers.items()
                                         if k.lower() in ("traceparent", "tracestate")})
    span = tracer.start_span(f"{method} {path}", context=parent, kind=SpanKind.SERVER,
                             attributes={"http.request.method": method, "url.path": path})
    carrier: dict[str, str] = {}
    propagator.inject(carrier, context=trace.set_span_in_context(span))
    return span, carrier


def end_span(span: Span, record: RequestRecord) -> None:
    from opentelemetry.trace import Status, StatusCode

    from capbalancer.server.access_log import token_count

    attrs: dict[str, Any] = {"http.response.status_code": record.status, "capbalancer.retries": record.retries}
    for key, value in (("capbalancer.request_id", record.request_id), ("gen_ai.request.model", record.model),
                       ("capbalancer.pool", record.pool), ("capbalancer.backend", record.backend),
                       ("capbalancer.held_ms", record.held_ms),
                       ("gen_ai.usage.input_tokens", token_count(record.tokens_in)),
                       ("gen_ai.usage.output_tokens", token_count(record.tokens_out))):
        if value is not None:
            attrs[key] = value
    if record.first_byte_s is not None:
        attrs["capbalancer.ttft_ms"] = round((record.first_byte_s - record.started_s) * 1000.0, 1)
    span.set_attributes(attrs)
    if record.status >= 500 or record.status == 0:
        span.set_status(Status(StatusCode.ERROR, f"status {record.status}"))
    span.end()
