"""One OpenTelemetry span per gateway request, exported over OTLP/HTTP when an endpoint is set.

The span is made when the request is over, with its real start and end times and everything
the exchange learnt (model, key, tokens), so tracing adds nothing to the request's path; export
runs in the SDK's background thread. A client's W3C `traceparent` makes the span its child.
Needs the `otel` extra (opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http); the app
imports this module only when tracing is configured.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import Scope

from qwenstack.gateway.exchange import Exchange


class RequestTracer:
    def __init__(self, endpoint: str, service_name: str) -> None:
        endpoint = endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("qwenstack.gateway")

    def record(
        self,
        scope: Scope,
        request_id: str,
        status: int,
        start_ns: int,
        end_ns: int,
        exchange: Exchange | None,
    ) -> None:
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        method = scope["method"]
        # A matched route has set "endpoint"; its path is then the route (there are no path
        # parameters). Unmatched paths stay out of the span name, which must stay low-cardinality.
        name = f"{method} {scope['path']}" if "endpoint" in scope else method
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": scope["path"],
            "http.response.status_code": status,
            "qwenstack.request_id": request_id,
        }
        if exchange is not None:
            attributes |= {
                "gen_ai.request.model": exchange.model,
                "qwenstack.key": exchange.caller.name,
                "gen_ai.usage.input_tokens": exchange.prompt_tokens,
                "gen_ai.usage.output_tokens": exchange.completion_tokens,
            }
            if exchange.first_chunk_s is not None:
                attributes["qwenstack.time_to_first_token_s"] = exchange.first_chunk_s
        span = self.tracer.start_span(
            name,
            context=extract(headers),
            kind=SpanKind.SERVER,
            start_time=start_ns,
            attributes=attributes,
        )
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        """Export what is still buffered."""
        self.provider.shutdown()
